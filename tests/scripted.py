"""Algorithms without a model: a scripted local training behind a real ``ClientContext``, and a federation
description built from plain tensors, so that an algorithm's hooks can be checked by hand."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from tapl.api import ClientInfo, FederationInfo, FitResult, Stage
from tapl.components import ComponentState, clone
from tapl.context import ClientContext, LocalTraining
from tapl.engine.client_store import ClientStore
from tapl.federation import FederatedOrchestrator
from tapl.objective import Objective, TrainingStep
from tapl.tasks import Task

#: Shifts a fitted state: ``(fit number from 1, the fit's arguments) -> the offset added to every tensor``.
Shift = Callable[[int, dict[str, Any]], float]
#: The training losses a fit reports: ``(fit number, the fit's arguments) -> loss per task``.
Losses = Callable[[int, dict[str, Any]], dict[str, float]]


class ScriptedTraining:
    """A local training whose fits add an offset to every trained tensor and record their arguments. A fit given
    an (automatic) objective evaluates it once on the state it starts from, as one training step would.

    Args:
        shift: The offset of each fit (default: ``100 * fit number``).
        losses: The training losses each fit reports (default: ``{task: fit number}`` for tasks ``a``, ``b``).
        metrics: The metrics each evaluation reports, from the evaluated state.
    """

    def __init__(
        self,
        shift: Shift | None = None,
        losses: Losses | None = None,
        metrics: Callable[[ComponentState, str], dict[str, dict[str, float]]] | None = None,
    ) -> None:
        self.shift = shift or (lambda n, kwargs: 100.0 * n)
        self.losses = losses or (lambda n, kwargs: {"a": float(n), "b": 10.0 * n})
        self.metrics = metrics or (lambda state, split: {"a": {"loss": 1.0}})
        self.fits: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []

    def fit(self, client: ClientInfo, state: ComponentState, **kwargs: Any) -> FitResult:
        call = {"client": client.id, "state": clone(state), **kwargs}
        self.fits.append(call)
        objective = kwargs.get("objective")
        if objective is not None and objective.automatic_optimization:
            objective_value(objective, state)
        trainable = kwargs.get("trainable") or list(state)
        offset = self.shift(len(self.fits), call)
        trained = {c: {k: t + offset if c in trainable else t.clone() for k, t in p.items()} for c, p in state.items()}
        return FitResult(trained, self.losses(len(self.fits), call), steps=kwargs.get("steps") or 1)

    def evaluate(self, client: ClientInfo, state: ComponentState, split: str) -> dict[str, dict[str, float]]:
        self.evaluations.append({"client": client.id, "state": clone(state), "split": split})
        return self.metrics(state, split)


def task(name: str, type: str = "classification", modalities: Sequence[str] = ("text",)) -> Task:
    """A task description (no data): enough for per-task settings and pairs."""
    return Task(name=name, type=type, modalities=tuple(modalities), num_classes=2)


def federation(
    initial: ComponentState,
    clients: Mapping[int, Sequence[str]] | None = None,
    tasks: Mapping[str, Task] | None = None,
    paths: Mapping[str, Sequence[str]] | None = None,
    **settings: Any,
) -> FederationInfo:
    """A federation over ``initial``'s components: by default 2 clients holding tasks ``a`` and ``b`` and every
    component, every task's path being every component."""
    tasks = dict(tasks or {"a": task("a"), "b": task("b")})
    components = tuple(sorted(initial))
    clients = clients or {0: ("a", "b"), 1: ("a", "b")}
    values: dict[str, Any] = {
        "rounds": 2,
        "local_steps": 1,
        "finetune_steps": 3,
        "finetune_lr": 1e-4,
        "warmup_rounds": 0,
        "precision": "32-true",
        "trainer": {},
        "run_dir": Path("unused-run-dir"),
        **settings,
    }
    return FederationInfo(
        tasks=tasks,
        clients={c: ClientInfo(c, tuple(ts), components, 10) for c, ts in clients.items()},
        paths={t: tuple((paths or {}).get(t, components)) for t in tasks},
        initial_state=initial,
        **values,
    )


def context(
    info: FederationInfo,
    training: LocalTraining,
    client: int = 0,
    round: int = 1,
    received: ComponentState | None = None,
    store: dict[str, Any] | None = None,
    stage: Stage = "federation",
    finetuned: ComponentState | None = None,
) -> ClientContext:
    """A real context of ``client`` over the scripted training; ``received`` defaults to its initial slice."""
    received = info.slice_of(info.initial_state, client) if received is None else received
    return ClientContext(
        training, info, info.clients[client], round, received, store=store, stage=stage, finetuned=finetuned
    )


def objective_value(objective: Objective, state: ComponentState, task_loss: float = 0.0) -> Tensor:
    """What ``objective`` adds to a batch whose task loss is ``task_loss``, with ``state`` as the trained
    tensors (no parts: for terms over the parameters, such as a proximal term)."""
    model = SimpleNamespace(component_parameters=lambda component: state[component])
    module = SimpleNamespace(components=sorted(state), model=model, device=torch.device("cpu"))
    step = TrainingStep(module, [])  # type: ignore[arg-type]
    return objective.loss(step) + task_loss


# Appended helpers (algorithm tests that need a client's slice or the engine's real local training).


def with_slices(info: FederationInfo, slices: Mapping[int, Sequence[str]]) -> FederationInfo:
    """``info`` where the clients of ``slices`` hold those components (the others keep theirs)."""
    clients = {
        c: replace(client, components=tuple(slices.get(c, client.components))) for c, client in info.clients.items()
    }
    return replace(info, clients=clients)


def engine_context(
    engine: FederatedOrchestrator,
    client: int,
    round: int = 1,
    received: ComponentState | None = None,
    store: dict[str, Any] | None = None,
    training: Any = None,
    stage: Stage = "federation",
) -> ClientContext:
    """The context of ``client``'s visit in ``round`` as ``engine`` (set up) builds it: its real local training (or
    ``training``), ``received`` defaulting to the client's slice of the engine's global state and ``store`` to a
    copy of the client's store. The engine must be set up (``engine.setup()``, or after ``fit``)."""
    return ClientContext(
        engine.training if training is None else training,
        engine.info,
        engine.info.clients[client],
        round,
        engine.info.slice_of(engine.global_state, client) if received is None else received,
        store=engine.worker.store.checkout(client) if store is None else store,
        stage=stage,
    )


def through_checkpoint(store: ClientStore) -> ClientStore:
    """``store`` saved as a checkpoint saves it (``torch.save``) and loaded back with the safe loader."""
    saved = io.BytesIO()
    torch.save(store.state_dict(), saved)
    saved.seek(0)
    restored = ClientStore()
    restored.load_state_dict(torch.load(saved, weights_only=True))
    return restored
