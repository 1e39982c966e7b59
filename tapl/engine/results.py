"""Results assembly: the final evaluation of every client's models as ``results.json``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tapl.engine.evaluation import Evaluation, Examples, of_clients, summaries
from tapl.tasks import Task


def new_client_record() -> dict[str, int]:
    """A client's record before any round: ``visits`` (sampled), ``failures`` (visits excluded from
    aggregation) and ``last_visit`` (the last round whose visit succeeded, i.e. was aggregated; 0: none)."""
    return {"visits": 0, "failures": 0, "last_visit": 0}


def task_descriptions(tasks: Mapping[str, Task]) -> dict[str, dict[str, Any]]:
    """Per task: its type, modality-task pair, primary metric and which metrics are better higher."""
    return {
        name: {
            "type": task.type,
            "pair": task.pair,
            "primary_metric": task.task_type.primary_metric,
            "higher_is_better": {"loss": False, **task.task_type.higher_is_better},
        }
        for name, task in tasks.items()
    }


def assemble_results(
    *,
    algorithm: str,
    split: str,
    round: int,
    stopped_early: bool,
    tasks: Mapping[str, Task],
    models: dict[str, dict[str, str]],
    clients: dict[str, dict[str, Any]],
    evaluation: Evaluation,
    examples: Examples,
    participants: Sequence[int],
    held_out: Sequence[int],
) -> dict[str, Any]:
    """``results.json``: the run's models, clients, per-client metrics and their summaries over the participating
    clients (and, separately, over the held-out ones).

    Args:
        algorithm: The algorithm's label.
        split: The evaluated split.
        round: The last round.
        stopped_early: Whether federation stopped before its last round.
        tasks: Every task.
        models: The reported models by key (label, description).
        clients: Per client id: its tasks, whether held out, and its record.
        evaluation: The evaluation of every model of every client.
        examples: Readable predictions of the evaluation.
        participants: The clients that took part in the rounds.
        held_out: The clients that never did.
    """
    results = {
        "algorithm": algorithm,
        "split": split,
        "round": round,
        "stopped_early": stopped_early,
        "tasks": task_descriptions(tasks),
        "models": models,
        "clients": clients,
        "per_client": evaluation,
        **summaries(of_clients(evaluation, participants), tasks, distribution=True),
        "examples": examples,
    }
    if held_out:
        held_out_evaluation = of_clients(evaluation, held_out)
        results["held_out"] = {"clients": sorted(held_out), **summaries(held_out_evaluation, tasks, True)}
    return results
