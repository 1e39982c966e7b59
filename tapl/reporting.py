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
    """A Markdown table of the final results: one row per client, task and model, then summaries."""
    metrics = sorted(
        {
            m
            for per_client in results["per_client"].values()
            for per_task in per_client.values()
            for values in per_task.values()
            for m in values
        }
        - {"samples", "loss"}
    )
    columns = ["loss", *metrics]
    directions = {m: better for task in data.tasks.values() for m, better in task.task_type.higher_is_better.items()}
    higher = [m for m in metrics if directions.get(m)]
    lower = ["loss", *(m for m in metrics if directions.get(m) is False)]
    lines = [
        f"# Results: {results['algorithm']} after round {results['round']} ({results['split']} split)",
        "",
        "Models (the `model` column; `results.json` keys them by the name in brackets):",
        "",
        *(f"- **{info['label']}** (`{key}`): {info['description']}" for key, info in results["models"].items()),
        "",
        f"Metrics are sample-weighted. Lower is better: {', '.join(lower)}."
        + (f" Higher is better: {', '.join(higher)}." if higher else ""),
        "",
        "| client | task | model | samples | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]

    def cells(values: Mapping[str, float]) -> str:
        return " | ".join(f"{values[c]:.4f}" if c in values else "-" for c in columns)

    labels = {key: info["label"] for key, info in results["models"].items()}
    for client in data.clients:
        for task in data.tasks:
            for model, per_client in results["per_client"].items():
                values = per_client.get(str(client.id), {}).get(task)
                if values is not None:
                    lines.append(
                        f"| {client.id} | {task} | {labels[model]} | {int(values['samples'])} | {cells(values)} |"
                    )
    lines += [
        "",
        "## Across clients (sample-weighted mean)",
        "",
        "| task | model | clients | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for task in data.tasks:
        for model, per_task in results["summary"].items():
            if task in per_task:
                lines.append(
                    f"| {task} | {labels[model]} | {int(per_task[task]['clients'])} | {cells(per_task[task])} |"
                )
    examples = [
        (model, client, task, example)
        for model, per_client in results.get("examples", {}).items()
        for client, per_task in per_client.items()
        for task, shown in per_task.items()
        for example in shown
    ]
    if examples:
        lines += [
            "",
            "## Examples (first predictions per client and task)",
            "",
            "| client | task | model | prediction | target |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {c} | {t} | {labels[m]} | {e['prediction']!r} | {e['target']!r} |" for m, c, t, e in examples]
    return "\n".join(lines) + "\n"
