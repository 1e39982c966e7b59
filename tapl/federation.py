"""The federated orchestrator: rounds, client sampling, visits, aggregation, evaluation, logs, checkpoints.

One round, as data flows: sample clients (seeded by ``(seed, round)``) -> for each,
``algorithm.client_update(ctx)`` drives one or more ``Trainer.fit`` on the client's slice -> uploads ->
``algorithm.aggregate`` -> evaluation every ``eval_every`` rounds -> ``metrics.jsonl`` and TensorBoard ->
checkpoint every ``checkpoint_every`` rounds. Every random choice is derived from the seed and the round,
client and call it belongs to, so runs are reproducible, resumable and identical on every rank.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.optim import AdamW, Optimizer

from tapl.algorithms.base import Algorithm
from tapl.callbacks.progress import RoundProgress
from tapl.client import ClientModule, LossFn, OptimizerFactory
from tapl.components import (
    ComponentMismatchError,
    ComponentState,
    check_finite,
    check_state,
    clone,
    non_finite_components,
    num_bytes,
    select,
    shapes_of,
)
from tapl.context import ClientContext, ClientUpdate, FitResult, Stage
from tapl.datamodules.collate import MultiTaskCollator
from tapl.datamodules.federated import ClientSpec, FederatedDataModule
from tapl.errors import Stopped, TaplError
from tapl.models.foundation import FoundationModel
from tapl.plateau import Plateau
from tapl.reporting import results_table, summarize, summarize_distribution
from tapl.run_dir import FINAL, POST_FEDERATION_METRICS, RunDirectory, RunDirError
from tapl.run_lock import RunLock
from tapl.sampling import SAMPLINGS, Sampling, sample_clients
from tapl.visit_trainer import VisitTrainers, quiet_lightning

log = logging.getLogger(__name__)


class FederationError(TaplError, RuntimeError):
    """The federation cannot go on (e.g. every sampled client of a round failed)."""


#: Settings (dotted keys of the resolved configuration) that may differ when a run resumes: they change when the
#: run stops, how it shows progress, or where it is, never what a round computes. Any other difference from the
#: checkpoint's configuration refuses the resume.
RESUMABLE_SETTINGS = (
    "federation.rounds",
    "federation.eval_every",
    "federation.checkpoint_every",
    "federation.progress",
    "data.num_workers",
    "run_dir",
    "ckpt_path",
)


@dataclass
class FederationConfig:
    """Settings of the federated loop (``--federation.*``).

    Args:
        rounds: Total number of rounds; resuming with a larger value continues to it.
        clients_per_round: Clients sampled per round: an int is a count, a float in (0, 1] a fraction.
        sampling: How each round's clients are chosen, always as a function of ``(seed, round)``:
            ``"random"``, uniformly and independently per round; ``"cyclic"``, without replacement across
            rounds: every participant once per pass of ``participants / clients_per_round`` rounds, in an
            order shuffled per pass (see :mod:`tapl.sampling`).
        local_steps: Optimizer steps of one local fit.
        seed: Seed of model initialisation, client sampling and every local fit.
        warmup_rounds: Warm the learning rate up linearly over this many rounds, from ``warmup_start_lr`` in
            round 1 to the optimizer's configured (peak) rate from round ``warmup_rounds + 1`` on; 0: no warm-up.
        warmup_start_lr: The learning rate of round 1 when warming up.
        eval_every: Evaluate on every client's validation split every this many rounds (and after the last).
        checkpoint_every: Write a checkpoint every this many rounds (and after the last).
        progress: Show the progress display.
        finetune_steps: Post-federation fine-tuning: each client's final global slice trains on this many
            batches of its own training data, one optimizer step per batch (``--trainer.accumulate_grad_batches``
            does not apply after the rounds, so the budget counts batches, as the TAP paper's 50 do), reported
            as the "+FT" model (e.g. FedAvg+FT) and used by algorithms as a teacher (TAP); 0 disables it.
        finetune_lr: Learning rate of that fine-tuning.
        plateau_window: Stop federation early once the global model's validation loss has stabilized: for
            this many consecutive evaluations, every task's loss changed by less than ``plateau_tolerance``
            (relative to the previous evaluation); the post-federation stage then runs. 0: run every round.
        plateau_tolerance: The relative change below which a task's validation loss counts as stable.
        holdout_clients: Ids of clients that never take part in the rounds: they are evaluated like every
            client (and fine-tuned after the rounds) to measure generalization to clients the federation never
            trained on; summaries cover the participating clients and, separately, the held-out ones.
    """

    rounds: int = 10
    clients_per_round: int | float = 0.5
    sampling: Sampling = "random"
    local_steps: int = 10
    seed: int = 0
    warmup_rounds: int = 0
    warmup_start_lr: float = 1e-4
    eval_every: int = 1
    checkpoint_every: int = 1
    progress: bool = True
    finetune_steps: int = 50
    finetune_lr: float = 1e-4
    plateau_window: int = 0
    plateau_tolerance: float = 0.01
    holdout_clients: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"federation.{name} must be >= 1, got {getattr(self, name)}")
        k = self.clients_per_round
        if isinstance(k, float) and not 0 < k <= 1:
            raise ValueError(f"federation.clients_per_round as a fraction must lie in (0, 1], got {k}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"federation.clients_per_round must be >= 1, got {k}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"federation.sampling must be one of {list(SAMPLINGS)}, got {self.sampling!r}")
        if self.warmup_rounds < 0 or self.warmup_start_lr <= 0:
            raise ValueError("federation.warmup_rounds must be >= 0 and federation.warmup_start_lr > 0")
        if self.finetune_steps < 0 or self.finetune_lr <= 0:
            raise ValueError("federation.finetune_steps must be >= 0 and federation.finetune_lr > 0")
        Plateau(self.plateau_window, self.plateau_tolerance)  # validates both

    def lr_for_round(self, round: int) -> Callable[[float], float] | None:
        """The warm-up of ``round`` as a function of the peak learning rate, or ``None`` once warmed up."""
        if not self.warmup_rounds or round > self.warmup_rounds:
            return None
        progress = (round - 1) / self.warmup_rounds
        start = self.warmup_start_lr
        return lambda peak: start + (peak - start) * progress

    def num_sampled(self, num_clients: int) -> int:
        """How many of ``num_clients`` clients one round samples."""
        k = self.clients_per_round
        if isinstance(k, float):
            return max(1, round(k * num_clients))
        if k > num_clients:
            raise ValueError(f"federation.clients_per_round is {k} but the federation has {num_clients} clients")
        return k


def new_client_record() -> dict[str, int]:
    """A client's record before any round: ``visits`` (sampled), ``failures`` (visits excluded from
    aggregation) and ``last_visit`` (the last round whose visit succeeded, i.e. was aggregated; 0: none)."""
    return {"visits": 0, "failures": 0, "last_visit": 0}


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``seed`` and ``keys``; different keys give independent streams."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


def default_optimizer(params: Iterable[nn.Parameter]) -> Optimizer:
    """AdamW with the paper's settings (lr 3e-4, weight decay 0.01)."""
    return AdamW(params, lr=3e-4, weight_decay=0.01)


class FederatedOrchestrator:
    """Runs a federation: the engine every algorithm plugs into.

    Args:
        model: The shared foundation model (every component of the server model).
        data: The federated data (tasks, clients, splits).
        algorithm: The federated algorithm.
        federation: Loop settings.
        run_dir: Where metrics, checkpoints and results go.
        trainer: ``lightning.pytorch.Trainer`` keyword arguments for client visits (``--trainer.*``).
        optimizer: Builds the optimizer of a local fit from the parameters to train.
        config_text: The resolved configuration, written to ``run_dir/config.yaml``.
    """

    def __init__(
        self,
        model: FoundationModel,
        data: FederatedDataModule,
        algorithm: Algorithm,
        federation: FederationConfig | None = None,
        run_dir: str = "runs/default",
        trainer: dict[str, Any] | None = None,
        optimizer: OptimizerFactory = default_optimizer,
        config_text: str | None = None,
    ) -> None:
        self.model = model
        self.data = data
        self.algorithm = algorithm
        self.config = federation or FederationConfig()
        self.run_dir = RunDirectory(run_dir)
        self.trainers = VisitTrainers(trainer)
        self.optimizer = optimizer
        self.config_text = config_text
        missing = sorted(set(data.tasks) - set(model.tasks))
        if missing:
            raise ValueError(f"The model has no heads for tasks {missing}: build it with the data's tasks.")
        # Fails fast: a resume must not rewrite the run directory for a sampling setting that cannot run.
        unknown = sorted(set(self.config.holdout_clients) - {c.id for c in data.clients})
        if unknown:
            raise ValueError(f"federation.holdout_clients names unknown clients {unknown}")
        #: The clients that take part in the rounds (every client but the held-out ones).
        self.participants = [c.id for c in data.clients if c.id not in set(self.config.holdout_clients)]
        if not self.participants:
            raise ValueError("federation.holdout_clients holds every client: none is left to train")
        self.config.num_sampled(len(self.participants))
        self.collate = MultiTaskCollator(data.tasks, model.preprocessors)
        self.slices = {c.id: model.components_for(c.tasks) for c in data.clients}
        self.global_state: ComponentState = model.get_state()
        self.round = 0
        self.finalized = False
        self.plateau = Plateau(self.config.plateau_window, self.config.plateau_tolerance)
        #: Post-federation progress: clients done, and each client's fine-tuned global slice ("+FT" model).
        self.post_done: list[int] = []
        self.finetuned: dict[int, ComponentState] = {}
        self.client_records: dict[int, dict[str, int]] = {c.id: new_client_record() for c in data.clients}
        #: Readable predictions (e.g. generated text) of the last evaluation: model -> client -> task -> list.
        self.examples: dict[str, dict[str, dict[str, list[dict[str, str]]]]] = {}
        self.last_examples: dict[str, list[dict[str, str]]] = {}
        self._logger: TensorBoardLogger | None = None
        self._progress: RoundProgress | None = None

    # -- public entry points ------------------------------------------------------------------------------

    def fit(self, ckpt_path: str | None = None) -> dict[str, Any]:
        """Run (or resume) the federation to ``federation.rounds``, the post-federation stage and the test.

        Args:
            ckpt_path: ``"last"`` or a checkpoint directory to resume from; ``None`` starts a new run, which
                requires an empty run directory.

        Returns:
            The final results (also written to ``results.json``).

        Raises:
            RunDirError: if another process holds the run directory, or it holds a run and no resume was asked.
            Stopped: on Ctrl-C, with the run directory to resume from.
        """
        with self._holding_run_dir():
            return self._fit(ckpt_path)

    @contextmanager
    def _holding_run_dir(self) -> Iterator[None]:
        """Hold the run directory's lock (on rank 0, the only writer) and tell a Ctrl-C stop where the run is."""
        try:
            with RunLock(self.run_dir.root) if rank_zero_only.rank == 0 else nullcontext():
                yield
        except Stopped as stop:
            stop.run_dir = self.run_dir.root
            raise

    def _fit(self, ckpt_path: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        # Only rank 0 checks: with DDP the other ranks start once rank 0 is already running.
        if ckpt_path is None and rank_zero_only.rank == 0 and self.run_dir.holds_run():
            raise RunDirError(
                f"{self.run_dir.root} already holds a run. Resume it with --ckpt_path last, or choose another "
                "--run_dir."
            )
        self.data.setup()
        self.data.check_values(self.model.preprocessors)
        self.algorithm.setup(self)
        if ckpt_path is not None:
            self._restore(self._resume_checkpoint(ckpt_path))
            if self.round > self.config.rounds:
                raise RunDirError(
                    f"The checkpoint is at round {self.round}, beyond --federation.rounds {self.config.rounds}."
                )
            post_stage = self.finalized or bool(self.post_done)
            if post_stage and self.round < self.config.rounds and self.plateau.stopped_at is None:
                raise RunDirError(
                    f"The checkpoint is from the post-federation stage after round {self.round}; to run more rounds "
                    f"resume from {self.run_dir.checkpoints / self.run_dir.round_checkpoint_name(self.round)}."
                )
            done = set(self.post_done)
            self._rank_zero(self.run_dir.truncate_metrics, lambda r: r["round"] <= self.round)
            self._rank_zero(self.run_dir.truncate_metrics, lambda r: r["client"] in done, POST_FEDERATION_METRICS)
        self._write_config()
        with RoundProgress(self.config.rounds, self.round, self.config.progress) as progress:
            self._progress = progress
            for round in range(self.round + 1, self.config.rounds + 1):
                if self.plateau.stopped_at is not None:
                    break
                self._run_round(round)
            if self.plateau.stopped_at is not None:
                progress.print(f"the global validation loss is stable: federation stopped after round {self.round}")
            if not self.finalized:
                self._post_federation()
            results = self._final_results("test")
            self._log_hparams(results)
            progress.print(
                f"done: {self.round} rounds in {time.perf_counter() - started:.1f} s; "
                f"results in {self.run_dir.root / 'results.md'}"
            )
        self._progress = None
        return results

    def test(self, ckpt_path: str | None = "last") -> dict[str, Any]:
        """Evaluate a checkpointed run on every client's test split and write ``results.json``.

        Args:
            ckpt_path: ``"last"`` (the newest checkpoint of the run directory) or a checkpoint directory.
        """
        with self._holding_run_dir():
            return self._test(ckpt_path)

    def _test(self, ckpt_path: str | None) -> dict[str, Any]:
        self.data.setup()
        self.algorithm.setup(self)
        self._restore(self.run_dir.resolve_checkpoint(ckpt_path or "last", prefer_final=True))
        if not self.finalized:
            log.warning(
                "The checkpoint of round %d precedes the end of the post-federation stage: its models are tested "
                "as they are (resume the run with `tapl fit --ckpt_path last` to finish it).",
                self.round,
            )
        results = self._final_results("test")
        log.info("Test results of round %d in %s", self.round, self.run_dir.root / "results.md")
        return results

    # -- services for algorithms --------------------------------------------------------------------------

    def client(self, client: int) -> ClientSpec:
        """The client with id ``client``."""
        return self.data.clients[client]

    def client_context(self, client: int, stage: Stage = "evaluation") -> ClientContext:
        """A context for local work on ``client`` outside a round's visit, e.g. adapting the global slice in
        :meth:`Algorithm.personalized_state`; its fits draw their randomness from ``(seed, stage, round,
        client, stream)`` like a visit's."""
        global_slice = clone(select(self.global_state, self.slices[client]))
        return ClientContext(self, self.client(client), self.round, global_slice, stage=stage)

    def fit_client(
        self,
        client: ClientSpec,
        state: ComponentState,
        *,
        round: int,
        seed_key: Sequence[int],
        steps: int | None = None,
        lr: float | None = None,
        loss_fn: LossFn | None = None,
        callbacks: Sequence[Callback] = (),
        module_class: Callable[..., ClientModule] = ClientModule,
        trainable: Sequence[str] | None = None,
        trainer_overrides: Mapping[str, Any] | None = None,
    ) -> FitResult:
        """One ``Trainer.fit`` of ``state`` on ``client``'s training data (see :meth:`ClientContext.fit`)."""
        steps = steps or self.config.local_steps
        if lr is None:
            lr = self.config.lr_for_round(round)
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
        module = module_class(
            self.model, [self.data.tasks[t] for t in client.tasks], trained, self.optimizer, lr, loss_fn
        )
        loader = self.data.train_dataloader(client.id, self.collate, seed)
        with quiet_lightning():
            trainer = self.trainers.fit_trainer(steps, callbacks, trainer_overrides)
            trainer.fit(module, train_dataloaders=loader)
        return FitResult(self.model.get_state(components), module.train_loss(), trainer.global_step)

    def evaluate_client(self, client: ClientSpec, state: ComponentState, split: str) -> dict[str, dict[str, float]]:
        """Metrics per task of ``state`` (the client's slice) on ``client``'s ``split``."""
        components = sorted(state)
        self.model.load_state(state, f"state evaluated on client {client.id}")
        module = ClientModule(self.model, [self.data.tasks[t] for t in client.tasks], components, self.optimizer)
        loader = self.data.eval_dataloader(client.id, split, self.collate)
        if len(loader.dataset) == 0:
            return {}
        with quiet_lightning():
            self.trainers.eval_trainer().validate(module, dataloaders=loader, verbose=False)
        self.last_examples = module.eval_examples
        return module.eval_results

    # -- the post-federation stage ------------------------------------------------------------------------

    def _post_federation(self) -> None:
        """Fine-tune every client's global slice (the "+FT" model), run the algorithm's per-client stage."""
        progress = self._progress
        todo = [c for c in self.data.clients if c.id not in self.post_done]
        if progress:
            progress.print(f"post-federation stage: {len(todo)} clients")
            progress.start_round(self.round, len(todo), "post-federation")
        for client in todo:
            started = time.perf_counter()
            global_slice = clone(select(self.global_state, self.slices[client.id]))
            ctx = ClientContext(self, client, self.round, global_slice, stage="post-federation")
            record: dict[str, Any] = {"round": self.round, "client": client.id}
            if self.algorithm.has_global_model and self.config.finetune_steps:
                if progress:
                    progress.client_started(client.id, "fine-tuning the global slice")
                result = ctx.fit(global_slice, steps=self.config.finetune_steps, lr=self.config.finetune_lr)
                self.finetuned[client.id] = ctx.finetuned = result.state
                record["finetune_loss"] = result.train_loss
            if progress:
                progress.client_started(client.id, f"{self.algorithm.label} post-federation")
            record["algorithm"] = self.algorithm.finalize_client(ctx)
            self.post_done.append(client.id)
            record["seconds"] = time.perf_counter() - started
            self._rank_zero(self.run_dir.append_metrics, record, POST_FEDERATION_METRICS)
            self._log_post_scalars(record)
            self._save_checkpoint(FINAL)
            if progress:
                progress.client_done()
                progress.print(f"post-federation: client {client.id} done in {record['seconds']:.1f} s")
        self.algorithm.finalize(self.global_state)
        self.finalized = True
        self._save_checkpoint(FINAL)

    def _resume_checkpoint(self, ckpt_path: str) -> Any:
        """The checkpoint ``--ckpt_path`` names; ``last`` prefers the post-federation one unless extending."""
        final = self.run_dir.checkpoints / FINAL
        if ckpt_path == "last" and (final / "state.pt").is_file():
            _, payload = self.run_dir.load_checkpoint(final)
            if payload["round"] >= self.config.rounds or payload["plateau"]["stopped_at"] is not None:
                return final
        return self.run_dir.resolve_checkpoint(ckpt_path)

    # -- the round ----------------------------------------------------------------------------------------

    def sample_clients(self, round: int) -> list[int]:
        """The clients of ``round`` among the participants, by ``federation.sampling``: a function of
        ``(seed, round)`` only, identical on every rank."""
        k = self.config.num_sampled(len(self.participants))
        return sample_clients(self.participants, k, self.config.seed, round, self.config.sampling)

    def _run_round(self, round: int) -> None:
        started = time.perf_counter()
        progress = self._progress
        sampled = self.sample_clients(round)
        if progress:
            progress.start_round(round, len(sampled))
        updates: list[ClientUpdate] = []
        failed: dict[str, str] = {}
        bytes_down = bytes_up = 0
        for cid in sampled:
            client = self.client(cid)
            if progress:
                progress.client_started(cid)
            global_slice = clone(select(self.global_state, self.slices[cid]))
            if self.algorithm.downloads_global:
                bytes_down += num_bytes(global_slice)
            self.client_records[cid]["visits"] += 1
            try:
                update = self.algorithm.client_update(ClientContext(self, client, round, global_slice))
                self._check_upload(client, update)
            except Exception as error:  # a failing client must not stop the federation
                self.client_records[cid]["failures"] += 1
                failed[str(cid)] = f"{type(error).__name__}: {error}"
                log.warning("Round %d: client %d excluded from aggregation: %s", round, cid, failed[str(cid)])
                log.debug("".join(traceback.format_exception(error)))
            else:
                updates.append(update)
                self.client_records[cid]["last_visit"] = round
                bytes_up += num_bytes(update.state)
            if progress:
                progress.client_done()
        if not updates:
            raise FederationError(f"Round {round}: every sampled client failed: {failed}")
        new_state = self.algorithm.aggregate(round, self.global_state, updates)
        check_state(new_state, shapes_of(self.global_state), f"aggregate() of {self.algorithm.label}")
        non_finite = non_finite_components(new_state)
        if non_finite:
            raise FederationError(
                f"Round {round}: aggregate() of {self.algorithm.label} returned non-finite values (NaN or infinity) in "
                f"{non_finite}; the round is neither logged nor checkpointed, and --ckpt_path last resumes before it."
            )
        self.global_state = new_state
        extra = self.algorithm.on_round_end(round, self.global_state)
        self.round = round
        record: dict[str, Any] = {
            "round": round,
            "sampled_clients": sampled,
            "failed_clients": failed,
            "train": {str(u.client): u.metrics for u in updates},
            "algorithm": extra,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        events = [{"client": u.client, **event} for u in updates for event in u.events]
        if events:
            record["events"] = events
        if round % self.config.eval_every == 0 or round == self.config.rounds:
            record["eval"] = self._evaluate_all("val")
            record.update(self._summaries(self._of_clients(record["eval"], self.participants)))
            if self.config.holdout_clients:
                record["held_out"] = self._summaries(self._of_clients(record["eval"], self.config.holdout_clients))
            reference = record["summary"].get("global", record["summary"]["personalized"])
            losses = {task: values["loss"] for task, values in reference.items()}
            if self.plateau.update(round, losses):
                record["stopped"] = "the global validation loss is stable"
        record["seconds"] = round_seconds = time.perf_counter() - started
        self._rank_zero(self.run_dir.append_metrics, record)
        self._log_scalars(record)
        if round % self.config.checkpoint_every == 0 or round == self.config.rounds or "stopped" in record:
            self._save_checkpoint(self.run_dir.round_checkpoint_name(round))
        if progress:
            progress.round_done(self._round_summary(record, round_seconds))

    def _check_upload(self, client: ClientSpec, update: ClientUpdate) -> None:
        outside = sorted(set(update.state) - set(self.slices[client.id]))
        if outside:
            raise ComponentMismatchError(f"client {client.id} uploaded components outside its slice: {outside}")
        check_state(update.state, self.model.component_shapes(update.state), f"upload of client {client.id}")
        check_finite(update.state, "upload")

    def models(self) -> dict[str, dict[str, str]]:
        """The models evaluated per client, by key: their ``label`` and ``description``."""
        algorithm = self.algorithm
        models: dict[str, dict[str, str]] = {}
        if algorithm.has_global_model:
            models["global"] = {
                "label": algorithm.global_label,
                "description": "each client's slice of the global model",
            }
            if self.finetuned:
                models["global+FT"] = {
                    "label": f"{algorithm.global_label}+FT",
                    "description": "each client's slice of the final global model, fine-tuned on the client's "
                    f"training data for {self.config.finetune_steps} batches at lr {self.config.finetune_lr:g} after "
                    "the last round",
                }
        models["personalized"] = {
            "label": algorithm.personalized_label,
            "description": algorithm.personalized_description,
        }
        models.update(algorithm.variants)
        return models

    def client_models(self, client: ClientSpec) -> dict[str, ComponentState]:
        """Every model of ``client`` to evaluate now, by the keys of :meth:`models`."""
        global_slice = select(self.global_state, self.slices[client.id])
        states: dict[str, ComponentState] = {}
        if self.algorithm.has_global_model:
            states["global"] = global_slice
            if client.id in self.finetuned:
                states["global+FT"] = self.finetuned[client.id]
        personal = self.algorithm.personalized_state(client.id, clone(global_slice))
        states["personalized"] = global_slice if personal is None else personal
        states.update(self.algorithm.variant_states(client.id, clone(global_slice)))
        return states

    def _evaluate_all(self, split: str) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        self.examples = {}
        for client in self.data.clients:
            if self._progress:
                self._progress.client_started(client.id, f"evaluating ({split})")
            evaluated: dict[int, dict[str, dict[str, float]]] = {}
            for model, state in self.client_models(client).items():
                # A model that is another one's very state (FedAvg's personalized = global) is evaluated once.
                if id(state) not in evaluated:
                    evaluated[id(state)] = self.evaluate_client(client, state, split)
                    self._keep_examples(model, client.id)
                results.setdefault(model, {})[str(client.id)] = evaluated[id(state)]
        return results

    @staticmethod
    def _of_clients(evaluation: dict[str, dict[str, Any]], clients: Sequence[int]) -> dict[str, dict[str, Any]]:
        """``evaluation`` (model -> client -> ...) restricted to ``clients``."""
        wanted = {str(c) for c in clients}
        return {model: {c: v for c, v in per_client.items() if c in wanted} for model, per_client in evaluation.items()}

    def _summaries(self, evaluation: dict[str, dict[str, Any]], distribution: bool = False) -> dict[str, Any]:
        """Across the clients of ``evaluation``: per task and per task type sample-weighted means, and with
        ``distribution`` the statistics of every metric over clients per task, task type and pair."""
        tasks = self.data.tasks
        summaries: dict[str, Any] = {
            "summary": {model: summarize(per_client, tasks) for model, per_client in evaluation.items()},
            "summary_task_type": {
                model: {
                    group: {metric: d["weighted_mean"] for metric, d in per_metric.items()}
                    for group, per_metric in summarize_distribution(per_client, tasks, "task_type").items()
                }
                for model, per_client in evaluation.items()
            },
        }
        if distribution:
            summaries["distribution"] = {
                by: {model: summarize_distribution(per_client, tasks, by) for model, per_client in evaluation.items()}
                for by in ("task", "task_type", "pair")
            }
        return summaries

    def _keep_examples(self, model: str, client: int) -> None:
        if self.last_examples:
            self.examples.setdefault(model, {})[str(client)] = self.last_examples

    def _clients_summary(self) -> dict[str, dict[str, Any]]:
        """Per client id: its tasks, whether it is held out, and its record (visits, failures, last visit)."""
        held_out = set(self.config.holdout_clients)
        return {
            str(c.id): {"tasks": list(c.tasks), "held_out": c.id in held_out, **self.client_records[c.id]}
            for c in self.data.clients
        }

    def _final_results(self, split: str) -> dict[str, Any]:
        evaluation = self._evaluate_all(split)
        results = {
            "algorithm": self.algorithm.label,
            "split": split,
            "round": self.round,
            "stopped_early": self.plateau.stopped_at is not None,
            "tasks": {
                name: {
                    "type": task.type,
                    "pair": task.pair,
                    "primary_metric": task.task_type.primary_metric,
                    "higher_is_better": {"loss": False, **task.task_type.higher_is_better},
                }
                for name, task in self.data.tasks.items()
            },
            "models": self.models(),
            "clients": self._clients_summary(),
            "per_client": evaluation,
            **self._summaries(self._of_clients(evaluation, self.participants), distribution=True),
            "examples": self.examples,
        }
        if self.config.holdout_clients:
            held_out = self._of_clients(evaluation, self.config.holdout_clients)
            results["held_out"] = {"clients": sorted(self.config.holdout_clients), **self._summaries(held_out, True)}
        self._rank_zero(self.run_dir.write_json, "results.json", results)
        self._rank_zero(self.run_dir.write_text, "results.md", results_table(results, self.data))
        return results

    # -- logging ------------------------------------------------------------------------------------------

    def _round_summary(self, record: dict[str, Any], seconds: float) -> str:
        parts = [f"{seconds:.1f}s"]
        for task, values in record.get("summary", {}).get("global", {}).items():
            metric = self.data.tasks[task].task_type.primary_metric
            parts.append(f"{task} {metric} {values[metric]:.3f}")
        if record["failed_clients"]:
            parts.append(f"{len(record['failed_clients'])} failed")
        return " | ".join(parts)

    @rank_zero_only
    def _log_scalars(self, record: dict[str, Any]) -> None:
        scalars: dict[str, float] = {
            "comm/bytes_up": record["bytes_up"],
            "comm/bytes_down": record["bytes_down"],
            "round/seconds": record["seconds"],
            "round/failed_clients": len(record["failed_clients"]),
        }
        for cid, metrics in record["train"].items():
            scalars.update({f"client_{cid}/{k}": v for k, v in metrics.items()})
        scalars.update({f"algorithm/{k}": v for k, v in record["algorithm"].items()})
        for model, per_task in record.get("summary", {}).items():
            for task, values in per_task.items():
                scalars.update({f"{model}/{task}/{k}": v for k, v in values.items()})
        for model, per_type in record.get("summary_task_type", {}).items():
            for group, values in per_type.items():
                scalars.update({f"{model}/task_type/{group}/{k}": v for k, v in values.items()})
        for model, per_client in record.get("eval", {}).items():
            for cid, per_task in per_client.items():
                for task, values in per_task.items():
                    scalars.update({f"client_{cid}/{model}/{task}/{k}": v for k, v in values.items()})
        self._tensorboard(scalars, record["round"])
        for model, per_client in record.get("eval", {}).items():
            self._client_histograms(model, per_client, record["round"])

    def _client_histograms(self, model: str, per_client: dict[str, Any], step: int) -> None:
        """One histogram per task and metric of the values over clients (``<model>/<task>/<metric>/clients``)."""
        experiment = self._tb_logger().experiment
        for task in self.data.tasks:
            rows = [per_task[task] for per_task in per_client.values() if task in per_task]
            for metric in sorted({m for row in rows for m in row} - {"samples"}):
                values = np.array([row[metric] for row in rows if metric in row], dtype=np.float64)
                values = values[np.isfinite(values)]
                if not values.size:
                    continue
                experiment.add_histogram(f"{model}/{task}/{metric}/clients", values, step)
        experiment.flush()

    @rank_zero_only
    def _log_hparams(self, results: dict[str, Any]) -> None:
        """The run's settings with its final test metrics, for TensorBoard's hparams view."""
        config = yaml.safe_load(self.config_text) if self.config_text else {"federation": asdict(self.config)}
        params = {k: v for k, v in _flatten(config).items() if isinstance(v, str | int | float | bool)}
        params["algorithm"] = self.algorithm.label
        metrics = {
            f"final/{model}/{task}/{metric}": value
            for model, per_task in results["summary"].items()
            for task, values in per_task.items()
            for metric, value in values.items()
            if metric not in ("clients", "samples")
        }
        self._tb_logger().log_hyperparams(params, metrics)
        self._tb_logger().experiment.flush()

    @rank_zero_only
    def _log_post_scalars(self, record: dict[str, Any]) -> None:
        prefix = f"post_federation/client_{record['client']}"
        scalars = {f"{prefix}/finetune_loss/{task}": v for task, v in record.get("finetune_loss", {}).items()}
        scalars.update({f"{prefix}/{key}": v for key, v in _numbers(record["algorithm"]).items()})
        if scalars:
            self._tensorboard(scalars, record["round"])

    def _tb_logger(self) -> TensorBoardLogger:
        if self._logger is None:
            self._logger = TensorBoardLogger(save_dir=str(self.run_dir.root), name="", version="tensorboard")
        return self._logger

    def _tensorboard(self, scalars: dict[str, float], step: int) -> None:
        self._tb_logger().log_metrics(scalars, step=step)
        self._tb_logger().experiment.flush()

    def _write_config(self) -> None:
        if self.config_text is not None:
            self._rank_zero(self.run_dir.write_text, "config.yaml", self.config_text)

    @staticmethod
    def _rank_zero(fn: Any, *args: Any) -> Any:
        return fn(*args) if rank_zero_only.rank == 0 else None

    # -- checkpoints --------------------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this federation."""
        return {
            **self.data.fingerprint(),
            "components": {c: {k: list(s) for k, s in p.items()} for c, p in self.model.component_shapes().items()},
            "algorithm": type(self.algorithm).__module__ + "." + type(self.algorithm).__qualname__,
        }

    def _save_checkpoint(self, name: str) -> None:
        if rank_zero_only.rank != 0:
            return
        payload = {
            "round": self.round,
            "finalized": self.finalized,
            "plateau": self.plateau.state_dict(),
            "post_federation": {
                "done": list(self.post_done),
                "finetuned": {str(c): s for c, s in self.finetuned.items()},
            },
            "fingerprint": self.fingerprint(),
            "config": self.resolved_config(),
            "federation": asdict(self.config),
            "algorithm": self.algorithm.state_dict(),
            "clients": {str(c): dict(r) for c, r in self.client_records.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                "numpy_pos": int(np.random.get_state()[2]),
                "python": list(random.getstate()[1]),
            },
        }
        self.run_dir.save_checkpoint(name, self.global_state, payload)

    def resolved_config(self) -> dict[str, Any] | None:
        """The run's resolved configuration as a dict (``None`` when built without one, e.g. from Python)."""
        return yaml.safe_load(self.config_text) if self.config_text else None

    def _restore(self, path: Any) -> None:
        global_state, payload = self.run_dir.load_checkpoint(path)
        self._check_fingerprint(payload["fingerprint"], path)
        self._check_config(payload.get("config"), path)
        check_state(global_state, shapes_of(self.global_state), f"checkpoint {path}")
        self.global_state = global_state
        self.round = int(payload["round"])
        self.finalized = bool(payload["finalized"])
        self.plateau.load_state_dict(payload["plateau"])
        post = payload["post_federation"]
        self.post_done = [int(c) for c in post["done"]]
        self.finetuned = {int(c): s for c, s in post["finetuned"].items()}
        self.algorithm.load_state_dict(payload["algorithm"])
        # Checkpoints written before a record field existed load it as 0.
        self.client_records = {int(c): {**new_client_record(), **r} for c, r in payload["clients"].items()}
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
        random.setstate((3, tuple(rng["python"]), None))
        log.info("Resumed from %s at round %d", path, self.round)

    def _check_fingerprint(self, saved: dict[str, Any], path: Any) -> None:
        current = self.fingerprint()
        differences = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
        if not differences:
            return
        details = []
        for key in differences:
            if key == "components":
                a, b = saved.get(key, {}), current.get(key, {})
                changed = sorted(set(a) ^ set(b)) or sorted(c for c in a if a[c] != b.get(c))
                details.append(f"components differ ({changed[:5]})")
            else:
                details.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
        raise RunDirError(f"Checkpoint {path} belongs to a different federation: " + "; ".join(details))

    def _check_config(self, saved: dict[str, Any] | None, path: Any) -> None:
        """Refuse to resume with settings other than the checkpoint's, but for :data:`RESUMABLE_SETTINGS`."""
        current = self.resolved_config()
        if saved is None or current is None:  # a checkpoint or a run built without a configuration
            return
        before, now = _flatten(saved, separator="."), _flatten(current, separator=".")
        changed = [
            f"{key}: checkpoint {_short(before.get(key, '(unset)'))}, now {_short(now.get(key, '(unset)'))}"
            for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key) and not _resumable(key)
        ]
        if changed:
            raise RunDirError(
                f"Checkpoint {path} was written with other settings: {'; '.join(changed)}. Resume with the run's "
                f"config.yaml (only {', '.join(RESUMABLE_SETTINGS)} may change), or start a new --run_dir."
            )


def _flatten(values: dict[str, Any], prefix: str = "", separator: str = "/") -> dict[str, Any]:
    """A nested dict as flat ``a/b/c`` keys (lists are kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name, separator))
        else:
            flat[name] = value
    return flat


def _resumable(key: str) -> bool:
    return any(key == setting or key.startswith(f"{setting}.") for setting in RESUMABLE_SETTINGS)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of a nested dict as flat ``a/b/c`` scalars (for TensorBoard)."""
    return {k: float(v) for k, v in _flatten(values).items() if isinstance(v, int | float) and not isinstance(v, bool)}
