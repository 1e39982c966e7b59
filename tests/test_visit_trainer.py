"""The per-visit Trainer: what it takes from --trainer.* and what the federation owns."""

from __future__ import annotations

import logging

import pytest

from tapl.visit_trainer import VisitTrainers


def test_federation_owned_settings_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        trainers = VisitTrainers({"accelerator": "cpu", "max_epochs": 3, "logger": True, "gradient_clip_val": 1.0})
    assert "--trainer.max_epochs" in caplog.text and "--trainer.logger" in caplog.text
    assert trainers.kwargs == {"accelerator": "cpu", "gradient_clip_val": 1.0}
    trainer = trainers.fit_trainer(5)
    assert trainer.max_steps == 5 and trainer.logger is None and trainer.gradient_clip_val == 1.0


def test_plain_ddp_looks_for_unused_parameters() -> None:
    assert VisitTrainers({"strategy": "ddp"}).kwargs["strategy"] == "ddp_find_unused_parameters_true"
    assert VisitTrainers({"strategy": "auto"}).kwargs["strategy"] == "auto"


def test_bf16_on_cpu_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        VisitTrainers({"accelerator": "cpu", "precision": "bf16-mixed"})
    assert "emulated" in caplog.text


def test_a_fit_needs_a_step() -> None:
    with pytest.raises(ValueError, match="at least one step"):
        VisitTrainers().fit_trainer(0)


def test_a_fit_may_override_user_settings_but_not_the_federations() -> None:
    trainers = VisitTrainers({"accelerator": "cpu", "devices": 1, "gradient_clip_val": 2.0})
    assert trainers.fit_trainer(3).gradient_clip_val == 2.0
    overridden = trainers.fit_trainer(3, overrides={"gradient_clip_val": None})
    assert overridden.gradient_clip_val is None and overridden.max_steps == 3
    for owned in ({"logger": True}, {"max_steps": 10}):
        with pytest.raises(ValueError, match="cannot be overridden"):
            trainers.fit_trainer(3, overrides=owned)
