"""Tests for tapl.reporting: distribution statistics across clients, by hand, and the clients table."""

from __future__ import annotations

import math

import pytest

from tapl.reporting import clients_table, distribution, summarize_distribution
from tapl.tasks import Task

VALUES = [0.9, 0.5, 0.7, 0.1]
WEIGHTS = [10.0, 30.0, 20.0, 40.0]


def test_distribution_statistics_by_hand() -> None:
    d = distribution(VALUES, WEIGHTS, higher_is_better=True)
    assert d["weighted_mean"] == pytest.approx((9 + 15 + 14 + 4) / 100)
    assert d["mean"] == pytest.approx(0.55)
    # deviations 0.35, -0.05, 0.15, -0.45 -> squares sum to 0.35, population variance 0.0875
    assert d["std"] == pytest.approx(math.sqrt(0.0875))
    assert (d["min"], d["max"], d["values"]) == (0.1, 0.9, 4) and isinstance(d["values"], int)
    assert d["worst_10pct_mean"] == pytest.approx(0.1)  # ceil(0.4) = 1 value: the lowest
    assert d["higher_is_better"] is True
    lower = distribution(VALUES, WEIGHTS, higher_is_better=False)
    assert lower["worst_10pct_mean"] == pytest.approx(0.9) and lower["higher_is_better"] is False


def test_worst_tail_takes_the_ceiling_of_a_tenth() -> None:
    values = [float(v) for v in range(25)]  # ceil(2.5) = 3 worst values
    assert distribution(values, [1.0] * 25, True)["worst_10pct_mean"] == pytest.approx(1.0)  # 0, 1, 2
    assert distribution(values, [1.0] * 25, False)["worst_10pct_mean"] == pytest.approx(23.0)  # 24, 23, 22
    assert distribution([3.0], [5.0], True)["worst_10pct_mean"] == 3.0


def test_distribution_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="one weight per value"):
        distribution([1.0, 2.0], [1.0], True)
    with pytest.raises(ValueError, match="at least one value"):
        distribution([], [], True)


TASKS = {
    "digits": Task(name="digits", type="classification", modalities=("image",), num_classes=10),
    "qa": Task(name="qa", type="classification", modalities=("image", "text"), num_classes=2),
    "recon": Task(name="recon", type="image_generation", modalities=("image",)),
}
PER_CLIENT = {
    "0": {"digits": {"accuracy": 0.8, "loss": 0.5, "samples": 10.0}},
    "1": {
        "digits": {"accuracy": 0.6, "loss": 0.9, "samples": 30.0},
        "qa": {"accuracy": 0.5, "loss": 0.7, "samples": 20.0},
    },
    "2": {"recon": {"mse": 0.04, "loss": 0.04, "samples": 5.0}},
}


def test_grouping_by_task_type_pools_every_client_and_task_of_the_type() -> None:
    by_type = summarize_distribution(PER_CLIENT, TASKS, "task_type")
    assert sorted(by_type) == ["classification", "image_generation"]
    accuracy = by_type["classification"]["accuracy"]
    assert accuracy["values"] == 3.0
    assert accuracy["weighted_mean"] == pytest.approx((8 + 18 + 10) / 60)
    assert accuracy["mean"] == pytest.approx(1.9 / 3)
    assert by_type["classification"]["loss"]["higher_is_better"] == 0.0
    assert by_type["classification"]["loss"]["worst_10pct_mean"] == 0.9  # the highest loss
    assert by_type["image_generation"]["mse"]["higher_is_better"] == 0.0
    assert "samples" not in by_type["classification"]


def test_grouping_by_pair_separates_modalities() -> None:
    by_pair = summarize_distribution(PER_CLIENT, TASKS, "pair")
    assert sorted(by_pair) == ["image+text,classification", "image,classification", "image,image_generation"]
    assert by_pair["image,classification"]["accuracy"]["values"] == 2.0
    assert by_pair["image+text,classification"]["accuracy"]["mean"] == 0.5
    by_task = summarize_distribution(PER_CLIENT, TASKS, "task")
    assert by_task["digits"]["accuracy"]["weighted_mean"] == pytest.approx((8 + 18) / 40)


def test_the_clients_table_shows_the_last_round_each_client_trained_in() -> None:
    results = {
        "round": 16,
        "clients": {
            "0": {"tasks": ["digits"], "held_out": False, "visits": 6, "failures": 0, "last_visit": 8},
            "1": {"tasks": ["digits", "qa"], "held_out": False, "visits": 2, "failures": 2, "last_visit": 0},
            "2": {"tasks": ["recon"], "held_out": True, "visits": 0, "failures": 0, "last_visit": 0},
        },
    }
    lines = clients_table(results)
    assert "| client | tasks | visits | failed | last trained (of 16) |" in lines
    assert lines[-3:] == [
        "| 0 | digits | 6 | 0 | 8 |",
        "| 1 | digits, qa | 2 | 2 | never |",
        "| 2 | recon | 0 | 0 | held out |",
    ]
