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
checkpoint under its final name, and a failed write (a full disk) leaves no temporary files. Each holds
``checksums.json``, the SHA-256 of its files, verified before loading; they load with safe loaders only
(safetensors, ``torch.load`` with ``weights_only=True``). Every JSON file is strict JSON: a non-finite number is
written as ``null``. A record torn by a kill or a full disk at the end of a JSON-lines file is dropped on reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tapl.components import ComponentState, flatten, unflatten
from tapl.errors import CheckpointError, TaplError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
#: One record per client of the post-federation stage (fine-tuning, distillation).
POST_FEDERATION_METRICS = "post_federation.jsonl"
FINAL = "final"
#: The SHA-256 of every file of a checkpoint, written last.
CHECKSUMS = "checksums.json"
_CHECKPOINT_FILES = ("server.safetensors", "state.pt")
_ROUND_DIR = re.compile(r"round-(\d{6})")


class RunDirError(TaplError, RuntimeError):
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
        """Write ``text`` to ``name`` in the run directory atomically (no temporary file is left on failure)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``data`` as indented strict JSON atomically (non-finite numbers become ``null``)."""
        return self.write_text(name, json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False) + "\n")

    def append_metrics(self, record: dict[str, Any], name: str = METRICS) -> None:
        """Append one record to a JSON-lines file (``metrics.jsonl``: one record per round), as strict JSON."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / name).open("a") as f:
            f.write(_json_line(record))

    def read_metrics(self, name: str = METRICS) -> list[dict[str, Any]]:
        """Every record of a JSON-lines file (``metrics.jsonl`` by default).

        A last line that is not a complete record (a write torn by a kill or a full disk) is dropped with a
        warning; a damaged line before it raises :class:`RunDirError`.
        """
        path = self.root / name
        if not path.exists():
            return []
        lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        records = []
        for position, (number, line) in enumerate(lines):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                if position == len(lines) - 1:
                    log.warning("Dropped the incomplete last record (line %d) of %s: %s", number, path, error)
                    break
                raise RunDirError(f"{path}, line {number}, is not a JSON record ({error}).") from None
            records.append(record)
        return records

    def truncate_metrics(self, keep: Callable[[dict[str, Any]], bool], name: str = METRICS) -> None:
        """Keep only the records ``keep`` accepts (e.g. drop what a killed run logged after its checkpoint), and
        drop an incomplete last record."""
        if (self.root / name).exists():
            kept = [r for r in self.read_metrics(name) if keep(r)]
            self.write_text(name, "".join(_json_line(r) for r in kept))

    def save_checkpoint(self, name: str, global_state: ComponentState, payload: dict[str, Any]) -> Path:
        """Write a checkpoint atomically: global tensors to safetensors, everything else to ``state.pt``, and
        the checksums of both; a failed write leaves the previous checkpoint of that name and no temporary files."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        target = self.checkpoints / name
        tmp = self.checkpoints / f".{name}.tmp"
        old = self.checkpoints / f".{name}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            save_file({k: t.contiguous() for k, t in flatten(global_state).items()}, str(tmp / "server.safetensors"))
            torch.save(payload, tmp / "state.pt")
            checksums = {file: _sha256(tmp / file) for file in _CHECKPOINT_FILES}
            (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=2, sort_keys=True) + "\n")
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not target.exists():
                os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return target

    def verify_checkpoint(self, path: Path) -> None:
        """Check that ``path`` holds a complete checkpoint whose files match their checksums.

        Raises:
            CheckpointError: naming the missing or damaged file, and the newest earlier checkpoint that verifies.
        """
        try:
            _verify(path)
        except CheckpointError as error:
            raise CheckpointError(f"{error}. {self._earlier_checkpoint_hint(path)}") from None

    def load_checkpoint(self, path: Path) -> tuple[ComponentState, dict[str, Any]]:
        """Verify and read a checkpoint written by :meth:`save_checkpoint`, with safe loaders only.

        Raises:
            CheckpointError: if a file is missing, damaged or unreadable.
        """
        self.verify_checkpoint(path)
        file = path / "server.safetensors"
        try:
            global_state = unflatten(load_file(str(file)))
            file = path / "state.pt"
            payload = torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(
                f"checkpoint file {file} cannot be read ({reason}). {self._earlier_checkpoint_hint(path)}"
            ) from None
        return global_state, payload

    def _earlier_checkpoint_hint(self, damaged: Path) -> str:
        """Where to resume from instead of the ``damaged`` checkpoint."""
        earlier = [p for p in self.round_checkpoints() if p.resolve() != damaged.resolve()]
        if damaged.name != FINAL:
            earlier = [p for p in earlier if p.name < damaged.name]
        for path in reversed(earlier):
            try:
                _verify(path)
            except CheckpointError:
                continue
            return f"Resume from an earlier checkpoint with --ckpt_path {path}"
        return "No earlier checkpoint of this run verifies; start the run again in a new --run_dir"

    def round_checkpoint_name(self, round: int) -> str:
        """Directory name of the checkpoint after ``round``."""
        return f"round-{round:06d}"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinity) replaced by ``None``, so it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def _verify(path: Path) -> None:
    """Raise :class:`CheckpointError` if a file of the checkpoint ``path`` is missing or differs from its checksum."""
    for file in _CHECKPOINT_FILES:
        if not (path / file).is_file():
            raise CheckpointError(f"checkpoint file {path / file} is missing")
    if not (path / CHECKSUMS).is_file():
        log.warning("Checkpoint %s has no %s (written by an older tapl): not verified.", path, CHECKSUMS)
        return
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except ValueError as error:
        raise CheckpointError(f"checkpoint file {path / CHECKSUMS} is damaged ({error})") from None
    for file in _CHECKPOINT_FILES:
        if expected.get(file) != _sha256(path / file):
            raise CheckpointError(
                f"checkpoint file {path / file} is damaged: its SHA-256 differs from the one written with it"
            )


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(strict_json(record), sort_keys=True, allow_nan=False) + "\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
