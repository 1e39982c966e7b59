"""Building the Lightning ``Trainer`` of each client visit from the user's ``--trainer.*`` settings."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

from lightning.fabric.utilities import registry
from lightning.pytorch import Callback, Trainer

log = logging.getLogger(__name__)

# The engine owns these per visit: logging, checkpointing and progress happen once per round, not per fit.
_VISIT_OVERRIDES: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "default_root_dir": None,
}
# Settings that the federation decides instead (local steps, evaluation schedule).
_FEDERATION_OWNED = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "max_time",
    "limit_train_batches",
    "limit_val_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
)


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-``Trainer`` info lines (devices, tips, "max_steps reached") for one visit.

    Also hides two warnings that do not apply to visits (no validation loader; a Lightning-internal
    deprecation).

    A federation builds a trainer per client visit; repeating those lines hundreds of times would bury the
    run's own output. Warnings still show.
    """
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addFilter(_warnings_only)  # a filter, as setLevel would clear the cache of every logger each visit
    try:
        with warnings.catch_warnings():
            # Visits fit without a validation loader on purpose; the engine evaluates once per round.
            warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        logger.removeFilter(_warnings_only)


@functools.cache
def _entry_points(group: str) -> importlib.metadata.EntryPoints:
    return importlib.metadata.entry_points(group=group)


def _trainer(**kwargs: Any) -> Trainer:
    """``Trainer(**kwargs)``, reading the installed packages' callback entry points once per process.

    Every ``Trainer`` looks up Lightning's external-callback entry points, which scans the metadata of every
    installed distribution (several milliseconds); a federation builds a ``Trainer`` per client fit.
    """
    with mock.patch.object(registry, "entry_points", _entry_points):
        return Trainer(**kwargs)


class VisitTrainers:
    """Makes a light ``Trainer`` per client visit with the user's precision, devices, strategy and more.

    Everything of ``--trainer.*`` applies (accelerator, devices, strategy, precision,
    accumulate_grad_batches, gradient_clip_val, deterministic, callbacks, ...) except what the federation
    owns: the number of steps comes from ``federation.local_steps``, evaluation from ``federation.eval_every``,
    and logging, checkpoints and progress from the engine. A user setting of one of those is ignored with a
    warning.

    Args:
        trainer_kwargs: Keyword arguments of ``lightning.pytorch.Trainer`` (the parsed ``--trainer`` group).
    """

    def __init__(self, trainer_kwargs: dict[str, Any] | None = None) -> None:
        kwargs = dict(trainer_kwargs or {})
        defaults = {
            name: p.default for name, p in inspect.signature(Trainer.__init__).parameters.items() if name != "self"
        }
        ignored = [k for k in (*_FEDERATION_OWNED, *_VISIT_OVERRIDES) if k in kwargs and kwargs[k] != defaults.get(k)]
        if ignored:
            log.warning(
                "Ignoring --trainer.%s: the federation sets these per client visit.",
                ", --trainer.".join(ignored),
            )
        for key in (*_FEDERATION_OWNED, *_VISIT_OVERRIDES):
            kwargs.pop(key, None)
        if kwargs.get("accelerator") == "cpu" and str(kwargs.get("precision")).startswith("bf16"):
            log.warning("--trainer.precision %s on a CPU is emulated and far slower; use 32-true.", kwargs["precision"])
        if kwargs.get("strategy") == "ddp":
            # A multi-task batch may hold no sample of some task, leaving its head without gradients; plain
            # DDP would fail on that, so let it look for unused parameters.
            log.info("Using strategy 'ddp_find_unused_parameters_true': a batch may leave a task's head unused.")
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        self.user_callbacks: list[Callback] = list(kwargs.pop("callbacks", None) or [])
        self.kwargs = kwargs

    def fit_trainer(
        self, steps: int, callbacks: Sequence[Callback] = (), overrides: Mapping[str, Any] | None = None
    ) -> Trainer:
        """A trainer that runs exactly ``steps`` optimizer steps and no validation.

        Args:
            steps: Optimizer steps.
            callbacks: Extra callbacks of this fit.
            overrides: ``--trainer`` settings replaced for this fit only (e.g. ``gradient_clip_val: None`` for a
                module that clips its own gradients under manual optimization).
        """
        if steps < 1:
            raise ValueError(f"a client fit needs at least one step, got {steps}")
        owned = sorted(set(overrides or {}) & {*_VISIT_OVERRIDES, *_FEDERATION_OWNED})
        if owned:
            raise ValueError(f"the federation sets {owned} of every fit; they cannot be overridden")
        return _trainer(
            **{**self.kwargs, **(overrides or {})},
            **_VISIT_OVERRIDES,
            max_steps=steps,
            max_epochs=-1,
            limit_val_batches=0,
            callbacks=[*self.user_callbacks, *callbacks],
        )

    def eval_trainer(self) -> Trainer:
        """A trainer for one pass over a held-out split.

        Each rank evaluates every row (no distributed sampler): a distributed sampler pads uneven splits with
        repeated rows, which would bias the metrics, and evaluation is cheap next to training.
        """
        kwargs = {**self.kwargs, "use_distributed_sampler": False}
        return _trainer(**kwargs, **_VISIT_OVERRIDES, callbacks=list(self.user_callbacks))
