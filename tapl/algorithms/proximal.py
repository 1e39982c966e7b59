"""The proximal objective ``task_loss + mu/2 * ||w - w_ref||^2``, for FedProx, Ditto and the like."""

from __future__ import annotations

import torch
from torch import Tensor

from tapl.components import ComponentState
from tapl.objective import Objective, TrainingStep


class Proximal(Objective):
    """The task loss plus ``mu/2 * ||w - w_ref||^2``.

    ``w`` are the tensors the fit trains and ``w_ref`` their values in ``reference`` (e.g. the global slice the
    client received). The term is computed in float32 whatever the precision, and added to every micro-batch's
    loss: with gradient accumulation Lightning scales each micro-batch's loss by ``1 / accumulate_grad_batches``,
    so one optimizer step sees the term's gradient ``mu * (w - w_ref)`` exactly once.

    Args:
        reference: The reference tensors (at least the fitted components).
        mu: The term's weight.
    """

    def __init__(self, reference: ComponentState, mu: float) -> None:
        if mu < 0:
            raise ValueError(f"The proximal weight mu must be >= 0, got {mu}")
        self.reference = reference
        self.mu = mu
        self._on_device: dict[tuple[str, str], Tensor] = {}
        self._sum: Tensor | None = None  # on the device: no host sync per step
        self._calls = 0

    def loss(self, step: TrainingStep) -> Tensor:
        loss = step.task_loss
        squares = torch.zeros((), device=loss.device, dtype=torch.float32)
        for component, key, param in step.parameters():
            reference = self._on_device.get((component, key))
            if reference is None:
                reference = self.reference[component][key].to(param.device, torch.float32)
                self._on_device[(component, key)] = reference
            squares = squares + (param.float() - reference).pow(2).sum()
        term = 0.5 * self.mu * squares
        self._sum = term.detach() if self._sum is None else self._sum + term.detach()
        self._calls += 1
        return loss + term

    @property
    def mean(self) -> float:
        """The term's mean value over the training batches so far (0 before the first)."""
        return float(self._sum) / self._calls if self._sum is not None else 0.0
