"""The client side of the engine in one process: what every piece of client work needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tapl.algorithms.base import Algorithm
from tapl.api import FederationInfo, Stage
from tapl.components import ComponentState
from tapl.context import ClientContext
from tapl.engine.client_store import ClientStore
from tapl.engine.local_training import LocalTraining


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
