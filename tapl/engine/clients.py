"""The client side of the engine in one process: the federation as algorithms see it, and what every piece of
client work needs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tapl.algorithms.base import Algorithm
from tapl.api import ClientInfo, ClientUpdate, FederationInfo, Instruction, Stage
from tapl.components import ComponentMismatchError, ComponentShapes, ComponentState, check_finite, check_state
from tapl.context import ClientContext
from tapl.datamodules.federated import FederatedDataModule
from tapl.engine.client_store import ClientStore
from tapl.engine.config import FederationConfig
from tapl.engine.disk_store import DiskClientStore
from tapl.engine.evaluation import FINETUNED, evaluate_models
from tapl.engine.local_training import LocalTraining
from tapl.engine.post_federation import post_federation
from tapl.errors import TaplError
from tapl.models.foundation import FoundationModel
from tapl.reported import ReportedModel
from tapl.run_dir import RunDirError
from tapl.visit_trainer import VisitTrainers, quiet_lightning

#: Marks the checkpoint of a run whose clients' stores stayed on their nodes (not in the checkpoint).
STORES_ON_NODES = "stores_on_nodes"

#: A client's evaluation: metrics per model key and task, and readable predictions per model key and task.
Evaluated = tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, list[dict[str, str]]]]]


class ClientUnreachable(TaplError, RuntimeError):
    """A client's node did not answer: it left the federation, or did not reply in time."""


class ClientWorker:
    """The client side of the engine: runs any client's work (a visit, an evaluation, the post-federation stage)
    on the local training it is given, and keeps every client's store.

    The server side (the round loop) only sends it what a client receives and gets back what the client
    reports; on a distributed runtime the same work runs where the client's data are.

    Args:
        info: The federation.
        algorithm: The algorithm whose client side runs.
        training: Fits and evaluates states on a client's data.
        shapes: The shapes of every component's tensors (uploads are checked against them).
    """

    def __init__(
        self, info: FederationInfo, algorithm: Algorithm, training: LocalTraining, shapes: ComponentShapes
    ) -> None:
        self.info = info
        self.algorithm = algorithm
        self.training = training
        self.shapes = shapes
        #: Every client's own state, as the algorithm keeps it (``ctx.store``).
        self.store = new_store(training.config.client_store, info.run_dir, "store")
        #: Every client's engine-made models: its fine-tuned global slice under :data:`FINETUNED`.
        self.engine_store = new_store(training.config.client_store, info.run_dir, "engine_store")

    def context(
        self,
        client: int,
        round: int,
        received: ComponentState,
        stage: Stage = "federation",
        config: Mapping[str, Any] | None = None,
    ) -> ClientContext:
        """A context of ``client`` holding ``received`` and a working copy of the client's store."""
        return ClientContext(
            self.training,
            self.info,
            self.info.clients[client],
            round,
            received,
            config=config,
            store=self.store.checkout(client),
            stage=stage,
        )

    def visit(self, round: int, instruction: Instruction) -> ClientUpdate:
        """One client's visit: its checked upload. The client's store keeps the visit's changes only when all went
        well.

        Raises:
            Exception: whatever the visit raised, or a check of its upload or store failed on.
        """
        client = instruction.client
        ctx = self.context(client, round, instruction.state, config=instruction.config)
        update = self.algorithm.client_update(ctx)
        check_upload(update, self.info.clients[client], self.shapes)
        self.store.commit(client, ctx.store)
        return update

    def evaluate(self, client: int, round: int, received: ComponentState, split: str) -> Evaluated:
        """Every model the client reports (the algorithm's, and its fine-tuned global slice once made) on its
        ``split``: metrics per model key and task, and readable predictions per model key and task."""
        ctx = self.context(client, round, received, "evaluation")
        models: list[ReportedModel] = []
        for model in self.algorithm.models():
            models.append(model)
            if model.key == "global" and client in self.engine_store:
                models.append(ReportedModel(FINETUNED, f"{model.label}+FT", "", self._finetuned))
        return evaluate_models(ctx, models, self.training, split)

    def _finetuned(self, ctx: ClientContext) -> ComponentState:
        return self.engine_store.checkout(ctx.client.id)[FINETUNED]

    def post_federation(
        self, client: int, round: int, received: ComponentState, fine_tune: bool, notify: Callable[[str], None]
    ) -> dict[str, Any]:
        """One client's post-federation stage (see :func:`~tapl.engine.post_federation.post_federation`); returns
        its ``post_federation.jsonl`` record."""
        ctx = self.context(client, round, received, "post-federation")
        record, finetuned = post_federation(ctx, self.algorithm, fine_tune, notify)
        self.store.commit(client, ctx.store)
        if finetuned is not None:
            self.engine_store.commit(client, {FINETUNED: finetuned})
        return record

    # -- many clients' work: one after another here, all at once on a distributed runtime ------------------------

    def visit_all(
        self, round: int, instructions: Sequence[Instruction], started: Callable[[int], None]
    ) -> Iterator[tuple[int, ClientUpdate | Exception]]:
        """Every instruction's visit, each outcome as it comes: the client's update, or the exception its visit
        raised (a failed visit does not stop the others). ``started`` hears each client whose visit starts."""
        for instruction in instructions:
            started(instruction.client)
            try:
                yield instruction.client, self.visit(round, instruction)
            except Exception as error:
                yield instruction.client, error

    def evaluate_all(
        self, round: int, received: Mapping[int, ComponentState], split: str, started: Callable[[int], None]
    ) -> Iterator[tuple[int, Evaluated | ClientUnreachable]]:
        """Every client's :meth:`evaluate` on ``split`` (``received``: what each client holds of the global
        model), each as it comes; a client whose node did not answer gives :class:`ClientUnreachable`."""
        for client, state in received.items():
            started(client)
            yield client, self.evaluate(client, round, state, split)

    def post_federation_all(
        self, round: int, received: Mapping[int, ComponentState], fine_tune: bool, notify: Callable[[int, str], None]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Every client's :meth:`post_federation`, each record as it comes; ``notify(client, step)`` hears what
        starts."""
        for client, state in received.items():
            yield client, self.post_federation(client, round, state, fine_tune, partial(notify, client))

    def state_dict(self) -> dict[str, Any]:
        """Every client's store and engine-made models."""
        return {"client_store": self.store.state_dict(), "engine_store": self.engine_store.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            RunDirError: for a checkpoint of a run whose clients' stores stayed on their nodes (a distributed
                runtime): resumed here, every client would silently start from an empty store.
        """
        if state.get(STORES_ON_NODES):
            raise RunDirError(
                "The checkpoint is of a run whose clients keep their stores on their nodes: resume or test it with "
                "--runtime flower (on the same nodes)."
            )
        self.store.load_state_dict(state["client_store"])
        self.engine_store.load_state_dict(state["engine_store"])


def new_store(kind: str, run_dir: Path, name: str) -> ClientStore:
    """An empty client store: in memory, or on disk under ``run_dir/client_stores/name``."""
    return DiskClientStore(run_dir / "client_stores" / name) if kind == "disk" else ClientStore()


def check_upload(update: ClientUpdate, client: ClientInfo, shapes: ComponentShapes) -> None:
    """Refuse an upload of another client, outside the client's slice, misshapen or with non-finite values."""
    if update.client != client.id:
        raise ValueError(f"client_update() of client {client.id} returned an update of client {update.client}")
    outside = sorted(set(update.state) - set(client.components))
    if outside:
        raise ComponentMismatchError(f"client {client.id} uploaded components outside its slice: {outside}")
    check_state(update.state, {c: shapes[c] for c in update.state}, f"upload of client {client.id}")
    check_finite(update.state, "upload")


def describe(
    model: FoundationModel,
    data: FederatedDataModule,
    config: FederationConfig,
    trainers: VisitTrainers,
    initial_state: ComponentState,
    run_dir: Path,
) -> FederationInfo:
    """The federation as algorithms see it (the data must be set up)."""
    clients = {
        c.id: ClientInfo(c.id, tuple(c.tasks), tuple(model.components_for(c.tasks)), data.num_samples(c.id, "train"))
        for c in data.clients
    }
    with quiet_lightning():  # the precision a fit really runs with (e.g. 16-mixed is bf16-mixed on a CPU)
        precision = str(trainers.fit_trainer(1).precision)
    return FederationInfo(
        tasks=dict(data.tasks),
        clients=clients,
        paths={task: tuple(model.components_on_path(task)) for task in data.tasks},
        initial_state=initial_state,
        rounds=config.rounds,
        local_steps=config.local_steps,
        finetune_steps=config.finetune_steps,
        finetune_lr=config.finetune_lr,
        warmup_rounds=config.warmup_rounds,
        precision=precision,
        trainer=dict(trainers.kwargs),
        run_dir=run_dir,
    )
