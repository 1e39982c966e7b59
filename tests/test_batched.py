"""Batched client execution equals sequential visits, tensor by tensor.

The tiny federation here has no dropout (the tiny BERT's, LoRA's and the heads' are 0): dropout is the one thing
a batched fit draws differently. Tolerance: 1e-5 absolute on every trained tensor after 9 AdamW steps at the
default learning rate (the members' float rounding differs from a sequential fit's by about 1e-7), 1e-5 relative on
the losses.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_image_parquet, make_text_parquet, make_tiny_bert, tiny_config, write_config

from tapl.algorithms.proximal import Proximal
from tapl.cli import TaplCLI, main
from tapl.components import ComponentState
from tapl.engine.batched import BatchedTraining
from tapl.engine.cohort import FitRequest
from tapl.engine.local_training import LocalTraining
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.meta_learning import MetaLearning
from tapl.run_dir import RunDirectory
from tapl.visit_trainer import VisitTrainers

ATOL = 1e-5


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("no-dropout")
    return {
        "bert": make_tiny_bert(root / "tiny-bert", dropout=0.0),
        "text": make_text_parquet(root / "text.parquet"),
        "image": make_image_parquet(root / "image.parquet"),
    }


def federation_config(assets: dict[str, Path], run_dir: Path, **federation: Any) -> dict[str, Any]:
    """Three two-task clients and two one-task clients; gradient clipping small enough to act."""
    config = tiny_config(assets, run_dir, **federation)
    for task in config["data"]["tasks"]:
        task["head_dropout"] = 0.0
    config["data"]["clients"] = [{"tasks": ["sentiment", "shapes"], "count": 3}, {"tasks": ["sentiment"], "count": 2}]
    config["trainer"]["gradient_clip_val"] = 0.05
    return config


@pytest.fixture(scope="module")
def engine(no_dropout: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> FederatedOrchestrator:
    argv, sys.argv = sys.argv, ["tapl"]
    try:
        built = TaplCLI(args=federation_config(no_dropout, tmp_path_factory.mktemp("run")), run=False).orchestrator
    finally:
        sys.argv = argv
    assert built is not None
    built.setup()
    return built


def perturbed(state: ComponentState, components: tuple[str, ...], scale: float) -> ComponentState:
    """``state``'s ``components``, each tensor moved by seeded noise of ``scale`` (so members start apart)."""
    return {c: {k: t + scale * torch.randn_like(t) for k, t in state[c].items()} for c in components}


def requests(engine: FederatedOrchestrator, stream: int, **fit: Any) -> list[FitRequest]:
    torch.manual_seed(stream)
    made = []
    for client in sorted(engine.info.clients):
        info = engine.info.clients[client]
        state = perturbed(engine.global_state, info.components, 0.01 * client)
        options = {k: v(state) if callable(v) else v for k, v in fit.items()}
        made.append(FitRequest(info, state, 1, (0, 1, client, stream), **options))
    return made


@pytest.fixture
def cohorts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the cohorts fitted together, as they run."""
    sizes: list[int] = []
    real_fit_cohort = LocalTraining.fit_cohort

    def counting(training: LocalTraining, fits: list, optimizer: Any) -> Any:
        sizes.append(len(fits))
        return real_fit_cohort(training, fits, optimizer)

    monkeypatch.setattr(LocalTraining, "fit_cohort", counting)
    return sizes


def assert_equal_fits(
    engine: FederatedOrchestrator, made: list[FitRequest], cohorts: list[int], cohort_sizes: list[int]
) -> None:
    training = engine.training
    sequential = [training.fit_resolved(training.resolve(r)) for r in made]
    together = BatchedTraining(training, max_rows=4096).fit_all(made)
    assert cohorts == cohort_sizes  # the fits really ran as cohorts
    for request, one, many in zip(made, sequential, together, strict=True):
        assert not isinstance(many, Exception), many
        assert many.steps == one.steps
        assert many.train_loss == pytest.approx(one.train_loss, rel=1e-5)
        assert sorted(many.state) == sorted(one.state)
        moved = 0.0
        for component, tensors in one.state.items():
            for key, tensor in tensors.items():
                torch.testing.assert_close(many.state[component][key], tensor, atol=ATOL, rtol=0)
                moved = max(moved, float((tensor - request.state[component][key]).abs().max()))
        assert moved > 100 * ATOL  # the fits trained: equality is not the start state on both sides


def test_a_cohort_fit_equals_each_members_sequential_fit(engine: FederatedOrchestrator, cohorts: list[int]) -> None:
    """Two-task clients (whose batches sometimes lack a task: that head skips the step) batched together, the
    one-task clients together; 9 steps cross an epoch of a one-task client; clipping acts per member."""
    assert_equal_fits(engine, requests(engine, stream=1, steps=9), cohorts, cohort_sizes=[3, 2])


def test_a_cohort_fit_keeps_each_members_objective_and_frozen_components(
    engine: FederatedOrchestrator, cohorts: list[int]
) -> None:
    """FedProx's proximal term towards each member's own reference, heads trained over per-member frozen bodies."""

    def heads(state: ComponentState) -> list[str]:
        return [c for c in state if c.startswith("head")]

    made = requests(engine, stream=2, steps=6, trainable=heads, objective=lambda s: Proximal(s, 0.5))
    assert_equal_fits(engine, made, cohorts, cohort_sizes=[3, 2])


def test_a_fit_with_its_own_training_step_runs_alone_with_a_notice(
    engine: FederatedOrchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    meta = {
        "steps": 2,
        "objective": lambda s: MetaLearning(alpha=0.01),
        "trainer_overrides": {"gradient_clip_val": None},
    }
    made = requests(engine, stream=3, **meta)
    training = engine.training
    with caplog.at_level(logging.INFO, logger="tapl"):
        together = BatchedTraining(training, max_rows=4096).fit_all(made)
    notices = [r.getMessage() for r in caplog.records if "execution batched" in r.getMessage()]
    reason = "its objective MetaLearning runs its own training step"
    assert notices == [f"federation.execution batched: fits run one after another where {reason}"]
    made = requests(engine, stream=3, **meta)  # fresh objectives
    for request, many in zip(made, together, strict=True):
        one = training.fit_resolved(training.resolve(request))
        for component, tensors in one.state.items():
            for key, tensor in tensors.items():
                assert torch.equal(many.state[component][key], tensor)


def checkpoint(run_dir: Path) -> tuple[ComponentState, dict[str, Any]]:
    """The last checkpoint's global model and every client's store."""
    run = RunDirectory(run_dir)
    state, payload = run.load_checkpoint(run.resolve_checkpoint("last"))
    return state, payload["client_store"]


def assert_close_tensors(batched: Any, sequential: Any, where: str = "") -> int:
    """Every tensor in ``sequential`` (nested dicts and lists) within :data:`ATOL` of ``batched``'s; the count."""
    if isinstance(sequential, torch.Tensor):
        torch.testing.assert_close(batched, sequential, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")
        return 1
    if isinstance(sequential, dict):
        assert sorted(batched) == sorted(sequential), where
        return sum(assert_close_tensors(batched[k], v, f"{where}/{k}") for k, v in sequential.items())
    if isinstance(sequential, (list, tuple)):
        return sum(
            assert_close_tensors(b, v, f"{where}[{i}]")
            for i, (b, v) in enumerate(zip(batched, sequential, strict=True))
        )
    assert batched == pytest.approx(sequential, rel=1e-5), where
    return 0


@pytest.mark.parametrize("algorithm", ["FedAvg", "FedRep", "TAP"])
def test_a_batched_run_equals_a_sequential_run(
    no_dropout: dict[str, Path], tmp_path: Path, cohorts: list[int], algorithm: str
) -> None:
    """The whole run through the CLI: rounds of 3 sampled clients (FedRep and TAP: two fits per visit, personal
    tensors in the clients' stores), then the post-federation stage (fine-tuning; TAP's distillation, whose teacher
    runs through the stacked model); the final global model and every client's store, tensor by tensor."""
    runs = {}
    for execution in ("sequential", "batched"):
        run_dir = tmp_path / execution
        config = federation_config(no_dropout, run_dir, clients_per_round=3, execution=execution)
        main(["fit", "--config", str(write_config(tmp_path / f"{execution}.yaml", config)), "--algorithm", algorithm])
        runs[execution] = checkpoint(run_dir)
        if execution == "sequential":
            assert not cohorts
    assert len(cohorts) >= 2 and max(cohorts) >= 2  # rounds and the post-federation stage ran cohorts
    assert assert_close_tensors(runs["batched"], runs["sequential"]) > 0


@pytest.mark.parametrize(("setting", "value"), [("execution", "parallel"), ("batched_rows", 0)])
def test_a_bad_batched_setting_is_refused_by_name(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"federation\.{setting}"):
        FederationConfig(**{setting: value})


def test_the_row_budget_splits_a_round_into_waves(engine: FederatedOrchestrator, cohorts: list[int]) -> None:
    """batched_rows 16 at batch size 8: two clients per wave, so only the first wave's two-task pair is a cohort
    (the second wave's clients hold different slices, the third has one client)."""
    training = engine.training
    made = requests(engine, stream=4, steps=3)
    batched_training = BatchedTraining(training, max_rows=16)
    assert batched_training.wave == 2
    works = [partial(batched_training.run_fit, request) for request in made]
    together = batched_training.run_together(works, lambda i: None)
    assert cohorts == [2]
    for request, many in zip(requests(engine, stream=4, steps=3), together, strict=True):
        one = training.fit_resolved(training.resolve(request))
        assert_close_tensors(many.state, one.state)


def test_an_optimizer_it_cannot_run_per_member_runs_alone_with_a_notice(
    engine: FederatedOrchestrator, cohorts: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    amsgrad = partial(torch.optim.Adam, amsgrad=True)
    made = requests(engine, stream=5, steps=2, optimizer=lambda state: amsgrad)
    with caplog.at_level(logging.INFO, logger="tapl"):
        together = BatchedTraining(engine.training, max_rows=4096).fit_all(made)
    assert cohorts == []
    assert all(not isinstance(result, Exception) for result in together)
    assert any("cannot run AMSGrad" in r.getMessage() for r in caplog.records)


def test_batched_execution_refuses_several_devices(engine: FederatedOrchestrator) -> None:
    training = engine.training
    trainers = VisitTrainers({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    several = LocalTraining(training.model, training.data, trainers, training.optimizer, training.config)
    with pytest.raises(ValueError, match=r"--trainer\.devices 1"):
        BatchedTraining(several, max_rows=4096)
