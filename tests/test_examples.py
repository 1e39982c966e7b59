"""The README's example plugin (examples/server_momentum.py) works as a user would run it."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config

from tapl.algorithms import ClientUpdate
from tapl.cli import main
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
    state = algorithm.aggregate(1, global_state, first, [])
    assert torch.allclose(state["c"]["w"], torch.tensor([0.0, 1.0]))
    # clients send back [0, 1] unchanged: delta 0, velocity = 0.5 * [1, 0]; new = [0, 1] - [0.5, 0]
    second = [ClientUpdate(0, {"c": {"w": torch.tensor([0.0, 1.0])}}, 1)]
    state = algorithm.aggregate(2, state, second, [])
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


@pytest.fixture
def model_interpolation(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import model_interpolation

    yield model_interpolation
    sys.modules.pop("model_interpolation", None)


def test_a_method_with_a_personal_model_is_one_short_file_of_the_public_api() -> None:
    path = EXAMPLES / "model_interpolation.py"
    assert len(path.read_text().splitlines()) < 100
    imports = {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tapl")
    }
    assert imports == {"tapl.algorithms", "tapl.components"}


def test_model_interpolation_mixes_the_local_and_global_models(model_interpolation) -> None:
    local = {"c": {"w": torch.tensor([4.0, 0.0])}}
    global_ = {"c": {"w": torch.tensor([0.0, 8.0])}}
    mixed = model_interpolation.mix(local, global_, 0.25)
    assert torch.equal(mixed["c"]["w"], torch.tensor([1.0, 6.0]))


def test_model_interpolation_runs_by_class_path_and_keeps_each_clients_choice(
    model_interpolation, assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    grid = [0.0, 0.5, 1.0]
    runs = {}
    for name, values in (("grid", grid), ("global_only", [0.0]), ("local_only", [1.0])):
        run_dir = tmp_path / name
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(assets, run_dir, finetune_steps=0)))
        args = ["--algorithm", "model_interpolation.ModelInterpolation", "--algorithm.grid", json.dumps(values)]
        main(["fit", "--config", str(config), *args])
        runs[name] = json.loads((run_dir / "results.json").read_text())
        directory = RunDirectory(run_dir)
        _, payload = directory.load_checkpoint(directory.resolve_checkpoint("last"))
        stores = payload["client_store"]
        assert stores, "the visited clients' local models and weights are checkpointed"
        assert all(set(store) == {"local", "lam"} and store["lam"] in values for store in stores.values())
    assert runs["grid"]["models"]["personalized"]["label"] == "Interpolation"
    # With lam = 0 only, the personalized model is the global one, client for client.
    only_global = runs["global_only"]["per_client"]
    assert only_global["personalized"] == only_global["global"]
    # With lam = 1 only, it is the local model, which differs from the global one on every visited client.
    only_local = runs["local_only"]["per_client"]
    visited = [c for c, record in runs["local_only"]["clients"].items() if record["last_visit"]]
    assert visited and all(only_local["personalized"][c] != only_local["global"][c] for c in visited)
