"""K-sweep: how the number K of modality-task pairs in a federation affects the global model's convergence.

The TAP paper's convergence analysis bounds the server model's error by a term that grows with K. This
script builds, from one base config, a federation per K that holds the base's first K tasks (each one a new
modality-task pair) over the same clients with the same total data budget (``--budget`` rows split evenly
over the K tasks; client ``i`` holds task ``i mod K``), runs each with ``tapl fit``, and plots against the
round, one line per K:

- ``train_loss.png``: the training loss of the round's local fits, each task's mean over the clients that
  trained it divided by that task's value in its first round, averaged over the tasks;
- ``val_loss.png``: the global model's validation loss, each task's sample-weighted value divided by its
  first evaluation, averaged over the tasks.

Relative losses put tasks of different loss scales (cross-entropy, MSE) on one axis. Finished runs are
reused, so re-running the command only plots. Example (the offline demo; see k_sweep.md)::

    python experiments/k_sweep.py --base experiments/demo.yaml --ks 1,2,3,4,5 --budget 1500 \\
        --run_dir runs/k_sweep
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tapl.cli import main as tapl_main
from tapl.compare import is_finished
from tapl.plots import plot_series
from tapl.run_dir import RunDirectory


def sweep_config(base: dict[str, Any], k: int, budget: int) -> dict[str, Any]:
    """The base config with its first ``k`` tasks, ``budget // k`` rows each, and one task per client."""
    tasks = base["data"]["tasks"][:k]
    if len(tasks) < k:
        raise ValueError(f"the base config has {len(base['data']['tasks'])} tasks, fewer than K = {k}")
    pairs = {(tuple(sorted(t["inputs"])), t.get("type", "classification")) for t in tasks}
    if len(pairs) < k:
        raise ValueError(f"the base config's first {k} tasks are not {k} distinct modality-task pairs")
    clients = sum(group["count"] for group in base["data"]["clients"])
    config = copy.deepcopy(base)
    config["data"]["tasks"] = [{**task, "max_rows": budget // k} for task in tasks]
    holders = [sum(1 for i in range(clients) if i % k == j) for j in range(k)]
    config["data"]["clients"] = [{"tasks": [task["name"]], "count": n} for task, n in zip(tasks, holders, strict=True)]
    return config


def relative_train_loss(records: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Per round, the tasks' mean training loss over clients relative to each task's first round, averaged."""
    first: dict[str, float] = {}
    rounds, values = [], []
    for record in records:
        per_task: dict[str, list[float]] = {}
        for metrics in record["train"].values():
            for key, loss in metrics.items():
                if key.startswith("train_loss/"):
                    per_task.setdefault(key.removeprefix("train_loss/"), []).append(loss)
        if not per_task:
            continue
        ratios = []
        for task, losses in per_task.items():
            mean = sum(losses) / len(losses)
            first.setdefault(task, mean)
            ratios.append(mean / first[task])
        rounds.append(record["round"])
        values.append(sum(ratios) / len(ratios))
    return rounds, values


def relative_val_loss(records: Sequence[dict[str, Any]], model: str = "global") -> tuple[list[int], list[float]]:
    """Per evaluation round, each task's validation loss relative to its first evaluation, averaged."""
    first: dict[str, float] = {}
    rounds, values = [], []
    for record in records:
        summary = record.get("summary", {}).get(model)
        if not summary:
            continue
        ratios = []
        for task, metrics in summary.items():
            first.setdefault(task, metrics["loss"])
            ratios.append(metrics["loss"] / first[task])
        rounds.append(record["round"])
        values.append(sum(ratios) / len(ratios))
    return rounds, values


def run_sweep(base_path: Path, ks: Sequence[int], budget: int, run_dir: Path, fit_args: Sequence[str]) -> list[Path]:
    """Run (or reuse) one federation per K and write the two plots; return the plots' paths."""
    base = yaml.safe_load(base_path.read_text())
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {"train": {}, "val": {}}
    for k in ks:
        directory = run_dir / f"k{k}"
        config_path = run_dir / f"k{k}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(sweep_config(base, k, budget), sort_keys=False))
        if not is_finished(directory):
            resume = ["--ckpt_path", "last"] if RunDirectory(directory).holds_run() else []
            tapl_main(["fit", "--config", str(config_path), "--run_dir", str(directory), *fit_args, *resume])
        records = RunDirectory(directory).read_metrics()
        curves["train"][f"K = {k}"] = relative_train_loss(records)
        curves["val"][f"K = {k}"] = relative_val_loss(records)
    paths = []
    for which, title in (("train", "training loss of the local fits"), ("val", "global model's validation loss")):
        rounds = max((r for r, _ in curves[which].values()), key=len)
        series = {label: v for label, (r, v) in curves[which].items() if r == rounds}
        paths.append(
            plot_series(
                rounds,
                series,
                run_dir / f"{which}_loss.png",
                title=f"{title}, relative to each task's first value (budget {budget} rows)",
                xlabel="round",
                ylabel="relative loss (mean over tasks)",
            )
        )
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--base", type=Path, default=Path("experiments/demo.yaml"), help="the base config")
    parser.add_argument("--ks", default="1,2,3,4,5", help="comma-separated values of K")
    parser.add_argument("--budget", type=int, default=1500, help="total rows over the K tasks")
    parser.add_argument("--run_dir", type=Path, default=Path("runs/k_sweep"))
    own, fit_args = parser.parse_known_args(argv)
    ks = [int(k) for k in own.ks.split(",")]
    paths = run_sweep(own.base, ks, own.budget, own.run_dir, fit_args)
    print("k_sweep: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
