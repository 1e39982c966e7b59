"""Summaries of per-client evaluation results and the run's results table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tapl.tasks import Task

if TYPE_CHECKING:
    from tapl.datamodules.federated import FederatedDataModule

#: client id -> task -> metric -> value (each entry has a ``samples`` count)
PerClient = Mapping[str, Mapping[str, Mapping[str, float]]]


def summarize(per_client: PerClient, tasks: Mapping[str, Task]) -> dict[str, dict[str, float]]:
    """Sample-weighted mean of every metric per task over the clients that hold the task.

    Weighting by each client's evaluated samples makes the mean equal the metric over all pooled samples
    for averages such as accuracy and loss (not a mean of client means).

    Returns:
        task -> metric -> weighted mean, plus ``clients`` (how many clients) and ``samples`` (their total).
    """
    summary: dict[str, dict[str, float]] = {}
    for task in tasks:
        rows = [results[task] for results in per_client.values() if task in results]
        total = sum(r["samples"] for r in rows)
        if not rows or total <= 0:
            continue
        metrics = sorted({k for r in rows for k in r} - {"samples"})
        summary[task] = {m: sum(r[m] * r["samples"] for r in rows) / total for m in metrics}
        summary[task]["clients"] = float(len(rows))
        summary[task]["samples"] = float(total)
    return summary


def results_table(results: Mapping[str, Any], data: FederatedDataModule) -> str:
    """A Markdown table of the final results: one row per client, task and model."""
    lines = [
        f"# Results: {results['algorithm']} after round {results['round']} ({results['split']} split)",
        "",
        *(f"- **{model}**: {text}" for model, text in results["models"].items()),
        "",
        "Metrics are sample-weighted; loss is lower-is-better, accuracy and f1 higher-is-better.",
        "",
        "| client | task | model | samples | loss | accuracy | f1 |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(values: Mapping[str, float], key: str) -> str:
        return f"{values[key]:.4f}" if key in values else "-"

    for model, per_client in results["per_client"].items():
        for client in data.clients:
            for task, values in per_client.get(str(client.id), {}).items():
                lines.append(
                    f"| {client.id} | {task} | {model} | {int(values['samples'])} | {cell(values, 'loss')} | "
                    f"{cell(values, 'accuracy')} | {cell(values, 'f1')} |"
                )
    lines += [
        "",
        "## Across clients (sample-weighted mean)",
        "",
        "| task | model | clients | loss | accuracy | f1 |",
        "|---|---|---|---|---|---|",
    ]
    for model, per_task in results["summary"].items():
        for task, values in per_task.items():
            lines.append(
                f"| {task} | {model} | {int(values['clients'])} | {cell(values, 'loss')} | "
                f"{cell(values, 'accuracy')} | {cell(values, 'f1')} |"
            )
    return "\n".join(lines) + "\n"
