"""Tests of the ``tapl`` command (tapl.cli): flags reach the objects, configs round-trip, plugins load by class
path, and bad input fails with a message that names the problem and leaves existing runs untouched."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import command_env, snapshot, tapl_command, tiny_config, write_config

from tapl.algorithms import FedAvg
from tapl.cli import TaplCLI, main
from tapl.engine.plateau import PlateauStop
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.run_versions import versions

# The tests call the CLI in-process, under pytest's own command line.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

# -- helpers ----------------------------------------------------------------------------------------------


def build(*args: str) -> FederatedOrchestrator:
    """The orchestrator the CLI builds from ``args``, without running anything."""
    orchestrator = TaplCLI(args=list(args), run=False).orchestrator
    assert orchestrator is not None
    return orchestrator


def fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``tapl`` in-process, expect a non-zero exit, and return what it wrote to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


class OtherAlgorithm(FedAvg):
    """A FedAvg under another name, for a checkpoint that belongs to a different algorithm."""


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture
def config_path(assets: dict[str, Path], tmp_path: Path) -> Path:
    return write_config(tmp_path / "config.yaml", tiny_config(assets, tmp_path / "run"))


# -- flags reach the objects --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["FedAvg", "tapl.algorithms.FedAvg", "tapl.algorithms.fedavg.FedAvg"])
def test_algorithm_by_short_name_or_class_path(config_path: Path, name: str) -> None:
    algorithm = build("--config", str(config_path), "--algorithm", name).algorithm
    assert type(algorithm) is FedAvg
    assert algorithm.weighting == "samples"


def test_algorithm_init_args_reach_the_algorithm(config_path: Path) -> None:
    assert build("--config", str(config_path), "--algorithm.weighting", "uniform").algorithm.weighting == "uniform"
    algorithm = build(
        "--config", str(config_path), "--algorithm", "FedAvg", "--algorithm.weighting", "uniform"
    ).algorithm
    assert type(algorithm) is FedAvg and algorithm.weighting == "uniform"
    plugin = build("--config", str(config_path), "--algorithm", f"{__name__}.OtherAlgorithm").algorithm
    assert type(plugin) is OtherAlgorithm


def test_federation_flags_reach_the_orchestrator(config_path: Path) -> None:
    orchestrator = build(
        "--config",
        str(config_path),
        "--federation.rounds",
        "7",
        "--federation.clients_per_round",
        "3",
        "--federation.seed",
        "41",
        "--federation.eval_every",
        "2",
        "--federation.finetune_lr",
        "0.01",
        "--federation.plateau_window",
        "3",
    )
    assert orchestrator.config == FederationConfig(
        rounds=7,
        clients_per_round=3,
        local_steps=2,
        seed=41,
        eval_every=2,
        progress=False,
        finetune_steps=2,
        finetune_lr=0.01,
        plateau_window=3,
    )
    (plateau,) = [c for c in orchestrator.callbacks if isinstance(c, PlateauStop)]
    assert plateau.plateau.window == 3
    assert all(len(orchestrator.sample_clients(r)) == 3 for r in range(1, 6))
    fraction = build("--config", str(config_path), "--federation.clients_per_round", "0.25").config
    assert fraction.clients_per_round == 0.25 and isinstance(fraction.clients_per_round, float)


def test_print_config_round_trips(config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["--federation.rounds", "5", "--algorithm.weighting", "uniform", "--federation.seed", "3"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config_path), *overrides, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["federation"]["rounds"] == 5
    assert config["federation"]["seed"] == 3
    assert config["algorithm"]["init_args"]["weighting"] == "uniform"
    assert config["data"]["clients"][0]["tasks"] == ["sentiment"]

    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == printed
    # Nothing ran.
    assert not (tmp_path / "run").exists()


# -- plugins from outside the package --------------------------------------------------------------------------

PLUGIN = '''
"""A personalization method that lives outside the tapl package."""

import json

import torch

from tapl.algorithms import FedAvg


class MyMethod(FedAvg):
    """FedAvg that moves the global model only ``scale`` of the way to the clients' average.

    Args:
        scale: Server step size.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.aggregations = 0

    def aggregate(self, round, global_state, results, failures):
        self.aggregations += 1
        average = super().aggregate(round, global_state, results, failures)
        self.log("scale", self.scale)
        return {
            c: {k: g + self.scale * (average[c][k] - g) for k, g in params.items()}
            for c, params in global_state.items()
        }

    def on_federation_end(self, round, global_state):
        marker = {"scale": self.scale, "aggregations": self.aggregations}
        (self.federation.run_dir / "my_plugin.json").write_text(json.dumps(marker))
'''


def test_plugin_outside_the_package_runs_from_the_command(assets: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent(PLUGIN))
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_config(assets, run_dir, local_steps=1))
    env = command_env(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    args = ["fit", "--config", str(config), "--algorithm", "my_plugin.MyMethod", "--algorithm.scale", "0.5"]
    done = subprocess.run([*tapl_command(), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert json.loads((run_dir / "my_plugin.json").read_text()) == {"scale": 0.5, "aggregations": 2}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["algorithm"] == {"class_path": "my_plugin.MyMethod", "init_args": {"scale": 0.5}}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["algorithm"] for r in records] == [{"scale": 0.5}, {"scale": 0.5}]
    assert json.loads((run_dir / "results.json").read_text())["algorithm"] == "MyMethod"


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_from_the_command_exits_non_zero(config_path: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [*tapl_command(), "fit", "--config", str(config_path), "--algorithm", "NoSuchAlgorithm"],
        env=command_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "NoSuchAlgorithm" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--algorithm", "NoSuchAlgorithm"], ["algorithm", "NoSuchAlgorithm"]),
        (["--algorithm", "tapl.algorithms.NoSuchAlgorithm"], ["algorithm", "NoSuchAlgorithm"]),
        (["--algorithm.weighting", "nope"], ["weighting", "nope"]),
        (["--federation.rounds", "abc"], ["federation.rounds", "abc"]),
        (["--federation.nosuch", "1"], ["federation.nosuch"]),
        (["--federation.rounds", "0"], ["federation.rounds", ">= 1"]),
        (["--federation.clients_per_round", "1.5"], ["clients_per_round", "1.5"]),
        (["--federation.clients_per_round", "5"], ["clients_per_round", "5", "4 clients"]),
        (["--federation.rounds", "1"], ["round 2", "--federation.rounds 1"]),
        (["--ckpt_path", "nowhere"], ["nowhere", "checkpoint"]),
    ],
)
def test_bad_arguments_name_the_problem_and_leave_the_run_intact(
    assets: dict[str, Path],
    existing_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: list[str],
) -> None:
    config = write_config(tmp_path / "config.yaml", tiny_config(assets, existing_run))
    before = snapshot(existing_run)
    # A resume, so that the bad argument is the only thing wrong (a later --ckpt_path wins).
    err = fails(["fit", "--config", str(config), "--ckpt_path", "last", *args], capsys)
    for text in expected:
        assert text in err
    assert snapshot(existing_run) == before


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    err = fails(["fit", "--config", str(missing)], capsys)
    assert str(missing) in err
    assert "not exist" in err or "not found" in err


def test_missing_data_file(
    assets: dict[str, Path], existing_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no-such-data.parquet")
    for run_dir, resume in ((tmp_path / "fresh", []), (existing_run, ["--ckpt_path", "last"])):
        config = tiny_config(assets, run_dir)
        config["data"]["tasks"][0]["data_files"] = missing
        before = snapshot(existing_run)
        err = fails(["fit", "--config", str(write_config(tmp_path / "config.yaml", config)), *resume], capsys)
        assert missing in err and "sentiment" in err
        assert snapshot(existing_run) == before
    assert not (tmp_path / "fresh").exists()


def test_fit_into_a_run_directory_that_holds_a_run(
    assets: dict[str, Path], existing_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "config.yaml", tiny_config(assets, existing_run, rounds=3, seed=5))
    before = snapshot(existing_run)
    err = fails(["fit", "--config", str(config)], capsys)
    assert str(existing_run) in err and "already holds a run" in err and "--ckpt_path last" in err
    assert snapshot(existing_run) == before


def _add_a_client(config: dict[str, Any]) -> None:
    config["data"]["clients"][0]["count"] = 2


def _change_a_client_s_tasks(config: dict[str, Any]) -> None:
    config["data"]["clients"][0]["tasks"] = ["shapes"]


def _change_the_lora_rank(config: dict[str, Any]) -> None:
    config["model"]["encoders"]["text"]["init_args"]["lora"]["r"] = 4


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_add_a_client, ["clients", "[['sentiment'], ['sentiment'], ['shapes']"]),
        (_change_a_client_s_tasks, ["clients", "[['shapes'], ['shapes']"]),
        (_change_the_lora_rank, ["components", "encoder"]),
        (None, ["algorithm", "OtherAlgorithm"]),
    ],
)
def test_resume_from_a_different_federation_is_refused(
    assets: dict[str, Path],
    existing_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: Any,
    expected: list[str],
) -> None:
    config = tiny_config(assets, existing_run, rounds=3)
    args = []
    if change is None:
        args = ["--algorithm", f"{__name__}.OtherAlgorithm"]
    else:
        change(config)
    before = snapshot(existing_run)
    err = fails(
        ["fit", "--config", str(write_config(tmp_path / "c.yaml", config)), "--ckpt_path", "last", *args], capsys
    )
    assert "different federation" in err
    for text in expected:
        assert text in err
    assert snapshot(existing_run) == before


# -- versioned run directories --------------------------------------------------------------------------------


def versioned_config(assets: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A one-round tiny config that names a run root instead of a run directory; its path and the root."""
    config = tiny_config(assets, tmp_path / "unused", rounds=1, finetune_steps=1)
    del config["run_dir"]
    config["run_root"] = str(tmp_path / "runs")
    return write_config(tmp_path / "config.yaml", config), tmp_path / "runs"


def test_each_fit_gets_a_new_version_and_last_resumes_and_tests_the_newest(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, root = versioned_config(assets, tmp_path)
    with caplog.at_level(logging.INFO, logger="tapl"):
        main(["fit", "--config", str(config)])
        main(["fit", "--config", str(config), "--algorithm", "FedProx"])  # the README's next step
    assert versions(root) == [0, 1]
    assert f"Run directory: {root / 'version_1'} (a new version)" in caplog.text
    for number, algorithm in ((0, "FedAvg"), (1, "FedProx")):
        run = root / f"version_{number}"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (saved["run_dir"], saved["run_root"]) == (str(run), str(root))
        assert saved["algorithm"]["class_path"].endswith(algorithm)
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    # --ckpt_path last without --run_dir resumes the newest version; test tests it.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tapl"):
        main(
            [
                "fit",
                "--config",
                str(config),
                "--algorithm",
                "FedProx",
                "--ckpt_path",
                "last",
                "--federation.rounds",
                "2",
            ]
        )
        main(["test", "--config", str(config), "--algorithm", "FedProx", "--federation.rounds", "2"])
    assert versions(root) == [0, 1]
    assert len((root / "version_1" / "metrics.jsonl").read_text().splitlines()) == 2
    assert f"Run directory: {root / 'version_1'} (the newest run under {root})" in caplog.text
    assert f"Test results of round 2 in {root / 'version_1' / 'results.md'}" in caplog.text

    # A run's own config.yaml names its directory: resuming with it continues that run, not the newest.
    main(
        ["fit", "--config", str(root / "version_0" / "config.yaml"), "--ckpt_path", "last", "--federation.rounds", "2"]
    )
    main(["test", "--config", str(root / "version_0" / "config.yaml")])
    assert versions(root) == [0, 1]
    assert len((root / "version_0" / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((root / "version_0" / "results.json").read_text())["round"] == 2


def test_nothing_to_resume_under_the_root_fails_in_one_line_and_creates_nothing(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, root = versioned_config(assets, tmp_path)
    err = fails(["fit", "--config", str(config), "--ckpt_path", "last"], capsys)
    assert err.startswith("tapl: error: no run to resume under --run_root") and err.count("\n") == 1
    err = fails(["test", "--config", str(config)], capsys)
    assert "no run to test under --run_root" in err
    assert not root.exists()


def test_a_fit_that_fails_before_it_starts_leaves_no_empty_version(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, root = versioned_config(assets, tmp_path)
    bad = yaml.safe_load(config.read_text())
    bad["data"]["tasks"][0]["data_files"] = str(tmp_path / "missing.parquet")
    err = fails(["fit", "--config", str(write_config(config, bad))], capsys)
    assert "missing.parquet" in err
    assert versions(root) == []


@pytest.mark.slow
def test_the_ranks_of_a_multi_device_run_share_one_version(assets: dict[str, Path], tmp_path: Path) -> None:
    config, root = versioned_config(assets, tmp_path)
    multi = yaml.safe_load(config.read_text())
    multi["trainer"] = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
    command = [*tapl_command(), "fit", "--config", str(write_config(config, multi))]
    done = subprocess.run(command, env=command_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Lightning re-runs the command for rank 1, which takes rank 0's version instead of making another.
    assert versions(root) == [0]
    assert len((root / "version_0" / "metrics.jsonl").read_text().splitlines()) == 1


def test_fit_help_leads_with_the_federation_and_ends_with_the_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    options = text[text.index("\noptions:") :]
    order = ["--federation.rounds", "--algorithm ", "--data.batch_size", "--model.", "--optimizer ", "--run_root"]
    positions = [options.index(f"  {option}") for option in order]
    assert positions == sorted(positions)
    trainer = options.index("  --trainer.accelerator")
    assert trainer > positions[-1]
