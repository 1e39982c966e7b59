"""Tests for ``tapl compare``: runs per algorithm and seed, the table by hand, reproducibility, overrides."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from tapl.cli import main
from tapl.compare import mean_std, parse_args

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


def test_rerunning_reuses_finished_runs_and_reproduces_the_table(
    comparison: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = comparison
    before = (out / "comparison.csv").read_text()
    compare(config, out, "--federation.local_steps", "1")
    assert capsys.readouterr().out.count("finished run") == 4
    assert (out / "comparison.csv").read_text() == before
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
    own, overrides, rest = parse_args(
        [
            "--algorithms",
            "FedAvg, TAP",
            "--seeds",
            "3,4",
            "--config",
            "c.yaml",
            "--algorithm.mu=0.1",
            "--trainer.devices",
            "1",
        ]
    )
    assert own.algorithms == ["FedAvg", "TAP"] and own.seeds == [3, 4]
    assert overrides == ["--algorithm.mu", "0.1"] and rest == ["--config", "c.yaml", "--trainer.devices", "1"]
    assert mean_std([2.0]) == (2.0, 0.0)
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt((4 + 1 + 9) / 2)))
