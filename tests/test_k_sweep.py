"""Tests for experiments/k_sweep.py: the generated federations, the relative losses by hand, the plots."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import load_script, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


@pytest.fixture(scope="module")
def k_sweep():
    return load_script("k_sweep")


def test_each_k_keeps_the_clients_and_the_data_budget(k_sweep, assets: dict[str, Path], tmp_path: Path) -> None:
    base = tiny_config(assets, tmp_path / "unused")
    for k in (1, 2):
        config = k_sweep.sweep_config(base, k, 300)
        tasks = config["data"]["tasks"]
        assert [t["name"] for t in tasks] == ["sentiment", "shapes"][:k]
        assert [t["max_rows"] for t in tasks] == [300 // k] * k
        clients = config["data"]["clients"]
        assert sum(c["count"] for c in clients) == 4 and [c["tasks"] for c in clients] == [[t["name"]] for t in tasks]
    with pytest.raises(ValueError, match="fewer than K = 3"):
        k_sweep.sweep_config(base, 3, 300)
    same_pair = {**base, "data": {**base["data"], "tasks": [base["data"]["tasks"][0]] * 2}}
    with pytest.raises(ValueError, match="distinct modality-task pairs"):
        k_sweep.sweep_config(same_pair, 2, 300)


def test_relative_losses_by_hand(k_sweep) -> None:
    records = [
        {"round": 1, "train": {"0": {"train_loss/a": 2.0}, "1": {"train_loss/a": 4.0, "train_loss/b": 0.5}}},
        {"round": 2, "train": {"1": {"train_loss/a": 1.5, "train_loss/b": 0.25}}},
        {"round": 3, "train": {"2": {"proximal_term": 1.0}}},
    ]
    rounds, values = k_sweep.relative_train_loss(records)
    # round 1: every task is its own reference -> 1; round 2: a 1.5 / 3.0, b 0.25 / 0.5 -> 0.5
    assert rounds == [1, 2] and values == pytest.approx([1.0, 0.5])
    evaluated = [
        {"round": 2, "summary": {"global": {"a": {"loss": 2.0}, "b": {"loss": 0.1}}}},
        {"round": 3},
        {"round": 4, "summary": {"global": {"a": {"loss": 1.0}, "b": {"loss": 0.09}}}},
    ]
    rounds, values = k_sweep.relative_val_loss(evaluated)
    assert rounds == [2, 4] and values == pytest.approx([1.0, (0.5 + 0.9) / 2])


def test_the_sweep_runs_each_k_once_and_plots(
    k_sweep, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(assets, tmp_path / "unused", eval_every=1)))
    out = tmp_path / "sweep"
    fit_args = ["--federation.rounds", "2"]
    paths = k_sweep.run_sweep(base, [1, 2], 120, out, fit_args)
    assert [p.name for p in paths] == ["train_loss.png", "val_loss.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    for k in (1, 2):
        saved = yaml.safe_load((out / f"k{k}" / "config.yaml").read_text())
        assert len(saved["data"]["tasks"]) == k and saved["federation"]["rounds"] == 2

    def no_more_runs(args: list[str]) -> None:
        raise AssertionError(f"a finished run was run again: {args}")

    monkeypatch.setattr(k_sweep, "tapl_main", no_more_runs)
    k_sweep.run_sweep(base, [1, 2], 120, out, fit_args)
