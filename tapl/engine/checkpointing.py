"""Checkpoints: when to write them (a callback), and the checks a checkpoint must pass to be resumed."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tapl.components import ComponentState
from tapl.engine.callbacks import Engine, EngineCallback
from tapl.engine.config import RESUMABLE_SETTINGS
from tapl.engine.logging import flatten
from tapl.run_dir import FINAL, RunDirectory, RunDirError

#: A loaded checkpoint: the global model and everything else.
Checkpoint = tuple[ComponentState, dict[str, Any]]


class Checkpointing(EngineCallback):
    """Writes a checkpoint every ``federation.checkpoint_every`` rounds, after the last round and an early stop,
    after every client's post-federation stage (so a killed stage resumes at the next client) and at its end.
    Every checkpoint holds the whole run: see :meth:`FederatedOrchestrator.state_dict`."""

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        round = record["round"]
        due = round % engine.config.checkpoint_every == 0 or round == engine.config.rounds
        if due or "stopped" in record:
            engine.save_checkpoint(engine.run_dir.round_checkpoint_name(round))

    def on_post_federation_client_end(self, engine: Engine, record: dict[str, Any]) -> None:
        engine.save_checkpoint(FINAL)

    def on_post_federation_end(self, engine: Engine) -> None:
        engine.save_checkpoint(FINAL)


def resume_target(run_dir: RunDirectory, ckpt_path: str, rounds: int) -> tuple[Path, Checkpoint | None]:
    """The checkpoint ``--ckpt_path`` names, and it loaded when finding it took loading it: ``last`` prefers the
    post-federation checkpoint unless the run is extended beyond its rounds."""
    final = run_dir.checkpoints / FINAL
    if ckpt_path == "last" and (final / "state.pt").is_file():
        loaded = run_dir.load_checkpoint(final)
        if loaded[1]["round"] >= rounds or loaded[1]["stopped_at"] is not None:
            return final, loaded
    return run_dir.resolve_checkpoint(ckpt_path), None


def rng_state() -> dict[str, Any]:
    """The global random generators' states (torch, numpy, python)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }


def set_rng_state(rng: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(rng["python"]), None))


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], path: Any) -> None:
    """Refuse a checkpoint of another federation (data, clients, components or algorithm differ)."""
    differences = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if not differences:
        return
    details = []
    for key in differences:
        if key == "components":
            a, b = saved.get(key, {}), current.get(key, {})
            changed = sorted(set(a) ^ set(b)) or sorted(c for c in a if a[c] != b.get(c))
            details.append(f"components differ ({changed[:5]})")
        else:
            details.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    raise RunDirError(f"Checkpoint {path} belongs to a different federation: " + "; ".join(details))


def check_config(saved: dict[str, Any] | None, current: dict[str, Any] | None, path: Any) -> None:
    """Refuse to resume with settings other than the checkpoint's, but for :data:`RESUMABLE_SETTINGS`."""
    if saved is None or current is None:  # a checkpoint or a run built without a configuration
        return
    before, now = flatten(saved, separator="."), flatten(current, separator=".")
    changed = [
        f"{key}: checkpoint {_short(before.get(key, '(unset)'))}, now {_short(now.get(key, '(unset)'))}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not _resumable(key)
    ]
    if changed:
        raise RunDirError(
            f"Checkpoint {path} was written with other settings: {'; '.join(changed)}. Resume with the run's "
            f"config.yaml (only {', '.join(RESUMABLE_SETTINGS)} may change), or start a new --run_dir."
        )


def _resumable(key: str) -> bool:
    return any(key == setting or key.startswith(f"{setting}.") for setting in RESUMABLE_SETTINGS)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
