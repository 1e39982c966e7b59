"""Ditto (Li et al., 2021): FedAvg for the global model, plus a personal model held near it by a proximal term.

Every visit trains the received global slice as FedAvg does and uploads it. The client's personal model
``v``, which never leaves the client, then trains on ``task_loss + lam/2 * ||v - w||^2`` where ``w`` is
the global slice the client received at the start of the visit.
"""

from __future__ import annotations

from typing import Literal

from tapl.algorithms.fedavg import FedAvg
from tapl.algorithms.proximal import Proximal
from tapl.api import ClientUpdate
from tapl.context import ClientContext
from tapl.reported import ReportedModel, global_model, initial, stored


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

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        trained = ctx.fit(ctx.received)
        proximal = Proximal(ctx.received, self.lam)
        personal = ctx.fit(ctx.store.get("personal", ctx.initial), steps=self.personal_steps, objective=proximal)
        ctx.store["personal"] = personal.state
        metrics = {f"train_loss/{t}": v for t, v in trained.train_loss.items()}
        metrics.update({f"personal_loss/{t}": v for t, v in personal.train_loss.items()})
        metrics["proximal_term"] = proximal.mean
        return ClientUpdate(ctx.client.id, trained.state, ctx.num_train_samples, metrics)

    def models(self) -> list[ReportedModel]:
        description = (
            f"Ditto's personal model of each client: trained on every visit on the task loss plus lam/2 * "
            f"||v - w||^2 (lam = {self.lam:g}) towards the global slice w the client received; never uploaded. "
            "A client never visited holds the initial model."
        )
        return [
            global_model("FedAvg"),
            ReportedModel("personalized", self.label, description, stored("personal", initial)),
        ]
