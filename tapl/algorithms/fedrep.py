"""FedRep (Collins et al., 2021): a shared representation learned by all clients, task heads kept local.

A client's task heads are personal and never leave it; every other component of its slice (encoders,
fusion experts: the body) is shared. Each visit trains the personal heads over the received body, then
the body under those heads, and uploads the body only.
"""

from __future__ import annotations

from typing import Literal

from tapl.algorithms.fedavg import FedAvg
from tapl.api import ClientUpdate
from tapl.components import ComponentState, head_component, select
from tapl.context import ClientContext
from tapl.reported import ReportedModel


class FedRep(FedAvg):
    """FedRep: federated representation learning with local heads.

    The server averages the bodies like FedAvg (each component over the clients that hold it); no client
    uploads a head, so the server's heads stay the untrained initial ones. There is thus no global model to
    report (no global or "+FT" rows); the personalized model is the global body with the client's own heads.

    Args:
        head_steps: Optimizer steps training the heads, the body frozen, per visit (default:
            ``federation.local_steps``). The paper trains the head for several local epochs first.
        body_steps: Optimizer steps then training the body, the heads frozen (default:
            ``federation.local_steps``).
        weighting: Server aggregation weights of the bodies, as :class:`FedAvg`.
    """

    def __init__(
        self,
        head_steps: int | None = None,
        body_steps: int | None = None,
        weighting: Literal["samples", "uniform"] = "samples",
    ) -> None:
        super().__init__(weighting=weighting)
        for name, steps in (("head_steps", head_steps), ("body_steps", body_steps)):
            if steps is not None and steps < 1:
                raise ValueError(f"algorithm.{name} must be >= 1 (or null: local_steps), got {steps}")
        self.head_steps = head_steps
        self.body_steps = body_steps

    @staticmethod
    def head_components(ctx: ClientContext) -> list[str]:
        """The client's personal components: the heads of its tasks."""
        return sorted(head_component(task) for task in ctx.client.tasks)

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        heads = self.head_components(ctx)
        body = [c for c in ctx.components if c not in heads]
        head_fit = ctx.fit(self.with_own_heads(ctx), steps=self.head_steps, trainable=heads)
        body_fit = ctx.fit(head_fit.state, steps=self.body_steps, trainable=body)
        ctx.store["heads"] = select(body_fit.state, heads)
        metrics = {f"head_loss/{t}": v for t, v in head_fit.train_loss.items()}
        metrics.update({f"body_loss/{t}": v for t, v in body_fit.train_loss.items()})
        return ClientUpdate(ctx.client.id, select(body_fit.state, body), ctx.num_train_samples, metrics)

    @staticmethod
    def with_own_heads(ctx: ClientContext) -> ComponentState:
        """The received body with the client's own heads (the received heads before its first visit)."""
        return {**ctx.received, **ctx.store.get("heads", {})}

    def models(self) -> list[ReportedModel]:
        description = (
            "FedRep's model of each client: the global body (every component but the task heads, averaged over "
            "the clients that hold it) with the client's own task heads, trained locally and never uploaded. "
            "There is no global model: the server's heads are the untrained initial ones, which a client never "
            "visited still holds."
        )
        return [ReportedModel("personalized", self.label, description, self.with_own_heads)]
