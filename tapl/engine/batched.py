"""Batched client execution (``--federation.execution batched``): a round's clients train together.

An algorithm's ``client_update`` stays plain sequential code: each sampled client's work runs as a job, and a
``ctx.fit`` inside it waits until every job of the wave has either asked for its fit or finished. The jobs take
turns (exactly one runs at a time, so the shared model is never used by two at once); then the asked fits run as
cohorts (:func:`~tapl.engine.cohort.fit_cohort`), one ``Trainer.fit`` per cohort, and every job goes on with its
own result, up to its next fit. An algorithm with two fits per visit (FedRep, TAP) thus trains its cohort twice.
Fits that cannot join a cohort (an objective with its own training step, such as Per-FedAvg's meta-gradient) run
one after another, with a one-line notice.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from typing_extensions import override

from tapl.algorithms.base import Algorithm
from tapl.api import ClientUpdate, FederationInfo, FitResult, Instruction
from tapl.components import ComponentShapes, ComponentState
from tapl.engine.clients import ClientWorker
from tapl.engine.cohort import (
    FitRequest,
    NotBatchable,
    ResolvedFit,
    cohort_key,
    optimizer_refusal,
    why_not_batched,
)
from tapl.engine.local_training import LocalTraining
from tapl.visit_trainer import quiet_lightning

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Job:
    """One client's work in its own thread, run only while the scheduler waits for it."""

    def __init__(self, work: Callable[[], Any], local: threading.local) -> None:
        self.work = work
        self.local = local
        self._to_job: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._to_scheduler: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _main(self) -> None:
        self.local.job = self
        try:
            outcome: Any = self.work()
        except Exception as error:
            outcome = error
        self._to_scheduler.put(("done", outcome))

    def ask(self, request: FitRequest) -> FitResult:
        """From the job's thread: wait for the fit of ``request``."""
        self._to_scheduler.put(("fit", request))
        reply = self._to_job.get()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def resume(self, reply: FitResult | Exception | None = None) -> tuple[str, Any]:
        """Run the job (start it, or hand it ``reply``) until it asks for a fit or ends: ``("fit", request)`` or
        ``("done", outcome)``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="tapl-client", daemon=True)
            self._thread.start()
        else:
            self._to_job.put(reply)
        return self._to_scheduler.get()


class BatchedTraining(LocalTraining):
    """Local training whose fits, asked from jobs of :meth:`run_together`, run as cohorts (see the module).

    Outside a job, a fit runs on its own, as :class:`~tapl.engine.local_training.LocalTraining` runs it.

    Args:
        training: The in-process local training whose model, data and settings it shares.
        max_rows: The memory budget of one cohort step: the most training rows (members times batch size) it
            holds. A wave of jobs has at most ``max_rows // batch_size`` clients.

    Raises:
        ValueError: when ``--trainer`` asks for more than one device.
    """

    def __init__(self, training: LocalTraining, max_rows: int) -> None:
        super().__init__(training.model, training.data, training.trainers, training.optimizer, training.config)
        self.wave = max(1, max_rows // training.data.batch_size)
        self._local = threading.local()
        self._noticed: set[str] = set()
        with quiet_lightning():
            devices = training.trainers.fit_trainer(1).world_size
        if devices > 1:
            raise ValueError(
                f"federation.execution batched trains a cohort on one device, but --trainer asks for {devices}: use "
                "--trainer.devices 1, or federation.execution sequential for data-parallel fits"
            )

    @override
    def run_fit(self, request: FitRequest) -> FitResult:
        """From a job, the fit with its cohort; otherwise at once, on its own."""
        job: _Job | None = getattr(self._local, "job", None)
        if job is None:
            return super().run_fit(request)
        return job.ask(request)

    def run_together(self, works: Sequence[Callable[[], T]], started: Callable[[int], None]) -> list[T | Exception]:
        """Run ``works`` (each a client's work), wave by wave, their fits batched; each outcome, or the exception
        the work raised, in order. ``started(i)`` hears each work that starts."""
        outcomes: dict[int, Any] = {}
        for first in range(0, len(works), self.wave):
            jobs = {i: _Job(works[i], self._local) for i in range(first, min(first + self.wave, len(works)))}
            asked: dict[int, FitRequest] = {}
            for i, job in jobs.items():
                started(i)
                self._record(i, job.resume(), asked, outcomes)
            while asked:
                replies = self.fit_all(list(asked.values()))
                waiting, asked = list(asked), {}
                for i, reply in zip(waiting, replies, strict=True):
                    self._record(i, jobs[i].resume(reply), asked, outcomes)
        return [outcomes[i] for i in range(len(works))]

    @staticmethod
    def _record(i: int, message: tuple[str, Any], asked: dict[int, FitRequest], outcomes: dict[int, Any]) -> None:
        kind, value = message
        if kind == "fit":
            asked[i] = value
        else:
            outcomes[i] = value

    def fit_all(self, requests: Sequence[FitRequest]) -> list[FitResult | Exception]:
        """The fits of ``requests``: together where they can, one after another where they cannot; each result, or
        the exception its fit raised, in order."""
        results: dict[int, FitResult | Exception] = {}
        cohorts: dict[tuple[Any, ...], list[tuple[int, ResolvedFit]]] = {}
        alone: list[tuple[int, ResolvedFit]] = []
        refusals: dict[int, str | None] = {}  # per optimizer factory, checked once
        for i, request in enumerate(requests):
            try:
                fit = self.resolve(request)
            except Exception as error:
                results[i] = error
                continue
            optimizer = request.optimizer or self.optimizer
            if id(optimizer) not in refusals:
                refusals[id(optimizer)] = optimizer_refusal(optimizer)
            reason = why_not_batched(fit) or refusals[id(optimizer)]
            if reason is not None:
                self._notice(f"fits run one after another where {reason}")
                alone.append((i, fit))
                continue
            cohorts.setdefault(cohort_key(fit, optimizer, self._epoch_batches(fit)), []).append((i, fit))
        for members in cohorts.values():
            if len(members) == 1:
                alone.extend(members)
                continue
            optimizer = members[0][1].request.optimizer or self.optimizer
            try:
                with quiet_lightning():
                    cohort_results: list[FitResult | Exception] = list(
                        self.fit_cohort([fit for _, fit in members], optimizer)
                    )
            except NotBatchable as reason:
                self._notice(f"fits run one after another where {reason}")
                alone.extend(members)
                continue
            except Exception as error:
                cohort_results = [error] * len(members)
            results.update({i: result for (i, _), result in zip(members, cohort_results, strict=True)})
        for i, fit in sorted(alone, key=lambda member: member[0]):
            try:
                results[i] = self.fit_resolved(fit)
            except Exception as error:
                results[i] = error
        return [results[i] for i in range(len(requests))]

    def _epoch_batches(self, fit: ResolvedFit) -> int | None:
        """The client's batches per epoch where gradient accumulation makes an epoch's end matter."""
        settings = {**self.trainers.kwargs, **(fit.request.trainer_overrides or {})}
        if (settings.get("accumulate_grad_batches") or 1) == 1:
            return None
        return math.ceil(fit.request.client.num_train_samples / self.data.batch_size)

    def _notice(self, message: str) -> None:
        if message not in self._noticed:
            self._noticed.add(message)
            log.info("federation.execution batched: %s", message)


class BatchedClientWorker(ClientWorker):
    """The in-process client side whose visits and post-federation stages run with their fits batched.

    Args:
        info: The federation.
        algorithm: The algorithm whose client side runs.
        training: The in-process local training.
        shapes: The shapes of every component's tensors.
    """

    def __init__(
        self, info: FederationInfo, algorithm: Algorithm, training: LocalTraining, shapes: ComponentShapes
    ) -> None:
        self.batched = BatchedTraining(training, training.config.batched_rows)
        super().__init__(info, algorithm, self.batched, shapes)

    def visit_all(
        self, round: int, instructions: Sequence[Instruction], started: Callable[[int], None]
    ) -> Iterator[tuple[int, ClientUpdate | Exception]]:
        works = [partial(self.visit, round, instruction) for instruction in instructions]
        outcomes = self.batched.run_together(works, lambda i: started(instructions[i].client))
        for instruction, outcome in zip(instructions, outcomes, strict=True):
            yield instruction.client, outcome

    def post_federation_all(
        self, round: int, received: Mapping[int, ComponentState], fine_tune: bool, notify: Callable[[int, str], None]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        clients = list(received)
        works = [
            partial(self.post_federation, client, round, received[client], fine_tune, partial(notify, client))
            for client in clients
        ]
        for client, outcome in zip(clients, self.batched.run_together(works, lambda i: None), strict=True):
            if isinstance(outcome, Exception):
                raise outcome
            yield client, outcome
