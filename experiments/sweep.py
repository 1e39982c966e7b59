"""A small grid sweep of one algorithm's settings on one federation, with one table of what each setting gives.

Every point of the grid is an ordinary ``tapl fit`` of the same configuration in ``RUN_DIR/<setting>``,
differing only in ``--algorithm.NAME VALUE`` settings; a finished run is reused, so re-running the command
only rebuilds the table. The table (printed, and written to ``RUN_DIR/sweep.md``) gives per setting:

- how the training loss of the local fits fell: per task, its mean over the clients that trained it in the
  last round that trained it, divided by the same in the first such round (rounds sample different clients,
  so only a task's own values are compared), averaged over the tasks;
- per task type, the primary metric on the test split of the global and the personalized model
  (sample-weighted over clients).

Example (the sweep behind Per-FedAvg's defaults; see ``experiments/sweeps.md``)::

    python experiments/sweep.py --algorithm PerFedAvg --grid alpha=0.01,0.05 --grid beta=0.001,0.01 \\
        --run_dir runs/sweep_perfedavg --jobs 2 -- --config experiments/demo.yaml --federation.rounds 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tapl.compare import is_finished, type_metrics
from tapl.run_dir import RunDirectory

#: The models whose test metrics the table shows.
MODELS = ("global", "personalized")


def grid_points(grid: Sequence[str]) -> list[dict[str, str]]:
    """Every combination of ``NAME=V1,V2,...`` entries, as ``{NAME: value}`` dicts."""
    axes = []
    for entry in grid:
        name, sep, values = entry.partition("=")
        if not sep or not name or not values:
            raise ValueError(f"--grid takes NAME=V1,V2,..., got {entry!r}")
        axes.append([(name, v) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)]


def point_name(point: Mapping[str, str]) -> str:
    """A directory name for one grid point, e.g. ``alpha=0.01_beta=0.001``."""
    return "_".join(f"{k}={v}" for k, v in point.items()) or "default"


def relative_train_loss(records: Sequence[Mapping[str, Any]]) -> float:
    """Per task, the clients' mean training loss in the last round that trained it over the same in the first,
    averaged over the tasks."""
    by_task: dict[str, list[float]] = {}
    for record in records:
        per_task: dict[str, list[float]] = {}
        for metrics in record["train"].values():
            for key, value in metrics.items():
                if key.startswith("train_loss/"):
                    per_task.setdefault(key.removeprefix("train_loss/"), []).append(value)
        for task, values in per_task.items():
            by_task.setdefault(task, []).append(sum(values) / len(values))
    ratios = [values[-1] / values[0] for values in by_task.values()]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def table(rows: Sequence[tuple[str, Path]]) -> str:
    """The Markdown table of every finished run in ``rows`` (setting, run directory)."""
    header: list[str] | None = None
    lines: list[str] = []
    for setting, directory in rows:
        results = json.loads((directory / "results.json").read_text())
        relative = relative_train_loss(RunDirectory(directory).read_metrics())
        types = type_metrics(results)
        if header is None:
            header = ["setting", "train loss last / first"]
            header += [f"{t} {m} {model}" for t, (m, _) in types.items() for model in MODELS]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        cells = [f"`{setting}`", f"{relative:.3f}"]
        summary = results["summary_task_type"]
        for task_type, (metric, _) in types.items():
            for model in MODELS:
                value = summary.get(model, {}).get(task_type, {}).get(metric)
                cells.append("-" if value is None else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_point(args: list[str], directory: Path, threads: int) -> int:
    """One ``tapl fit`` in its own process, its output in ``<directory>.log``; returns the exit code."""
    log = directory.with_name(f"{directory.name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    command = [sys.executable, "-m", "tapl", "fit", "--federation.progress", "false", *args]
    if RunDirectory(directory).holds_run():
        command += ["--ckpt_path", "last"]
    start = time.perf_counter()
    with log.open("a") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    print(f"sweep: {directory.name}: exit {code} in {time.perf_counter() - start:.0f} s (log: {log})", flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> None:
    """Run the sweep and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", required=True, help="the algorithm, e.g. PerFedAvg")
    parser.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... (repeatable)")
    parser.add_argument("--run_dir", required=True, help="one sub-directory per setting")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores/jobs CPU threads")
    parser.add_argument("fit_args", nargs="*", help="after --: arguments for every tapl fit (--config, ...)")
    own = parser.parse_args(argv)
    out = Path(own.run_dir)
    threads = max(1, (os.cpu_count() or 1) // own.jobs)
    runs: list[tuple[str, Path, list[str]]] = []
    for point in grid_points(own.grid):
        directory = out / point_name(point)
        settings = [item for name, value in point.items() for item in (f"--algorithm.{name}", value)]
        args = [*own.fit_args, "--algorithm", own.algorithm, *settings, "--run_dir", str(directory)]
        runs.append((point_name(point), directory, args))
    todo = [(directory, args) for _, directory, args in runs if not is_finished(directory)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=own.jobs) as pool:
        codes = list(pool.map(lambda item: run_point(item[1], item[0], threads), todo))
    print(f"sweep: {len(todo)} runs in {time.perf_counter() - start:.0f} s")
    text = table([(name, directory) for name, directory, _ in runs if is_finished(directory)])
    RunDirectory(out).write_text("sweep.md", text)
    print(text)
    if any(codes):
        sys.exit(1)


if __name__ == "__main__":
    main()
