"""The post-federation stage: on every client, fine-tune the final global slice (the "+FT" model), then run
the algorithm's own per-client work (e.g. TAP's distillation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tapl.components import ComponentState
from tapl.engine.clients import Clients


def _silent(what: str) -> None:
    """Hears nothing."""


class PostFederation:
    """Runs the post-federation stage client by client and remembers which clients are done.

    Args:
        clients: The client side (the algorithm's :meth:`~tapl.algorithms.Algorithm.post_federation` runs per
            client and may change its store).
        fine_tune: Whether the engine fine-tunes each client's global slice first (``federation.finetune_steps``
            > 0 and the algorithm reports a global model).
    """

    def __init__(self, clients: Clients, fine_tune: bool) -> None:
        self.clients = clients
        self.fine_tune = fine_tune
        #: Clients whose stage is done, in order.
        self.done: list[int] = []
        #: Each done client's fine-tuned global slice (the "+FT" model).
        self.finetuned: dict[int, ComponentState] = {}

    def todo(self) -> list[int]:
        """The clients whose stage is still to run."""
        return [c for c in self.clients.info.clients if c not in set(self.done)]

    def run_client(
        self, client: int, round: int, global_state: ComponentState, notify: Callable[[str], None] = _silent
    ) -> dict[str, Any]:
        """One client's stage; returns its ``post_federation.jsonl`` record. ``notify`` hears what starts."""
        started = time.perf_counter()
        info, algorithm = self.clients.info, self.clients.algorithm
        global_slice = info.slice_of(global_state, client)
        ctx = self.clients.context(client, round, global_slice, "post-federation")
        record: dict[str, Any] = {"round": round, "client": client}
        finetuned = None
        if self.fine_tune:
            notify("fine-tuning the global slice")
            result = ctx.fit(global_slice, steps=info.finetune_steps, lr=info.finetune_lr)
            ctx.finetuned = finetuned = result.state
            record["finetune_loss"] = result.train_loss
        notify(f"{algorithm.label} post-federation")
        record["algorithm"] = algorithm.post_federation(ctx)
        self.clients.store.commit(client, ctx.store)
        if finetuned is not None:
            self.finetuned[client] = finetuned
        self.done.append(client)
        record["seconds"] = time.perf_counter() - started
        return record

    def state_dict(self) -> dict[str, Any]:
        """Which clients are done, and their fine-tuned slices."""
        return {"done": list(self.done), "finetuned": {str(c): s for c, s in self.finetuned.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.done = [int(c) for c in state["done"]]
        self.finetuned.clear()  # in place: the evaluator reads the same dict
        self.finetuned.update({int(c): s for c, s in state["finetuned"].items()})
