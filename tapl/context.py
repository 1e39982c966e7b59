"""What an algorithm sees of one client: the visit's inputs, the client's own store, and local training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from lightning.pytorch import Callback

from tapl.api import ClientInfo, FederationInfo, FitResult, Stage
from tapl.client import OptimizerFactory
from tapl.components import ComponentState
from tapl.objective import Objective
from tapl.tasks import Task

#: Post-federation budgets count batches, as the TAP paper does: one optimizer step per batch.
POST_FEDERATION_TRAINER: dict[str, Any] = {"accumulate_grad_batches": 1}
_STAGE_KEYS: dict[str, int] = {"federation": 0, "post-federation": 1, "evaluation": 2}


class LocalTraining(Protocol):
    """Fits and evaluates states on a client's data (the runtime's side of :class:`ClientContext`)."""

    def fit(
        self,
        client: ClientInfo,
        state: ComponentState,
        *,
        round: int,
        seed_key: Sequence[int],
        steps: int | None,
        lr: float | None,
        objective: Objective | None,
        optimizer: OptimizerFactory | None,
        callbacks: Sequence[Callback],
        trainable: Sequence[str] | None,
        trainer_overrides: Mapping[str, Any] | None,
    ) -> FitResult:
        """Train ``state`` on ``client``'s training data (see :meth:`ClientContext.fit`)."""
        ...

    def evaluate(self, client: ClientInfo, state: ComponentState, split: str) -> dict[str, dict[str, float]]:
        """Metrics per task of ``state`` on ``client``'s ``split``."""
        ...


class ClientContext:
    """One client's work as an algorithm sees it: a visit of a round, its post-federation stage, or its
    evaluation.

    Attributes:
        info: The federation (tasks, clients, settings).
        client: The client (id, tasks, slice).
        round: The round number (from 1); after the rounds, the last round.
        stage: ``"federation"`` for a visit in a round, ``"post-federation"`` after the last round,
            ``"evaluation"`` while the client's models are evaluated.
        received: What the server sent (usually the client's slice of the global model, a private copy); in the
            post-federation stage and at evaluation, the client's slice of the current global model.
        config: The round's instructions for this client beyond the state (see
            :class:`~tapl.api.Instruction`).
        store: The client's own state, kept by the engine between visits (personal models, heads, loss
            histories: tensors, numbers, strings, lists and dicts of them). Change it freely: the engine keeps the
            changes only when the visit succeeds, checkpoints them with the run and, on a distributed runtime,
            keeps them on the client's node. At evaluation, changes are discarded.
        finetuned: In the post-federation stage, the client's global slice after the engine's fine-tuning
            (``federation.finetune_steps``; the "+FT" model); ``None`` otherwise or when disabled.
    """

    def __init__(
        self,
        training: LocalTraining,
        info: FederationInfo,
        client: ClientInfo,
        round: int,
        received: ComponentState,
        *,
        config: Mapping[str, Any] | None = None,
        store: dict[str, Any] | None = None,
        stage: Stage = "federation",
        finetuned: ComponentState | None = None,
    ) -> None:
        self.info = info
        self.client = client
        self.round = round
        self.stage = stage
        self.received = received
        self.config = dict(config or {})
        self.store = store if store is not None else {}
        self.finetuned = finetuned
        self._training = training
        self._streams = 0

    @property
    def components(self) -> list[str]:
        """The components of the client's slice, sorted."""
        return sorted(self.client.components)

    @property
    def tasks(self) -> dict[str, Task]:
        """The client's tasks, by name."""
        return {name: self.info.tasks[name] for name in self.client.tasks}

    @property
    def num_train_samples(self) -> int:
        """Training rows of this client over all its tasks."""
        return self.client.num_train_samples

    @property
    def initial(self) -> ComponentState:
        """A copy of the client's slice of the initial global model (e.g. a personal model before any visit)."""
        return self.info.slice_of(self.info.initial_state, self.client.id)

    def components_on_path(self, task: str) -> list[str]:
        """The components of this client's slice that ``task``'s forward pass uses."""
        return list(self.info.paths[task])

    def new_stream(self) -> int:
        """A fresh random stream of this visit: fits given the same stream see the same data order and draws.

        ``fit`` without a ``stream`` takes a new one, so a visit's fits are numbered 1, 2, ... in call order.
        """
        self._streams += 1
        return self._streams

    def fit(
        self,
        state: ComponentState,
        *,
        steps: int | None = None,
        lr: float | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerFactory | None = None,
        stream: int | None = None,
        trainable: Sequence[str] | None = None,
        callbacks: Sequence[Callback] = (),
        trainer_overrides: Mapping[str, Any] | None = None,
    ) -> FitResult:
        """Train ``state`` on this client's training data with one ``Trainer.fit``.

        Each fit draws its data order and randomness from ``(seed, stage, round, client, stream)``, so a visit
        is reproducible and independent of what ran before it. In the post-federation stage a fit takes one
        optimizer step per batch (``--trainer.accumulate_grad_batches`` does not apply), so its ``steps``
        count batches of ``data.batch_size`` rows, as the paper's post-federation budgets do.

        Args:
            state: The tensors to start from (e.g. :attr:`received` or a personal model from :attr:`store`).
            steps: Optimizer steps (default: ``federation.local_steps``).
            lr: Learning rate for this fit (default: the optimizer's, warmed up by ``federation.warmup_rounds``).
            objective: What the fit minimises (default: the task loss); see :class:`~tapl.objective.Objective`.
            optimizer: Builds this fit's optimizer from the trained parameters, e.g. ``torch.optim.SGD``
                (default: ``--optimizer``); ``lr``, when given, replaces its learning rate.
            stream: The random stream (see :meth:`new_stream`); a new one by default. Two fits with the same
                stream, steps and batch size see the same batches in the same order (e.g. an ablation).
            trainable: Train only these components of ``state``; the others are loaded and stay frozen (e.g.
                a local head over a shared body). Default: every component of ``state``. The result holds
                every component of ``state``.
            callbacks: Extra Lightning callbacks for this fit.
            trainer_overrides: ``--trainer`` settings replaced for this fit (e.g. ``{"gradient_clip_val": None}``
                for an objective that clips its own gradients).
        """
        if stream is None:
            stream = self.new_stream()
        if self.stage == "post-federation":
            trainer_overrides = {**POST_FEDERATION_TRAINER, **(trainer_overrides or {})}
        return self._training.fit(
            self.client,
            state,
            round=self.round,
            seed_key=(_STAGE_KEYS[self.stage], self.round, self.client.id, stream),
            steps=steps,
            lr=lr,
            objective=objective,
            optimizer=optimizer,
            callbacks=callbacks,
            trainable=trainable,
            trainer_overrides=trainer_overrides,
        )

    def evaluate(self, state: ComponentState, split: str = "val") -> dict[str, dict[str, float]]:
        """Metrics per task of ``state`` on this client's ``split``."""
        return self._training.evaluate(self.client, state, split)
