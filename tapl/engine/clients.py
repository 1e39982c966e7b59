"""The client side of the engine in one process: the federation as algorithms see it, and what every piece of
client work needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapl.algorithms.base import Algorithm
from tapl.api import ClientInfo, FederationInfo, Stage
from tapl.components import ComponentState
from tapl.context import ClientContext
from tapl.datamodules.federated import FederatedDataModule
from tapl.engine.client_store import ClientStore
from tapl.engine.config import FederationConfig
from tapl.engine.local_training import LocalTraining
from tapl.models.foundation import FoundationModel
from tapl.visit_trainer import VisitTrainers, quiet_lightning


@dataclass(frozen=True)
class Clients:
    """The federation, the algorithm, local training and every client's store.

    Attributes:
        info: The federation.
        algorithm: The algorithm whose client side runs.
        training: Fits and evaluates states on a client's data.
        store: Every client's own state.
    """

    info: FederationInfo
    algorithm: Algorithm
    training: LocalTraining
    store: ClientStore

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
