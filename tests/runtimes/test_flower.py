"""The Flower runtime: the same federation on Flower's simulation runtime gives the same run as in-process."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
from helpers import fit_tiny, read_records, read_results

from tapl.algorithms import ClientContext, ClientUpdate, FedAvg
from tapl.run_dir import RunDirectory

HAS_FLOWER = importlib.util.find_spec("flwr") is not None
needs_flower = pytest.mark.skipif(not HAS_FLOWER, reason="Flower is not installed (pip install -e '.[flower]')")


def final_global_state(run_dir: Path) -> dict:
    directory = RunDirectory(run_dir)
    state, _ = directory.load_checkpoint(directory.resolve_checkpoint("last", prefer_final=True))
    return state


@pytest.mark.skipif(HAS_FLOWER, reason="Flower is installed")
def test_the_flower_runtime_without_flower_fails_in_one_line_before_building_anything(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        fit_tiny(tmp_path / "run", assets, "--runtime", "flower")
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "tapl: error: --runtime flower needs Flower: pip install -e '.[flower]'\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@needs_flower
@pytest.mark.parametrize("algorithm", ["FedAvg", "TAP"])
def test_a_run_on_the_flower_simulation_equals_the_in_process_run(
    algorithm: str, assets: dict[str, Path], tmp_path: Path
) -> None:
    started = time.perf_counter()
    inprocess = fit_tiny(tmp_path / "inprocess", assets, "--algorithm", algorithm)
    inprocess_seconds = time.perf_counter() - started
    started = time.perf_counter()
    flower = fit_tiny(tmp_path / "flower", assets, "--algorithm", algorithm, "--runtime", "flower")
    flower_seconds = time.perf_counter() - started

    assert read_records(flower) == read_records(inprocess)
    assert read_records(flower, "post_federation.jsonl") == read_records(inprocess, "post_federation.jsonl")
    assert read_results(flower) == read_results(inprocess)
    expected, got = final_global_state(inprocess), final_global_state(flower)
    assert got.keys() == expected.keys()
    differences = {
        f"{c}/{k}": (got[c][k] - t).abs().max().item() for c, params in expected.items() for k, t in params.items()
    }
    assert set(differences) == {f"{c}/{k}" for c, params in got.items() for k in params}
    print(
        f"{algorithm}: max abs difference of the final global tensors: {max(differences.values())}; "
        f"in-process {inprocess_seconds:.1f} s, Flower simulation {flower_seconds:.1f} s"
    )
    assert max(differences.values()) == 0.0


class CountingAndFailing(FedAvg):
    """FedAvg whose clients count their visits in their store and report the count; client 0 fails in round 2,
    after counting."""

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        ctx.store["visits"] = ctx.store.get("visits", 0) + 1
        if ctx.client.id == 0 and ctx.round == 2:
            raise RuntimeError("client 0 fails in round 2")
        update = super().client_update(ctx)
        update.metrics["visits"] = ctx.store["visits"]
        return update


@pytest.mark.slow
@needs_flower
def test_on_flower_a_store_stays_on_its_node_and_a_failing_client_is_a_failure_of_its_round(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The simulated nodes import this module by name to build the algorithm of the config.
    tests, root = Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(tests), os.environ.get("PYTHONPATH", "")]))
    args = ("--algorithm", f"{__name__}.CountingAndFailing")
    inprocess = fit_tiny(tmp_path / "inprocess", assets, *args, rounds=3, clients_per_round=4)
    flower = fit_tiny(tmp_path / "flower", assets, *args, "--runtime", "flower", rounds=3, clients_per_round=4)

    expected, got = read_records(inprocess), read_records(flower)
    assert [r["train"] for r in got] == [r["train"] for r in expected]
    assert [r["train"]["1"]["visits"] for r in got] == [1, 2, 3]
    assert [r["train"]["0"]["visits"] for r in got if "0" in r["train"]] == [1, 2]  # the failed visit did not count
    assert got[1]["failed_clients"] == {"0": "ClientFailed: RuntimeError: client 0 fails in round 2"}
    assert expected[1]["failed_clients"] == {"0": "RuntimeError: client 0 fails in round 2"}
    for record in (*expected, *got):
        record.pop("failed_clients")
    assert got == expected

    # Its checkpoints hold no client stores: resuming it, in process or on Flower, is refused, not started afresh.
    for runtime in ("inprocess", "flower"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            fit_tiny(
                tmp_path / "flower",
                assets,
                *args,
                "--runtime",
                runtime,
                "--ckpt_path",
                "last",
                rounds=4,
                clients_per_round=4,
            )
        assert stopped.value.code == 1
        assert "those stores are not in it, so it cannot be resumed" in capsys.readouterr().err
