"""Tests of tapl's argument parser (tapl.parser): naming another class for an option drops the earlier class's
init args, while init args for the class in effect still merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import tiny_config

from tapl.cli import TaplCLI, main

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


def printed(capsys: pytest.CaptureFixture[str], *args: str, config: Path = DEMO) -> dict[str, Any]:
    """The configuration ``tapl fit --config CONFIG ARGS --print_config`` prints."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def init_args(option: dict[str, Any]) -> dict[str, Any]:
    return option.get("init_args") or {}


def test_another_optimizer_drops_the_demo_s_adamw_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    demo = printed(capsys)["optimizer"]
    assert demo["class_path"] == "torch.optim.AdamW" and init_args(demo)["weight_decay"] == 0.01
    assert init_args(demo)["lr"] == 0.002
    sgd = printed(capsys, "--optimizer", "SGD")["optimizer"]
    # SGD's own defaults, not the demo's AdamW weight decay and learning rate.
    assert sgd["class_path"] == "torch.optim.SGD"
    assert init_args(sgd)["weight_decay"] == 0.0 and init_args(sgd)["lr"] == 0.001
    for switch in (["--optimizer.class_path", "SGD"], ["--optimizer", "torch.optim.SGD"]):
        assert printed(capsys, *switch)["optimizer"] == sgd


def test_init_args_given_after_the_switch_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    sgd = printed(capsys, "--optimizer", "SGD", "--optimizer.momentum", "0.9")["optimizer"]
    assert init_args(sgd)["momentum"] == 0.9 and init_args(sgd)["weight_decay"] == 0.0
    inline = printed(capsys, "--optimizer", '{"class_path": "SGD", "init_args": {"momentum": 0.8}}')["optimizer"]
    assert init_args(inline)["momentum"] == 0.8 and init_args(inline)["weight_decay"] == 0.0


def test_init_args_for_the_class_in_effect_still_merge(capsys: pytest.CaptureFixture[str]) -> None:
    for same_class in ([], ["--optimizer", "AdamW"], ["--optimizer", "torch.optim.AdamW"]):
        adamw = printed(capsys, *same_class, "--optimizer.lr", "0.1")["optimizer"]
        assert adamw["class_path"] == "torch.optim.AdamW"
        assert init_args(adamw)["lr"] == 0.1 and init_args(adamw)["weight_decay"] == 0.01
    alpha = printed(capsys, "--data.partitioner.alpha", "0.3")["data"]["partitioner"]
    assert init_args(alpha) == {"alpha": 0.3, "min_samples_per_client": 20}


def test_another_algorithm_drops_the_previous_one_s_arguments(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = yaml.safe_load(DEMO.read_text())
    config["algorithm"] = {"class_path": "tapl.algorithms.FedProx", "init_args": {"mu": 0.5, "weighting": "uniform"}}
    fedprox = tmp_path / "fedprox.yaml"
    fedprox.write_text(yaml.safe_dump(config))
    ditto = printed(capsys, "--algorithm", "Ditto", config=fedprox)["algorithm"]
    assert ditto["class_path"] == "tapl.algorithms.Ditto"
    assert init_args(ditto)["weighting"] == "samples"  # Ditto's default, not FedProx's "uniform"
    assert "mu" not in init_args(ditto)
    # Switching back and forth keeps nothing from before the last switch.
    fedprox_again = printed(
        capsys, "--algorithm", "Ditto", "--algorithm.lam", "0.5", "--algorithm", "FedProx", config=fedprox
    )
    assert init_args(fedprox_again["algorithm"]) == {"mu": 0.01, "weighting": "samples"}
    # The same class given again keeps the config's arguments.
    same = printed(capsys, "--algorithm", "FedProx", "--algorithm.mu", "0.2", config=fedprox)["algorithm"]
    assert init_args(same) == {"mu": 0.2, "weighting": "uniform"}


def test_a_later_config_that_switches_the_class_drops_the_earlier_arguments(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    later = tmp_path / "sgd.yaml"
    later.write_text(yaml.safe_dump({"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.5}}}))
    more = tmp_path / "nesterov.yaml"
    more.write_text(yaml.safe_dump({"optimizer": {"init_args": {"nesterov": True}}}))
    sgd = printed(capsys, "--config", str(later), "--config", str(more))["optimizer"]
    assert sgd["class_path"] == "torch.optim.SGD"
    assert init_args(sgd)["momentum"] == 0.5 and init_args(sgd)["nesterov"] is True
    assert init_args(sgd)["weight_decay"] == 0.0 and init_args(sgd)["lr"] == 0.001
    # The same class named again after the switch merges with it; the switch before still counts.
    again = printed(capsys, "--config", str(later), "--optimizer", "SGD", "--optimizer.lr", "0.2")["optimizer"]
    assert init_args(again)["momentum"] == 0.5 and init_args(again)["lr"] == 0.2
    assert init_args(again)["weight_decay"] == 0.0


def test_a_config_given_as_a_dict_switches_the_same_way(assets: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(assets, tmp_path / "run")
    config["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}
    optimizer = TaplCLI(args=config, run=False).config["optimizer"]
    # Over tapl's default AdamW(lr=3e-4, weight_decay=0.01): SGD with only what the dict gives.
    assert optimizer["class_path"] == "torch.optim.SGD"
    assert optimizer["init_args"]["lr"] == 0.5 and optimizer["init_args"]["weight_decay"] == 0.0


def test_a_config_may_name_a_class_by_its_short_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = yaml.safe_load(DEMO.read_text())
    config["algorithm"] = "FedRep"
    path = tmp_path / "fedrep.yaml"
    path.write_text(yaml.safe_dump(config))
    assert printed(capsys, config=path)["algorithm"]["class_path"] == "tapl.algorithms.FedRep"
    # A later switch on the command line still starts the new class afresh.
    tap = printed(capsys, "--algorithm", "TAP", config=path)["algorithm"]
    assert tap["class_path"] == "tapl.algorithms.TAP" and "head_steps" not in init_args(tap)


def test_the_cross_device_config_resolves_with_batched_execution(capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parents[1] / "experiments" / "cross_device.yaml"
    resolved = printed(capsys, "--federation.execution", "batched", config=config)
    assert resolved["federation"]["execution"] == "batched"
    assert resolved["federation"]["clients_per_round"] == 100
    assert resolved["data"]["clients"][0]["count"] == 1000
