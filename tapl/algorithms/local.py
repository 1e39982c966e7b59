"""Local training: every client trains only its own model and nothing is shared (the no-federation baseline)."""

from __future__ import annotations

from tapl.algorithms.base import Algorithm
from tapl.api import ClientUpdate, Failure, Instruction
from tapl.components import ComponentState
from tapl.context import ClientContext
from tapl.reported import ReportedModel, initial, stored


class Local(Algorithm):
    """Each client trains its own model on its own data; the server sends and aggregates nothing.

    The compute schedule is the federation's: a client sampled in a round trains its local model for
    ``federation.local_steps`` (its slice of the initial model on its first visit). Nothing goes down or up,
    and the global model stays the initial one; results report only the local models (a client never
    visited is evaluated with its slice of the initial model).
    """

    def configure_round(self, round: int, clients: list[int], global_state: ComponentState) -> list[Instruction]:
        return [Instruction(client, {}) for client in clients]

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        result = ctx.fit(ctx.store.get("model", ctx.initial))
        ctx.store["model"] = result.state
        metrics = {f"train_loss/{task}": loss for task, loss in result.train_loss.items()}
        return ClientUpdate(ctx.client.id, {}, ctx.num_train_samples, metrics)

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        return global_state

    def models(self) -> list[ReportedModel]:
        description = (
            "each client's own model, trained only on its own data from its slice of the initial model; a client "
            "never visited holds that initial slice"
        )
        return [ReportedModel("personalized", self.label, description, stored("model", initial))]
