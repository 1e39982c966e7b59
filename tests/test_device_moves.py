"""The shared model stays where it computes: no client fit or evaluation moves or walks the frozen backbone.

Lightning moves a fit's module to its device at the start and to the CPU at the end. On a GPU the latter would
copy the whole shared model to the host after every visit, and the former back. Counted here on the CPU through
``Module._apply``, which every ``.to`` and ``.cpu`` goes through: a round applies nothing to the shared model, so
it moves none of its bytes, and spends no time walking its modules either.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_text_image_model, tiny_config
from torch import nn

from tapl.cli import TaplCLI
from tapl.client import ClientModule, SharedModelModule
from tapl.tasks import Task


@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_a_round_applies_nothing_to_the_shared_model(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, execution: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    config = tiny_config(assets, tmp_path / "run", clients_per_round=4, execution=execution)
    engine = TaplCLI(args=config, run=False).orchestrator
    assert engine is not None
    engine.setup()
    shared = engine.model
    counts = {"applied to the shared model": 0, "moves of fit modules": 0}
    real_apply, real_to, real_cpu = nn.Module._apply, SharedModelModule.to, SharedModelModule.cpu

    def counting_apply(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        counts["applied to the shared model"] += self is shared
        return real_apply(self, *args, **kwargs)

    def counting_to(self: SharedModelModule, *args: Any, **kwargs: Any) -> SharedModelModule:
        counts["moves of fit modules"] += 1
        return real_to(self, *args, **kwargs)

    def counting_cpu(self: SharedModelModule) -> SharedModelModule:
        counts["moves of fit modules"] += 1
        return real_cpu(self)

    monkeypatch.setattr(nn.Module, "_apply", counting_apply)
    monkeypatch.setattr(SharedModelModule, "to", counting_to)  # the base of client and cohort modules
    monkeypatch.setattr(SharedModelModule, "cpu", counting_cpu)
    engine._run_round(1)  # four visits and, as the last of one round, every client's evaluation
    engine._run_round(2)
    assert counts["moves of fit modules"] > 0  # Lightning did move the fits' modules: the counting saw them
    assert counts["applied to the shared model"] == 0


@pytest.fixture
def module(assets: dict[str, Path]) -> ClientModule:
    tasks = [Task(name="sentiment", type="classification", modalities=("text",), num_classes=2)]
    model = make_text_image_model(assets["bert"], tasks)
    return ClientModule(model, tasks, model.component_names(), torch.optim.SGD)


def test_a_move_to_another_device_moves_the_shared_model(module: ClientModule) -> None:
    module.to(torch.device("meta"))
    assert module.device == torch.device("meta")
    assert {t.device.type for t in [*module.model.parameters(), *module.model.buffers()]} == {"meta"}


def test_a_dtype_change_converts_the_shared_model(module: ClientModule) -> None:
    module.to(torch.float64)
    assert module.dtype == torch.float64
    assert {p.dtype for p in module.model.parameters()} == {torch.float64}


def test_a_move_to_where_the_shared_model_is_skips_it_and_moves_the_modules_own_tensors(
    module: ClientModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    module.model.to(torch.device("meta"))
    module.register_buffer("own", torch.zeros(2))
    applied = []
    monkeypatch.setattr(module.model, "_apply", lambda *args, **kwargs: applied.append(args))
    module.to(torch.device("meta"))
    assert module.own.device == torch.device("meta")
    assert module.device == torch.device("meta")
    assert applied == []
