"""Round-level learning-rate warm-up (the paper's: linear from a start rate to the peak over N rounds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config
from lightning.pytorch import Callback

from tapl.algorithms import ClientUpdate, FedAvg
from tapl.cli import main
from tapl.federation import FederationConfig

SEEN: list[tuple[int, float]] = []


class LrRecorder(Callback):
    def __init__(self, round: int) -> None:
        self.round = round

    def on_train_start(self, trainer, pl_module) -> None:
        SEEN.append((self.round, trainer.optimizers[0].param_groups[0]["lr"]))


class RecordingFedAvg(FedAvg):
    """FedAvg that records the learning rate of every local fit."""

    def client_update(self, ctx):
        result = ctx.fit(ctx.received, callbacks=[LrRecorder(ctx.round)])
        return ClientUpdate(ctx.client.id, result.state, ctx.num_train_samples)


def test_lr_for_round_is_linear_then_none() -> None:
    config = FederationConfig(warmup_rounds=4, warmup_start_lr=1e-4)
    assert config.lr_for_round(1)(1e-3) == pytest.approx(1e-4)
    assert config.lr_for_round(3)(1e-3) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert config.lr_for_round(5) is None
    assert FederationConfig().lr_for_round(1) is None
    with pytest.raises(ValueError, match="warmup"):
        FederationConfig(warmup_rounds=-1)


def test_local_fits_use_the_warmed_up_rate(assets, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    monkeypatch.setitem(sys.modules, "warmup_plugin", sys.modules[__name__])
    SEEN.clear()
    config = tiny_config(assets, tmp_path / "run", rounds=3, warmup_rounds=2, warmup_start_lr=1e-4)
    config["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}
    config["algorithm"] = {"class_path": "warmup_plugin.RecordingFedAvg"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    by_round = {r: lr for r, lr in SEEN}
    assert by_round == pytest.approx({1: 1e-4, 2: 5.5e-4, 3: 1e-3})
