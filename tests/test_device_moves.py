"""The shared model stays where it computes: no client fit or evaluation moves the frozen backbone.

Lightning moves a fit's module to its device at the start and to the CPU at the end. On a GPU the latter would
copy the whole shared model to the host after every visit, and the former back. Counted here on the CPU through
``Module.cpu`` and ``Module.to``: the bytes of the shared model that a ``.cpu()`` would bring to the host (all its
tensors, wherever they are), and those a ``.to(device)`` would copy (its tensors on another device).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config
from torch import nn

from tapl.cli import TaplCLI


def tensor_bytes(module: nn.Module, moved: Any = None) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if moved is None or moved(t))


@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_a_round_moves_none_of_the_shared_model(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, execution: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    config = tiny_config(assets, tmp_path / "run", clients_per_round=4, execution=execution)
    engine = TaplCLI(args=config, run=False).orchestrator
    assert engine is not None
    engine.setup()
    shared = engine.model
    moved: dict[str, int] = {"cpu": 0, "to": 0, "calls": 0}
    real_cpu, real_to = nn.Module.cpu, nn.Module.to

    def holds_shared(module: nn.Module) -> bool:
        return any(m is shared for m in module.modules())

    def counting_cpu(self: nn.Module) -> nn.Module:
        if holds_shared(self):
            moved["cpu"] += tensor_bytes(shared)
        return real_cpu(self)

    def counting_to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        if holds_shared(self):
            moved["calls"] += 1
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                moved["to"] += tensor_bytes(shared, lambda t: t.device != device)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "cpu", counting_cpu)
    monkeypatch.setattr(nn.Module, "to", counting_to)
    engine._run_round(1)  # four visits and, as the last of one round, every client's evaluation
    engine._run_round(2)
    assert moved["calls"] > 0  # Lightning did move the fits' modules: the counting saw them
    assert moved == {"cpu": 0, "to": 0, "calls": moved["calls"]}
