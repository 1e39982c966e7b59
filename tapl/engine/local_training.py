"""Local training: one ``Trainer.fit`` (or ``validate``) of a state on one client's data, in this process."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback
from torch import nn
from torch.optim import AdamW, Optimizer

from tapl.api import ClientInfo, FitResult
from tapl.client import ClientModule, OptimizerFactory
from tapl.components import ComponentState
from tapl.datamodules.collate import MultiTaskCollator
from tapl.datamodules.federated import FederatedDataModule
from tapl.engine.config import FederationConfig
from tapl.models.foundation import FoundationModel
from tapl.objective import Objective
from tapl.tasks import Task
from tapl.visit_trainer import VisitTrainers, quiet_lightning


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``seed`` and ``keys``; different keys give independent streams."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


def default_optimizer(params: Iterable[nn.Parameter]) -> Optimizer:
    """AdamW with the paper's settings (lr 3e-4, weight decay 0.01)."""
    return AdamW(params, lr=3e-4, weight_decay=0.01)


class LocalTraining:
    """Fits and evaluates states of clients' slices over the one shared model (see
    :class:`~tapl.context.LocalTraining`).

    Args:
        model: The shared foundation model.
        data: The federated data (set up).
        trainers: Builds each fit's and evaluation's ``Trainer`` from ``--trainer``.
        optimizer: Builds a fit's optimizer from the parameters to train (``--optimizer``).
        config: The federation's settings (seed, local steps, warm-up).
    """

    def __init__(
        self,
        model: FoundationModel,
        data: FederatedDataModule,
        trainers: VisitTrainers,
        optimizer: OptimizerFactory,
        config: FederationConfig,
    ) -> None:
        self.model = model
        self.data = data
        self.trainers = trainers
        self.optimizer = optimizer
        self.config = config
        self.collate = MultiTaskCollator(data.tasks, model.preprocessors)
        #: Readable predictions (e.g. generated text) of the last evaluation, per task.
        self.last_examples: dict[str, list[dict[str, str]]] = {}

    def fit(
        self,
        client: ClientInfo,
        state: ComponentState,
        *,
        round: int,
        seed_key: Sequence[int],
        steps: int | None = None,
        lr: float | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerFactory | None = None,
        callbacks: Sequence[Callback] = (),
        trainable: Sequence[str] | None = None,
        trainer_overrides: Mapping[str, Any] | None = None,
    ) -> FitResult:
        """One ``Trainer.fit`` of ``state`` on ``client``'s training data (see :meth:`ClientContext.fit`)."""
        steps = steps or self.config.local_steps
        schedule = self.config.lr_for_round(round) if lr is None else lr
        seed = derive_seed(self.config.seed, *seed_key)
        seed_everything(seed, workers=True, verbose=False)
        components = sorted(state)
        trained = components if trainable is None else sorted(trainable)
        outside = sorted(set(trained) - set(components))
        if outside:
            raise ValueError(f"trainable components {outside} are not in the fitted state {components}")
        self.model.load_state(state, f"state fitted on client {client.id}")
        self.model.set_trainable(trained)
        # Pretrained backbones load in eval mode; local training uses their dropout like any fine-tuning.
        self.model.train()
        module = ClientModule(
            self.model, self._tasks(client), trained, optimizer or self.optimizer, schedule, objective
        )
        loader = self.data.train_dataloader(client.id, self.collate, seed)
        with quiet_lightning():
            trainer = self.trainers.fit_trainer(steps, callbacks, trainer_overrides)
            trainer.fit(module, train_dataloaders=loader)
        return FitResult(self.model.get_state(components), module.train_loss(), trainer.global_step)

    def evaluate(self, client: ClientInfo, state: ComponentState, split: str) -> dict[str, dict[str, float]]:
        """Metrics per task of ``state`` (the client's slice) on ``client``'s ``split``."""
        self.model.load_state(state, f"state evaluated on client {client.id}")
        module = ClientModule(self.model, self._tasks(client), sorted(state), self.optimizer)
        loader = self.data.eval_dataloader(client.id, split, self.collate)
        if len(loader.dataset) == 0:
            self.last_examples = {}
            return {}
        with quiet_lightning():
            self.trainers.eval_trainer().validate(module, dataloaders=loader, verbose=False)
        self.last_examples = module.eval_examples
        return module.eval_results

    def _tasks(self, client: ClientInfo) -> list[Task]:
        return [self.data.tasks[t] for t in client.tasks]
