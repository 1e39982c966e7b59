"""The run directory: resolved config, ``metrics.jsonl``, checkpoints and results.

Layout::

    RUN_DIR/
      config.yaml              resolved configuration (re-runnable with --config)
      metrics.jsonl            one JSON object per round
      post_federation.jsonl    one JSON object per client of the post-federation stage
      tensorboard/             TensorBoard events
      checkpoints/round-000004/ server.safetensors (global components) + state.pt (everything else)
      checkpoints/final/       the same during (after each client) and after the post-federation stage
      results.json, results.md per-client, per-task results of the final evaluation

Checkpoints are written to a temporary directory and renamed into place, so a kill never leaves a partial
checkpoint under its final name. They load with safe loaders only (safetensors, ``torch.load`` with
``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tapl.components import ComponentState, flatten, unflatten

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
#: One record per client of the post-federation stage (fine-tuning, distillation).
POST_FEDERATION_METRICS = "post_federation.jsonl"
FINAL = "final"
_ROUND_DIR = re.compile(r"round-(\d{6})")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds a run and no resume was asked)."""


class RunDirectory:
    """Paths and safe writes inside one run directory.

    Args:
        root: The run directory (created on first write).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl``: one JSON object per round."""
        return self.root / METRICS

    @property
    def checkpoints(self) -> Path:
        """Folder of checkpoints."""
        return self.root / CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        """Folder of TensorBoard events."""
        return self.root / "tensorboard"

    def holds_run(self) -> bool:
        """Whether a run already wrote metrics or checkpoints here."""
        return self.metrics_path.exists() or (self.checkpoints.exists() and any(self.checkpoints.iterdir()))

    def round_checkpoints(self) -> list[Path]:
        """Complete per-round checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and _ROUND_DIR.fullmatch(p.name))

    def resolve_checkpoint(self, ckpt_path: str, prefer_final: bool = False) -> Path:
        """Turn ``--ckpt_path`` into a checkpoint directory.

        Args:
            ckpt_path: ``"last"`` (the newest checkpoint of this run directory) or a checkpoint directory.
            prefer_final: With ``"last"``, take the post-federation checkpoint when it is the newest.

        Raises:
            RunDirError: if there is no such checkpoint.
        """
        if ckpt_path != "last":
            path = Path(ckpt_path)
            if not (path / "state.pt").is_file():
                raise RunDirError(f"--ckpt_path {ckpt_path}: not a tapl checkpoint directory (no state.pt).")
            return path
        rounds = self.round_checkpoints()
        final = self.checkpoints / FINAL
        if prefer_final and (final / "state.pt").is_file():
            return final
        if not rounds:
            raise RunDirError(f"--ckpt_path last: no checkpoint in {self.checkpoints}.")
        return rounds[-1]

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` to ``name`` in the run directory atomically."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``data`` as indented JSON atomically."""
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def append_metrics(self, record: dict[str, Any], name: str = METRICS) -> None:
        """Append one record to a JSON-lines file (``metrics.jsonl``: one record per round)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / name).open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self, name: str = METRICS) -> list[dict[str, Any]]:
        """Every record of a JSON-lines file (``metrics.jsonl`` by default)."""
        path = self.root / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, keep: Callable[[dict[str, Any]], bool], name: str = METRICS) -> None:
        """Keep only the records ``keep`` accepts (e.g. drop what a killed run logged after its checkpoint)."""
        if (self.root / name).exists():
            kept = [r for r in self.read_metrics(name) if keep(r)]
            self.write_text(name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def save_checkpoint(self, name: str, global_state: ComponentState, payload: dict[str, Any]) -> Path:
        """Write a checkpoint atomically: global tensors to safetensors, everything else to ``state.pt``."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        target = self.checkpoints / name
        tmp = self.checkpoints / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: t.contiguous() for k, t in flatten(global_state).items()}, str(tmp / "server.safetensors"))
        torch.save(payload, tmp / "state.pt")
        if target.exists():
            old = self.checkpoints / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        return target

    @staticmethod
    def load_checkpoint(path: Path) -> tuple[ComponentState, dict[str, Any]]:
        """Read a checkpoint written by :meth:`save_checkpoint`, with safe loaders only."""
        global_state = unflatten(load_file(str(path / "server.safetensors")))
        payload = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        return global_state, payload

    def round_checkpoint_name(self, round: int) -> str:
        """Directory name of the checkpoint after ``round``."""
        return f"round-{round:06d}"
