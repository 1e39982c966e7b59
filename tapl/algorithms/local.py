"""Local training: every client trains only its own model and nothing is shared (the no-federation baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tapl.algorithms.base import Algorithm
from tapl.algorithms.personal import PersonalModels
from tapl.components import ComponentState, check_finite
from tapl.context import ClientContext, ClientUpdate

if TYPE_CHECKING:
    from tapl.federation import FederatedOrchestrator


class Local(Algorithm):
    """Each client trains its own model on its own data; the server aggregates nothing.

    The compute schedule is the federation's: a client sampled in a round trains its local model for
    ``federation.local_steps`` (its slice of the initial model on its first visit). Uploads are empty, so no
    bytes go up, and the global model stays the initial one; results report only the local models (a client
    never visited is evaluated with its slice of the initial model). The local models are checkpointed, so a
    resumed run continues each client's own training.
    """

    has_global_model = False
    downloads_global = False

    def __init__(self) -> None:
        super().__init__()
        #: Each visited client's model, by client id.
        self.local = PersonalModels()

    @property
    def personalized_description(self) -> str:
        return (
            "each client's own model, trained only on its own data from its slice of the initial model; a client "
            "never visited holds that initial slice"
        )

    def setup(self, federation: FederatedOrchestrator) -> None:
        super().setup(federation)
        self.local.start_from(federation.global_state)

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        cid = ctx.client.id
        result = ctx.fit(self.local.model(cid, ctx.components))
        # Nothing is uploaded for the engine to check, so the visit fails here.
        check_finite(result.state, "the trained local model")
        self.local[cid] = result.state
        metrics = {f"train_loss/{task}": loss for task, loss in result.train_loss.items()}
        return ClientUpdate(cid, {}, ctx.num_train_samples, metrics)

    def aggregate(self, round: int, global_state: ComponentState, updates: list[ClientUpdate]) -> ComponentState:
        return global_state

    def personalized_state(self, client: int, global_state: ComponentState) -> ComponentState | None:
        return self.local.model(client, global_state)

    def state_dict(self) -> dict[str, Any]:
        return {"local": self.local.to_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local.load(state["local"])
