"""Summaries of per-client evaluation results and the run's results table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

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


#: The share of clients whose mean is reported as the worst tail.
WORST_SHARE = 0.1
#: How per-client results are grouped in distribution summaries.
Grouping = Literal["task", "task_type", "pair"]


def distribution(
    values: Sequence[float], weights: Sequence[float], higher_is_better: bool
) -> dict[str, float | int | bool]:
    """Statistics of one metric over clients (one value per client and task).

    Returns:
        ``weighted_mean`` (weighted by ``weights``, the evaluated samples: the metric over all pooled
        samples for averages), ``mean`` (unweighted: every client counts the same), ``std`` (population
        standard deviation over clients), ``min``, ``max``, ``worst_10pct_mean`` (mean of the worst
        ``ceil(10%)`` of the values, at least one; worst is lowest when ``higher_is_better``, else highest),
        ``values`` (how many, an int: clients, or (client, task) pairs for a group of tasks) and
        ``higher_is_better`` (a bool).
    """
    if not values or len(values) != len(weights):
        raise ValueError(f"need one weight per value and at least one value, got {len(values)} and {len(weights)}")
    n = len(values)
    total = sum(weights)
    mean = sum(values) / n
    worst = sorted(values, reverse=not higher_is_better)[: max(1, math.ceil(WORST_SHARE * n))]
    return {
        "weighted_mean": sum(v * w for v, w in zip(values, weights, strict=True)) / total if total > 0 else mean,
        "mean": mean,
        "std": math.sqrt(sum((v - mean) ** 2 for v in values) / n),
        "min": min(values),
        "max": max(values),
        "worst_10pct_mean": sum(worst) / len(worst),
        "values": n,
        "higher_is_better": higher_is_better,
    }


def group_key(task: Task, by: Grouping) -> str:
    """The group of ``task``: its name, its task type, or its modality-task pair (``image,classification``)."""
    if by == "task":
        return task.name
    if by == "task_type":
        return task.type
    return task.pair


def summarize_distribution(
    per_client: PerClient, tasks: Mapping[str, Task], by: Grouping
) -> dict[str, dict[str, dict[str, float | int | bool]]]:
    """Per group of tasks and metric, the :func:`distribution` over every (client, task) of the group.

    Returns:
        group -> metric -> statistic -> value. Losses and metrics declared lower-is-better by their task type
        carry ``higher_is_better = False``.
    """
    entries: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    directions: dict[str, dict[str, bool]] = {}
    for results in per_client.values():
        for name, values in results.items():
            task = tasks[name]
            group = group_key(task, by)
            for metric, value in values.items():
                if metric == "samples":
                    continue
                got, weights = entries.setdefault(group, {}).setdefault(metric, ([], []))
                got.append(value)
                weights.append(values["samples"])
                better = task.task_type.higher_is_better.get(metric, False) if metric != "loss" else False
                directions.setdefault(group, {})[metric] = better
    return {
        group: {m: distribution(v, w, directions[group][m]) for m, (v, w) in sorted(metrics.items())}
        for group, metrics in sorted(entries.items())
    }


def clients_table(results: Mapping[str, Any]) -> list[str]:
    """The Markdown section of ``results["clients"]``: per client its tasks, visits, failures and last round."""
    rounds = results["round"]
    lines = [
        "",
        "## Clients: visits and the last round each trained in",
        "",
        f"Rounds 1 to {rounds}. Visits: rounds that sampled the client; failed: visits excluded from aggregation; "
        "last trained: the last round whose visit succeeded (was aggregated), before the post-federation stage.",
        "",
        f"| client | tasks | visits | failed | last trained (of {rounds}) |",
        "|---|---|---|---|---|",
    ]
    for client, record in results["clients"].items():
        last = "held out" if record["held_out"] else record["last_visit"] or "never"
        tasks = ", ".join(record["tasks"])
        lines.append(f"| {client} | {tasks} | {record['visits']} | {record['failures']} | {last} |")
    return lines


def results_table(results: Mapping[str, Any], data: FederatedDataModule) -> str:
    """A Markdown table of the final results: one row per client, task and model, then each client's visits
    and last round of training (:func:`clients_table`), then summaries."""
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

    lines += clients_table(results)

    def summary_table(title: str, summary: Mapping[str, Mapping[str, Mapping[str, float]]], note: str) -> list[str]:
        rows = [
            f"| {task} | {labels[model]} | {int(per_task[task]['clients'])} | {cells(per_task[task])} |"
            for task in data.tasks
            for model, per_task in summary.items()
            if task in per_task
        ]
        header = ["| task | model | clients | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
        return ["", title, "", *([note, ""] if note else []), *header, *rows]

    lines += summary_table("## Across clients (sample-weighted mean)", results["summary"], "")
    held_out = results.get("held_out")
    if held_out:
        lines += summary_table(
            f"## Held-out clients {held_out['clients']} (never trained on; sample-weighted mean)",
            held_out["summary"],
            "The summaries above cover the participating clients only.",
        )
    primary = {task.type: task.task_type.primary_metric for task in data.tasks.values()}
    primary.update({task.pair: task.task_type.primary_metric for task in data.tasks.values()})
    for by, title in (("task_type", "task type"), ("pair", "modality-task pair")):
        lines += [
            "",
            f"## Distribution across clients, per {title}",
            "",
            "One value per client and task of the group. Worst 10%: the mean of the worst tenth of those values "
            "(at least one).",
            "",
            f"| {title} | model | metric | better | values | weighted mean | mean | std | min | max | worst 10% |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, groups in results.get("distribution", {}).get(by, {}).items():
            for group, per_metric in groups.items():
                for metric in ("loss", primary[group]):
                    d = per_metric[metric]
                    stats = " | ".join(
                        f"{d[k]:.4f}" for k in ("weighted_mean", "mean", "std", "min", "max", "worst_10pct_mean")
                    )
                    better = "higher" if d["higher_is_better"] else "lower"
                    lines.append(f"| {group} | {labels[model]} | {metric} | {better} | {int(d['values'])} | {stats} |")
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
