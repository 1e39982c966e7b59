"""End-to-end tests of TAP on the tiny federation: both stages, reported models, plots, ablations, resume."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fit_tiny
from helpers import read_records as records
from helpers import read_results as results
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tapl.algorithms import TAP
from tapl.cli import main
from tapl.context import ClientContext

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

ROUNDS = 4
SETTINGS = {"rounds": ROUNDS, "eval_every": 2, "finetune_steps": 3}


def run(run_dir: Path, assets: dict[str, Path], *args: str, **federation: Any) -> Path:
    return fit_tiny(run_dir, assets, *args, **{**SETTINGS, **federation})


def checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "state.pt", weights_only=True)


def algorithm_state(checkpoint: Path) -> dict[str, Any]:
    """The server side's state of the algorithm in a checkpoint."""
    return checkpoint_state(checkpoint)["algorithm"]


def client_stores(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Every client's store in a checkpoint (TAP's personal model, hP and undistilled model), by client id."""
    return checkpoint_state(checkpoint)["client_store"]


def same_tensors(a: Any, b: Any) -> bool:
    """Nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_run(expected: Path, actual: Path) -> None:
    for name in ("round-000004", "final"):
        want = load_file(expected / "checkpoints" / name / "server.safetensors")
        got = load_file(actual / "checkpoints" / name / "server.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
        for state in (algorithm_state, client_stores):
            assert same_tensors(state(expected / "checkpoints" / name), state(actual / "checkpoints" / name)), name
    assert records(actual) == records(expected)
    assert records(actual, "post_federation.jsonl") == records(expected, "post_federation.jsonl")
    assert results(actual) == results(expected)


@pytest.fixture(scope="module")
def tap_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("tap") / "run", assets, "--algorithm", "TAP")


@pytest.fixture(scope="module")
def fedavg_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("fedavg") / "run", assets)


def test_results_report_fedavg_fedavg_ft_tap_and_tap_without_distillation(tap_run: Path) -> None:
    final = results(tap_run)
    labels = {key: info["label"] for key, info in final["models"].items()}
    assert labels == {
        "global": "FedAvg",
        "global+FT": "FedAvg+FT",
        "personalized": "TAP",
        "no_distillation": "TAP w/o distillation",
    }
    for model in labels:
        assert {client: set(tasks) for client, tasks in final["per_client"][model].items()} == {
            "0": {"sentiment"},
            "1": {"shapes"},
            "2": {"sentiment", "shapes"},
            "3": {"sentiment", "shapes"},
        }
    table = (tap_run / "results.md").read_text()
    for label in labels.values():
        assert f"| 2 | shapes | {label} |" in table


def test_tap_trains_exactly_fedavgs_global_model(tap_run: Path, fedavg_run: Path) -> None:
    # Stage 1 uploads the trained global slices only, so the server model is FedAvg's, tensor for tensor.
    for name in ("round-000002", "round-000004"):
        tap = load_file(tap_run / "checkpoints" / name / "server.safetensors")
        fedavg = load_file(fedavg_run / "checkpoints" / name / "server.safetensors")
        assert all(torch.equal(tap[k], fedavg[k]) for k in fedavg)
    tap, fedavg = results(tap_run), results(fedavg_run)
    for model in ("global", "global+FT"):
        assert tap["per_client"][model] == fedavg["per_client"][model]
    # ... while its personalized model is its own.
    assert tap["per_client"]["personalized"] != tap["per_client"]["global"]


def test_every_replacement_is_logged_and_plotted(tap_run: Path) -> None:
    logged = [(r["round"], e) for r in records(tap_run) for e in r.get("events", [])]
    assert logged, "the first visit of a client always replaces"
    firsts: dict[tuple[int, str], int] = {}
    for round, event in logged:
        assert event["event"] == "replacement" and event["round"] == round
        assert event["task"] in {"sentiment", "shapes"}
        assert f"head[{event['task']}]" in event["components"]
        firsts.setdefault((event["client"], event["task"]), round)
    visited = {c for r in records(tap_run) for c in r["sampled_clients"]}
    tasks = {0: ["sentiment"], 1: ["shapes"], 2: ["sentiment", "shapes"], 3: ["sentiment", "shapes"]}
    assert {(c, t) for c in visited for t in tasks[c]} <= set(firsts)

    png = (tap_run / "replacements.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    scalars = EventAccumulator(str(tap_run / "tensorboard")).Reload().Tags()["scalars"]
    assert "algorithm/replacements/text,classification" in scalars
    counts = [r["algorithm"]["replacements/text,classification"] for r in records(tap_run)]
    assert counts == sorted(counts) and counts[-1] == sum(1 for _, e in logged if e["task"] == "sentiment")
    # The server side keeps every replacement the clients reported, as logged.
    kept = algorithm_state(tap_run / "checkpoints" / "final")["replacements"]
    assert [(e["client"], e["round"], e["task"]) for e in kept] == [
        (e["client"], round, e["task"]) for round, e in logged
    ]
    # Each visit logs, per task, whether it replaced and the personal model's loss.
    for record in records(tap_run):
        for client, metrics in record["train"].items():
            for task in tasks[int(client)]:
                assert metrics[f"replaced/{task}"] in (0.0, 1.0) and f"personal_loss/{task}" in metrics


def test_stage_two_logs_teacher_and_student_metrics_per_client(tap_run: Path) -> None:
    post = records(tap_run, "post_federation.jsonl")
    assert [r["client"] for r in post] == [0, 1, 2, 3]
    for record in post:
        assert record["round"] == ROUNDS
        val = record["algorithm"]["val"]
        assert set(val) == {"teacher", "student", "no_distillation"}
        assert set(record["finetune_loss"]) == set(val["teacher"])
    assert post[2]["algorithm"]["distill_weights"] == {"sentiment": 1.0, "shapes": 2e-3}


def test_the_engine_checkpoints_every_clients_personal_models(tap_run: Path) -> None:
    stores = client_stores(tap_run / "checkpoints" / "final")
    assert sorted(stores) == ["0", "1", "2", "3"]
    slices = {"0": "sentiment", "1": "shapes"}
    for client, store in stores.items():
        assert {"personal", "undistilled"} <= set(store)
        assert store["personal"].keys() == store["undistilled"].keys()
        if client in slices:  # a client with one task holds that task's head only
            assert {c for c in store["personal"] if c.startswith("head[")} == {f"head[{slices[client]}]"}
    # The server side of TAP holds no client's model.
    assert set(algorithm_state(tap_run / "checkpoints" / "final")) == {"replacements"}


def test_without_distillation_weights_the_student_is_the_no_distillation_model(
    assets: dict[str, Path], tmp_path: Path, tap_run: Path
) -> None:
    run_dir = run(tmp_path / "run", assets, "--algorithm", "TAP", "--algorithm.distill_weights", '{"default": 0.0}')
    stores = client_stores(run_dir / "checkpoints" / "final")
    assert all(same_tensors(store["personal"], store["undistilled"]) for store in stores.values())
    # With the default weights distillation changes the personal model (same data order, same steps).
    stores = client_stores(tap_run / "checkpoints" / "final")
    assert all(not same_tensors(store["personal"], store["undistilled"]) for store in stores.values())


def test_never_replace_ablation_reports_under_its_own_name(assets: dict[str, Path], tmp_path: Path) -> None:
    run_dir = run(tmp_path / "run", assets, "--algorithm", "TAP", "--algorithm.replacement", "never", rounds=2)
    assert not any(r.get("events") for r in records(run_dir))
    final = results(run_dir)
    assert final["algorithm"] == "TAP (never replace)"
    assert final["models"]["personalized"]["label"] == "TAP (never replace)"


def test_resume_mid_stage_one_equals_the_uninterrupted_run(
    assets: dict[str, Path], tmp_path: Path, tap_run: Path
) -> None:
    # A run killed during round 3: checkpoints up to round 2, metrics of round 3 half-written.
    run_dir = tmp_path / "run"
    shutil.copytree(tap_run, run_dir)
    for name in ("round-000003", "round-000004", "final"):
        shutil.rmtree(run_dir / "checkpoints" / name)
    for name in ("results.json", "results.md", "replacements.png", "post_federation.jsonl"):
        (run_dir / name).unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")

    run(run_dir, assets, "--algorithm", "TAP", "--ckpt_path", "last")
    assert_same_run(tap_run, run_dir)


def test_resume_mid_stage_two_equals_the_uninterrupted_run(
    assets: dict[str, Path], tmp_path: Path, tap_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = TAP.post_federation

    def killed_at_client_2(self: TAP, ctx: ClientContext) -> dict[str, Any]:
        if ctx.client.id == 2:
            raise KeyboardInterrupt("killed")
        return original(self, ctx)

    monkeypatch.setattr(TAP, "post_federation", killed_at_client_2)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(run_dir, assets, "--algorithm", "TAP")
    assert [r["client"] for r in records(run_dir, "post_federation.jsonl")] == [0, 1]
    partial = checkpoint_state(run_dir / "checkpoints" / "final")
    assert partial["post_federation"]["done"] == [0, 1] and not partial["finalized"]
    # The stage's work is kept client by client: only clients 0 and 1 hold their undistilled model yet.
    assert sorted(c for c, store in partial["client_store"].items() if "undistilled" in store) == ["0", "1"]

    monkeypatch.setattr(TAP, "post_federation", original)
    run(run_dir, assets, "--algorithm", "TAP", "--ckpt_path", "last")
    assert_same_run(tap_run, run_dir)


def test_tapl_test_reevaluates_every_reported_model(tap_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tap_run, run_dir)
    (run_dir / "results.json").unlink()
    main(["test", "--config", str(tap_run.parent / "run.yaml"), "--run_dir", str(run_dir), "--algorithm", "TAP"])
    assert results(run_dir) == results(tap_run)
