"""Per-FedAvg (Fallah et al., 2020): MAML-style local meta-steps, personalization by local adaptation steps.

A sampled client trains its slice ``w`` of the global model with meta-steps, each on its own fresh batches:

- inner step on a batch ``D1``: ``w' = w - alpha * grad L(w; D1)``;
- first-order outer step on ``D2`` (default): ``w <- w - beta * grad L(w'; D2)``, the gradient taken at ``w'``
  and applied to ``w``;
- Hessian-free outer step (``variant="hessian_free"``), with a third batch ``D3``:
  ``w <- w - beta * (I - alpha * H(w; D3)) grad L(w'; D2)``, where the Hessian-vector product is exact (double
  backward), not the finite difference of gradients the paper also allows.

The outer step applies the meta-gradient with Adam at ``beta`` (tapl's default, from a sweep on the demo) or
with the paper's plain SGD step written above. The server averages the uploads like FedAvg. A client's
personalized model is its slice of the global model after ``adapt_steps`` plain SGD steps at ``alpha`` on its
own training data.

The math lives in pure functions over a list of parameters and loss closures (:func:`meta_gradient`,
:func:`hessian_vector_product`); :class:`PerFedAvgModule` feeds them a client's batches under Lightning's
manual optimization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim import SGD, Adam, Optimizer
from typing_extensions import override

from tapl.algorithms.fedavg import FedAvg
from tapl.client import ClientModule
from tapl.components import ComponentState
from tapl.context import ClientContext, ClientUpdate
from tapl.datamodules.collate import TaskBatch

if TYPE_CHECKING:
    from tapl.federation import FederatedOrchestrator

#: Evaluates a loss at the parameters' current values (with a graph to them).
LossClosure = Callable[[], Tensor]
#: Maps a list of per-parameter gradients to the gradients to use, e.g. their mean over data-parallel ranks.
GradientMap = Callable[[list[Tensor]], list[Tensor]]
#: Batches one meta-step consumes, per variant.
BATCHES_PER_STEP: dict[str, int] = {"first_order": 2, "hessian_free": 3}
#: The outer (meta) step's optimizer at step size ``beta``.
OuterOptimizer = Literal["sgd", "adam"]
#: ``--trainer`` settings that never apply to Per-FedAvg's own steps: it clips (or not) by its own setting.
NO_CLIPPING: dict[str, Any] = {"gradient_clip_val": None, "gradient_clip_algorithm": None}


def _unchanged(gradients: list[Tensor]) -> list[Tensor]:
    return gradients


def gradient(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False) -> list[Tensor]:
    """``d loss / d params``, with zeros for parameters the loss does not reach.

    Args:
        loss: A scalar with a graph to ``params``.
        params: The parameters.
        create_graph: Keep a graph of the gradient itself (to differentiate it again).
    """
    grads = torch.autograd.grad(
        loss, list(params), create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return list(grads)


def hessian_vector_product(loss: Tensor, params: Sequence[Tensor], vector: Sequence[Tensor]) -> list[Tensor]:
    """The exact product ``H v`` of the Hessian of ``loss`` at ``params`` with ``vector``, by double backward.

    Args:
        loss: A scalar with a graph to ``params``.
        params: The parameters.
        vector: One tensor per parameter, of its shape (treated as a constant).
    """
    grads = gradient(loss, params, create_graph=True)
    dot = sum(((g * v.detach()).sum() for g, v in zip(grads, vector, strict=True)), torch.zeros((), device=loss.device))
    if not dot.requires_grad:  # the loss is linear in params: its Hessian is zero
        return [torch.zeros_like(p) for p in params]
    return gradient(dot, params)


@dataclass(frozen=True)
class MetaGradient:
    """The outcome of one meta-step's gradient computation (see :func:`meta_gradient`).

    Attributes:
        gradient: The meta-gradient per parameter; the outer step is ``w <- w - beta * gradient``.
        inner_loss: ``L(w; D1)``, the loss before the inner adaptation step (detached).
        outer_loss: ``L(w'; D2)``, the loss after it, on a batch the step did not see (detached).
    """

    gradient: list[Tensor]
    inner_loss: Tensor
    outer_loss: Tensor


def meta_gradient(
    params: Sequence[Tensor],
    inner: LossClosure,
    outer: LossClosure,
    alpha: float,
    hessian: LossClosure | None = None,
    average: GradientMap = _unchanged,
) -> MetaGradient:
    """Per-FedAvg's meta-gradient at the parameters' current values ``w``; ``params`` end where they started.

    First-order (``hessian is None``): ``grad L(w'; D2)`` with ``w' = w - alpha * grad L(w; D1)``.
    Hessian-free: ``(I - alpha * H(w; D3)) grad L(w'; D2)`` with the exact Hessian-vector product; the ``D3``
    loss is evaluated with PyTorch's math attention kernel, the one that can be differentiated twice.

    Args:
        params: The trained parameters ``w`` (leaf tensors that require gradients).
        inner: The loss on ``D1`` at the current parameters.
        outer: The loss on ``D2`` at the current parameters (called at ``w'``).
        alpha: The inner step size.
        hessian: The loss on ``D3`` (called at ``w``) for the Hessian-free variant; ``None``: first-order.
        average: Applied to every gradient and Hessian-vector product before use, e.g. the mean over
            data-parallel ranks (the gradient of the mean loss over the global batch).
    """
    start = [p.detach().clone() for p in params]
    inner_loss = inner()
    inner_grad = average(gradient(inner_loss, params))
    try:
        with torch.no_grad():
            for p, g in zip(params, inner_grad, strict=True):
                p.sub_(alpha * g)
        outer_loss = outer()
        meta = average(gradient(outer_loss, params))
    finally:
        with torch.no_grad():
            for p, w in zip(params, start, strict=True):
                p.copy_(w)
    if hessian is not None:
        # The fused attention kernels (flash, memory-efficient) have no second derivative; the math one has.
        with sdpa_kernel(SDPBackend.MATH):
            hessian_loss = hessian()
        product = average(hessian_vector_product(hessian_loss, params, meta))
        meta = [g - alpha * h for g, h in zip(meta, product, strict=True)]
    return MetaGradient(meta, inner_loss.detach(), outer_loss.detach())


class SGDModule(ClientModule):
    """A :class:`ClientModule` trained by plain SGD (no momentum, no weight decay) at its fixed ``lr``.

    The configured ``--optimizer`` does not apply: ``lr`` must be a number (``ClientContext.fit(lr=...)``).
    """

    @override
    def configure_optimizers(self) -> Optimizer:
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float):
            raise TypeError(
                f"{type(self).__name__} needs a fixed learning rate (ClientContext.fit(lr=...)), got {self.lr!r}"
            )
        return SGD(self.model.parameters_of(self.components), lr=float(self.lr))


@dataclass
class AdaptationLosses:
    """What a :class:`PerFedAvgModule` fit reports: mean losses over its meta-steps (and data-parallel ranks).

    Attributes:
        before: Mean ``L(w; D1)``, before the inner adaptation step.
        after: Mean ``L(w'; D2)``, after it, on the meta-step's next batch.
    """

    before: float = math.nan
    after: float = math.nan


class PerFedAvgModule(SGDModule):
    """Trains a client's slice with Per-FedAvg meta-steps under Lightning's manual optimization.

    Every training batch is held until a meta-step has its 2 (first-order) or 3 (Hessian-free) batches; the
    meta-step then computes :func:`meta_gradient` and applies it with one step of the outer optimizer (plain
    SGD, or Adam whose moments live for the fit) at the module's ``lr`` (``beta``). Lightning counts
    ``global_step`` (hence ``max_steps``) in optimizer steps, so a fit of ``steps`` steps runs ``steps``
    meta-steps on ``2 * steps`` or ``3 * steps`` batches, across epochs if the client has fewer. With data
    parallelism every gradient is averaged over the ranks before use.

    ``train_loss()`` holds, per task, the loss before adaptation ``L(w; D1)``; ``losses`` receives the
    mean losses before and after adaptation when the fit ends.

    Args:
        *args, **kwargs: The arguments of :class:`ClientModule`; ``lr`` is the outer step size ``beta``.
        alpha: The inner step size.
        hessian_free: Use the Hessian-free outer step (3 batches) instead of the first-order one (2).
        losses: Filled in at the end of the fit.
        gradient_clip: The largest L2 norm of a meta-gradient (over the whole slice) before its step; ``None``:
            no clipping.
        outer_optimizer: ``"sgd"`` (plain SGD, as the paper) or ``"adam"`` (Adam, no weight decay).
    """

    def __init__(
        self,
        *args: Any,
        alpha: float,
        hessian_free: bool = False,
        losses: AdaptationLosses | None = None,
        gradient_clip: float | None = None,
        outer_optimizer: OuterOptimizer = "sgd",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.gradient_clip = gradient_clip
        self.outer_optimizer = outer_optimizer
        self.alpha = alpha
        self.hessian_free = hessian_free
        self.batches_per_step = BATCHES_PER_STEP["hessian_free" if hessian_free else "first_order"]
        self.losses = losses if losses is not None else AdaptationLosses()
        self._pending: list[TaskBatch] = []
        self._loss_sums: Tensor | None = None
        self._meta_steps = 0

    @override
    def configure_optimizers(self) -> Optimizer:
        if self.outer_optimizer == "sgd":
            return super().configure_optimizers()
        return Adam(self.model.parameters_of(self.components), lr=float(self.lr))

    def _loss(self, batch: TaskBatch, batch_idx: int, record: bool) -> Tensor:
        """The training objective on ``batch``; only a recorded call counts towards ``train_loss()``."""
        if record:
            return super().training_step(batch, batch_idx)
        sums, samples = dict(self._train_loss_sum), dict(self._train_samples)
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._train_loss_sum, self._train_samples = sums, samples

    def _average(self, gradients: list[Tensor]) -> list[Tensor]:
        """The gradients' mean over data-parallel ranks (one all-reduce); unchanged on one device."""
        if self.trainer.world_size == 1:
            return gradients
        flat = self.trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in gradients]), reduce_op="mean")
        return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in gradients]), gradients, strict=True)]

    @override
    def training_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._pending.append(batch)
        if len(self._pending) < self.batches_per_step:
            return
        batches, self._pending = self._pending, []
        params = self.model.parameters_of(self.components)
        result = meta_gradient(
            params,
            inner=lambda: self._loss(batches[0], batch_idx, record=True),
            outer=lambda: self._loss(batches[1], batch_idx, record=False),
            alpha=self.alpha,
            hessian=(lambda: self._loss(batches[2], batch_idx, record=False)) if self.hessian_free else None,
            average=self._average,
        )
        optimizer = self.optimizers()
        for p, g in zip(params, result.gradient, strict=True):
            p.grad = g
        if self.gradient_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses = torch.stack([result.inner_loss.double(), result.outer_loss.double()])
        self._loss_sums = losses if self._loss_sums is None else self._loss_sums + losses
        self._meta_steps += 1

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._loss_sums is None:
            return
        means = self.trainer.strategy.reduce(self._loss_sums / self._meta_steps, reduce_op="mean")
        self.losses.before, self.losses.after = (float(v) for v in means)


class PerFedAvg(FedAvg):
    """Per-FedAvg (Fallah et al., 2020): personalized FL as model-agnostic meta-learning.

    Each local fit runs ``federation.local_steps`` meta-steps (see :class:`PerFedAvgModule`), each on 2
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

    @property
    def global_label(self) -> str:
        return f"{self.label} meta-model"

    @property
    def personalized_label(self) -> str:
        return f"{self.label} adapted"

    @property
    def personalized_description(self) -> str:
        steps = f"{self.adapt_steps} SGD step{'s' if self.adapt_steps > 1 else ''}"
        return (
            f"each client's slice of the global meta-model after {steps} at lr alpha={self.alpha:g} on the client's "
            "own training data (the global row is the same model before this adaptation)"
        )

    # -- engine hooks -------------------------------------------------------------------------------------

    def setup(self, federation: FederatedOrchestrator) -> None:
        super().setup(federation)
        trainer = federation.trainers.kwargs
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
        if str(trainer.get("precision")) in ("16", "16-mixed"):
            raise ValueError(
                f"{self.label} does not support --trainer.precision {trainer['precision']}: its meta-gradients "
                "bypass the fp16 gradient scaler. Use bf16-mixed or 32-true."
            )
        if federation.config.warmup_rounds:
            rank_zero_warn(
                f"{self.label} ignores federation.warmup_rounds: its meta-steps use the fixed step sizes "
                f"alpha={self.alpha:g} and beta={self.beta:g}."
            )

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        losses = AdaptationLosses()
        module = partial(
            PerFedAvgModule,
            alpha=self.alpha,
            hessian_free=self.variant == "hessian_free",
            losses=losses,
            gradient_clip=self.gradient_clip,
            outer_optimizer=self.outer_optimizer,
        )
        result = ctx.fit(ctx.global_state, lr=self.beta, module_class=module, trainer_overrides=NO_CLIPPING)
        metrics = {f"train_loss/{task}": loss for task, loss in result.train_loss.items()}
        metrics["loss_before_adaptation"] = losses.before
        metrics["loss_after_adaptation"] = losses.after
        return ClientUpdate(ctx.client.id, result.state, ctx.num_train_samples, metrics)

    def personalized_state(self, client: int, global_state: ComponentState) -> ComponentState | None:
        assert self.federation is not None
        ctx = self.federation.client_context(client)
        adapted = ctx.fit(
            global_state, steps=self.adapt_steps, lr=self.alpha, module_class=SGDModule, trainer_overrides=NO_CLIPPING
        )
        return adapted.state
