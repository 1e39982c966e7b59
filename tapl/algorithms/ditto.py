"""Ditto (Li et al., 2021): FedAvg for the global model, plus a personal model held near it by a proximal term.

Every visit trains the received global slice as FedAvg does and uploads it. The client's personal model
``v``, which never leaves the client, then trains on ``task_loss + lam/2 * ||v - w||^2`` where ``w`` is
the global slice the client received at the start of the visit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from tapl.algorithms.fedavg import FedAvg
from tapl.algorithms.personal import PersonalModels
from tapl.algorithms.proximal import ProximalTerm
from tapl.components import ComponentState, check_finite
from tapl.context import ClientContext, ClientUpdate

if TYPE_CHECKING:
    from tapl.federation import FederatedOrchestrator


class Ditto(FedAvg):
    """Ditto: fair and robust personalization through a global-regularized personal model.

    The server model is FedAvg's, tensor for tensor (the uploads are the trained global slices), so it is
    reported as FedAvg and FedAvg+FT.

    Args:
        lam: Weight ``lambda`` of the proximal term pulling the personal model towards the received global
            slice; ``0`` trains it on the task loss alone (local training), larger values keep it closer to
            the global model. Default 0.1; the paper tunes it per dataset with SGD. Under an adaptive
            optimizer such as AdamW (the demo's ``--optimizer``) the task and proximal gradients are
            normalised together, so its scale differs from the paper's: what counts is
            ``lam * |v - w|`` next to the task gradient (see :class:`~tapl.algorithms.FedProx`).
        personal_steps: Optimizer steps of the personal model per visit (default: ``federation.local_steps``).
        weighting: Server aggregation weights, as :class:`FedAvg`.
    """

    def __init__(
        self,
        lam: float = 0.1,
        personal_steps: int | None = None,
        weighting: Literal["samples", "uniform"] = "samples",
    ) -> None:
        super().__init__(weighting=weighting)
        if lam < 0:
            raise ValueError(f"algorithm.lam must be >= 0, got {lam}")
        if personal_steps is not None and personal_steps < 1:
            raise ValueError(f"algorithm.personal_steps must be >= 1 (or null: local_steps), got {personal_steps}")
        self.lam = lam
        self.personal_steps = personal_steps
        #: Each visited client's personal model ``v``.
        self.personal = PersonalModels()

    @property
    def global_label(self) -> str:
        return "FedAvg"

    @property
    def personalized_description(self) -> str:
        return (
            f"Ditto's personal model of each client: trained on every visit on the task loss plus lam/2 * "
            f"||v - w||^2 (lam = {self.lam:g}) towards the global slice w the client received; never uploaded. "
            "A client never visited holds the initial model."
        )

    def setup(self, federation: FederatedOrchestrator) -> None:
        super().setup(federation)
        # The personal model of a client not visited yet: its slice of the initial model.
        self.personal.start_from(federation.global_state)

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        cid = ctx.client.id
        trained = ctx.fit(ctx.global_state)
        proximal = ProximalTerm(ctx.global_state, self.lam)
        fitted = ctx.fit(self.personal.model(cid, ctx.components), steps=self.personal_steps, loss_fn=proximal)
        check_finite(trained.state, "the trained global slice")
        check_finite(fitted.state, "the personal model")
        # The visit succeeded: only now does the client's own state change.
        self.personal[cid] = fitted.state
        metrics = {f"train_loss/{t}": v for t, v in trained.train_loss.items()}
        metrics.update({f"personal_loss/{t}": v for t, v in fitted.train_loss.items()})
        metrics["proximal_term"] = proximal.mean
        return ClientUpdate(cid, trained.state, ctx.num_train_samples, metrics)

    def personalized_state(self, client: int, global_state: ComponentState) -> ComponentState | None:
        return self.personal.model(client, global_state)

    def state_dict(self) -> dict[str, Any]:
        return {"personal": self.personal.to_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.personal.load(state["personal"])
