"""What an algorithm sees of one client visit, and what it hands back to the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    """

    client: int
    state: ComponentState
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ClientContext:
    """One visit of one client in one round, as an algorithm's ``client_update`` sees it.

    Attributes:
        client: The client (id and tasks).
        round: The round number (from 1).
        global_state: The client's slice of the current global model (a private copy).
        components: The components of the client's slice.
    """

    def __init__(
        self,
        federation: FederatedOrchestrator,
        client: ClientSpec,
        round: int,
        global_state: ComponentState,
    ) -> None:
        self.federation = federation
        self.client = client
        self.round = round
        self.global_state = global_state
        self.components = sorted(global_state)
        self._fits = 0

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
        module_class: type[ClientModule] = ClientModule,
    ) -> FitResult:
        """Train ``state`` on this client's training data with one ``Trainer.fit``.

        Each call of a visit draws its own data order and randomness from ``(seed, round, client, call)``, so
        a visit is reproducible and independent of what ran before it.

        Args:
            state: The tensors to start from (usually :attr:`global_state` or a personal model).
            steps: Optimizer steps (default: ``federation.local_steps``).
            lr: Learning rate for this fit (default: the optimizer's, warmed up by ``federation.warmup_rounds``).
            loss_fn: Changes the local objective, e.g. adds a proximal term.
            callbacks: Extra Lightning callbacks for this fit (e.g. optimizer-step hooks).
            module_class: A :class:`ClientModule` subclass for algorithms that change the training step.
        """
        self._fits += 1
        return self.federation.fit_client(
            self.client,
            state,
            round=self.round,
            seed_key=(self.round, self.client.id, self._fits),
            steps=steps,
            lr=lr,
            loss_fn=loss_fn,
            callbacks=callbacks,
            module_class=module_class,
        )

    def evaluate(self, state: ComponentState, split: str = "val") -> dict[str, dict[str, float]]:
        """Metrics per task of ``state`` on this client's ``split``."""
        return self.federation.evaluate_client(self.client, state, split)
