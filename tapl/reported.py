"""The models an algorithm reports per client: one declaration each (key, label, description, state)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tapl.components import ComponentState
from tapl.context import ClientContext

#: The model of one client to evaluate, from the client's evaluation context; ``None``: none for this client.
StateOf = Callable[[ClientContext], ComponentState | None]


@dataclass(frozen=True)
class ReportedModel:
    """One model an algorithm reports per client in the results and the validation logs.

    Attributes:
        key: Its key in ``results.json`` and TensorBoard tags. ``"global"`` is the client's slice of the
            global model (the engine then also reports ``"global+FT"``, its post-federation fine-tuning);
            ``"personalized"`` is the method's own model, compared across algorithms.
        label: Its name in tables, e.g. ``"FedAvg"`` or ``"TAP w/o distillation"``.
        description: Which model this is, in a sentence for the results files.
        state: Gives the model from the client's evaluation context (``ctx.received`` is the client's slice
            of the current global model, ``ctx.state`` its stored state); ``None`` when the client has none.
    """

    key: str
    label: str
    description: str
    state: StateOf


#: Description of the global model in the results.
GLOBAL_DESCRIPTION = "each client's slice of the global model"


def received(ctx: ClientContext) -> ComponentState:
    """The client's slice of the global model: the state of the ``global`` model."""
    return ctx.received


def global_model(label: str) -> ReportedModel:
    """The ``global`` model (each client's slice of the global model), reported under ``label``."""
    return ReportedModel("global", label, GLOBAL_DESCRIPTION, received)


def stored(key: str, otherwise: StateOf | None = None) -> StateOf:
    """The model kept in the client's store under ``key``; without one, ``otherwise(ctx)`` (default: none)."""

    def state(ctx: ClientContext) -> ComponentState | None:
        if key in ctx.store:
            return ctx.store[key]
        return otherwise(ctx) if otherwise is not None else None

    return state


def initial(ctx: ClientContext) -> ComponentState:
    """The client's slice of the initial global model (what a personal model starts from)."""
    return ctx.initial
