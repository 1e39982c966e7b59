"""Local training: one ``Trainer.fit`` (or ``validate``) of a state on one client's data, in this process."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback
from torch import nn
from torch.optim import AdamW, Optimizer

from tapl.api import ClientInfo, FitResult
from tapl.client import ClientModule, OptimizerFactory
from tapl.components import ComponentState
from tapl.datamodules.collate import MultiTaskCollator
from tapl.datamodules.federated import FederatedDataModule
from tapl.engine.cohort import CohortBatches, CohortModule, FitRequest, ResolvedFit
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
        request = FitRequest(
            client,
            state,
            round,
            tuple(seed_key),
            steps,
            lr,
            objective,
            optimizer,
            callbacks,
            trainable,
            trainer_overrides,
        )
        return self.run_fit(request)

    def run_fit(self, request: FitRequest) -> FitResult:
        """Run the fit ``request`` asks for (here, at once, on its own)."""
        return self.fit_resolved(self.resolve(request))

    def resolve(self, request: FitRequest) -> ResolvedFit:
        """``request`` with the federation's defaults filled in: steps, the fit's seed and the trained components.

        Raises:
            ValueError: when the trainable components are not all in the fitted state.
        """
        components = sorted(request.state)
        trained = components if request.trainable is None else sorted(request.trainable)
        outside = sorted(set(trained) - set(components))
        if outside:
            raise ValueError(f"trainable components {outside} are not in the fitted state {components}")
        steps = request.steps or self.config.local_steps
        return ResolvedFit(request, steps, derive_seed(self.config.seed, *request.seed_key), components, trained)

    def fit_resolved(self, fit: ResolvedFit) -> FitResult:
        """One ``Trainer.fit`` of a resolved request."""
        request = fit.request
        client = request.client
        schedule = self.config.lr_for_round(request.round) if request.lr is None else request.lr
        seed_everything(fit.seed, workers=True, verbose=False)
        self.model.load_state(request.state, f"state fitted on client {client.id}")
        self.model.set_trainable(fit.trained)
        # Pretrained backbones load in eval mode; local training uses their dropout like any fine-tuning.
        self.model.train()
        module = ClientModule(
            self.model,
            self.tasks_of(client),
            fit.trained,
            request.optimizer or self.optimizer,
            schedule,
            request.objective,
        )
        loader = self.data.train_dataloader(client.id, self.collate, fit.seed)
        with quiet_lightning():
            trainer = self.trainers.fit_trainer(fit.steps, request.callbacks, request.trainer_overrides)
            trainer.fit(module, train_dataloaders=loader)
        return FitResult(self.model.get_state(fit.components), module.train_loss(), trainer.global_step)

    def fit_cohort(self, fits: Sequence[ResolvedFit], optimizer: OptimizerFactory) -> list[FitResult]:
        """The fits of one cohort (equal :func:`~tapl.engine.cohort.cohort_key`) as one ``Trainer.fit`` (see
        :mod:`tapl.engine.cohort`); each member's result, in order.

        Raises:
            NotBatchable: when the fits cannot run together (the caller runs them one by one).
        """
        first = fits[0]
        states = [f.request.state for f in fits]
        # Frozen components equal for every member stay loaded in the model instead of being stacked.
        shared = [
            c
            for c in first.components
            if c not in first.trained and all(torch.equal(s[c][k], states[0][c][k]) for s in states for k in s[c])
        ]
        loaders = [self.data.train_dataloader(f.request.client.id, self.collate, f.seed) for f in fits]
        seed_everything(first.seed, workers=True, verbose=False)
        self.model.load_state(states[0], f"state fitted on client {first.request.client.id}")
        self.model.set_trainable([])
        self.model.train()
        schedule = self.config.lr_for_round(first.request.round) if first.request.lr is None else first.request.lr
        module = CohortModule(
            self.model,
            fits,
            [self.tasks_of(f.request.client) for f in fits],
            optimizer,
            schedule,
            [f.request.objective or Objective() for f in fits],
            shared,
        )
        trainer = self.trainers.fit_trainer(first.steps, (), first.request.trainer_overrides)
        trainer.fit(module, train_dataloaders=CohortBatches(loaders, max(len(loader) for loader in loaders)))
        trained = module.member_states(fits)
        losses = module.train_losses()
        return [FitResult(state, loss, trainer.global_step) for state, loss in zip(trained, losses, strict=True)]

    def evaluate(self, client: ClientInfo, state: ComponentState, split: str) -> dict[str, dict[str, float]]:
        """Metrics per task of ``state`` (the client's slice) on ``client``'s ``split``."""
        self.model.load_state(state, f"state evaluated on client {client.id}")
        module = ClientModule(self.model, self.tasks_of(client), sorted(state), self.optimizer)
        loader = self.data.eval_dataloader(client.id, split, self.collate)
        if len(loader.dataset) == 0:
            self.last_examples = {}
            return {}
        with quiet_lightning():
            self.trainers.eval_trainer().validate(module, dataloaders=loader, verbose=False)
        self.last_examples = module.eval_examples
        return module.eval_results

    def tasks_of(self, client: ClientInfo) -> list[Task]:
        """The tasks of ``client``."""
        return [self.data.tasks[t] for t in client.tasks]
