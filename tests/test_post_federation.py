"""Tests of the engine's post-federation stage (the "+FT" fine-tuning) and of the early end of federation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import BatchCounter, fit_tiny, tiny_config, write_tiny_config
from scripted import engine_context

from tapl.cli import TaplCLI
from tapl.plateau import Plateau
from tapl.run_dir import RunDirError

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


def run(run_dir: Path, assets: dict[str, Path], *args: str, **federation: Any) -> Path:
    return fit_tiny(run_dir, assets, *args, **federation)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_algorithm_with_a_global_model_reports_its_fine_tuned_variant(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = run(tmp_path / "run", assets, finetune_steps=3, finetune_lr=0.05)
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["models"]) == {"global", "global+FT", "personalized"}
    assert results["models"]["global+FT"]["label"] == "FedAvg+FT"
    assert "3 batches at lr 0.05" in results["models"]["global+FT"]["description"]
    assert set(results["per_client"]["global+FT"]) == {"0", "1", "2", "3"}
    # Fine-tuning changed every client's model.
    for client, per_task in results["per_client"]["global+FT"].items():
        for task, values in per_task.items():
            assert values["loss"] != results["per_client"]["global"][client][task]["loss"]
    post = jsonl(run_dir / "post_federation.jsonl")
    assert [r["client"] for r in post] == [0, 1, 2, 3]
    assert set(post[2]["finetune_loss"]) == {"sentiment", "shapes"}
    final = torch.load(run_dir / "checkpoints" / "final" / "state.pt", weights_only=True)
    assert final["post_federation"]["done"] == [0, 1, 2, 3]
    assert sorted(final["engine_store"]) == ["0", "1", "2", "3"]
    assert all(set(store) == {"global+FT"} for store in final["engine_store"].values())
    assert "| 2 | shapes | FedAvg+FT |" in (run_dir / "results.md").read_text()


def test_post_federation_budgets_count_batches_under_gradient_accumulation(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    config = write_tiny_config(assets, tmp_path / "run")
    cli = TaplCLI(args=["--config", str(config), "--trainer.accumulate_grad_batches", "2"], run=False)
    orchestrator = cli.orchestrator
    assert orchestrator is not None
    orchestrator.setup()
    seen = {}
    for stage in ("federation", "post-federation"):
        ctx = engine_context(orchestrator, 0, stage=stage)
        counter = BatchCounter()
        result = ctx.fit(ctx.received, steps=3, callbacks=[counter])
        seen[stage] = (result.steps, counter.batches)
    assert seen["federation"] == (3, 6)  # a round's fit accumulates 2 batches per optimizer step
    assert seen["post-federation"] == (3, 3)  # after the rounds, one step per batch: steps count batches


def test_fine_tuning_can_be_switched_off(assets: dict[str, Path], tmp_path: Path) -> None:
    run_dir = run(tmp_path / "run", assets, finetune_steps=0)
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["models"]) == {"global", "personalized"}
    assert all("finetune_loss" not in r for r in jsonl(run_dir / "post_federation.jsonl"))


def test_tap_refuses_to_run_without_a_teacher(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        run(tmp_path / "run", assets, "--algorithm", "TAP", finetune_steps=0)
    assert "set federation.finetune_steps >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- plateau -------------------------------------------------------------------------------------------------


def test_plateau_needs_window_consecutive_small_relative_changes_of_every_task() -> None:
    plateau = Plateau(window=2, tolerance=0.1)
    assert not plateau.update(1, {"a": 1.0, "b": 10.0})  # nothing to compare with yet
    assert not plateau.update(2, {"a": 0.95, "b": 9.5})  # 5% and 5%: stable once
    assert not plateau.update(3, {"a": 0.5, "b": 9.4})  # a moved by 47%: the count restarts
    assert not plateau.update(4, {"a": 0.48, "b": 9.3})  # stable once
    assert plateau.update(5, {"a": 0.47, "b": 9.2})  # stable twice: stop after round 5
    assert plateau.stopped_at == 5
    restored = Plateau(window=2, tolerance=0.1)
    restored.load_state_dict(plateau.state_dict())
    assert restored.stopped_at == 5 and restored.update(6, {"a": 100.0, "b": 0.0})


def test_plateau_at_exactly_the_tolerance_is_not_stable_and_window_zero_never_stops() -> None:
    plateau = Plateau(window=1, tolerance=0.5)
    plateau.update(1, {"a": 2.0})
    assert not plateau.update(2, {"a": 1.0})  # a relative change of exactly 0.5
    assert plateau.update(3, {"a": 0.75})  # 0.25
    off = Plateau(window=0)
    assert not any(off.update(r, {"a": 1.0}) for r in range(1, 10))
    with pytest.raises(ValueError, match="plateau"):
        Plateau(window=-1)


def test_a_stable_validation_loss_ends_federation_early(assets: dict[str, Path], tmp_path: Path) -> None:
    # A tolerance of 100x counts any change as stable: the second evaluation (round 2) stops federation.
    settings = {"rounds": 6, "eval_every": 1, "plateau_window": 1, "plateau_tolerance": 100.0}
    run_dir = run(tmp_path / "run", assets, **settings)
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in metrics] == [1, 2]
    assert "stopped" in metrics[-1] and "stopped" not in metrics[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["round"] == 2 and results["stopped_early"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["final", "round-000001", "round-000002"]
    assert [r["round"] for r in jsonl(run_dir / "post_federation.jsonl")] == [2, 2, 2, 2]

    # Resuming a run that stopped early does not start round 3.
    before = (run_dir / "results.json").read_text()
    run(run_dir, assets, "--ckpt_path", "last", **settings)
    assert [r["round"] for r in jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert (run_dir / "results.json").read_text() == before


def test_more_rounds_cannot_follow_a_post_federation_checkpoint(assets: dict[str, Path], tmp_path: Path) -> None:
    run_dir = run(tmp_path / "run", assets, rounds=1)
    config = run_dir.parent / "more.yaml"
    config.write_text(yaml.safe_dump(tiny_config(assets, run_dir, rounds=2)))
    orchestrator = TaplCLI(args=["--config", str(config)], run=False).orchestrator
    assert orchestrator is not None
    with pytest.raises(RunDirError, match="round-000001"):
        orchestrator.fit(str(run_dir / "checkpoints" / "final"))


def test_held_out_clients_never_train_and_are_summarized_apart(assets: dict[str, Path], tmp_path: Path) -> None:
    run_dir = run(tmp_path / "run", assets, rounds=4, eval_every=2, holdout_clients=[3])
    records = jsonl(run_dir / "metrics.jsonl")
    assert all(3 not in r["sampled_clients"] and len(r["sampled_clients"]) == 2 for r in records)
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["per_client"]["global"]) == {"0", "1", "2", "3"}  # every client is evaluated
    # Participating summaries: clients 0, 2 hold sentiment; held-out: client 3 alone.
    assert results["summary"]["global"]["sentiment"]["clients"] == 2
    held_out = results["held_out"]
    assert held_out["clients"] == [3]
    assert held_out["summary"]["global"]["sentiment"]["clients"] == 1
    assert (
        held_out["summary"]["global"]["sentiment"]["accuracy"]
        == results["per_client"]["global"]["3"]["sentiment"]["accuracy"]
    )
    assert held_out["distribution"]["task_type"]["global"]["classification"]["accuracy"]["values"] == 2
    assert "held_out" in records[-1] and records[-1]["summary"]["global"]["shapes"]["clients"] == 2
    assert "## Held-out clients [3]" in (run_dir / "results.md").read_text()
    # After the rounds a held-out client is fine-tuned like the others.
    assert [r["client"] for r in jsonl(run_dir / "post_federation.jsonl")] == [0, 1, 2, 3]


def test_holdout_must_name_known_clients_and_leave_some(assets: dict[str, Path], tmp_path: Path) -> None:
    for holdout, message in (([7], "unknown clients"), ([0, 1, 2, 3], "none is left")):
        config = tmp_path / f"{holdout[0]}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(assets, tmp_path / "run", holdout_clients=holdout)))
        with pytest.raises(ValueError, match=message):
            TaplCLI(args=["--config", str(config)], run=False)
