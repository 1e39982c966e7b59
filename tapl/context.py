"""What an algorithm sees of one client visit, and what it hands back to the server."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch import Callback

from tapl.client import ClientModule, LossFn
from tapl.components import ComponentState
from tapl.datamodules.federated import ClientSpec

if TYPE_CHECKING:
    from tapl.federation import FederatedOrchestrator


@dataclass
class FitResult:
    """The outcome of one local fit.

    Attributes:
        state: The trained tensors (same components as the state that was fitted).
        train_loss: Mean training loss per task over the fit, sample-weighted.
        steps: Optimizer steps taken.
    """

    state: ComponentState
    train_loss: dict[str, float]
    steps: int


@dataclass
class ClientUpdate:
    """What one client uploads after a visit.

    Attributes:
        client: The client's id.
        state: The tensors sent to the server; only these count as upload traffic.
        num_samples: The client's training samples (the default aggregation weight).
        metrics: Scalars to log for this visit (e.g. training loss per task, a proximal term).
        events: Things that happened during the visit, logged as they are in ``metrics.jsonl`` (e.g. TAP's
            replacements); each a JSON-serialisable dict.
    """

    client: int
    state: ComponentState
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


#: What a visit belongs to: a federated round, the post-federation stage after the last round, or an
#: evaluation (e.g. Per-FedAvg adapting the global slice before its personalized model is scored).
Stage = Literal["federation", "post-federation", "evaluation"]
_STAGE_KEYS: dict[str, int] = {"federation": 0, "post-federation": 1, "evaluation": 2}
#: Post-federation budgets count batches, as the TAP paper does: one optimizer step per batch.
POST_FEDERATION_TRAINER: dict[str, Any] = {"accumulate_grad_batches": 1}


class ClientContext:
    """One visit of one client, as an algorithm's ``client_update`` (or ``finalize_client``) sees it.

    Attributes:
        client: The client (id and tasks).
        round: The round number (from 1); in the post-federation stage, the last round.
        global_state: The client's slice of the current global model (a private copy).
        components: The components of the client's slice.
        stage: ``"federation"`` for a visit in a round, ``"post-federation"`` after the last round,
            ``"evaluation"`` for work done while models are evaluated (see ``FederatedOrchestrator.client_context``).
        finetuned: In the post-federation stage, the client's global slice after the engine's fine-tuning
            (``federation.finetune_steps``; the "+FT" model); ``None`` otherwise or when disabled.
    """

    def __init__(
        self,
        federation: FederatedOrchestrator,
        client: ClientSpec,
        round: int,
        global_state: ComponentState,
        stage: Stage = "federation",
        finetuned: ComponentState | None = None,
    ) -> None:
        self.federation = federation
        self.client = client
        self.round = round
        self.global_state = global_state
        self.components = sorted(global_state)
        self.stage = stage
        self.finetuned = finetuned
        self._streams = 0

    def new_stream(self) -> int:
        """A fresh random stream of this visit: fits given the same stream see the same data order and draws.

        ``fit`` without a ``stream`` takes a new one, so a visit's fits are numbered 1, 2, ... in call order.
        """
        self._streams += 1
        return self._streams

    @property
    def num_train_samples(self) -> int:
        """Training rows of this client over all its tasks."""
        return self.federation.data.num_samples(self.client.id, "train")

    def components_on_path(self, task: str) -> list[str]:
        """The components of this client's slice that ``task``'s forward pass uses."""
        return self.federation.model.components_on_path(task)

    def fit(
        self,
        state: ComponentState,
        *,
        steps: int | None = None,
        lr: float | None = None,
        loss_fn: LossFn | None = None,
        callbacks: Sequence[Callback] = (),
        module_class: Callable[..., ClientModule] = ClientModule,
        stream: int | None = None,
        trainable: Sequence[str] | None = None,
        trainer_overrides: Mapping[str, Any] | None = None,
    ) -> FitResult:
        """Train ``state`` on this client's training data with one ``Trainer.fit``.

        Each fit draws its data order and randomness from ``(seed, stage, round, client, stream)``, so a visit
        is reproducible and independent of what ran before it. In the post-federation stage a fit takes one
        optimizer step per batch (``--trainer.accumulate_grad_batches`` does not apply), so its ``steps``
        count batches of ``data.batch_size`` rows, as the paper's post-federation budgets do.

        Args:
            state: The tensors to start from (usually :attr:`global_state` or a personal model).
            steps: Optimizer steps (default: ``federation.local_steps``).
            lr: Learning rate for this fit (default: the optimizer's, warmed up by ``federation.warmup_rounds``).
            loss_fn: Changes the local objective, e.g. adds a proximal term.
            callbacks: Extra Lightning callbacks for this fit (e.g. optimizer-step hooks).
            module_class: A :class:`ClientModule` subclass for algorithms that change the training step, or a
                callable that builds one from the same arguments (e.g. a ``functools.partial`` with extra ones).
            stream: The random stream (see :meth:`new_stream`); a new one by default. Two fits with the same
                stream, steps and batch size see the same batches in the same order (e.g. an ablation).
            trainable: Train only these components of ``state``; the others are loaded and stay frozen (e.g.
                a local head over a shared body). Default: every component of ``state``. The result holds
                every component of ``state``.
            trainer_overrides: ``--trainer`` settings replaced for this fit (e.g. ``{"gradient_clip_val": None}``
                for a module that clips its own gradients under manual optimization).
        """
        if stream is None:
            stream = self.new_stream()
        if self.stage == "post-federation":
            trainer_overrides = {**POST_FEDERATION_TRAINER, **(trainer_overrides or {})}
        return self.federation.fit_client(
            self.client,
            state,
            round=self.round,
            seed_key=(_STAGE_KEYS[self.stage], self.round, self.client.id, stream),
            steps=steps,
            lr=lr,
            loss_fn=loss_fn,
            callbacks=callbacks,
            module_class=module_class,
            trainable=trainable,
            trainer_overrides=trainer_overrides,
        )

    def evaluate(self, state: ComponentState, split: str = "val") -> dict[str, dict[str, float]]:
        """Metrics per task of ``state`` on this client's ``split``."""
        return self.federation.evaluate_client(self.client, state, split)
