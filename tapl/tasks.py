"""Tasks and task types: the one place that declares what a task consumes, predicts and is scored by.

A :class:`Task` is a named objective of the federation (``digits``, ``ag_news``); its :class:`TaskType` says
how a head is built, which loss trains it and which metrics score it. Every other module reads these
declarations instead of inferring meaning from names.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


class TaskType(ABC):
    """How one kind of task is trained and scored.

    Subclasses register themselves under :attr:`name`; adding a task type is one subclass.
    """

    name: ClassVar[str]
    #: Whether a higher value of each metric is better, by metric name; losses are always lower-is-better.
    higher_is_better: ClassVar[dict[str, bool]] = {}
    registry: ClassVar[dict[str, TaskType]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            TaskType.registry[cls.name] = cls()

    @classmethod
    def get(cls, name: str) -> TaskType:
        """The registered task type called ``name``.

        Raises:
            ValueError: if no task type has that name.
        """
        try:
            return cls.registry[name]
        except KeyError:
            raise ValueError(f"Unknown task type {name!r}; known task types: {sorted(cls.registry)}.") from None

    @abstractmethod
    def validate(self, task: Task) -> None:
        """Raise ``ValueError`` if ``task`` lacks a setting this type needs."""

    @abstractmethod
    def build_head(self, in_features: int, task: Task) -> nn.Module:
        """The task head mapping one pooled feature per sample to this type's outputs."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over the samples of one batch."""

    @abstractmethod
    def metrics(self, task: Task) -> MetricCollection:
        """Fresh metric objects scoring this task on a held-out split."""

    @abstractmethod
    def collate_targets(self, targets: list[object], task: Task) -> Tensor:
        """Stack the raw targets of a batch into the tensor :meth:`loss` expects."""


class Classification(TaskType):
    """Single-label classification over ``task.num_classes`` classes: cross-entropy, accuracy, macro-F1."""

    name = "classification"
    higher_is_better = {"accuracy": True, "f1": True}

    def validate(self, task: Task) -> None:
        if task.num_classes < 2:
            raise ValueError(f"Task {task.name!r}: classification needs num_classes >= 2, got {task.num_classes}.")

    def build_head(self, in_features: int, task: Task) -> nn.Module:
        hidden = task.head_hidden or in_features
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.GELU(),
            nn.Dropout(task.head_dropout),
            nn.Linear(hidden, task.num_classes),
        )

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def metrics(self, task: Task) -> MetricCollection:
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(task.num_classes, average="micro"),
                "f1": MulticlassF1Score(task.num_classes, average="macro"),
            }
        )

    def collate_targets(self, targets: list[object], task: Task) -> Tensor:
        labels = torch.as_tensor(targets, dtype=torch.long)
        return labels


@dataclass(frozen=True)
class Task:
    """One objective of the federation.

    Args:
        name: Unique task name; heads and metrics are keyed by it.
        type: Registered task type name, e.g. ``"classification"``.
        modalities: Input modalities the task consumes, e.g. ``("image",)`` or ``("image", "text")``.
        num_classes: Number of classes (classification).
        head_hidden: Hidden width of the head's MLP; ``None`` uses the encoder width.
        head_dropout: Dropout inside the head.
    """

    name: str
    type: str
    modalities: tuple[str, ...]
    num_classes: int = 0
    head_hidden: int | None = None
    head_dropout: float = 0.1
    _type: TaskType = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_\-]+", self.name):
            raise ValueError(f"Task name {self.name!r} is invalid: use letters, digits, '_' and '-' only.")
        if not self.modalities:
            raise ValueError(f"Task {self.name!r}: declare at least one modality.")
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "_type", TaskType.get(self.type))
        self._type.validate(self)

    @property
    def task_type(self) -> TaskType:
        """The :class:`TaskType` this task is declared with."""
        return self._type
