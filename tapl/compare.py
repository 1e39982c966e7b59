"""``tapl compare``: several algorithms and seeds on one federation, then one comparison table and plots.

Every run is an ordinary ``tapl fit`` in ``RUN_DIR/<algorithm>/seed-<seed>`` with the same configuration and
overrides, only ``--algorithm`` and ``--federation.seed`` differing. A finished run is read, not re-run, and
an unfinished one resumes, so re-running the command completes a comparison and reproduces its table.
``--jobs N`` runs N of them at once, each in its own process with its share of the CPU threads.

``tapl compare`` is a subcommand of :class:`tapl.cli.TaplCLI`: its parser is ``fit``'s, with this module's own
options added, so every ``fit`` option is checked before anything runs and ``tapl compare --help`` lists them.
The comparison's directory is ``--run_dir``, else ``RUN_ROOT/compare``.

Besides the mean +- std over seeds, the comparison pairs models on the same clients: every model against a
baseline (``--baseline``), per (seed, client, task), with wins / ties / losses and a Wilcoxon signed-rank test.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from scipy.stats import wilcoxon

import tapl.algorithms
from tapl.errors import TaplError
from tapl.plots import plot_boxes, plot_series
from tapl.run_dir import FINAL, RunDirectory

#: The model whose per-client values the distribution plots show.
PLOTTED_MODEL = "personalized"
#: A model of the comparison: (the algorithm as given to ``--algorithms``, the model's key in results.json).
Row = tuple[str, str]
#: The variant an algorithm's personalized model is also paired with: TAP's ablation without distillation.
ABLATION_MODEL = "no_distillation"


#: ``tapl compare``'s own options, which its runs do not get (each run has its own ``--run_dir``).
OWN_OPTIONS = ("--algorithms", "--seeds", "--baseline", "--jobs", "--run_dir")


@dataclass(frozen=True)
class CompareOptions:
    """``tapl compare``'s own options, checked.

    Args:
        algorithms: The algorithms, as ``--algorithm`` takes them (short names or class paths).
        seeds: The federation seeds.
        baseline: The baseline's algorithm and model (``None``: the default, see :func:`baseline_row`).
        jobs: Runs at once.
    """

    algorithms: list[str]
    seeds: list[int]
    baseline: tuple[str | None, str | None] = (None, None)
    jobs: int = 1


def _argument_error(message: str) -> NoReturn:
    """Fail as a bad argument does: the ``tapl`` command reports it in one line, with exit status 2."""
    raise argparse.ArgumentError(None, message)


def compare_options(algorithms: str, seeds: str = "0", baseline: str | None = None, jobs: int = 1) -> CompareOptions:
    """Check ``tapl compare``'s own options, as given on the command line.

    Args:
        algorithms: Comma-separated, e.g. ``"FedAvg, TAP"``.
        seeds: Comma-separated integers, e.g. ``"0,1,2"``.
        baseline: ``ALGORITHM[:MODEL]``; the algorithm must be one of ``algorithms``.
        jobs: At least 1.

    Raises:
        argparse.ArgumentError: naming the option at fault.
    """
    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    try:
        numbers = [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError:
        _argument_error(f"--seeds must be comma-separated integers, got {seeds!r}")
    if not names or not numbers:
        _argument_error("give at least one algorithm and one seed")
    if jobs < 1:
        _argument_error(f"--jobs must be >= 1, got {jobs}")
    algorithm, _, model = (baseline or "").partition(":")
    if algorithm and algorithm not in names:
        _argument_error(f"--baseline {baseline}: {algorithm} is not one of --algorithms {names}")
    return CompareOptions(names, numbers, (algorithm or None, model or None), jobs)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``tapl compare``'s arguments into the rest and its ``--algorithm.NAME VALUE`` overrides (flat list).

    Raises:
        argparse.ArgumentError: for ``--algorithm`` or ``--federation.seed``, which every run sets itself.
    """
    rest: list[str] = []
    overrides: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--algorithm" or item.startswith("--algorithm="):
            _argument_error("--algorithm is set per run by --algorithms")
        if item.startswith("--federation.seed"):
            _argument_error("--federation.seed is set per run by --seeds")
        if item.startswith("--algorithm."):
            overrides += item.split("=", 1) if "=" in item else [item, next(items, "")]
        else:
            rest.append(item)
    return rest, overrides


def fit_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``tapl compare``'s own options (:data:`OWN_OPTIONS`): what every run gets."""
    kept: list[str] = []
    items = iter(argv)
    for item in items:
        name = item.split("=", 1)[0]
        if name in OWN_OPTIONS:
            if "=" not in item:
                next(items, None)
            continue
        kept.append(item)
    return kept


def algorithm_class(name: str) -> type:
    """The class ``--algorithm NAME`` selects: a short name of ``tapl.algorithms`` or a class path."""
    if "." not in name:
        if name not in tapl.algorithms.BUILT_IN:
            raise ValueError(f"Unknown algorithm {name!r}; built-in ones: {sorted(tapl.algorithms.BUILT_IN)}")
        return getattr(tapl.algorithms, name)
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def overrides_for(name: str, overrides: Sequence[str]) -> list[str]:
    """The ``--algorithm.NAME VALUE`` pairs that algorithm ``name`` accepts."""
    accepted = set(inspect.signature(algorithm_class(name).__init__).parameters)
    kept: list[str] = []
    for flag, value in zip(overrides[::2], overrides[1::2], strict=True):
        if flag.removeprefix("--algorithm.").split(".")[0] in accepted:
            kept += [flag, value]
    return kept


def check_overrides(algorithms: Sequence[str], overrides: Sequence[str]) -> None:
    """Fail when an ``--algorithm.*`` override applies to none of the algorithms."""
    for flag in overrides[::2]:
        if not any(flag in overrides_for(a, [flag, ""]) for a in algorithms):
            raise ValueError(f"{flag} is an argument of none of {list(algorithms)}")


class CompareError(TaplError, RuntimeError):
    """Some runs of a comparison failed."""


def run_all(
    algorithms: Sequence[str],
    seeds: Sequence[int],
    run_dir: Path,
    overrides: Sequence[str],
    fit_args: Sequence[str],
    fit: Callable[[list[str]], None],
    jobs: int = 1,
    check: Callable[[list[str]], Any] | None = None,
) -> dict[tuple[str, int], Path]:
    """Run (or resume, or reuse) every algorithm and seed; return each run's directory.

    With ``jobs`` > 1 the runs go to :func:`run_in_processes`; otherwise ``fit`` runs them one by one. ``check``
    (e.g. the ``tapl`` parser) is given each algorithm's ``fit`` arguments first, so that a bad argument fails
    before any run starts.
    """
    check_overrides(algorithms, overrides)
    runs: dict[tuple[str, int], Path] = {}
    pending: dict[tuple[str, int], list[str]] = {}
    for algorithm in algorithms:
        for seed in seeds:
            directory = run_dir / algorithm.rsplit(".", 1)[-1] / f"seed-{seed}"
            runs[(algorithm, seed)] = directory
            if is_finished(directory):
                print(f"compare: {algorithm} seed {seed}: finished run in {directory}, reused")
                continue
            args = [
                "fit",
                *fit_args,
                "--algorithm",
                algorithm,
                *overrides_for(algorithm, overrides),
                "--federation.seed",
                str(seed),
                "--run_dir",
                str(directory),
            ]
            if RunDirectory(directory).holds_run():
                args += ["--ckpt_path", "last"]
            pending[(algorithm, seed)] = args
    if check is not None:
        for args in {key[0]: args for key, args in pending.items()}.values():
            check(args)
    if jobs > 1:
        run_in_processes(pending, {key: runs[key] for key in pending}, jobs)
    else:
        for (algorithm, seed), args in pending.items():
            print(f"compare: {algorithm} seed {seed} -> {runs[(algorithm, seed)]}")
            fit(args)
    return runs


def run_in_processes(
    pending: Mapping[tuple[str, int], list[str]], directories: Mapping[tuple[str, int], Path], jobs: int
) -> None:
    """Run ``tapl fit`` with each of ``pending``'s arguments in its own process, ``jobs`` at a time.

    Each process gets ``cores // jobs`` CPU threads (``OMP_NUM_THREADS``, unless set already) and writes its
    output to ``<run directory>.log``. Every run is let finish; then failures are raised together.

    Raises:
        CompareError: naming each run that failed and its log.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))

    def launch(key: tuple[str, int]) -> tuple[tuple[str, int], int, float, Path]:
        directory = directories[key]
        log = directory.with_name(f"{directory.name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"compare: {key[0]} seed {key[1]} -> {directory} (log: {log})", flush=True)
        start = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "tapl",
            pending[key][0],
            "--federation.progress",
            "false",
            *pending[key][1:],
        ]
        with log.open("a") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
        seconds = time.perf_counter() - start
        print(
            f"compare: {key[0]} seed {key[1]}: {'done' if code == 0 else f'failed (exit {code})'} in {seconds:.0f} s",
            flush=True,
        )
        return key, code, seconds, log

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(launch, pending))
    failed = [f"{key[0]} seed {key[1]} (see {log})" for key, code, _, log in outcomes if code != 0]
    if failed:
        raise CompareError(f"{len(failed)} of {len(outcomes)} runs failed: {'; '.join(failed)}")


def is_finished(directory: Path) -> bool:
    """Whether ``directory`` holds a run that completed its post-federation stage and wrote its results."""
    state = directory / "checkpoints" / FINAL / "state.pt"
    if not (directory / "results.json").is_file() or not state.is_file():
        return False
    return bool(torch.load(state, map_location="cpu", weights_only=True)["finalized"])


# -- reading runs ------------------------------------------------------------------------------------------


def load_run(directory: Path) -> dict[str, Any]:
    """A run's ``results.json`` and its per-round records."""
    results = json.loads((directory / "results.json").read_text())
    rounds = RunDirectory(directory).read_metrics()
    return {"results": results, "rounds": rounds}


def type_metrics(results: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """Task type -> (its primary metric, whether higher is better), from a run's ``tasks``."""
    out = {}
    for task in results["tasks"].values():
        metric = task["primary_metric"]
        out[task["type"]] = (metric, bool(task["higher_is_better"].get(metric, False)))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def comparison_rows(runs: Mapping[tuple[str, int], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per algorithm, model and task type: the primary metric over seeds.

    The value of one run is the sample-weighted mean over every client and task of the type (the test
    split, ``results.json`` ``distribution.task_type``).
    """
    rows: list[dict[str, Any]] = []
    algorithms = list(dict.fromkeys(a for a, _ in runs))
    for algorithm in algorithms:
        seeds = sorted(s for a, s in runs if a == algorithm)
        first = runs[(algorithm, seeds[0])]["results"]
        for model, info in first["models"].items():
            for task_type, (metric, higher) in sorted(type_metrics(first).items()):
                values = [
                    runs[(algorithm, s)]["results"]["distribution"]["task_type"][model][task_type][metric][
                        "weighted_mean"
                    ]
                    for s in seeds
                ]
                mean, std = mean_std(values)
                rows.append(
                    {
                        "algorithm": first["algorithm"],
                        "model": model,
                        "label": info["label"],
                        "task_type": task_type,
                        "metric": metric,
                        "higher_is_better": higher,
                        "mean": mean,
                        "std": std,
                        "seeds": seeds,
                        "values": values,
                    }
                )
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], command: str) -> str:
    """Algorithm and model x task type, ``mean +- std`` over seeds, with what each number is."""
    types = list(dict.fromkeys(r["task_type"] for r in rows))
    metric_of = {r["task_type"]: (r["metric"], r["higher_is_better"]) for r in rows}
    header = [f"{t} {metric_of[t][0]} ({'higher' if metric_of[t][1] else 'lower'} is better)" for t in types]
    lines = [
        "# Comparison",
        "",
        f"Command: `{command}`",
        "",
        "Each cell: the task type's primary metric on the test split, sample-weighted over every client and "
        "task of that type, as mean +- sample std over the seeds (their number in brackets). Models: `global` "
        "is the final global model's slice, `global+FT` that slice fine-tuned per client after the last round, "
        "`personalized` the algorithm's personalized model, others the algorithm's variants; each run's "
        "results.md describes them.",
        "",
        "| algorithm | model | " + " | ".join(header) + " |",
        "|---|---|" + "---|" * len(types),
    ]
    keys = list(dict.fromkeys((r["algorithm"], r["model"]) for r in rows))
    by_key = {(r["algorithm"], r["model"], r["task_type"]): r for r in rows}
    for algorithm, model in keys:
        label = next(r["label"] for r in rows if (r["algorithm"], r["model"]) == (algorithm, model))
        cells = []
        for task_type in types:
            row = by_key.get((algorithm, model, task_type))
            cells.append(f"{row['mean']:.4f} +- {row['std']:.4f} ({len(row['seeds'])})" if row else "-")
        lines.append(f"| {algorithm} | {label} (`{model}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows in long form: one line per algorithm, model and task type."""
    buffer = io.StringIO()
    fields = [
        "algorithm",
        "model",
        "label",
        "task_type",
        "metric",
        "higher_is_better",
        "mean",
        "std",
        "seeds",
        "values",
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                **row,
                "seeds": " ".join(map(str, row["seeds"])),
                "values": " ".join(f"{v:.6g}" for v in row["values"]),
            }
        )
    return buffer.getvalue()


# -- paired comparisons on the same clients ----------------------------------------------------------------


def first_results(runs: Mapping[tuple[str, int], Mapping[str, Any]], algorithm: str) -> Mapping[str, Any]:
    """The results of ``algorithm``'s run with the lowest seed (for what every seed shares: labels, models)."""
    return runs[(algorithm, min(s for a, s in runs if a == algorithm))]["results"]


def models_of(runs: Mapping[tuple[str, int], Mapping[str, Any]], algorithm: str) -> list[str]:
    """The model keys ``algorithm`` reports."""
    return list(first_results(runs, algorithm)["models"])


def baseline_row(
    runs: Mapping[tuple[str, int], Mapping[str, Any]], algorithm: str | None = None, model: str | None = None
) -> Row:
    """The baseline of the paired comparisons (``--baseline ALGORITHM[:MODEL]``).

    Args:
        runs: The loaded runs by (algorithm, seed).
        algorithm: The baseline algorithm; ``None``: the first of ``runs``.
        model: Its model; ``None``: ``global+FT`` if the algorithm reports it, else ``personalized``.

    Raises:
        ValueError: when the algorithm did not run or does not report the model.
    """
    algorithm = algorithm or next(iter(runs))[0]
    if not any(a == algorithm for a, _ in runs):
        raise ValueError(f"--baseline: {algorithm} is not one of the compared algorithms")
    models = models_of(runs, algorithm)
    model = model or ("global+FT" if "global+FT" in models else "personalized")
    if model not in models:
        raise ValueError(f"--baseline {algorithm}:{model}: {algorithm} reports no model {model!r}, only {models}")
    return algorithm, model


def paired_comparisons(runs: Mapping[tuple[str, int], Mapping[str, Any]], baseline: Row) -> list[tuple[Row, Row]]:
    """The (model, baseline) pairs to compare: every other model of every algorithm against ``baseline``,
    then each algorithm's ``personalized`` model against its own ``no_distillation`` variant, if it has one."""
    algorithms = list(dict.fromkeys(a for a, _ in runs))
    rows = [(a, m) for a in algorithms for m in models_of(runs, a)]
    pairs = [(row, baseline) for row in rows if row != baseline]
    pairs += [((a, "personalized"), (a, ABLATION_MODEL)) for a in algorithms if ABLATION_MODEL in models_of(runs, a)]
    return list(dict.fromkeys(pairs))


def paired_differences(
    runs: Mapping[tuple[str, int], Mapping[str, Any]], row: Row, baseline: Row, task_type: str
) -> list[float]:
    """Per (seed, participating client, task of ``task_type``) that both models were evaluated on: the task
    type's primary metric of ``row`` minus the baseline's, signed so that positive means ``row`` is better.

    Seeds are those both algorithms ran; held-out clients are left out, as in the runs' summaries.
    """
    seeds = sorted({s for a, s in runs if a == row[0]} & {s for a, s in runs if a == baseline[0]})
    differences: list[float] = []
    for seed in seeds:
        results = runs[(row[0], seed)]["results"]
        metric, higher = type_metrics(results)[task_type]
        ours = results["per_client"][row[1]]
        theirs = runs[(baseline[0], seed)]["results"]["per_client"][baseline[1]]
        held_out = {str(c) for c in results.get("held_out", {}).get("clients", [])}
        for client in sorted(set(ours) & set(theirs) - held_out, key=int):
            for task in sorted(set(ours[client]) & set(theirs[client])):
                if results["tasks"][task]["type"] == task_type:
                    difference = ours[client][task][metric] - theirs[client][task][metric]
                    differences.append(difference if higher else -difference)
    return differences


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``differences``, zeros dropped; 1 when all are zero.

    scipy's default method: exact for small samples (a permutation test when absolute differences tie), a
    normal approximation for large ones.
    """
    nonzero = [d for d in differences if d != 0]
    return float(wilcoxon(nonzero).pvalue) if nonzero else 1.0


def paired_stats(differences: Sequence[float]) -> dict[str, Any]:
    """Count, mean, wins (> 0), ties (== 0), losses (< 0) and the Wilcoxon p-value of paired differences."""
    return {
        "pairs": len(differences),
        "mean_difference": sum(differences) / len(differences),
        "wins": sum(d > 0 for d in differences),
        "ties": sum(d == 0 for d in differences),
        "losses": sum(d < 0 for d in differences),
        "p_value": wilcoxon_p(differences),
    }


def paired_rows(runs: Mapping[tuple[str, int], Mapping[str, Any]], baseline: Row) -> list[dict[str, Any]]:
    """One row per pair of :func:`paired_comparisons` and task type both hold: :func:`paired_stats` of the
    :func:`paired_differences`."""
    rows: list[dict[str, Any]] = []
    for row, against in paired_comparisons(runs, baseline):
        ours, theirs = first_results(runs, row[0]), first_results(runs, against[0])
        for task_type, (metric, higher) in sorted(type_metrics(ours).items()):
            differences = paired_differences(runs, row, against, task_type)
            if not differences:
                continue
            rows.append(
                {
                    "algorithm": ours["algorithm"],
                    "model": row[1],
                    "label": ours["models"][row[1]]["label"],
                    "baseline_algorithm": theirs["algorithm"],
                    "baseline_model": against[1],
                    "baseline_label": theirs["models"][against[1]]["label"],
                    "task_type": task_type,
                    "metric": metric,
                    "higher_is_better": higher,
                    **paired_stats(differences),
                }
            )
    return rows


def paired_markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paired comparisons: one line per (model, baseline) pair, one column per task type."""
    types = list(dict.fromkeys(r["task_type"] for r in rows))
    metric_of = {r["task_type"]: r["metric"] for r in rows}
    lines = [
        "## Paired differences on the same clients",
        "",
        "Each line pairs a model with a baseline on the same clients: for every seed, participating client and "
        "task of the type, the difference of the task type's primary metric (test split) between the model and "
        "the baseline of the same seed, signed so that **positive means better than the baseline**. The baseline "
        "is `--baseline ALGORITHM[:MODEL]` (default: the first algorithm's `global+FT` model, else its "
        "`personalized` one); an algorithm with a `no_distillation` variant (TAP) also pairs its `personalized` "
        "model with it. Each cell: the mean difference (every client and task counts once, unlike the "
        "sample-weighted table above); wins/ties/losses over the pairs (their number in brackets); the two-sided "
        "Wilcoxon signed-rank p-value over the non-zero differences (scipy's default method: exact for small "
        "samples, where n differences cannot give less than 2^(1-n); 1 when all are zero; not corrected for the "
        "number of comparisons).",
        "",
        "| algorithm | model | against | " + " | ".join(f"{t} {metric_of[t]}" for t in types) + " |",
        "|---|---|---|" + "---|" * len(types),
    ]
    pairs: dict[tuple[str, str, str, str], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        key = (r["algorithm"], r["model"], r["baseline_algorithm"], r["baseline_model"])
        pairs.setdefault(key, {})[r["task_type"]] = r
    for (algorithm, model, baseline, baseline_model), per_type in pairs.items():
        first = next(iter(per_type.values()))
        against = f"{baseline} {first['baseline_label']} (`{baseline_model}`)"
        cells = " | ".join(paired_cell(per_type.get(t)) for t in types)
        lines.append(f"| {algorithm} | {first['label']} (`{model}`) | {against} | {cells} |")
    return "\n".join(lines) + "\n"


def paired_cell(row: Mapping[str, Any] | None) -> str:
    """``+0.0123; 7/1/4 (12); p 0.0342`` for one paired row, ``-`` for none."""
    if row is None:
        return "-"
    counts = f"{row['wins']}/{row['ties']}/{row['losses']} ({row['pairs']})"
    return f"{row['mean_difference']:+.4f}; {counts}; p {row['p_value']:.3g}"


#: The columns of ``comparison_paired.csv``: the keys of :func:`paired_rows`.
PAIRED_FIELDS = [
    "algorithm",
    "model",
    "label",
    "baseline_algorithm",
    "baseline_model",
    "baseline_label",
    "task_type",
    "metric",
    "higher_is_better",
    "pairs",
    "mean_difference",
    "wins",
    "ties",
    "losses",
    "p_value",
]


def paired_csv_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paired rows in long form: one line per (model, baseline) pair and task type."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PAIRED_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- plots -------------------------------------------------------------------------------------------------


def plot_curves(runs: Mapping[tuple[str, int], Mapping[str, Any]], out: Path, model: str = PLOTTED_MODEL) -> list[Path]:
    """Per task type: its primary validation metric vs round, one line per algorithm (mean over seeds)."""
    first = next(iter(runs.values()))["results"]
    paths = []
    for task_type, (metric, higher) in sorted(type_metrics(first).items()):
        series: dict[str, list[float]] = {}
        rounds: list[int] = []
        for algorithm in dict.fromkeys(a for a, _ in runs):
            per_seed = [
                {
                    r["round"]: r["summary_task_type"][model][task_type][metric]
                    for r in run["rounds"]
                    if model in r.get("summary_task_type", {})
                }
                for (a, _), run in runs.items()
                if a == algorithm
            ]
            common = sorted(set.intersection(*(set(p) for p in per_seed)))
            if not common:
                continue
            rounds = common
            label = runs[next(k for k in runs if k[0] == algorithm)]["results"]["algorithm"]
            series[label] = [sum(p[r] for p in per_seed) / len(per_seed) for r in common]
        series = {k: v for k, v in series.items() if len(v) == len(rounds)}
        if series:
            paths.append(
                plot_series(
                    rounds,
                    series,
                    out / f"curve_{task_type}.png",
                    title=f"{task_type}: {model} model, validation ({'higher' if higher else 'lower'} is better)",
                    xlabel="round",
                    ylabel=metric,
                )
            )
    return paths


def plot_client_distributions(
    runs: Mapping[tuple[str, int], Mapping[str, Any]], out: Path, model: str = PLOTTED_MODEL
) -> list[Path]:
    """Per task type: the final per-client values of its primary metric, one box per algorithm (all seeds)."""
    first = next(iter(runs.values()))["results"]
    paths = []
    for task_type, (metric, higher) in sorted(type_metrics(first).items()):
        groups: dict[str, list[float]] = {}
        for run in runs.values():
            results = run["results"]
            kinds = {name: t["type"] for name, t in results["tasks"].items()}
            values = groups.setdefault(results["algorithm"], [])
            for per_task in results["per_client"].get(model, {}).values():
                values += [v[metric] for task, v in per_task.items() if kinds[task] == task_type]
        paths.append(
            plot_boxes(
                groups,
                out / f"clients_{task_type}.png",
                title=f"{task_type}: per-client {metric} of the {model} model, test ({'higher' if higher else 'lower'} "
                "is better)",
                ylabel=metric,
            )
        )
    return paths


def plot_replacements(runs: Mapping[tuple[str, int], Mapping[str, Any]], out: Path) -> Path | None:
    """TAP's cumulative replacements per modality-task pair over rounds, mean over its seeds (if it ran)."""
    series: dict[str, list[list[float]]] = {}
    last = 0
    for run in runs.values():
        if not run["results"]["algorithm"].startswith("TAP"):
            continue
        rounds = run["rounds"]
        last = max(last, len(rounds))
        pairs = sorted({t["pair"] for t in run["results"]["tasks"].values()})
        for pair in pairs:
            running, total = [], 0
            for record in rounds:
                total += sum(1 for e in record.get("events", []) if e.get("pair") == pair)
                running.append(float(total))
            series.setdefault(f"{run['results']['algorithm']} {pair}", []).append(running)
    if not series:
        return None
    means = {k: [sum(v) / len(v) for v in zip(*runs_, strict=True)] for k, runs_ in series.items()}
    return plot_series(
        list(range(1, last + 1)),
        means,
        out / "replacements.png",
        title="TAP: cumulative replacements per modality-task pair (mean over seeds)",
        xlabel="round",
        ylabel="cumulative replacements",
        step=True,
    )


# -- the command -------------------------------------------------------------------------------------------


def compare(
    options: CompareOptions,
    out: Path,
    overrides: Sequence[str],
    fit_args: Sequence[str],
    fit: Callable[[list[str]], None],
    command: str,
    check: Callable[[list[str]], Any] | None = None,
) -> Path:
    """Run ``tapl compare``: every algorithm and seed of ``options`` into ``out``, then the comparison.

    Writes ``comparison.md``, ``comparison.csv``, ``comparison_paired.csv`` and the PNG plots into ``out`` and
    returns it.

    Args:
        options: The algorithms, seeds, baseline and jobs.
        out: The comparison's directory; run ``(algorithm, seed)`` goes to ``out/<algorithm>/seed-<seed>``.
        overrides: ``--algorithm.NAME VALUE`` pairs, each given to the algorithms that take ``NAME``.
        fit_args: The ``tapl fit`` arguments every run gets.
        fit: Runs one ``tapl fit`` in this process, given its arguments.
        command: The command, for the table.
        check: Given each algorithm's ``fit`` arguments before any run (see :func:`run_all`).
    """
    start = time.perf_counter()
    paths = run_all(options.algorithms, options.seeds, out, overrides, fit_args, fit, options.jobs, check)
    runs = {key: load_run(directory) for key, directory in paths.items()}
    rows = comparison_rows(runs)
    paired = paired_rows(runs, baseline_row(runs, *options.baseline))
    out.mkdir(parents=True, exist_ok=True)
    RunDirectory(out).write_text("comparison.md", markdown_table(rows, command) + "\n" + paired_markdown_table(paired))
    RunDirectory(out).write_text("comparison.csv", csv_table(rows))
    RunDirectory(out).write_text("comparison_paired.csv", paired_csv_table(paired))
    plots = [*plot_curves(runs, out), *plot_client_distributions(runs, out)]
    replacements = plot_replacements(runs, out)
    if replacements is not None:
        plots.append(replacements)
    seconds = time.perf_counter() - start
    names = ", ".join(p.name for p in plots)
    print(f"compare: {len(runs)} runs in {seconds:.0f} s; table in {out / 'comparison.md'}; plots: {names}")
    return out
