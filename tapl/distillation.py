"""Knowledge distillation of a client's model towards a teacher model over the same shared backbone."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tapl.components import ComponentState
from tapl.objective import FitModule, Objective, TrainingStep


class Distillation(Objective):
    """The objective ``task_loss + weight[task] * distillation_loss(student, teacher)`` per task.

    The teacher is another state of the same slice; its outputs come from the shared model with the teacher's
    tensors substituted (:meth:`~tapl.objective.TrainingStep.outputs_of`), in evaluation mode and without
    gradients, so the teacher is deterministic and the student's randomness (dropout, data order) is the same
    as a plain fit's. The distillation loss of each task is its task type's
    :meth:`~tapl.tasks.TaskType.distillation_loss` in the task's form (softened KL for logits; MSE or a KL
    over the width axis for images; a per-token mean or a per-sequence sum of KLs for text). A task with
    weight 0 skips the teacher's forward pass.

    Args:
        teacher: The teacher's tensors, with the same components as the student.
        weights: Distillation weight per task name.
        temperature: Softmax temperature ``T`` (the KL is scaled by ``T^2``).
        forms: Distillation loss form per task name (one of its type's ``distillation_forms``); a task
            without one uses its type's default.
    """

    def __init__(
        self,
        teacher: ComponentState,
        weights: Mapping[str, float],
        temperature: float = 1.0,
        forms: Mapping[str, str] | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"The distillation temperature must be > 0, got {temperature}")
        self.teacher = teacher
        self.weights = dict(weights)
        self.temperature = temperature
        self.forms = dict(forms or {})

    def on_fit_start(self, module: FitModule) -> None:
        """Check the teacher and the forms against the student's fit, and move the teacher to its device."""
        missing = sorted(set(module.components) ^ set(self.teacher))
        if missing:
            raise ValueError(f"The teacher's components differ from the student's: {missing}")
        for task, form in self.forms.items():
            if task in module.tasks:
                module.tasks[task].task_type.check_distillation_form(form)
        self.teacher = {c: {k: t.to(module.device) for k, t in p.items()} for c, p in self.teacher.items()}

    def loss(self, step: TrainingStep) -> Tensor:
        loss = torch.zeros((), device=step.device)
        for part in step.parts:
            task = part.task
            weight = self.weights.get(task.name, 0.0)
            objective = part.loss
            if weight != 0:
                teacher = step.outputs_of(self.teacher, part)
                distill = task.task_type.distillation_loss(
                    part.outputs, teacher, part.targets, self.temperature, self.forms.get(task.name)
                )
                objective = objective + weight * distill
            loss = loss + objective * part.share
        return loss
