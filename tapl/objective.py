"""The local objective of a fit: the one way an algorithm changes what a client minimises.

A fit's :class:`~tapl.client.ClientModule` runs the model on every task's part of a batch and hands the
outcome to the fit's :class:`Objective` as a :class:`TrainingStep`; the objective returns the loss to optimise.
The default is the task loss: each task's mean loss weighted by its share of the batch. An objective may add
terms over the trained tensors (a proximal term), over the outputs of another state of the client run on the
same inputs (:meth:`TrainingStep.outputs_of`, e.g. a teacher for distillation), or replace the training step
itself (:meth:`Objective.training_step`, e.g. meta-learning steps over several batches).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from tapl.components import ComponentState
from tapl.datamodules.collate import TaskBatch

if TYPE_CHECKING:
    from tapl.models.foundation import FoundationModel
    from tapl.tasks import Task


class FitModule(Protocol):
    """What an objective sees of its fit's ``LightningModule`` (a :class:`~tapl.client.ClientModule`)."""

    #: The components the fit trains.
    components: list[str]
    #: The shared model, with the fitted state loaded.
    model: FoundationModel
    #: The client's tasks, by name.
    tasks: dict[str, Task]

    @property
    def device(self) -> torch.device:
        """Where the module computes."""
        ...

    def batch_loss(self, batch: TaskBatch, record: bool = True) -> Tensor:
        """The objective's loss on ``batch`` (its task losses count towards the fit's training loss)."""
        ...


@dataclass(frozen=True)
class TaskPart:
    """One task's part of a training batch, run through the model.

    Attributes:
        task: The task.
        inputs: The part's inputs.
        targets: The part's targets.
        outputs: The model's outputs (with a graph to the trained tensors).
        loss: The task type's mean loss of those outputs.
        share: The part's share of the batch's rows.
    """

    task: Task
    inputs: Mapping[str, Any]
    targets: Any
    outputs: Tensor
    loss: Tensor
    share: float


class TrainingStep:
    """One training batch of a fit as an objective sees it: the tasks' parts and the trained tensors.

    Args:
        module: The fit's module.
        parts: The batch's parts, one per task present in it.
    """

    def __init__(self, module: FitModule, parts: list[TaskPart]) -> None:
        self.module = module
        self.parts = parts

    @property
    def device(self) -> torch.device:
        """Where the batch and the trained tensors are."""
        return self.module.device

    @property
    def task_loss(self) -> Tensor:
        """The batch's task loss: every task's mean loss weighted by its share of the batch's rows."""
        loss = torch.zeros((), device=self.device)
        for part in self.parts:
            loss = loss + part.loss * part.share
        return loss

    def parameters(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """The trained tensors as ``(component, key, parameter)``, in the fit's component order."""
        model = self.module.model
        for component in self.module.components:
            for key, param in model.component_parameters(component).items():
                yield component, key, param

    def outputs_of(self, state: ComponentState, part: TaskPart) -> Tensor:
        """The outputs of another state of the client's slice (e.g. a teacher) on ``part``'s inputs.

        They are computed in evaluation mode and without gradients: the other state is a constant of the
        objective, and the trained state's randomness (dropout) is the same as in a plain fit.
        """
        model = self.module.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model.forward_with(state, part.task.name, part.inputs)
        finally:
            model.train(was_training)


class Objective:
    """What a local fit minimises; by itself, the task loss. Subclass it to change a fit's objective.

    Override :meth:`loss` to add terms. An objective that needs its own optimization loop (several batches
    per optimizer step) sets :attr:`automatic_optimization` to ``False`` and overrides :meth:`training_step`,
    as Lightning's manual optimization. One objective serves one fit; give each fit a new one.
    """

    #: Whether Lightning steps the optimizer (``False``: :meth:`training_step` does it).
    automatic_optimization: bool = True

    def loss(self, step: TrainingStep) -> Tensor:
        """The loss to optimise on one batch; by default ``step.task_loss``."""
        return step.task_loss

    def on_fit_start(self, module: FitModule) -> None:
        """Called when the fit starts, on the fit's device (e.g. to check settings against the module's tasks or
        move constant tensors to the device)."""

    def training_step(self, module: FitModule, batch: TaskBatch, batch_idx: int) -> Tensor | None:
        """One training step: by default the loss of ``batch`` (:meth:`ClientModule.batch_loss`)."""
        return module.batch_loss(batch)

    def on_fit_end(self, module: FitModule) -> None:
        """Called when the fit ends (e.g. to gather statistics over data-parallel ranks)."""
