"""The federated orchestrator: the round loop, which the engine's rooms and callbacks serve.

One round: sample clients (seeded by ``(seed, round)``) -> ``algorithm.configure_round`` says what each
receives -> on each client ``algorithm.client_update(ctx)`` drives local fits -> uploads are checked ->
``algorithm.aggregate`` with the round's results and failures -> evaluation every ``eval_every`` rounds -> the
callbacks (early stop, ``metrics.jsonl``, loggers, checkpoints, progress). Every random choice is derived from
the seed and the round, client and call it belongs to, so runs are reproducible, resumable and identical on
every rank. The rooms: :mod:`tapl.engine.config` (settings), :mod:`tapl.sampling` (client sampling),
:mod:`tapl.engine.local_training`, :mod:`tapl.engine.client_store`, :mod:`tapl.engine.evaluation`,
:mod:`tapl.engine.post_federation`, :mod:`tapl.engine.results` and :mod:`tapl.engine.checkpointing`.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_only

from tapl.algorithms.base import Algorithm
from tapl.api import ClientUpdate, Failure, FederationInfo
from tapl.client import OptimizerFactory
from tapl.components import (
    ComponentShapes,
    ComponentState,
    check_state,
    non_finite_components,
    num_bytes,
    shapes_of,
)
from tapl.datamodules.federated import FederatedDataModule
from tapl.engine.batched import BatchedClientWorker
from tapl.engine.callbacks import EngineCallback
from tapl.engine.checkpointing import (
    Checkpoint,
    Checkpointing,
    check_config,
    check_fingerprint,
    resume_target,
    rng_state,
    set_rng_state,
)
from tapl.engine.clients import ClientUnreachable, ClientWorker, Evaluated, describe
from tapl.engine.config import RESUMABLE_SETTINGS, FederationConfig
from tapl.engine.evaluation import Evaluation, Examples, of_clients, reported_models, summaries
from tapl.engine.local_training import LocalTraining, default_optimizer
from tapl.engine.logging import LoggerCallback, MetricsFile, loggers_of
from tapl.engine.plateau import PlateauStop
from tapl.engine.progress import Progress
from tapl.engine.results import assemble_results, new_client_record
from tapl.errors import Stopped, TaplError
from tapl.models.foundation import FoundationModel
from tapl.reporting import results_table
from tapl.run_dir import POST_FEDERATION_METRICS, RunDirectory, RunDirError
from tapl.run_lock import RunLock
from tapl.sampling import sample_clients
from tapl.tasks import Task
from tapl.visit_trainer import VisitTrainers

__all__ = ["RESUMABLE_SETTINGS", "FederatedOrchestrator", "FederationConfig", "FederationError"]

log = logging.getLogger(__name__)


class FederationError(TaplError, RuntimeError):
    """The federation cannot go on (e.g. every sampled client of a round failed)."""


class FederatedOrchestrator:
    """Runs a federation: the engine every algorithm plugs into.

    Args:
        model: The shared foundation model (every component of the server model).
        data: The federated data (tasks, clients, splits).
        algorithm: The federated algorithm.
        federation: Loop settings.
        run_dir: Where metrics, checkpoints and results go.
        trainer: ``lightning.pytorch.Trainer`` keyword arguments for local fits (``--trainer.*``). Its
            ``logger`` (a Lightning logger or a list of them) receives the run's per-round scalars instead of the
            default TensorBoard logger in ``RUN_DIR/tensorboard``; ``False`` turns that logging off.
        optimizer: Builds the optimizer of a local fit from the parameters to train.
        config_text: The resolved configuration, written to ``run_dir/config.yaml``.
        callbacks: Further engine callbacks, fired after the built-in ones but before the checkpoint is written.
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
        callbacks: Sequence[EngineCallback] = (),
    ) -> None:
        self.model = model
        self.data = data
        self.algorithm = algorithm
        self.config = federation or FederationConfig()
        self.run_dir = RunDirectory(run_dir)
        trainer = dict(trainer or {})
        loggers = loggers_of(trainer.pop("logger", None))
        self.trainers = VisitTrainers(trainer)
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
        self.training = LocalTraining(model, data, self.trainers, optimizer, self.config)
        self.initial_state: ComponentState = model.get_state()
        self.global_state: ComponentState = model.get_state()
        self.round = 0
        self.finalized = False
        self.stopped_at: int | None = None
        self.client_records: dict[int, dict[str, int]] = {c.id: new_client_record() for c in data.clients}
        hparams = config_text if config_text is not None else yaml.safe_dump({"federation": asdict(self.config)})
        self.callbacks: list[EngineCallback] = [
            PlateauStop(self.config.plateau_window, self.config.plateau_tolerance),  # first: it marks the record
            MetricsFile(),
            LoggerCallback(loggers, hparams, algorithm.label),
            Progress(),
            *callbacks,
            Checkpointing(),  # last: a checkpoint holds what every other callback did in the round
        ]
        self._info: FederationInfo | None = None
        self._worker: ClientWorker | None = None
        #: Builds the client side at set-up from the federation, the algorithm, the local training and the
        #: component shapes; a distributed runtime puts a proxy of its nodes here (see :mod:`tapl.runtimes`).
        self.worker_factory: Callable[[FederationInfo, Algorithm, LocalTraining, ComponentShapes], ClientWorker] = (
            BatchedClientWorker if self.config.execution == "batched" else ClientWorker
        )
        #: Clients whose post-federation stage is done, in order.
        self.post_done: list[int] = []
        #: Whether the post-federation stage fine-tunes each client's global slice (the "+FT" model); set up with
        #: the algorithm.
        self.fine_tune = False

    # -- what callbacks and algorithms see ----------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, Task]:
        """Every task, by name."""
        return self.data.tasks

    @property
    def info(self) -> FederationInfo:
        """The federation as algorithms see it (once the data are set up)."""
        if self._info is None:
            raise RuntimeError("The federation is not set up yet: call fit() or test()")
        return self._info

    def stop(self, reason: str) -> None:
        """End federation after the current round; the post-federation stage still runs."""
        self.stopped_at = self.round
        log.debug("Federation stops after round %d: %s", self.round, reason)

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
            started = time.perf_counter()
            # Only rank 0 checks: with DDP the other ranks start once rank 0 is already running.
            if ckpt_path is None and rank_zero_only.rank == 0 and self.run_dir.holds_run():
                raise RunDirError(
                    f"{self.run_dir.root} already holds a run. Resume it with --ckpt_path last, or choose another "
                    "--run_dir."
                )
            self.setup(check_values=True)
            if ckpt_path is not None:
                self._resume(ckpt_path)
            if self.config_text is not None:
                self._rank_zero(self.run_dir.write_text, "config.yaml", self.config_text)
            try:
                self._fire("on_fit_start")
                results = self._fit()
                self._fire(
                    "on_message",
                    f"done: {self.round} rounds in {time.perf_counter() - started:.1f} s; "
                    f"results in {self.run_dir.root / 'results.md'}",
                )
            finally:
                self._fire("teardown")
            return results

    def test(self, ckpt_path: str | None = "last") -> dict[str, Any]:
        """Evaluate a checkpointed run on every client's test split and write ``results.json``.

        Args:
            ckpt_path: ``"last"`` (the newest checkpoint of the run directory) or a checkpoint directory.
        """
        with self._holding_run_dir():
            self.setup(check_values=False)
            self._restore(self.run_dir.resolve_checkpoint(ckpt_path or "last", prefer_final=True))
            if not self.finalized:
                log.warning(
                    "The checkpoint of round %d precedes the end of the post-federation stage: its models are "
                    "tested as they are (resume the run with `tapl fit --ckpt_path last` to finish it).",
                    self.round,
                )
            results = self._final_results("test")
            log.info("Test results of round %d in %s", self.round, self.run_dir.root / "results.md")
            return results

    def sample_clients(self, round: int) -> list[int]:
        """The clients of ``round`` among the participants, by ``federation.sampling``: a function of
        ``(seed, round)`` only, identical on every rank."""
        k = self.config.num_sampled(len(self.participants))
        return sample_clients(self.participants, k, self.config.seed, round, self.config.sampling)

    # -- setup and the loop -------------------------------------------------------------------------------

    @contextmanager
    def _holding_run_dir(self) -> Iterator[None]:
        """Hold the run directory's lock (on rank 0, the only writer) and tell a Ctrl-C stop where the run is."""
        try:
            with RunLock(self.run_dir.root) if rank_zero_only.rank == 0 else nullcontext():
                yield
        except Stopped as stop:
            stop.run_dir = self.run_dir.root
            raise

    def setup(self, check_values: bool = True) -> None:
        """Set the data up (checking their values unless told not to), describe the federation to the algorithm
        and build the rooms that need both; :meth:`fit` and :meth:`test` call it."""
        self.data.setup()
        if check_values:
            self.data.check_values(self.model.preprocessors)
        self._info = describe(
            self.model, self.data, self.config, self.trainers, self.initial_state, Path(self.run_dir.root)
        )
        self.algorithm.setup(self._info)
        has_global = any(m.key == "global" for m in self.algorithm.models())
        self.fine_tune = has_global and self.config.finetune_steps > 0
        self._worker = self.worker_factory(self._info, self.algorithm, self.training, self.model.component_shapes())

    @property
    def finetune_description(self) -> str:
        """How the "+FT" model is made, for the results."""
        return (
            "each client's slice of the final global model, fine-tuned on the client's training data for "
            f"{self.config.finetune_steps} batches at lr {self.config.finetune_lr:g} after the last round"
        )

    @property
    def worker(self) -> ClientWorker:
        """The client side: runs every client's work and keeps every client's store (once set up)."""
        if self._worker is None:
            raise RuntimeError("The federation is not set up yet: call fit() or test()")
        return self._worker

    def _fit(self) -> dict[str, Any]:
        for round in range(self.round + 1, self.config.rounds + 1):
            if self.stopped_at is not None:
                break
            self._run_round(round)
        if self.stopped_at is not None:
            self._fire(
                "on_message", f"the global validation loss is stable: federation stopped after round {self.round}"
            )
        if not self.finalized:
            self._post_federation()
        results = self._final_results("test")
        self._fire("on_fit_end", results)
        return results

    def _run_round(self, round: int) -> None:
        started = time.perf_counter()
        instructions = self.algorithm.configure_round(round, self.sample_clients(round), self.global_state)
        strangers = sorted({i.client for i in instructions} - set(self.participants))
        if strangers:
            raise FederationError(f"configure_round() of {self.algorithm.label} chose non-participants {strangers}")
        clients = [i.client for i in instructions]
        self._fire("on_round_start", round, clients)
        outcomes: dict[int, ClientUpdate | Exception] = {}
        for cid, outcome in self.worker.visit_all(round, instructions, partial(self._started, "training")):
            outcomes[cid] = outcome
            self._fire("on_client_end", cid)
        results: list[ClientUpdate] = []
        failures: list[Failure] = []
        bytes_down = bytes_up = 0
        for instruction in instructions:  # in the order configure_round gave, however the outcomes came
            cid, outcome = instruction.client, outcomes[instruction.client]
            bytes_down += num_bytes(instruction.state)
            self.client_records[cid]["visits"] += 1
            if isinstance(outcome, Exception):  # a failing client must not stop the federation
                failures.append(Failure(cid, f"{type(outcome).__name__}: {outcome}"))
                self.client_records[cid]["failures"] += 1
                log.warning("Round %d: client %d excluded from aggregation: %s", round, cid, failures[-1].error)
                log.debug("".join(traceback.format_exception(outcome)))
            else:
                results.append(outcome)
                self.client_records[cid]["last_visit"] = round
                bytes_up += num_bytes(outcome.state)
        if not results:
            raise FederationError(
                f"Round {round}: every sampled client failed: { {str(f.client): f.error for f in failures} }"
            )
        self.global_state = self._aggregate(round, results, failures)
        self.round = round
        record: dict[str, Any] = {
            "round": round,
            "sampled_clients": clients,
            "failed_clients": {str(f.client): f.error for f in failures},
            "train": {str(u.client): u.metrics for u in results},
            "algorithm": self.algorithm.pop_logged(),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        events = [{"client": u.client, **event} for u in results for event in u.events]
        if events:
            record["events"] = events
        if round % self.config.eval_every == 0 or round == self.config.rounds:
            record.update(self._validation())
        record["seconds"] = time.perf_counter() - started
        self._fire("on_round_end", record)

    def _aggregate(self, round: int, results: list[ClientUpdate], failures: list[Failure]) -> ComponentState:
        new_state = self.algorithm.aggregate(round, self.global_state, results, failures)
        check_state(new_state, shapes_of(self.global_state), f"aggregate() of {self.algorithm.label}")
        non_finite = non_finite_components(new_state)
        if non_finite:
            raise FederationError(
                f"Round {round}: aggregate() of {self.algorithm.label} returned non-finite values (NaN or infinity) in "
                f"{non_finite}; the round is neither logged nor checkpointed, and --ckpt_path last resumes before it."
            )
        return new_state

    def _validation(self) -> dict[str, Any]:
        """A round's evaluation on the validation splits, with its summaries."""
        evaluation, _, unreachable = self._evaluate("val")
        record: dict[str, Any] = {"eval": evaluation}
        if unreachable:
            record["unevaluated_clients"] = unreachable
        record.update(summaries(of_clients(evaluation, self.participants), self.data.tasks))
        if self.config.holdout_clients:
            record["held_out"] = summaries(of_clients(evaluation, self.config.holdout_clients), self.data.tasks)
        return record

    def _evaluate(self, split: str) -> tuple[Evaluation, Examples, dict[str, str]]:
        """Every client's reported models on ``split``: model -> client -> task -> metrics, examples, and why each
        client whose node did not answer is missing."""
        evaluation: Evaluation = {}
        examples: Examples = {}
        unreachable: dict[str, str] = {}
        received = {client: self.info.slice_of(self.global_state, client) for client in self.info.clients}
        started = partial(self._started, f"evaluating ({split})")
        outcomes: dict[int, Evaluated | ClientUnreachable] = {}
        for client, outcome in self.worker.evaluate_all(self.round, received, split, started):
            outcomes[client] = outcome
            self._fire("on_client_end", client)
        for client in received:  # in the clients' order, however the outcomes came
            outcome = outcomes[client]
            if isinstance(outcome, ClientUnreachable):
                unreachable[str(client)] = str(outcome)
                log.warning(
                    "Round %d: client %d is missing from the evaluation on %s: %s", self.round, client, split, outcome
                )
                continue
            metrics, shown = outcome
            for model, per_task in metrics.items():
                evaluation.setdefault(model, {})[str(client)] = per_task
            for model, per_task in shown.items():
                examples.setdefault(model, {})[str(client)] = per_task
        return evaluation, examples, unreachable

    def _post_federation(self) -> None:
        """Fine-tune every client's global slice (the "+FT" model), run the algorithm's per-client stage."""
        todo = [c for c in self.info.clients if c not in set(self.post_done)]
        self._fire("on_post_federation_start", todo)
        received = {client: self.info.slice_of(self.global_state, client) for client in todo}
        notify = partial(self._fire, "on_client_start")
        for client, record in self.worker.post_federation_all(self.round, received, self.fine_tune, notify):
            self.post_done.append(client)
            self._fire("on_client_end", client)
            self._fire("on_post_federation_client_end", record)
        self.algorithm.on_federation_end(self.round, self.global_state)
        self.finalized = True
        self._fire("on_post_federation_end")

    def _final_results(self, split: str) -> dict[str, Any]:
        evaluation, examples, _ = self._evaluate(split)  # a missing client was warned of
        held_out = set(self.config.holdout_clients)
        results = assemble_results(
            algorithm=self.algorithm.label,
            split=split,
            round=self.round,
            stopped_early=self.stopped_at is not None,
            tasks=self.data.tasks,
            models=reported_models(self.algorithm, self.fine_tune and bool(self.post_done), self.finetune_description),
            clients={
                str(c.id): {"tasks": list(c.tasks), "held_out": c.id in held_out, **self.client_records[c.id]}
                for c in self.data.clients
            },
            evaluation=evaluation,
            examples=examples,
            participants=self.participants,
            held_out=self.config.holdout_clients,
        )
        self._rank_zero(self.run_dir.write_json, "results.json", results)
        self._rank_zero(self.run_dir.write_text, "results.md", results_table(results, self.data))
        return results

    def _started(self, what: str, client: int) -> None:
        self._fire("on_client_start", client, what)

    def _fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

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

    def resolved_config(self) -> dict[str, Any] | None:
        """The run's resolved configuration as a dict (``None`` when built without one, e.g. from Python)."""
        return yaml.safe_load(self.config_text) if self.config_text else None

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs but the global model: the loop's position, the algorithm's server
        state, every client's store and record, the post-federation progress, the callbacks' states and the
        random generators."""
        return {
            "round": self.round,
            "finalized": self.finalized,
            "stopped_at": self.stopped_at,
            "post_federation": {"done": list(self.post_done)},
            "fingerprint": self.fingerprint(),
            "config": self.resolved_config(),
            "federation": asdict(self.config),
            "algorithm": self.algorithm.state_dict(),
            **self.worker.state_dict(),
            "clients": {str(c): dict(r) for c, r in self.client_records.items()},
            "callbacks": {name: callback.state_dict() for name, callback in self._named_callbacks().items()},
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the fingerprint and configuration are checked before, by the caller)."""
        self.round = int(state["round"])
        self.finalized = bool(state["finalized"])
        self.stopped_at = None if state["stopped_at"] is None else int(state["stopped_at"])
        self.post_done = [int(c) for c in state["post_federation"]["done"]]
        self.algorithm.load_state_dict(state["algorithm"])
        self.worker.load_state_dict(state)
        self.client_records = {int(c): {**new_client_record(), **r} for c, r in state["clients"].items()}
        saved = state["callbacks"]
        for name, callback in self._named_callbacks().items():
            if name in saved:
                callback.load_state_dict(saved[name])
        set_rng_state(state["rng"])

    def _named_callbacks(self) -> dict[str, EngineCallback]:
        names: dict[str, EngineCallback] = {}
        for callback in self.callbacks:
            name = type(callback).__qualname__
            names[name if name not in names else f"{name}#{len(names)}"] = callback
        return names

    def save_checkpoint(self, name: str) -> Path | None:
        """Write the checkpoint ``name`` of the whole run (rank 0)."""
        if rank_zero_only.rank != 0:
            return None
        return self.run_dir.save_checkpoint(name, self.global_state, self.state_dict())

    def _restore(self, path: Path, loaded: Checkpoint | None = None) -> None:
        global_state, payload = loaded or self.run_dir.load_checkpoint(path)
        check_fingerprint(payload["fingerprint"], self.fingerprint(), path)
        check_config(payload.get("config"), self.resolved_config(), path)
        check_state(global_state, shapes_of(self.global_state), f"checkpoint {path}")
        self.global_state = global_state
        self.load_state_dict(payload)
        log.info("Resumed from %s at round %d", path, self.round)

    def _resume(self, ckpt_path: str) -> None:
        """Load the checkpoint ``--ckpt_path`` names and cut the logs back to it."""
        self._restore(*resume_target(self.run_dir, ckpt_path, self.config.rounds))
        if self.round > self.config.rounds:
            raise RunDirError(
                f"The checkpoint is at round {self.round}, beyond --federation.rounds {self.config.rounds}."
            )
        post_stage = self.finalized or bool(self.post_done)
        if post_stage and self.round < self.config.rounds and self.stopped_at is None:
            raise RunDirError(
                f"The checkpoint is from the post-federation stage after round {self.round}; to run more rounds "
                f"resume from {self.run_dir.checkpoints / self.run_dir.round_checkpoint_name(self.round)}."
            )
        done = set(self.post_done)
        self._rank_zero(self.run_dir.truncate_metrics, lambda r: r["round"] <= self.round)
        self._rank_zero(self.run_dir.truncate_metrics, lambda r: r["client"] in done, POST_FEDERATION_METRICS)
