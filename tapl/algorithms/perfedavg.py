"""Per-FedAvg (Fallah et al., 2020): personalized federated learning as model-agnostic meta-learning.

A sampled client trains its slice ``w`` of the global model by meta-steps (:mod:`tapl.meta_learning`): an inner
SGD step ``w' = w - alpha * grad L(w; D1)`` and an outer step along ``grad L(w'; D2)`` (first-order) or
``(I - alpha * H(w; D3)) grad L(w'; D2)`` (Hessian-free). The server averages the uploads like FedAvg. A client's
personalized model is its slice of the global model after ``adapt_steps`` plain SGD steps at ``alpha`` on its
own training data.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import SGD, Adam

from tapl.algorithms.fedavg import FedAvg
from tapl.api import ClientUpdate, FederationInfo
from tapl.client import OptimizerFactory
from tapl.components import ComponentState
from tapl.context import ClientContext
from tapl.meta_learning import BATCHES_PER_STEP, MetaLearning
from tapl.reported import ReportedModel, global_model

#: The outer (meta) step's optimizer at step size ``beta``.
OuterOptimizer = Literal["sgd", "adam"]
OUTER_OPTIMIZERS: dict[str, OptimizerFactory] = {"sgd": SGD, "adam": Adam}
#: ``--trainer`` settings that never apply to Per-FedAvg's own steps: it clips (or not) by its own setting.
NO_CLIPPING: dict[str, Any] = {"gradient_clip_val": None, "gradient_clip_algorithm": None}


class PerFedAvg(FedAvg):
    """Per-FedAvg (Fallah et al., 2020): personalized FL as model-agnostic meta-learning.

    Each local fit runs ``federation.local_steps`` meta-steps (see :class:`~tapl.meta_learning.MetaLearning`), each on 2
    (first-order) or 3 (Hessian-free) batches of ``data.batch_size`` rows; the server averages like FedAvg.
    The inner steps and the adaptation are plain SGD at ``alpha``; the outer step is Adam (tapl's default) or
    SGD (the paper's) at ``beta``. ``--optimizer`` applies only to the engine's "+FT" fine-tuning, and
    ``federation.warmup_rounds`` does not apply.

    Clipping is this algorithm's own setting: ``gradient_clip`` bounds each meta-gradient's norm, and
    ``--trainer.gradient_clip_val`` applies neither to the meta-steps nor to the adaptation steps (it still
    applies to the "+FT" fine-tuning). A clip of ``c`` under an SGD outer step caps every meta-step's move at
    ``beta * c``: the demo's clip of 1.0 at ``beta = 1e-3`` let a whole visit move the slice by about 0.01
    where a FedAvg visit moves it by about 6, which is why clipping is off unless asked for.
    ``--trainer.accumulate_grad_batches`` other than 1 and fp16 mixed precision (``16-mixed``, whose gradient
    scaler the meta-gradient bypasses) are refused; ``32-true`` and ``bf16-mixed`` work. The Hessian-free
    variant runs its third batch's attention on PyTorch's math kernel (differentiable twice; slower and larger
    than the fused kernels).

    Results report the global (meta-)model before adaptation as ``global``, its fine-tuned slice as
    ``global+FT``, and the adapted model as ``personalized``. Each visit logs ``train_loss/<task>`` (the
    meta-model's loss on each meta-step's first batch) and the mean losses before (``L(w; D1)``) and after
    (``L(w'; D2)``) the inner adaptation step as ``loss_before_adaptation`` and ``loss_after_adaptation``.

    The defaults (Adam outer step, ``alpha = 0.01``, ``beta = 1e-3``) come from a sweep on the demo
    (``experiments/sweeps.md``): the paper's plain SGD outer step at ``beta`` up to 0.05 left the image decoder
    and text decoder almost untrained in 8 rounds, and ``alpha = 0.05`` made the meta-model's text generation
    diverge. ``outer_optimizer: sgd`` is the paper's method.

    Args:
        variant: ``"first_order"`` (Per-FedAvg (FO)) or ``"hessian_free"`` (Per-FedAvg (HF), exact
            Hessian-vector products on a third batch).
        adapt_steps: SGD steps at ``alpha`` on the client's training data that personalize the global slice.
        outer_optimizer: ``"adam"`` (Adam at ``beta``, its moments kept for one visit like the local
            optimizer of the other algorithms), or ``"sgd"``, the paper's plain SGD outer step.
        gradient_clip: The largest L2 norm of a meta-gradient before the outer step; ``None``: no clipping.
        weighting: Server aggregation weights, as :class:`FedAvg`.
    """

    def __init__(
        self,
        alpha: float = 0.01,
        beta: float = 0.001,
        variant: Literal["first_order", "hessian_free"] = "first_order",
        adapt_steps: int = 1,
        outer_optimizer: OuterOptimizer = "adam",
        gradient_clip: float | None = None,
        weighting: Literal["samples", "uniform"] = "samples",
    ) -> None:
        super().__init__(weighting=weighting)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"algorithm.alpha and algorithm.beta must be > 0, got {alpha} and {beta}")
        if variant not in BATCHES_PER_STEP:
            raise ValueError(f"algorithm.variant must be 'first_order' or 'hessian_free', got {variant!r}")
        if adapt_steps < 1:
            raise ValueError(f"algorithm.adapt_steps must be >= 1, got {adapt_steps}")
        if outer_optimizer not in ("sgd", "adam"):
            raise ValueError(f"algorithm.outer_optimizer must be 'sgd' or 'adam', got {outer_optimizer!r}")
        if gradient_clip is not None and gradient_clip <= 0:
            raise ValueError(f"algorithm.gradient_clip must be > 0 or null, got {gradient_clip}")
        self.alpha = alpha
        self.beta = beta
        self.variant = variant
        self.adapt_steps = adapt_steps
        self.outer_optimizer = outer_optimizer
        self.gradient_clip = gradient_clip

    # -- names --------------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return "Per-FedAvg (HF)" if self.variant == "hessian_free" else "Per-FedAvg (FO)"

    def models(self) -> list[ReportedModel]:
        steps = f"{self.adapt_steps} SGD step{'s' if self.adapt_steps > 1 else ''}"
        description = (
            f"each client's slice of the global meta-model after {steps} at lr alpha={self.alpha:g} on the client's "
            "own training data (the global row is the same model before this adaptation)"
        )
        return [
            global_model(f"{self.label} meta-model"),
            ReportedModel("personalized", f"{self.label} adapted", description, self.adapted),
        ]

    # -- hooks --------------------------------------------------------------------------------------------

    def setup(self, info: FederationInfo) -> None:
        super().setup(info)
        trainer = info.trainer
        if trainer.get("gradient_clip_val"):
            rank_zero_warn(
                f"{self.label} does not clip its meta-steps or adaptation steps with --trainer.gradient_clip_val "
                f"(it still clips the +FT fine-tuning); use --algorithm.gradient_clip to clip meta-gradients."
            )
        if trainer.get("accumulate_grad_batches", 1) not in (None, 1):
            raise ValueError(
                f"{self.label} computes its meta-gradients itself, which Lightning cannot accumulate: set "
                "--trainer.accumulate_grad_batches 1 (each meta-step takes whole batches; raise --data.batch_size "
                "for more rows per step)."
            )
        if info.precision in ("16", "16-mixed"):
            raise ValueError(
                f"{self.label} does not support --trainer.precision {info.precision}: its meta-gradients "
                "bypass the fp16 gradient scaler. Use bf16-mixed or 32-true."
            )
        if info.warmup_rounds:
            rank_zero_warn(
                f"{self.label} ignores federation.warmup_rounds: its meta-steps use the fixed step sizes "
                f"alpha={self.alpha:g} and beta={self.beta:g}."
            )

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        meta = MetaLearning(self.alpha, hessian_free=self.variant == "hessian_free", gradient_clip=self.gradient_clip)
        optimizer = OUTER_OPTIMIZERS[self.outer_optimizer]
        result = ctx.fit(ctx.received, lr=self.beta, objective=meta, optimizer=optimizer, trainer_overrides=NO_CLIPPING)
        metrics = {f"train_loss/{task}": loss for task, loss in result.train_loss.items()}
        metrics["loss_before_adaptation"] = meta.loss_before
        metrics["loss_after_adaptation"] = meta.loss_after
        return ClientUpdate(ctx.client.id, result.state, ctx.num_train_samples, metrics)

    def adapted(self, ctx: ClientContext) -> ComponentState:
        """The client's personalized model: its global slice after ``adapt_steps`` SGD steps at ``alpha``."""
        fit = ctx.fit(ctx.received, steps=self.adapt_steps, lr=self.alpha, optimizer=SGD, trainer_overrides=NO_CLIPPING)
        return fit.state
