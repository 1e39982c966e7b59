"""Tests for experiments/sweep.py: the grid, the relative training loss by hand, and a sweep end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import load_script, tiny_config


@pytest.fixture(scope="module")
def sweep():
    return load_script("sweep")


def test_the_grid_is_every_combination_in_order(sweep) -> None:
    points = sweep.grid_points(["alpha=0.1,0.2", "outer_optimizer=adam"])
    assert points == [{"alpha": "0.1", "outer_optimizer": "adam"}, {"alpha": "0.2", "outer_optimizer": "adam"}]
    assert sweep.point_name(points[1]) == "alpha=0.2_outer_optimizer=adam"
    assert sweep.grid_points([]) == [{}]
    with pytest.raises(ValueError, match="NAME=V1,V2"):
        sweep.grid_points(["alpha"])


def test_relative_train_loss_compares_each_task_with_itself(sweep) -> None:
    records = [
        {"train": {"0": {"train_loss/a": 2.0, "proximal_term": 9.0}, "1": {"train_loss/a": 4.0}}},
        {"train": {"2": {"train_loss/b": 0.5}}},
        {"train": {"0": {"train_loss/a": 1.5}, "2": {"train_loss/b": 0.25}}},
    ]
    # Task a: 1.5 / mean(2, 4) = 0.5; task b: 0.25 / 0.5 = 0.5; other scalars are not losses.
    assert sweep.relative_train_loss(records) == pytest.approx(0.5)


def test_a_sweep_runs_each_point_and_tabulates_it(
    sweep, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(assets, tmp_path / "unused", rounds=1, finetune_steps=0)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    args = ["--algorithm", "FedProx", "--grid", "mu=0.0,1.0", "--run_dir", str(out), "--", "--config", str(config)]
    sweep.main(args)
    table = (out / "sweep.md").read_text()
    assert "| `mu=0.0` |" in table and "| `mu=1.0` |" in table
    assert "classification accuracy personalized" in table
    assert "sweep: 2 runs" in capsys.readouterr().out
    sweep.main(args)  # finished runs are reused
    assert "sweep: 0 runs" in capsys.readouterr().out
