"""Tests for ``tapl compare``: runs per algorithm and seed, the table by hand, reproducibility, overrides."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import tiny_config

from tapl.cli import main
from tapl.compare import (
    baseline_row,
    compare_options,
    fit_arguments,
    mean_std,
    paired_comparisons,
    paired_csv_table,
    paired_differences,
    paired_markdown_table,
    paired_rows,
    paired_stats,
    split_overrides,
)

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


def config_file(assets: dict[str, Path], directory: Path) -> Path:
    path = directory / "config.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_config(assets, directory / "unused", rounds=2, eval_every=1)))
    return path


def compare(config: Path, run_dir: Path, *extra: str) -> None:
    main(
        [
            "compare",
            "--config",
            str(config),
            "--algorithms",
            "FedAvg,TAP",
            "--seeds",
            "0,1",
            "--run_dir",
            str(run_dir),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def comparison(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    config = config_file(assets, root)
    compare(config, root / "out", "--federation.local_steps", "1")
    return config, root / "out"


def test_every_algorithm_and_seed_runs_with_the_shared_overrides(comparison: tuple[Path, Path]) -> None:
    _, out = comparison
    for algorithm in ("FedAvg", "TAP"):
        for seed in (0, 1):
            run = out / algorithm / f"seed-{seed}"
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert saved["federation"]["seed"] == seed and saved["federation"]["local_steps"] == 1
            assert json.loads((run / "results.json").read_text())["round"] == 2


def test_the_table_is_mean_and_std_over_seeds_of_each_runs_results(comparison: tuple[Path, Path]) -> None:
    _, out = comparison
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    tap_personal = next(r for r in rows if r["algorithm"] == "TAP" and r["model"] == "personalized")
    assert tap_personal["task_type"] == "classification" and tap_personal["metric"] == "accuracy"
    values = [
        json.loads((out / "TAP" / f"seed-{s}" / "results.json").read_text())["distribution"]["task_type"][
            "personalized"
        ]["classification"]["accuracy"]["weighted_mean"]
        for s in (0, 1)
    ]
    mean = sum(values) / 2
    std = math.sqrt(sum((v - mean) ** 2 for v in values))  # sample std of two values
    assert float(tap_personal["mean"]) == pytest.approx(mean) and float(tap_personal["std"]) == pytest.approx(std)
    assert {(r["algorithm"], r["model"]) for r in rows} == {
        ("FedAvg", "global"),
        ("FedAvg", "global+FT"),
        ("FedAvg", "personalized"),
        ("TAP", "global"),
        ("TAP", "global+FT"),
        ("TAP", "personalized"),
        ("TAP", "no_distillation"),
    }
    table = (out / "comparison.md").read_text()
    assert f"| TAP | TAP (`personalized`) | {mean:.4f} +- {std:.4f} (2) |" in table
    assert "classification accuracy (higher is better)" in table


def test_plots_are_written(comparison: tuple[Path, Path]) -> None:
    _, out = comparison
    for name in ("curve_classification.png", "clients_classification.png", "replacements.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name


def test_the_paired_table_pairs_each_model_with_the_baseline_on_the_same_clients(
    comparison: tuple[Path, Path],
) -> None:
    _, out = comparison
    rows = list(csv.DictReader((out / "comparison_paired.csv").open()))
    tap = next(
        r for r in rows if (r["algorithm"], r["model"], r["baseline_model"]) == ("TAP", "personalized", "global+FT")
    )
    assert tap["baseline_algorithm"] == "FedAvg" and tap["task_type"] == "classification"
    differences = []
    for seed in (0, 1):
        ours, theirs = (
            json.loads((out / algorithm / f"seed-{seed}" / "results.json").read_text())["per_client"][model]
            for algorithm, model in (("TAP", "personalized"), ("FedAvg", "global+FT"))
        )
        differences += [ours[c][t]["accuracy"] - theirs[c][t]["accuracy"] for c in ours for t in ours[c]]
    assert int(tap["pairs"]) == len(differences) == 12  # 2 seeds x 6 (client, task) of the tiny federation
    assert float(tap["mean_difference"]) == pytest.approx(sum(differences) / 12)
    assert int(tap["wins"]) == sum(d > 0 for d in differences)
    assert int(tap["losses"]) == sum(d < 0 for d in differences)
    assert 0 <= float(tap["p_value"]) <= 1
    ablation = [r for r in rows if r["baseline_model"] == "no_distillation"]
    assert [(r["algorithm"], r["model"]) for r in ablation] == [("TAP", "personalized")]
    table = (out / "comparison.md").read_text()
    assert "## Paired differences on the same clients" in table
    assert "| TAP | TAP (`personalized`) | FedAvg FedAvg+FT (`global+FT`) | " in table


def test_rerunning_reuses_finished_runs_and_reproduces_the_table(
    comparison: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = comparison
    before = (out / "comparison.csv").read_text()
    paired = (out / "comparison_paired.csv").read_text()
    compare(config, out, "--federation.local_steps", "1")
    assert capsys.readouterr().out.count("finished run") == 4
    assert (out / "comparison.csv").read_text() == before
    assert (out / "comparison_paired.csv").read_text() == paired
    # The same seeds in a fresh directory: the same numbers.
    compare(config, tmp_path / "again", "--federation.local_steps", "1")
    assert (tmp_path / "again" / "comparison.csv").read_text() == before


def test_jobs_run_in_processes_with_logs_and_give_the_same_table(
    comparison: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = comparison
    compare(config, tmp_path / "jobs", "--federation.local_steps", "1", "--jobs", "2")
    printed = capsys.readouterr().out
    assert printed.count(" done in ") == 4 and "4 runs in " in printed
    for algorithm in ("FedAvg", "TAP"):
        for seed in (0, 1):
            assert "done: 2 rounds" in (tmp_path / "jobs" / algorithm / f"seed-{seed}.log").read_text()
    # Fewer CPU threads per process may round differently in the last bits, never more.
    with (out / "comparison.csv").open() as a, (tmp_path / "jobs" / "comparison.csv").open() as b:
        one, many = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [(r["algorithm"], r["model"], r["task_type"]) for r in one] == [
        (r["algorithm"], r["model"], r["task_type"]) for r in many
    ]
    for a_row, b_row in zip(one, many, strict=True):
        assert float(b_row["mean"]) == pytest.approx(float(a_row["mean"]), rel=1e-4, abs=1e-5)


def test_failed_runs_are_named_with_their_logs_after_the_others_finish(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_file(assets, tmp_path)
    with pytest.raises(SystemExit):
        main(
            [
                "compare",
                "--config",
                str(config),
                "--algorithms",
                "FedAvg,FedProx",
                "--run_dir",
                str(tmp_path / "out"),
                "--federation.rounds",
                "1",
                "--algorithm.mu",
                "-1",
                "--jobs",
                "2",
            ]
        )
    error = capsys.readouterr().err
    assert "1 of 2 runs failed: FedProx seed 0 (see " in error
    assert "mu" in (tmp_path / "out" / "FedProx" / "seed-0.log").read_text()
    assert (tmp_path / "out" / "FedAvg" / "seed-0" / "results.json").is_file()


def test_algorithm_overrides_apply_to_the_algorithms_that_take_them(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_file(assets, tmp_path)
    with pytest.raises(SystemExit):
        compare(config, tmp_path / "out", "--algorithm.no_such_option", "1")
    assert "--algorithm.no_such_option is an argument of none of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare(config, tmp_path / "out", "--algorithm", "TAP")
    assert not (tmp_path / "out").exists()

    main(
        [
            "compare",
            "--config",
            str(config),
            "--algorithms",
            "FedAvg,TAP",
            "--run_dir",
            str(tmp_path / "one"),
            "--federation.rounds",
            "1",
            "--algorithm.replacement",
            "never",
        ]
    )
    tap = yaml.safe_load((tmp_path / "one" / "TAP" / "seed-0" / "config.yaml").read_text())
    assert tap["algorithm"]["init_args"]["replacement"] == "never"
    fedavg = yaml.safe_load((tmp_path / "one" / "FedAvg" / "seed-0" / "config.yaml").read_text())
    assert "replacement" not in fedavg["algorithm"].get("init_args", {})


def test_argument_parsing_and_mean_std() -> None:
    rest, overrides = split_overrides(
        [
            "--algorithms",
            "FedAvg, TAP",
            "--seeds=3,4",
            "--config",
            "c.yaml",
            "--algorithm.mu=0.1",
            "--run_dir",
            "out",
            "--trainer.devices",
            "1",
            "--jobs",
            "2",
        ]
    )
    assert overrides == ["--algorithm.mu", "0.1"]
    # What every run gets: neither compare's own options nor its directory.
    assert fit_arguments(rest) == ["--config", "c.yaml", "--trainer.devices", "1"]
    options = compare_options("FedAvg, TAP", "3,4", jobs=2)
    assert options.algorithms == ["FedAvg", "TAP"] and options.seeds == [3, 4] and options.jobs == 2
    for every_run_sets in (["--algorithm", "TAP"], ["--algorithm=TAP"], ["--federation.seed", "1"]):
        with pytest.raises(argparse.ArgumentError, match="is set per run by"):
            split_overrides(every_run_sets)
    assert mean_std([2.0]) == (2.0, 0.0)
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt((4 + 1 + 9) / 2)))


# -- paired comparisons on hand-made results --------------------------------------------------------------

TASKS = {
    "digits": {"type": "classification", "primary_metric": "accuracy", "higher_is_better": {"accuracy": True}},
    "recon": {"type": "image_generation", "primary_metric": "mse", "higher_is_better": {"mse": False}},
}
#: Client 2 holds both tasks; client 3 is held out.
CLIENT_TASKS = {"0": ["digits"], "1": ["digits"], "2": ["digits", "recon"], "3": ["digits"]}
METRIC = {"digits": "accuracy", "recon": "mse"}


def hand_results(label: str, values: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """A results.json of one seed: ``values[model][task]`` lists the metric per client holding the task."""
    per_client: dict[str, dict[str, Any]] = {}
    for model, per_task in values.items():
        for task, column in per_task.items():
            holders = [c for c, tasks in CLIENT_TASKS.items() if task in tasks]
            for client, value in zip(holders, column, strict=True):
                per_client.setdefault(model, {}).setdefault(client, {})[task] = {METRIC[task]: value, "samples": 5.0}
    return {
        "algorithm": label,
        "tasks": TASKS,
        "models": {m: {"label": f"{label} {m}", "description": ""} for m in values},
        "per_client": per_client,
        "held_out": {"clients": [3]},
    }


def constant(value: float) -> dict[str, list[float]]:
    return {"digits": [value] * 4, "recon": [value]}


# FedAvg+FT and TAP's personalized model on digits (clients 0, 1, 2 and held-out 3) and recon (client 2).
FT = {0: {"digits": [0.5, 0.25, 0.75, 0.0], "recon": [0.5]}, 1: {"digits": [0.5, 0.25, 0.25, 0.0], "recon": [0.375]}}
TAP = {0: {"digits": [0.625, 0.625, 0.5, 1.0], "recon": [0.25]}, 1: {"digits": [0.5, 0.75, 0.875, 1.0], "recon": [0.5]}}
RUNS = {
    **{
        ("FedAvg", s): {"results": hand_results("FedAvg", {"global": constant(0.5), "global+FT": FT[s]})}
        for s in (0, 1)
    },
    **{
        ("TAP", s): {"results": hand_results("TAP", {"personalized": TAP[s], "no_distillation": TAP[s]})}
        for s in (0, 1)
    },
}


def exact_wilcoxon_p(differences: list[float]) -> float:
    """Two-sided exact signed-rank p-value by enumerating every sign pattern (distinct non-zero |d|)."""
    nonzero = sorted((d for d in differences if d), key=abs)
    ranks = range(1, len(nonzero) + 1)
    observed = sum(r for r, d in zip(ranks, nonzero, strict=True) if d > 0)
    sums = [
        sum(r for r, positive in zip(ranks, signs, strict=True) if positive)
        for signs in itertools.product((False, True), repeat=len(nonzero))
    ]
    tail = min(sum(s <= observed for s in sums), sum(s >= observed for s in sums))
    return min(1.0, 2 * tail / len(sums))


def test_paired_differences_are_signed_so_that_positive_is_better() -> None:
    tap, ft = ("TAP", "personalized"), ("FedAvg", "global+FT")
    # Accuracy: TAP minus FedAvg+FT, by seed then client; the held-out client 3 is left out.
    assert paired_differences(RUNS, tap, ft, "classification") == [0.125, 0.375, -0.25, 0.0, 0.5, 0.625]
    # MSE is lower-is-better: FedAvg+FT minus TAP.
    assert paired_differences(RUNS, tap, ft, "image_generation") == [0.25, -0.125]
    # Swapped (on seed 0 alone): the signs flip.
    assert paired_differences({k: v for k, v in RUNS.items() if k[1] == 0}, ft, tap, "classification") == [
        -0.125,
        -0.375,
        0.25,
    ]


def test_paired_stats_by_hand() -> None:
    differences = [0.125, 0.375, -0.25, 0.0, 0.5, 0.625]
    stats = paired_stats(differences)
    assert stats["pairs"] == 6 and stats["mean_difference"] == pytest.approx(1.375 / 6)
    assert (stats["wins"], stats["ties"], stats["losses"]) == (4, 1, 1)
    # The zero is dropped; the one loss has rank 2 of 5: 2 * #{subsets of 1..5 summing to <= 2} / 32 = 6/32.
    assert exact_wilcoxon_p(differences) == 6 / 32
    assert stats["p_value"] == pytest.approx(6 / 32)
    assert paired_stats([0.25, -0.125])["p_value"] == pytest.approx(exact_wilcoxon_p([0.25, -0.125])) == 1.0
    assert paired_stats([0.5])["p_value"] == pytest.approx(1.0)


def test_all_zero_differences_give_p_one_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = paired_stats([0.0, 0.0, 0.0])
    assert stats == {"pairs": 3, "mean_difference": 0.0, "wins": 0, "ties": 3, "losses": 0, "p_value": 1.0}


def test_the_baseline_and_the_pairs() -> None:
    assert baseline_row(RUNS) == ("FedAvg", "global+FT")
    tap_first = {key: RUNS[key] for key in sorted(RUNS, key=lambda k: k[0] != "TAP")}
    assert baseline_row(tap_first) == ("TAP", "personalized")  # no global+FT: its personalized model
    assert baseline_row(RUNS, "FedAvg", "global") == ("FedAvg", "global")
    with pytest.raises(ValueError, match=r"FedAvg reports no model 'personalized', only \['global', 'global\+FT'\]"):
        baseline_row(RUNS, "FedAvg", "personalized")
    with pytest.raises(ValueError, match="Local is not one of the compared algorithms"):
        baseline_row(RUNS, "Local")
    ft = ("FedAvg", "global+FT")
    assert paired_comparisons(RUNS, ft) == [
        (("FedAvg", "global"), ft),
        (("TAP", "personalized"), ft),
        (("TAP", "no_distillation"), ft),
        (("TAP", "personalized"), ("TAP", "no_distillation")),
    ]
    # With the ablation itself as the baseline, its pair is listed once.
    ablation = ("TAP", "no_distillation")
    assert paired_comparisons(RUNS, ablation) == [
        (("FedAvg", "global"), ablation),
        (("FedAvg", "global+FT"), ablation),
        (("TAP", "personalized"), ablation),
    ]


def test_paired_rows_and_their_tables() -> None:
    rows = paired_rows(RUNS, ("FedAvg", "global+FT"))
    by_key = {(r["algorithm"], r["model"], r["baseline_model"], r["task_type"]): r for r in rows}
    assert len(rows) == 8  # 4 pairs x 2 task types
    tap = by_key[("TAP", "personalized", "global+FT", "classification")]
    assert tap["label"] == "TAP personalized" and tap["baseline_label"] == "FedAvg global+FT"
    assert (tap["metric"], tap["higher_is_better"], tap["pairs"]) == ("accuracy", True, 6)
    assert (tap["wins"], tap["ties"], tap["losses"]) == (4, 1, 1) and tap["p_value"] == pytest.approx(6 / 32)
    recon = by_key[("TAP", "personalized", "global+FT", "image_generation")]
    assert (recon["metric"], recon["higher_is_better"], recon["pairs"]) == ("mse", False, 2)
    assert recon["mean_difference"] == pytest.approx(0.0625)
    ablation = by_key[("TAP", "personalized", "no_distillation", "classification")]
    assert (ablation["ties"], ablation["p_value"], ablation["mean_difference"]) == (6, 1.0, 0.0)

    table = paired_markdown_table(rows)
    assert "| algorithm | model | against | classification accuracy | image_generation mse |" in table
    assert (
        "| TAP | TAP personalized (`personalized`) | FedAvg FedAvg global+FT (`global+FT`) | "
        "+0.2292; 4/1/1 (6); p 0.188 | +0.0625; 1/0/1 (2); p 1 |" in table
    )
    assert "**positive means better than the baseline**" in table
    parsed = list(csv.DictReader(paired_csv_table(rows).splitlines()))
    assert len(parsed) == 8 and float(parsed[2]["p_value"]) == pytest.approx(6 / 32)


def test_the_baseline_flag() -> None:
    assert compare_options("FedAvg,TAP").baseline == (None, None)
    assert compare_options("FedAvg,TAP", baseline="TAP:no_distillation").baseline == ("TAP", "no_distillation")
    assert compare_options("FedAvg,TAP", baseline="FedAvg").baseline == ("FedAvg", None)
    with pytest.raises(argparse.ArgumentError, match="FedProx is not one of --algorithms"):
        compare_options("FedAvg,TAP", baseline="FedProx:global")


# -- the same parser as fit ---------------------------------------------------------------------------------


def test_compare_help_lists_fit_s_options_and_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    for option in ("--federation.rounds", "--data.partitioner", "--optimizer", "--run_root", "--trainer.precision"):
        assert option in text, option
    for option in ("--algorithms", "--seeds", "--baseline", "--jobs"):
        assert option in text, option


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--federation.rounds", "abc"], "federation.rounds"),
        (["--trainer.nosuch", "1"], "trainer.nosuch"),
        (["--algorithm.replacement", "bogus"], "bogus"),  # TAP's: checked before FedAvg runs
    ],
    ids=["fit-option", "unknown-option", "per-algorithm-override"],
)
def test_every_run_s_arguments_are_checked_before_any_run(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    config = config_file(assets, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        compare(config, tmp_path / "out", *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tapl: error: ") and expected in err and "tapl compare --help" in err
    assert not (tmp_path / "out" / "FedAvg").exists()


def test_without_run_dir_the_comparison_goes_under_the_run_root(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load(config_file(assets, tmp_path).read_text())
    del config["run_dir"]
    config["run_root"] = str(tmp_path / "runs")
    path = tmp_path / "rooted.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--algorithms", "FedAvg", "--federation.rounds", "1", "--federation.finetune_steps", "1"]
    main(["compare", "--config", str(path), *args])
    assert (tmp_path / "runs" / "compare" / "FedAvg" / "seed-0" / "results.json").is_file()
    assert (tmp_path / "runs" / "compare" / "comparison.md").is_file()
