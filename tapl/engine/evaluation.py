"""Evaluation: every reported model of every client on a split, and the summaries across clients."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tapl.components import ComponentState
from tapl.context import ClientContext
from tapl.engine.clients import Clients
from tapl.reported import ReportedModel
from tapl.reporting import summarize, summarize_distribution
from tapl.tasks import Task

#: model -> client id (a string) -> task -> metric -> value.
Evaluation = dict[str, dict[str, dict[str, dict[str, float]]]]
#: Examples of readable predictions: model -> client id -> task -> examples.
Examples = dict[str, dict[str, dict[str, list[dict[str, str]]]]]


class Evaluator:
    """Evaluates the models an algorithm reports (plus the engine's "+FT" model) on every client.

    Args:
        clients: The client side (the algorithm's :meth:`~tapl.algorithms.Algorithm.models` are evaluated; a
            model may fit first, e.g. adapt).
        finetuned: Each client's fine-tuned global slice, once the post-federation stage made it.
        finetune_description: How the "+FT" model was made, for the results.
    """

    def __init__(self, clients: Clients, finetuned: Mapping[int, ComponentState], finetune_description: str) -> None:
        self.clients = clients
        self.finetuned = finetuned
        self.finetune_description = finetune_description

    def models(self) -> list[ReportedModel]:
        """The reported models: the algorithm's, with "+FT" after the global one once fine-tuning ran."""
        models = []
        for model in self.clients.algorithm.models():
            models.append(model)
            if model.key == "global" and self.finetuned:
                label = f"{model.label}+FT"
                models.append(ReportedModel("global+FT", label, self.finetune_description, self._finetuned))
        return models

    def descriptions(self) -> dict[str, dict[str, str]]:
        """The reported models by key: their ``label`` and ``description`` (``results.json``'s ``models``)."""
        return {m.key: {"label": m.label, "description": m.description} for m in self.models()}

    def _finetuned(self, ctx: ClientContext) -> ComponentState | None:
        return self.finetuned.get(ctx.client.id)

    def evaluate(
        self,
        round: int,
        global_state: ComponentState,
        split: str,
        clients: Sequence[int],
        on_client: Callable[[int], None] = lambda client: None,
    ) -> tuple[Evaluation, Examples]:
        """Every reported model of every client of ``clients`` on ``split``, and readable predictions.

        A model that is another one's very state (FedAvg's personalized model is its global one) is evaluated
        once.
        """
        results: Evaluation = {}
        examples: Examples = {}
        models = self.models()
        for client in clients:
            on_client(client)
            ctx = self.clients.context(client, round, self.clients.info.slice_of(global_state, client), "evaluation")
            evaluated: dict[int, dict[str, dict[str, float]]] = {}
            for model in models:
                state = model.state(ctx)
                if state is None:
                    continue
                if id(state) not in evaluated:
                    evaluated[id(state)] = self.clients.training.evaluate(ctx.client, state, split)
                    if self.clients.training.last_examples:
                        examples.setdefault(model.key, {})[str(client)] = self.clients.training.last_examples
                results.setdefault(model.key, {})[str(client)] = evaluated[id(state)]
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
