"""Golden runs: every built-in algorithm and the example plugin on the tiny federation, against recorded outputs.

The records (``metrics.jsonl``, ``post_federation.jsonl``, ``results.json``) and the final global tensors of each
run are kept in ``tests/golden/<name>/``. A change that is meant to leave the numbers alone (a refactor) must
pass this test unchanged. Numbers are compared to a relative 1e-6 (float kernels may differ in the last bits
between CPUs and library releases), or an absolute 1e-7: a spread (std) of float32 losses near 1 carries their
absolute rounding error, which a relative bound on a small spread magnifies. Wall-clock seconds are left out.
After a change that is meant to change the numbers, rewrite the records with
``TAPL_WRITE_GOLDEN=1 pytest tests/test_golden_runs.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import fit_tiny
from safetensors.torch import load_file

from tapl.run_dir import RunDirectory

GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECORDS = ("metrics.jsonl", "post_federation.jsonl", "results.json")
#: name -> the ``tapl fit`` arguments of the run.
RUNS = {
    "FedAvg": ["--algorithm", "FedAvg"],
    "FedProx": ["--algorithm", "FedProx", "--algorithm.mu", "0.1"],
    "PerFedAvg": ["--algorithm", "PerFedAvg"],
    "Local": ["--algorithm", "Local"],
    "Ditto": ["--algorithm", "Ditto"],
    "FedRep": ["--algorithm", "FedRep"],
    "TAP": ["--algorithm", "TAP", "--algorithm.distill_steps", "2"],
    "FedAvgM": ["--algorithm", "server_momentum.FedAvgM", "--algorithm.momentum", "0.5"],
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def without_time(value: Any) -> Any:
    """``value`` without its wall-clock ``seconds`` fields."""
    if isinstance(value, dict):
        return {k: without_time(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_time(v) for v in value]
    return value


def read(path: Path) -> Any:
    if path.suffix == ".jsonl":
        return [without_time(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return without_time(json.loads(path.read_text()))


def differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected``: numbers beyond a relative 1e-6 and an absolute 1e-7, anything else
    at all."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys():
            return [f"{where}: keys {sorted(expected.keys() ^ actual.keys())} differ"]
        return [d for k in expected for d in differences(expected[k], actual[k], f"{where}/{k}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(actual)} items, expected {len(expected)}"]
        return [
            d for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for d in differences(e, a, f"{where}[{i}]")
        ]
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool):
        if math.isclose(expected, actual, rel_tol=1e-6, abs_tol=1e-7):
            return []
    elif expected == actual:
        return []
    return [f"{where}: {actual!r}, expected {expected!r}"]


@pytest.mark.parametrize("name", list(RUNS))
def test_the_tiny_federation_reproduces_its_golden_run(
    name: str, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    run_dir = fit_tiny(tmp_path / "run", assets, *RUNS[name])
    final = RunDirectory(run_dir).checkpoints / "final" / "server.safetensors"
    golden = GOLDEN / name
    if os.environ.get("TAPL_WRITE_GOLDEN"):
        golden.mkdir(parents=True, exist_ok=True)
        for record in RECORDS:
            shutil.copy(run_dir / record, golden / record)
        shutil.copy(final, golden / "server.safetensors")
    found = [d for record in RECORDS for d in differences(read(golden / record), read(run_dir / record), record)]
    assert not found, "\n".join(found[:20])
    expected, actual = load_file(str(golden / "server.safetensors")), load_file(str(final))
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert (actual[key] - tensor).abs().max() <= 1e-6 * max(1.0, float(tensor.abs().max())), key
