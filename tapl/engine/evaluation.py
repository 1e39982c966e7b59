"""Evaluation: a client's reported models on a split (client side), and the summaries across clients (server side)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tapl.algorithms.base import Algorithm
from tapl.context import ClientContext
from tapl.engine.local_training import LocalTraining
from tapl.reported import ReportedModel
from tapl.reporting import summarize, summarize_distribution
from tapl.tasks import Task

#: model -> client id (a string) -> task -> metric -> value.
Evaluation = dict[str, dict[str, dict[str, dict[str, float]]]]
#: Examples of readable predictions: model -> client id -> task -> examples.
Examples = dict[str, dict[str, dict[str, list[dict[str, str]]]]]


#: The key of the engine's fine-tuned global slice among a client's models.
FINETUNED = "global+FT"


def reported_models(algorithm: Algorithm, finetuned: bool, finetune_description: str) -> dict[str, dict[str, str]]:
    """The models reported per client, by key: their ``label`` and ``description`` (``results.json``'s
    ``models``); with ``finetuned``, the engine's "+FT" model follows the global one."""
    models: dict[str, dict[str, str]] = {}
    for model in algorithm.models():
        models[model.key] = {"label": model.label, "description": model.description}
        if model.key == "global" and finetuned:
            models[FINETUNED] = {"label": f"{model.label}+FT", "description": finetune_description}
    return models


def evaluate_models(
    ctx: ClientContext, models: Sequence[ReportedModel], training: LocalTraining, split: str
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, list[dict[str, str]]]]]:
    """One client's models on its ``split`` (client side): metrics per model key and task, and readable
    predictions per model key and task. A model that is another one's very state (FedAvg's personalized model
    is its global one) is evaluated once."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    examples: dict[str, dict[str, list[dict[str, str]]]] = {}
    evaluated: dict[int, dict[str, dict[str, float]]] = {}
    for model in models:
        state = model.state(ctx)
        if state is None:
            continue
        if id(state) not in evaluated:
            evaluated[id(state)] = training.evaluate(ctx.client, state, split)
            if training.last_examples:
                examples[model.key] = training.last_examples
        results[model.key] = evaluated[id(state)]
    return results, examples


def of_clients(evaluation: Mapping[str, Mapping[str, Any]], clients: Sequence[int]) -> dict[str, dict[str, Any]]:
    """``evaluation`` (model -> client -> ...) restricted to ``clients``."""
    wanted = {str(c) for c in clients}
    return {model: {c: v for c, v in per_client.items() if c in wanted} for model, per_client in evaluation.items()}


def summaries(
    evaluation: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Task], distribution: bool = False
) -> dict[str, Any]:
    """Across the clients of ``evaluation``: per task and per task type sample-weighted means, and with
    ``distribution`` the statistics of every metric over clients per task, task type and pair."""
    result: dict[str, Any] = {
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
        result["distribution"] = {
            by: {model: summarize_distribution(per_client, tasks, by) for model, per_client in evaluation.items()}
            for by in ("task", "task_type", "pair")
        }
    return result
