"""FedProx: FedAvg whose local objective adds a proximal term towards the received global slice."""

from __future__ import annotations

from typing import Literal

from tapl.algorithms.fedavg import FedAvg
from tapl.algorithms.proximal import Proximal
from tapl.api import ClientUpdate, FederationInfo
from tapl.context import ClientContext

#: Precisions that keep the trainable tensors in float32, so ``mu * (w - w_global)`` reaches them exactly.
EXACT_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg with a proximal local objective.

    A sampled client trains its received global slice ``w_global`` on

        ``L(w) = task_loss(w) + mu/2 * ||w - w_global||^2``

    over its trainable tensors ``w`` (the slice's components), so each optimizer step's gradient is
    ``grad task_loss(w) + mu * (w - w_global)``; the server then averages like :class:`FedAvg`. The term is
    computed in float32 and counted once per optimizer step under gradient accumulation (see
    :class:`~tapl.algorithms.proximal.Proximal`). Each upload logs ``proximal_term``, the term's mean over
    the visit's training batches, beside ``train_loss/<task>``.

    The trainable tensors must stay float32: ``--trainer.precision`` ``32-true``, ``bf16-mixed`` or
    ``16-mixed`` (its gradient scaling is undone before the step). With ``16-true``/``bf16-true`` the weights
    themselves are half precision (``w_global`` is not representable and ``lr * mu * (w - w_global)`` rounds
    away) and with ``64-true`` the float32 term is coarser than the weights, so :meth:`setup` rejects them.

    The FedProx paper tunes ``mu`` (0.001 to 1) for plain SGD, where the term pulls each step back by
    ``lr * mu * (w - w_global)``. Under an adaptive optimizer such as AdamW (the demo's and the paper configs'
    ``--optimizer``) the gradient is divided by its running RMS, task and proximal parts together: the step
    no longer scales with ``mu``, and what counts is ``mu * |w - w_global|`` next to the task gradient. As a
    visit of a few AdamW steps moves a tensor by roughly ``local_steps * lr``, values tuned for SGD do not
    transfer: sweep ``mu`` with your optimizer (``experiments/sweeps.md`` holds the demo's sweep).

    Args:
        mu: Weight of the proximal term (``mu >= 0``; ``0`` is FedAvg). Default 0.01 (the FedProx paper's
            SGD range); its effect under AdamW differs, see above.
        weighting: Server aggregation weights: ``"samples"`` (training rows) or ``"uniform"``, as :class:`FedAvg`.
    """

    def __init__(self, mu: float = 0.01, weighting: Literal["samples", "uniform"] = "samples") -> None:
        super().__init__(weighting=weighting)
        if mu < 0:
            raise ValueError(f"algorithm.mu must be >= 0, got {mu}")
        self.mu = mu

    def setup(self, info: FederationInfo) -> None:
        """Check that the local fits' precision keeps the proximal gradient exact.

        Raises:
            ValueError: naming ``trainer.precision`` when it is not one of :data:`EXACT_PRECISIONS`.
        """
        super().setup(info)
        if info.precision not in EXACT_PRECISIONS:
            raise ValueError(
                f"FedProx needs float32 trainable tensors for its proximal term, but --trainer.precision is "
                f"{info.precision!r}: use one of {', '.join(EXACT_PRECISIONS)} (bf16-mixed for bfloat16 compute)."
            )

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        proximal = Proximal(ctx.received, self.mu)
        result = ctx.fit(ctx.received, objective=proximal)
        metrics = {f"train_loss/{task}": loss for task, loss in result.train_loss.items()}
        metrics["proximal_term"] = proximal.mean
        return ClientUpdate(ctx.client.id, result.state, ctx.num_train_samples, metrics)
