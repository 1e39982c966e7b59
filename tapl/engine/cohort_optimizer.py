"""The optimizer of a cohort fit: SGD, Adam or AdamW over stacked per-member tensors, each member on its own.

A sequential fit's optimizer skips a tensor whose gradient is ``None`` (a multi-task client's batch without one of
its tasks leaves that task's head out of the graph): no momentum, no weight decay, no step counted. Over stacked
tensors such a member's slice gets a zero gradient instead, so :class:`CohortOptimizer` steps a member's slice only
where the member's own fit used it, and counts each member's steps apart (Adam's bias correction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.optim import SGD, Adam, AdamW, Optimizer

#: The optimizers a cohort fit can run per member (their update is elementwise).
COHORT_OPTIMIZERS: tuple[type[Optimizer], ...] = (SGD, Adam, AdamW)


class CohortOptimizer(Optimizer):
    """Runs ``template``'s update rule (its type and hyperparameters) on each member's slices of ``params``.

    Args:
        params: The stacked tensors (members first).
        template: The optimizer a member's sequential fit would build (one parameter group).
        used: Per stacked tensor, which members' fits used it since the last step (``(members,)`` booleans); the
            cohort module marks them, and each step clears them.

    Raises:
        ValueError: for an optimizer type outside :data:`COHORT_OPTIMIZERS`, several parameter groups, or settings
            the per-member rule does not cover (AMSGrad, a fused or capturable implementation).
    """

    def __init__(self, params: Sequence[nn.Parameter], template: Optimizer, used: Mapping[Tensor, Tensor]) -> None:
        if not isinstance(template, COHORT_OPTIMIZERS):
            raise ValueError(f"a cohort fit cannot run {type(template).__name__} per member")
        if len(template.param_groups) != 1:
            raise ValueError("a cohort fit needs an optimizer with one parameter group")
        settings = {k: v for k, v in template.param_groups[0].items() if k != "params"}
        if settings.get("amsgrad") or settings.get("fused") or settings.get("capturable"):
            raise ValueError("a cohort fit cannot run AMSGrad, fused or capturable optimizers per member")
        self.kind = "sgd" if isinstance(template, SGD) else "adam"
        settings["decoupled_weight_decay"] = isinstance(template, AdamW) or settings.get("decoupled_weight_decay")
        super().__init__(list(params), settings)
        self.used = used

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step of every member whose fit used a tensor."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                used = self.used[param]
                if param.grad is not None and bool(used.any()):
                    mask = used.view(-1, *[1] * (param.dim() - 1))
                    grad = -param.grad if group["maximize"] else param.grad
                    if self.kind == "sgd":
                        self._sgd(param, grad, mask, group)
                    else:
                        self._adam(param, grad, mask, used, group)
                used.zero_()
        return loss

    def _sgd(self, param: Tensor, grad: Tensor, mask: Tensor, group: dict) -> None:
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
                state["started"] = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
            buffer, started = state["momentum_buffer"], state["started"].view_as(mask)
            moved = torch.where(started, buffer * momentum + grad * (1 - group["dampening"]), grad)
            buffer.copy_(torch.where(mask, moved, buffer))
            state["started"] |= mask.flatten()
            grad = grad.add(moved, alpha=momentum) if group["nesterov"] else moved
        param.copy_(torch.where(mask, param - group["lr"] * grad, param))

    def _adam(self, param: Tensor, grad: Tensor, mask: Tensor, used: Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros(param.shape[0], dtype=torch.float64, device=param.device)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        state["step"] += used.to(torch.float64)
        step = state["step"].clamp(min=1)
        updated = param
        if weight_decay:
            if group["decoupled_weight_decay"]:
                updated = param * (1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
        shape = mask.shape
        step_size = (lr / (1 - beta1**step)).to(param.dtype).view(shape)
        correction2 = (1 - beta2**step).sqrt().to(param.dtype).view(shape)
        updated = updated - step_size * exp_avg / (exp_avg_sq.sqrt() / correction2 + group["eps"])
        state["exp_avg"].copy_(torch.where(mask, exp_avg, state["exp_avg"]))
        state["exp_avg_sq"].copy_(torch.where(mask, exp_avg_sq, state["exp_avg_sq"]))
        param.copy_(torch.where(mask, updated, param))
