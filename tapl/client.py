"""The client module: one client's slice of the shared foundation model as a ``LightningModule``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric, SumMetric
from typing_extensions import Self, override

from tapl.datamodules.collate import TaskBatch, batch_size
from tapl.models.foundation import FoundationModel
from tapl.objective import Objective, TaskPart, TrainingStep
from tapl.tasks import Task

#: Readable predictions kept per task and evaluation (see :attr:`ClientModule.eval_examples`).
EXAMPLES_PER_TASK = 3
#: Builds the optimizer of a visit from the parameters to train.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


class SharedModelModule(LightningModule):
    """A ``LightningModule`` over the process's one shared :class:`FoundationModel` (its ``model``), which stays
    where it computes when a fit or an evaluation ends.

    Lightning moves a module to its device when a fit starts and back to the CPU when it ends; for the shared model
    that would copy the whole frozen backbone to the host and back at every client visit on a GPU. Here :meth:`cpu`
    moves only the module's own parts (metrics, stacked tensors), and :meth:`to` leaves the shared model alone when
    every one of its tensors is on the target device already (walking its modules to move nothing costs a visit
    more than the rest of Lightning's set-up).
    """

    model: FoundationModel

    @contextmanager
    def _without_shared_model(self) -> Iterator[None]:
        """Hides the shared model from this module's children for the duration (registered as ``model``)."""
        model = self._modules.pop("model")
        try:
            yield
        finally:
            self._modules["model"] = model

    def _shared_model_on(self, device: torch.device) -> bool:
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return all(t.device == device for t in tensors)

    @override
    def to(self, *args: Any, **kwargs: Any) -> Self:
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        if dtype is not None or device is None or not self._shared_model_on(device):
            return super().to(*args, **kwargs)
        with self._without_shared_model():
            return super().to(*args, **kwargs)

    @override
    def cpu(self) -> Self:
        with self._without_shared_model():
            return super().cpu()


class ClientModule(SharedModelModule):
    """Trains and evaluates one client's slice of the shared :class:`FoundationModel`.

    A batch holds samples of one or more tasks (see :class:`~tapl.datamodules.collate.MultiTaskCollator`).
    The training loss is the sum of each task's mean loss weighted by its share of the batch, so every sample
    counts the same whatever its task; the fit's :class:`~tapl.objective.Objective` may change it. Validation and
    test compute, per task, the sample-weighted mean loss and the task type's metrics.

    Args:
        model: The shared foundation model, with this client's tensors already loaded into it.
        tasks: The client's tasks.
        components: The components this module trains (the client's slice).
        optimizer: Builds the optimizer from the slice's parameters.
        lr: Overrides the optimizer's learning rate for this module (e.g. post-federation fine-tuning): a
            fixed value, or a function of the configured learning rate (e.g. a warm-up factor).
        objective: What the fit minimises (default: the task loss).
    """

    def __init__(
        self,
        model: FoundationModel,
        tasks: Sequence[Task],
        components: Sequence[str],
        optimizer: OptimizerFactory,
        lr: float | Callable[[float], float] | None = None,
        objective: Objective | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tasks = {t.name: t for t in tasks}
        self.components = list(components)
        self.optimizer_factory = optimizer
        self.lr = lr
        self.objective = objective or Objective()
        self.automatic_optimization = self.objective.automatic_optimization
        # Built by setup() for an evaluation only: a training fit (most of a federation's fits) needs none.
        self.eval_metrics = nn.ModuleDict()
        self.eval_loss = nn.ModuleDict()
        self.eval_samples = nn.ModuleDict()
        self._train_loss_sum: dict[str, Tensor] = {}
        self._train_samples: dict[str, int] = {}
        self._train_totals: dict[str, tuple[float, int]] | None = None
        self.eval_results: dict[str, dict[str, float]] = {}
        #: The first few readable predictions per task of the last evaluation (e.g. generated text).
        self.eval_examples: dict[str, list[dict[str, str]]] = {}
        self._examples: dict[str, list[dict[str, str]]] = {}

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" or len(self.eval_metrics):
            return
        # Evaluation runs every row on every rank (see VisitTrainers.eval_trainer), so metrics stay local:
        # syncing would count each row once per rank.
        tasks = self.tasks.values()
        self.eval_metrics.update({t.name: t.task_type.metrics(t) for t in tasks})
        for collection in self.eval_metrics.values():
            for metric in collection.values():
                metric.sync_on_compute = False
        self.eval_loss.update({t.name: MeanMetric(sync_on_compute=False) for t in tasks})
        self.eval_samples.update({t.name: SumMetric(sync_on_compute=False) for t in tasks})

    @override
    def on_fit_start(self) -> None:
        self.objective.on_fit_start(self)

    @override
    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor | None:
        return self.objective.training_step(self, batch, batch_idx)

    def batch_loss(self, batch: TaskBatch, record: bool = True) -> Tensor:
        """The objective's loss on ``batch``; with ``record``, its task losses count towards :meth:`train_loss`."""
        total = batch_size(batch)
        parts = []
        for name, part in batch.items():
            task = self.tasks[name]
            outputs = self.model(name, part["inputs"])
            task_loss = task.task_type.loss(outputs, part["targets"])
            n = len(part["targets"])
            if record:
                self._train_loss_sum[name] = self._train_loss_sum.get(name, 0) + task_loss.detach() * n
                self._train_samples[name] = self._train_samples.get(name, 0) + n
            parts.append(TaskPart(task, part["inputs"], part["targets"], outputs, task_loss, n / total))
        return self.objective.loss(TrainingStep(self, parts))

    @override
    def on_train_end(self) -> None:
        # Sum over data-parallel ranks, so every rank sees the same losses (and takes the same decisions).
        names = sorted(self.tasks)
        totals = torch.tensor(
            [[float(self._train_loss_sum.get(t, 0.0)), float(self._train_samples.get(t, 0))] for t in names],
            device=self.device,
            dtype=torch.float64,
        )
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self._train_totals = {t: (float(s), int(n)) for t, (s, n) in zip(names, totals.tolist(), strict=True) if n}
        self.objective.on_fit_end(self)

    def train_loss(self) -> dict[str, float]:
        """Mean training loss per task over the last fit, sample-weighted and summed over all ranks."""
        totals = self._train_totals
        if totals is None:  # not fitted through a Trainer: this process's running sums
            totals = {t: (float(self._train_loss_sum[t]), self._train_samples[t]) for t in self._train_loss_sum}
        return {t: loss / n for t, (loss, n) in totals.items()}

    def _eval_step(self, batch: TaskBatch) -> None:
        for name, part in batch.items():
            task = self.tasks[name]
            outputs = self.model(name, part["inputs"])
            targets = part["targets"]
            self.eval_loss[name].update(task.task_type.loss(outputs, targets), weight=len(targets))
            self.eval_samples[name].update(len(targets))
            task.task_type.update_metrics(self.eval_metrics[name], outputs, targets, self.model.head_context)
            shown = self._examples.setdefault(name, [])
            if len(shown) < EXAMPLES_PER_TASK:
                examples = task.task_type.examples(outputs, targets, self.model.head_context)
                shown.extend(examples[: EXAMPLES_PER_TASK - len(shown)])

    def _eval_epoch_end(self) -> None:
        results: dict[str, dict[str, float]] = {}
        for name in self.tasks:
            loss_metric = self.eval_loss[name]
            if not loss_metric.update_called:
                continue
            values = {"loss": float(loss_metric.compute())}
            values.update({k: float(v) for k, v in self.eval_metrics[name].compute().items()})
            values["samples"] = float(self.eval_samples[name].compute())
            results[name] = values
            loss_metric.reset()
            self.eval_samples[name].reset()
            self.eval_metrics[name].reset()
        self.eval_results = results
        self.eval_examples = {name: shown for name, shown in self._examples.items() if shown}
        self._examples = {}

    @override
    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end()

    @override
    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    @override
    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end()

    @override
    def configure_optimizers(self) -> Optimizer:
        optimizer = self.optimizer_factory(self.model.parameters_of(self.components))
        set_learning_rate(optimizer, self.lr)
        return optimizer


def set_learning_rate(optimizer: Optimizer, lr: float | Callable[[float], float] | None) -> None:
    """Override every parameter group's learning rate: with ``lr``, or with ``lr(configured rate)`` for a function
    (e.g. a warm-up factor); ``None`` keeps the configured rates."""
    if lr is None:
        return
    for group in optimizer.param_groups:
        group["lr"] = lr(group["lr"]) if callable(lr) else lr
