"""The README's example plugin (examples/server_momentum.py) works as a user would run it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config

from tapl.cli import main
from tapl.context import ClientUpdate
from tapl.run_dir import RunDirectory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def server_momentum(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import server_momentum

    yield server_momentum
    sys.modules.pop("server_momentum", None)


def test_fedavgm_applies_momentum_to_the_averaged_change(server_momentum) -> None:
    algorithm = server_momentum.FedAvgM(momentum=0.5, server_lr=1.0, weighting="uniform")
    global_state = {"c": {"w": torch.tensor([1.0, 1.0])}}
    first = [
        ClientUpdate(0, {"c": {"w": torch.tensor([0.0, 2.0])}}, 1),
        ClientUpdate(1, {"c": {"w": torch.tensor([0.0, 0.0])}}, 1),
    ]
    # average [0, 1]; delta = old - average = [1, 0]; velocity = [1, 0]; new = [0, 1]
    state = algorithm.aggregate(1, global_state, first)
    assert torch.allclose(state["c"]["w"], torch.tensor([0.0, 1.0]))
    # clients send back [0, 1] unchanged: delta 0, velocity = 0.5 * [1, 0]; new = [0, 1] - [0.5, 0]
    second = [ClientUpdate(0, {"c": {"w": torch.tensor([0.0, 1.0])}}, 1)]
    state = algorithm.aggregate(2, state, second)
    assert torch.allclose(state["c"]["w"], torch.tensor([-0.5, 1.0]))


def test_fedavgm_runs_by_class_path_and_checkpoints_its_velocity(
    server_momentum, assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(assets, run_dir)))
    main(["fit", "--config", str(config), "--algorithm", "server_momentum.FedAvgM", "--algorithm.momentum", "0.8"])
    directory = RunDirectory(run_dir)
    global_state, payload = directory.load_checkpoint(directory.resolve_checkpoint("last"))
    velocity = payload["algorithm"]["velocity"]
    assert set(velocity) == set(global_state)
    assert any(t.abs().sum() > 0 for params in velocity.values() for t in params.values())
    assert (run_dir / "results.json").exists()
