"""Knowledge distillation of a client's model towards a teacher model over the same shared backbone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from tapl.client import ClientModule
from tapl.components import ComponentState


class DistillationModule(ClientModule):
    """Trains a client's slice on ``task_loss + weight[task] * distillation_loss(student, teacher)``.

    The teacher is another state of the same slice; its outputs come from the shared model with the teacher's
    tensors substituted (:meth:`FoundationModel.forward_with`), in evaluation mode and without gradients, so
    the teacher is deterministic and the student's randomness (dropout, data order) is the same as a plain
    fit's. The distillation loss of each task is its task type's
    :meth:`~tapl.tasks.TaskType.distillation_loss` in the task's form (softened KL for logits; MSE or a KL
    over the width axis for images; a per-token mean or a per-sequence sum of KLs for text). A task with
    weight 0 skips the teacher's forward pass.

    Args:
        *args, **kwargs: The arguments of :class:`ClientModule` (model, tasks, components, optimizer, ...).
        teacher: The teacher's tensors, with the same components as the student.
        weights: Distillation weight per task name.
        temperature: Softmax temperature ``T`` (the KL is scaled by ``T^2``).
        forms: Distillation loss form per task name (one of its type's ``distillation_forms``); a task
            without one uses its type's default.
    """

    def __init__(
        self,
        *args: Any,
        teacher: ComponentState,
        weights: Mapping[str, float],
        temperature: float = 1.0,
        forms: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        missing = sorted(set(self.components) ^ set(teacher))
        if missing:
            raise ValueError(f"The teacher's components differ from the student's: {missing}")
        if temperature <= 0:
            raise ValueError(f"The distillation temperature must be > 0, got {temperature}")
        self.teacher = teacher
        self.weights = dict(weights)
        self.temperature = temperature
        self.forms = dict(forms or {})
        for task, form in self.forms.items():
            self.tasks[task].task_type.check_distillation_form(form)

    @override
    def on_fit_start(self) -> None:
        self.teacher = {c: {k: t.to(self.device) for k, t in p.items()} for c, p in self.teacher.items()}

    def teacher_outputs(self, task: str, inputs: Mapping[str, dict[str, Tensor]]) -> Tensor:
        """The teacher's outputs for one task's inputs (evaluation mode, no gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model.forward_with(self.teacher, task, inputs)
        finally:
            self.model.train(was_training)

    @override
    def objective(self, task: str, part: dict[str, Any], outputs: Tensor, task_loss: Tensor) -> Tensor:
        weight = self.weights.get(task, 0.0)
        if weight == 0:
            return task_loss
        teacher = self.teacher_outputs(task, part["inputs"])
        distill = self.tasks[task].task_type.distillation_loss(
            outputs, teacher, part["targets"], self.temperature, self.forms.get(task)
        )
        return task_loss + weight * distill
