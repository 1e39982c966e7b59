"""Batched local training: the fits of a cohort of clients as one ``Trainer.fit``.

Every client's slice is a few small tensors over the one frozen backbone, so the fits of many clients can run
as one: the :class:`CohortModule` holds the members' tensors stacked along a first dimension, each training
step runs the frozen layers once over all members' rows, and the layers that own the members' tensors apply
each member's values to its own rows (:class:`~tapl.engine.per_client_modules.PerClientModules`). Each member
keeps what a sequential fit gives it: its own data order (its own loader, seeded as in a sequential fit), its own
loss means and objective, its own gradient clipping and its own optimizer state
(:class:`~tapl.engine.cohort_optimizer.CohortOptimizer`). A cohort fit therefore equals the members' sequential
fits up to float rounding, except for dropout, whose masks are drawn differently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from typing_extensions import override

from tapl.api import ClientInfo
from tapl.client import OptimizerFactory, SharedModelModule, set_learning_rate
from tapl.components import ComponentState
from tapl.datamodules.collate import TaskBatch, batch_size
from tapl.engine.cohort_optimizer import CohortOptimizer
from tapl.engine.per_client_modules import NotBatchable, PerClientModules
from tapl.models.foundation import FoundationModel
from tapl.objective import Objective, TaskPart, TrainingStep
from tapl.tasks import Task

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


@dataclass(frozen=True)
class FitRequest:
    """One client's fit, as :meth:`~tapl.context.ClientContext.fit` asks for it (see
    :meth:`~tapl.engine.local_training.LocalTraining.fit` for the fields)."""

    client: ClientInfo
    state: ComponentState
    round: int
    seed_key: tuple[int, ...]
    steps: int | None = None
    lr: float | None = None
    objective: Objective | None = None
    optimizer: OptimizerFactory | None = None
    callbacks: Sequence[Callback] = ()
    trainable: Sequence[str] | None = None
    trainer_overrides: Mapping[str, Any] | None = field(default=None)


@dataclass(frozen=True)
class ResolvedFit:
    """A request with the federation's defaults filled in."""

    request: FitRequest
    steps: int
    seed: int
    components: list[str]
    trained: list[str]


def why_not_batched(fit: ResolvedFit) -> str | None:
    """Why ``fit`` cannot join a cohort for its objective or callbacks (``None``: it can)."""
    objective = fit.request.objective
    if objective is not None and (
        not objective.automatic_optimization or type(objective).training_step is not Objective.training_step
    ):
        return f"its objective {type(objective).__name__} runs its own training step"
    if fit.request.callbacks:
        return "it has fit callbacks"
    return None


def optimizer_refusal(optimizer: OptimizerFactory) -> str | None:
    """Why fits with ``optimizer`` cannot join a cohort (``None``: they can), from one it builds on a probe."""
    probe = nn.Parameter(torch.zeros(1))
    try:
        CohortOptimizer([probe], optimizer([probe]), {})
    except ValueError as error:
        return f"the optimizer cannot run per member ({error})"
    return None


def cohort_key(fit: ResolvedFit, optimizer: OptimizerFactory, epoch_batches: int | None) -> tuple[Any, ...]:
    """Fits with equal keys train together: same components, steps, schedule, optimizer and trainer settings.

    ``epoch_batches`` (the client's batches per epoch) joins the key under gradient accumulation, where an epoch's
    end closes an optimizer step early.
    """
    request = fit.request
    overrides = tuple(sorted((k, repr(v)) for k, v in (request.trainer_overrides or {}).items()))
    return (
        tuple(fit.components),
        tuple(fit.trained),
        fit.steps,
        request.round,
        request.lr,
        id(optimizer),
        overrides,
        epoch_batches,
    )


class CohortBatches:
    """The cohort's training batches: at each step, one batch of every member from its own loader.

    A member's loader starts again when it runs out (a new epoch, as a sequential fit's loader does), so each
    member sees exactly the batches its sequential fit would.
    """

    def __init__(self, loaders: Sequence[DataLoader], length: int) -> None:
        self.loaders = list(loaders)
        self._iterators: list[Iterator[TaskBatch] | None] = [None] * len(loaders)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[list[TaskBatch]]:
        for _ in range(self.length):
            yield [self._next(i) for i in range(len(self.loaders))]

    def _next(self, member: int) -> TaskBatch:
        iterator = self._iterators[member]
        if iterator is not None:
            batch = next(iterator, None)
            if batch is not None:
                return batch
        self._iterators[member] = iter(self.loaders[member])
        return next(self._iterators[member])


class CohortMember:
    """One member of a cohort fit as its objective sees it (see :class:`~tapl.objective.FitModule`)."""

    def __init__(self, cohort: CohortModule, index: int, tasks: Sequence[Task]) -> None:
        self.cohort = cohort
        self.index = index
        self.tasks = {t.name: t for t in tasks}
        self.components = list(cohort.trained)
        self.model = cohort.model

    @property
    def device(self) -> torch.device:
        """Where the cohort computes."""
        return self.cohort.device

    def tensors(self) -> Iterator[tuple[str, str, Tensor]]:
        """The member's trained tensors (views into the cohort's stacked parameters), as
        :meth:`~tapl.objective.TrainingStep.parameters` yields them."""
        for component in self.components:
            for key in self.model.component_parameters(component):
                yield component, key, self.cohort.stacked_parameter(component, key)[self.index]


class CohortStep(TrainingStep):
    """A member's training batch of a cohort fit: its trained tensors are its own slices of the cohort's."""

    def __init__(self, member: CohortMember, parts: list[TaskPart]) -> None:
        super().__init__(member, parts)  # type: ignore[arg-type]
        self.member = member

    @override
    def parameters(self) -> Iterator[tuple[str, str, Tensor]]:  # type: ignore[override]
        return self.member.tensors()

    @override
    def outputs_of(self, state: ComponentState, part: TaskPart) -> Tensor:
        with self.member.cohort.per_client.suspended():
            return super().outputs_of(state, part)


def _pad_to(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    """``tensor`` zero-padded at the end of every dimension but the first to ``shape``."""
    pads: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape), strict=True):
        pads.extend((0, want - have))
    return F.pad(tensor, pads) if any(pads) else tensor


def stack_rows(parts: Sequence[Any], rows: int) -> Any:
    """The members' inputs (nested dicts of tensors with rows first) as one input of ``rows`` rows per member.

    Trailing dimensions are zero-padded to the longest member's (padding positions are masked, e.g. by an attention
    mask that pads with 0); a member with fewer rows repeats its first row (its outputs are dropped).
    """
    first = parts[0]
    if isinstance(first, Mapping):
        return {key: stack_rows([p[key] for p in parts], rows) for key in first}
    if not isinstance(first, Tensor):
        raise NotBatchable(f"an input of type {type(first).__name__} cannot be stacked across clients")
    shape = [max(p.shape[d] for p in parts) for d in range(1, first.dim())]
    padded = []
    for part in parts:
        part = _pad_to(part, shape)
        if len(part) < rows:
            part = torch.cat([part, part[:1].expand(rows - len(part), *part.shape[1:])])
        padded.append(part)
    return torch.cat(padded)


#: A bucket takes the next member while padding every member to the bucket's rows and input length costs at most
#: this share more work than the members' own rows.
BUCKET_SLACK = 1.05


def _row_size(inputs: Any) -> int:
    """Elements per row of a member's inputs (nested dicts of tensors with rows first)."""
    if isinstance(inputs, Mapping):
        return sum(_row_size(v) for v in inputs.values())
    return inputs[0].numel() if isinstance(inputs, Tensor) and len(inputs) else 0


def _rows(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        return max(_rows(v) for v in inputs.values())
    return len(inputs) if isinstance(inputs, Tensor) else 0


def length_buckets(members: Sequence[int], inputs: Sequence[Any]) -> list[list[int]]:
    """``members`` in buckets of similar rows and input length, so that padding a bucket to its largest member
    wastes little work (members of the same shape always share a bucket); each bucket's members in order."""
    shapes = [(_rows(x), _row_size(x)) for x in inputs]
    buckets: list[list[int]] = []
    work = rows = size = 0
    for j in sorted(range(len(members)), key=lambda j: shapes[j]):
        r, n = shapes[j]
        bucket = buckets[-1] if buckets else None
        joined = (len(bucket) + 1) * max(rows, r) * max(size, n) if bucket is not None else 0
        if bucket is not None and joined <= BUCKET_SLACK * (work + r * n):
            bucket.append(j)
            work, rows, size = work + r * n, max(rows, r), max(size, n)
        else:
            buckets.append([j])
            work, rows, size = r * n, r, n
    return [sorted(members[j] for j in bucket) for bucket in buckets]


class CohortModule(SharedModelModule):
    """Trains the slices of a cohort of clients over the shared model in one fit.

    Args:
        model: The shared model, with the first member's state loaded (the components that the members share).
        fits: The members' fits (one cohort key).
        tasks: Each member's tasks.
        optimizer: Builds the optimizer from the stacked parameters.
        lr: The learning rate override of the fits (as :class:`~tapl.client.ClientModule`'s).
        objectives: Each member's objective.
        shared: Components whose values are the same for every member and stay frozen: they stay loaded in the
            model instead of being stacked.
    """

    def __init__(
        self,
        model: FoundationModel,
        fits: Sequence[ResolvedFit],
        tasks: Sequence[Sequence[Task]],
        optimizer: OptimizerFactory,
        lr: Any,
        objectives: Sequence[Objective],
        shared: Sequence[str],
    ) -> None:
        super().__init__()
        self.model = model
        self.trained = list(fits[0].trained)
        self.optimizer_factory = optimizer
        self.lr = lr
        self.objectives = list(objectives)
        self.members = [CohortMember(self, i, member_tasks) for i, member_tasks in enumerate(tasks)]
        self.stacked = nn.ParameterDict()
        self._constants: dict[str, Tensor] = {}
        names = model.parameter_names()
        for component in fits[0].components:
            if component in shared:
                continue
            for key in model.component_parameters(component):
                values = torch.stack([f.request.state[component][key] for f in fits])
                name = names[component][key]
                if component in self.trained:
                    self.stacked[_safe(name)] = nn.Parameter(values)
                else:
                    self.register_buffer(_safe(name), values, persistent=False)
                    self._constants[name] = values
        self._names = names
        self.per_client = PerClientModules(model, self._cohort_tensors())  # refuses unsupported layers now
        #: Per stacked parameter, which members used it since the last optimizer step (see CohortOptimizer).
        self.used: dict[Tensor, Tensor] = {}
        self._loss_sum = [dict[str, Tensor]() for _ in fits]
        self._samples = [dict[str, int]() for _ in fits]

    def stacked_parameter(self, component: str, key: str) -> nn.Parameter:
        """The members' values of a trained tensor, stacked."""
        return self.stacked[_safe(self._names[component][key])]

    def _cohort_tensors(self) -> dict[str, Tensor]:
        tensors = {name: getattr(self, _safe(name)) for name in self._constants}
        for component in self.trained:
            for key, name in self._names[component].items():
                tensors[name] = self.stacked_parameter(component, key)
        return tensors

    @override
    def on_fit_start(self) -> None:
        # The tensors are on the fit's device now: route the model's layers through them.
        self.per_client = PerClientModules(self.model, self._cohort_tensors())
        self.used.update(
            {p: torch.zeros(len(self.members), dtype=torch.bool, device=p.device) for p in self.stacked.values()}
        )
        for member, objective in zip(self.members, self.objectives, strict=True):
            objective.on_fit_start(member)  # type: ignore[arg-type]

    @override
    def training_step(self, batch: list[TaskBatch], batch_idx: int) -> Tensor:
        parts: list[dict[str, TaskPart]] = [{} for _ in batch]
        for name in sorted({task for member in batch for task in member}):
            holders = [i for i, member in enumerate(batch) if name in member]
            for members in length_buckets(holders, [batch[i][name]["inputs"] for i in holders]):
                self._forward_bucket(name, batch, members, len(members) == len(batch), parts)
        total = torch.zeros((), device=self.device)
        for i, member in enumerate(self.members):
            ordered = [parts[i][name] for name in batch[i]]  # the order a sequential fit sums them in
            total = total + self.objectives[i].loss(CohortStep(member, ordered))
        return total

    def _forward_bucket(
        self, name: str, batch: list[TaskBatch], members: list[int], everyone: bool, parts: list[dict[str, TaskPart]]
    ) -> None:
        """Run task ``name``'s parts of ``members`` through the model together; record each member's part."""
        rows = max(len(batch[i][name]["targets"]) for i in members)
        inputs = stack_rows([batch[i][name]["inputs"] for i in members], rows)
        with self.per_client.active(None if everyone else members):
            outputs = self.model(name, inputs)
        outputs = outputs.reshape(len(members), rows, *outputs.shape[1:])
        index = torch.as_tensor(members, device=self.device)
        for param in self._on_path(name):
            self.used[param][index] = True
        for j, i in enumerate(members):
            task = self.members[i].tasks[name]
            part = batch[i][name]
            n = len(part["targets"])
            out = outputs[j, :n]
            loss = task.task_type.loss(out, part["targets"])
            self._loss_sum[i][name] = self._loss_sum[i].get(name, 0) + loss.detach() * n
            self._samples[i][name] = self._samples[i].get(name, 0) + n
            parts[i][name] = TaskPart(task, part["inputs"], part["targets"], out, loss, n / batch_size(batch[i]))

    def _on_path(self, task: str) -> list[nn.Parameter]:
        """The stacked parameters that ``task``'s forward pass uses."""
        on_path = set(self.model.components_on_path(task))
        return [
            self.stacked_parameter(component, key)
            for component in self.trained
            if component in on_path
            for key in self.model.component_parameters(component)
        ]

    @override
    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each member's gradients by themselves, as its sequential fit would (Lightning's clipping would
        take the cohort's norm)."""
        if gradient_clip_val is None or gradient_clip_val <= 0:
            return
        grads = [p.grad for p in self.stacked.values() if p.grad is not None]
        if not grads:
            return
        if gradient_clip_algorithm == "value":
            for grad in grads:
                grad.clamp_(-gradient_clip_val, gradient_clip_val)
            return
        squares = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0)
        # torch.nn.utils.clip_grad_norm_'s coefficient, per member
        coefficient = (gradient_clip_val / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coefficient.view(-1, *[1] * (grad.dim() - 1)).to(grad.dtype))

    @override
    def on_train_end(self) -> None:
        for member, objective in zip(self.members, self.objectives, strict=True):
            objective.on_fit_end(member)  # type: ignore[arg-type]

    def train_losses(self) -> list[dict[str, float]]:
        """Each member's mean training loss per task over the fit, sample-weighted."""
        totals = zip(self._loss_sum, self._samples, strict=True)
        return [{t: float(sums[t]) / samples[t] for t in sums} for sums, samples in totals]

    def member_states(self, fits: Sequence[ResolvedFit]) -> list[ComponentState]:
        """Each member's state after the fit (CPU copies; the components it did not train, as it sent them)."""
        states = []
        for i, fit in enumerate(fits):
            state = {}
            for component in fit.components:
                if component in self.trained:
                    state[component] = {
                        key: self.stacked_parameter(component, key)[i].detach().to("cpu", copy=True)
                        for key in self.model.component_parameters(component)
                    }
                else:
                    state[component] = {k: t.clone() for k, t in fit.request.state[component].items()}
            states.append(state)
        return states

    @override
    def configure_optimizers(self) -> Optimizer:
        params = list(self.stacked.values())
        template = self.optimizer_factory(params)
        set_learning_rate(template, self.lr)
        return CohortOptimizer(params, template, self.used)


def _safe(name: str) -> str:
    """A parameter name usable as a module attribute."""
    return name.replace(".", "__")
