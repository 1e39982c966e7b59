"""Meta-learning steps (MAML-style, as Per-FedAvg's): the meta-gradient maths and an objective that trains by it.

One meta-step at parameters ``w``, each on its own fresh batches:

- inner step on a batch ``D1``: ``w' = w - alpha * grad L(w; D1)``;
- first-order meta-gradient on ``D2``: ``grad L(w'; D2)``, the gradient taken at ``w'`` and applied to ``w``;
- Hessian-free meta-gradient, with a third batch ``D3``: ``(I - alpha * H(w; D3)) grad L(w'; D2)``, where the
  Hessian-vector product is exact (double backward), not a finite difference of gradients.

The maths are pure functions over a list of parameters and loss closures (:func:`meta_gradient`,
:func:`hessian_vector_product`); :class:`MetaLearning` feeds them a client's batches as a fit's objective, under
Lightning's manual optimization, and steps the fit's optimizer with the meta-gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from tapl.datamodules.collate import TaskBatch
from tapl.objective import Objective

if TYPE_CHECKING:
    from tapl.client import ClientModule

#: Evaluates a loss at the parameters' current values (with a graph to them).
LossClosure = Callable[[], Tensor]
#: Maps a list of per-parameter gradients to the gradients to use, e.g. their mean over data-parallel ranks.
GradientMap = Callable[[list[Tensor]], list[Tensor]]
#: Batches one meta-step consumes, per variant.
BATCHES_PER_STEP: dict[str, int] = {"first_order": 2, "hessian_free": 3}


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


class MetaLearning(Objective):
    """Trains a fit's state by meta-steps: each consumes 2 (first-order) or 3 (Hessian-free) batches.

    Every training batch is held until a meta-step has its batches; the meta-step then computes
    :func:`meta_gradient` and applies it with one step of the fit's optimizer at the fit's learning rate (the
    outer step size ``beta``; e.g. ``ClientContext.fit(optimizer=torch.optim.SGD, lr=beta)``). Lightning counts
    ``global_step`` (hence a fit's ``steps``) in optimizer steps, so a fit of ``steps`` steps runs ``steps``
    meta-steps on ``2 * steps`` or ``3 * steps`` batches, across epochs if the client has fewer. With data
    parallelism every gradient is averaged over the ranks before use.

    The fit's ``train_loss`` holds, per task, the loss before adaptation ``L(w; D1)``; :attr:`loss_before` and
    :attr:`loss_after` hold the mean losses before and after adaptation over the fit's meta-steps (and ranks)
    once it ends.

    Args:
        alpha: The inner step size.
        hessian_free: Use the Hessian-free meta-gradient (3 batches) instead of the first-order one (2).
        gradient_clip: The largest L2 norm of a meta-gradient (over the whole state) before its step; ``None``:
            no clipping.
    """

    automatic_optimization = False

    def __init__(self, alpha: float, hessian_free: bool = False, gradient_clip: float | None = None) -> None:
        self.alpha = alpha
        self.hessian_free = hessian_free
        self.gradient_clip = gradient_clip
        self.batches_per_step = BATCHES_PER_STEP["hessian_free" if hessian_free else "first_order"]
        #: Mean ``L(w; D1)`` over the fit's meta-steps, before the inner adaptation step.
        self.loss_before = math.nan
        #: Mean ``L(w'; D2)``, after it, on the meta-step's next batch.
        self.loss_after = math.nan
        self._pending: list[TaskBatch] = []
        self._loss_sums: Tensor | None = None
        self._meta_steps = 0

    @staticmethod
    def _average(module: ClientModule, gradients: list[Tensor]) -> list[Tensor]:
        """The gradients' mean over data-parallel ranks (one all-reduce); unchanged on one device."""
        if module.trainer.world_size == 1:
            return gradients
        flat = module.trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in gradients]), reduce_op="mean")
        return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in gradients]), gradients, strict=True)]

    def training_step(self, module: ClientModule, batch: TaskBatch, batch_idx: int) -> None:
        self._pending.append(batch)
        if len(self._pending) < self.batches_per_step:
            return
        batches, self._pending = self._pending, []
        params = module.model.parameters_of(module.components)
        result = meta_gradient(
            params,
            inner=lambda: module.batch_loss(batches[0]),
            outer=lambda: module.batch_loss(batches[1], record=False),
            alpha=self.alpha,
            hessian=(lambda: module.batch_loss(batches[2], record=False)) if self.hessian_free else None,
            average=partial(self._average, module),
        )
        optimizer = module.optimizers()
        for p, g in zip(params, result.gradient, strict=True):
            p.grad = g
        if self.gradient_clip is not None:
            module.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses = torch.stack([result.inner_loss.double(), result.outer_loss.double()])
        self._loss_sums = losses if self._loss_sums is None else self._loss_sums + losses
        self._meta_steps += 1

    def on_fit_end(self, module: ClientModule) -> None:
        if self._loss_sums is None:
            return
        means = module.trainer.strategy.reduce(self._loss_sums / self._meta_steps, reduce_op="mean")
        self.loss_before, self.loss_after = (float(v) for v in means)
