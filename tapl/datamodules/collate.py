"""Collation of multi-task samples into per-task batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from tapl.models.encoders import Preprocessor
from tapl.tasks import HeadContext, Task

#: task name -> {"inputs": {modality: tensors}, "targets": Tensor}
TaskBatch = dict[str, dict[str, Any]]


class MultiTaskCollator:
    """Groups a list of samples by task and turns each group's raw values into tensors.

    A sample is ``{"task": name, "inputs": {modality: raw value}, "target": raw target}``. The result maps
    each task present in the batch (in sorted order) to ``{"inputs": {modality: tensors}, "targets": tensor}``.
    It holds only preprocessors (tokenizers, image settings), so it pickles cheaply into loader workers.

    Args:
        tasks: The tasks samples may belong to.
        preprocessors: One preprocessor per modality.
    """

    def __init__(self, tasks: Mapping[str, Task], preprocessors: Mapping[str, Preprocessor]) -> None:
        self.tasks = dict(tasks)
        self.preprocessors = dict(preprocessors)
        self.context = HeadContext(self.preprocessors)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> TaskBatch:
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for sample in samples:
            groups.setdefault(sample["task"], []).append(sample)
        batch: TaskBatch = {}
        for name in sorted(groups):
            task, group = self.tasks[name], groups[name]
            inputs: dict[str, dict[str, Tensor]] = {
                m: self.preprocessors[m]([s["inputs"][m] for s in group]) for m in task.modalities
            }
            targets = task.task_type.collate_targets([s["target"] for s in group], task, self.context)
            batch[name] = {"inputs": inputs, "targets": targets}
        return batch


def batch_size(batch: TaskBatch) -> int:
    """Number of samples in a collated batch, over all its tasks."""
    return sum(len(part["targets"]) for part in batch.values())
