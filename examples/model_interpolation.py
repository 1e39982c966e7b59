"""Model interpolation (Mansour et al., 2020) as a user-written tapl plugin with a personal model.

Each client keeps a local model trained on its own data beside FedAvg's global one, and its personalized model
is the mixture ``lam * local + (1 - lam) * global``, with ``lam`` chosen per client on its validation split.

    PYTHONPATH=examples tapl fit --config experiments/demo.yaml --algorithm model_interpolation.ModelInterpolation
"""

from __future__ import annotations

from tapl.algorithms import ClientContext, ClientUpdate, FedAvg, ReportedModel
from tapl.components import ComponentState


def mix(local: ComponentState, global_: ComponentState, lam: float) -> ComponentState:
    """``lam * local + (1 - lam) * global``, tensor by tensor."""
    return {c: {k: lam * t + (1 - lam) * global_[c][k] for k, t in p.items()} for c, p in local.items()}


class ModelInterpolation(FedAvg):
    """FedAvg plus, per client, a local model and the interpolation weight that suits the client best.

    Args:
        grid: The weights ``lam`` tried on the validation split after each visit (0: the global model).
        weighting: Server aggregation weights, as FedAvg.
    """

    def __init__(self, grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), weighting: str = "samples") -> None:
        super().__init__(weighting=weighting)
        self.grid = grid

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        trained = ctx.fit(ctx.received)  # the global model's local training, uploaded
        local = ctx.fit(ctx.store.get("local", ctx.initial))  # the client's own model, never uploaded
        losses = {lam: self.val_loss(ctx, mix(local.state, trained.state, lam)) for lam in self.grid}
        ctx.store["local"] = local.state
        ctx.store["lam"] = min(losses, key=losses.__getitem__)
        metrics = {f"train_loss/{t}": v for t, v in trained.train_loss.items()}
        metrics["lam"] = ctx.store["lam"]
        return ClientUpdate(ctx.client.id, trained.state, ctx.num_train_samples, metrics)

    @staticmethod
    def val_loss(ctx: ClientContext, state: ComponentState) -> float:
        """The sample-weighted validation loss of ``state`` over the client's tasks."""
        per_task = ctx.evaluate(state, "val").values()
        return sum(m["loss"] * m["samples"] for m in per_task) / max(1.0, sum(m["samples"] for m in per_task))

    def personalized(self, ctx: ClientContext) -> ComponentState:
        """The client's mixture of its local model and the current global slice (the global one if never
        visited)."""
        if "local" not in ctx.store:
            return ctx.received
        return mix(ctx.store["local"], ctx.received, ctx.store["lam"])

    def models(self) -> list[ReportedModel]:
        description = "lam * local + (1 - lam) * global, lam chosen per client on its validation split"
        return [super().models()[0], ReportedModel("personalized", "Interpolation", description, self.personalized)]
