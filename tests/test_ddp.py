"""Data-parallel client visits on CPU: every rank runs the loop and agrees; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

PLUGIN = textwrap.dedent(
    """
    import json
    from pathlib import Path

    import torch.distributed as dist

    from tapl.algorithms import FedAvg


    class RankEcho(FedAvg):
        \"\"\"FedAvg that records, per rank, what each round sampled and aggregated.\"\"\"

        def __init__(self, out: str = ".") -> None:
            super().__init__()
            self.out = Path(out)

        def configure_round(self, round, clients, global_state):
            self.sampled = list(clients)
            return super().configure_round(round, clients, global_state)

        def aggregate(self, round, global_state, results, failures):
            state = super().aggregate(round, global_state, results, failures)
            rank = dist.get_rank() if dist.is_initialized() else 0
            checksum = sum(float(t.double().sum()) for p in state.values() for t in p.values())
            record = {"sampled": self.sampled, "checksum": checksum}
            (self.out / f"rank{rank}_round{round}.json").write_text(json.dumps(record))
            return state
    """
)


@pytest.mark.slow
def test_ddp_ranks_agree_and_only_rank_zero_writes(assets: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "rank_echo.py").write_text(PLUGIN)
    records = tmp_path / "records"
    records.mkdir()
    run_dir = tmp_path / "run"
    config = tiny_config(assets, run_dir, rounds=2)
    config["trainer"] = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
    config["algorithm"] = {"class_path": "rank_echo.RankEcho", "init_args": {"out": str(records)}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "tapl.cli", "fit", "--config", str(config_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for round in (1, 2):
        rank0 = json.loads((records / f"rank0_round{round}.json").read_text())
        rank1 = json.loads((records / f"rank1_round{round}.json").read_text())
        assert rank0 == rank1
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    results = json.loads((run_dir / "results.json").read_text())
    # Every test row is evaluated exactly once: 12 rows per client and task in the tiny federation.
    assert all(v["samples"] == 36 for v in results["summary"]["global"].values())
