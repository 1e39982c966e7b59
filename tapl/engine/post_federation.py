"""The post-federation stage: on every client, fine-tune the final global slice (the "+FT" model), then run
the algorithm's own per-client work (e.g. TAP's distillation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tapl.algorithms.base import Algorithm
from tapl.components import ComponentState
from tapl.context import ClientContext


def _silent(what: str) -> None:
    """Hears nothing."""


def post_federation(
    ctx: ClientContext, algorithm: Algorithm, fine_tune: bool, notify: Callable[[str], None] = _silent
) -> tuple[dict[str, Any], ComponentState | None]:
    """One client's post-federation stage (client side): fine-tune its global slice ``ctx.received`` when
    ``fine_tune`` (``federation.finetune_steps`` batches), then the algorithm's own work, which may change
    ``ctx.store``.

    Returns:
        The client's ``post_federation.jsonl`` record, and its fine-tuned global slice (``None`` without one).
        ``notify`` hears what starts.
    """
    started = time.perf_counter()
    record: dict[str, Any] = {"round": ctx.round, "client": ctx.client.id}
    if fine_tune:
        notify("fine-tuning the global slice")
        result = ctx.fit(ctx.received, steps=ctx.info.finetune_steps, lr=ctx.info.finetune_lr)
        ctx.finetuned = result.state
        record["finetune_loss"] = result.train_loss
    notify(f"{algorithm.label} post-federation")
    record["algorithm"] = algorithm.post_federation(ctx)
    record["seconds"] = time.perf_counter() - started
    return record, ctx.finetuned
