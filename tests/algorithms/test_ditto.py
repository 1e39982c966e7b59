"""Tests for Ditto: what each visit fits and uploads, its proximal update by hand, state, and full runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import fit_tiny, tiny_config
from helpers import read_results as results

from tapl.algorithms import Ditto
from tapl.algorithms.proximal import ProximalTerm
from tapl.cli import TaplCLI
from tapl.components import ComponentState, clone, select
from tapl.context import ClientContext, FitResult
from tapl.datamodules.federated import ClientSpec

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

COMPONENTS = ["encoder[image]", "encoder[text]", "head[a]", "head[b]"]
INITIAL: ComponentState = {c: {"w": torch.full((2,), float(i))} for i, c in enumerate(COMPONENTS)}


class FakeModule:
    """What :class:`ProximalTerm` reads of a ``ClientModule``: the trained components and their parameters."""

    def __init__(self, state: ComponentState) -> None:
        self.components = sorted(state)
        self.model = SimpleNamespace(component_parameters=lambda component: state[component])


class ScriptedVisit:
    """A visit whose fits add ``100 * round`` (first fit: the global slice) or ``1000 * round`` (second fit:
    the personal model) to the fitted state, and call the fit's ``loss_fn`` once on the state it starts from.
    """

    def __init__(self, round: int, global_state: ComponentState, client: int = 0) -> None:
        self.client = ClientSpec(client, ("a", "b"))
        self.round = round
        self.global_state = global_state
        self.components = sorted(global_state)
        self.num_train_samples = 10
        self.fits: list[dict[str, Any]] = []

    def fit(self, state: ComponentState, **kwargs: Any) -> FitResult:
        self.fits.append({"state": clone(state), **kwargs})
        loss_fn = kwargs.get("loss_fn")
        if loss_fn is not None:
            loss_fn(FakeModule(state), torch.zeros(()))
        offset = (100 if len(self.fits) == 1 else 1000) * self.round
        trained = {c: {k: t + offset for k, t in p.items()} for c, p in state.items()}
        return FitResult(trained, {"a": float(len(self.fits)), "b": 10.0 * len(self.fits)}, steps=1)


def make_ditto(**kwargs: Any) -> Ditto:
    ditto = Ditto(**kwargs)
    ditto.setup(SimpleNamespace(global_state=INITIAL))  # type: ignore[arg-type]
    return ditto


def global_slice(value: float) -> ComponentState:
    return {c: {"w": torch.full((2,), value + i)} for i, c in enumerate(COMPONENTS)}


def shifted(state: ComponentState, offset: float) -> ComponentState:
    return {c: {k: t + offset for k, t in p.items()} for c, p in state.items()}


def same(a: Any, b: Any) -> bool:
    """Nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# -- scripted visits ------------------------------------------------------------------------------------------


def test_a_visit_trains_the_global_slice_plainly_then_the_personal_model_towards_the_received_slice() -> None:
    ditto = make_ditto(lam=0.3, personal_steps=5)
    received = global_slice(0.5)
    ctx = ScriptedVisit(1, clone(received))
    update = ditto.client_update(ctx)  # type: ignore[arg-type]

    first, second = ctx.fits
    assert same(first["state"], received)
    assert first.get("loss_fn") is None and first.get("steps") is None
    # Before its first visit the personal model is the client's slice of the initial model.
    assert same(second["state"], INITIAL)
    assert second["steps"] == 5
    proximal = second["loss_fn"]
    assert isinstance(proximal, ProximalTerm) and proximal.mu == 0.3
    assert same(proximal.reference, received)

    assert same(update.state, shifted(received, 100))  # the trained global slice
    assert same(ditto.personal[0], shifted(INITIAL, 1000))  # the trained personal model
    assert same(ditto.personalized_state(0, received), ditto.personal[0])


def test_metrics_hold_both_losses_and_the_proximal_term() -> None:
    ditto = make_ditto(lam=0.3)
    received = global_slice(0.5)
    update = ditto.client_update(ScriptedVisit(1, received))  # type: ignore[arg-type]
    # The personal model starts at INITIAL: 0.3 / 2 * ||INITIAL - received||^2, 4 components x 2 values of 0.5.
    expected_term = 0.15 * 8 * 0.5**2
    assert update.metrics["proximal_term"] == pytest.approx(expected_term)
    assert update.metrics["train_loss/a"] == 1.0 and update.metrics["train_loss/b"] == 10.0
    assert update.metrics["personal_loss/a"] == 2.0 and update.metrics["personal_loss/b"] == 20.0


def test_the_personal_model_carries_over_visits_and_is_never_uploaded() -> None:
    ditto = make_ditto()
    personal_values: list[torch.Tensor] = []
    for round in range(1, 4):
        before = ditto.personal.model(0, COMPONENTS)
        ctx = ScriptedVisit(round, global_slice(round / 10))
        update = ditto.client_update(ctx)  # type: ignore[arg-type]
        assert same(ctx.fits[1]["state"], before)
        assert same(update.state, shifted(global_slice(round / 10), 100 * round))
        personal_values += [t for p in ditto.personal[0].values() for t in p.values()]
        uploaded = [t for p in update.state.values() for t in p.values()]
        assert not any(torch.equal(u, p) or u.data_ptr() == p.data_ptr() for u in uploaded for p in personal_values)
    assert same(ditto.personal[0], shifted(INITIAL, 1000 * (1 + 2 + 3)))


def test_a_non_finite_personal_model_fails_the_visit_and_keeps_the_old_one() -> None:
    ditto = make_ditto()
    ditto.client_update(ScriptedVisit(1, global_slice(0.0)))  # type: ignore[arg-type]
    before = clone(ditto.personal[0])
    ctx = ScriptedVisit(2, global_slice(0.0))
    scripted_fit = ctx.fit

    def nan_personal_fit(state: ComponentState, **kwargs: Any) -> FitResult:
        result = scripted_fit(state, **kwargs)
        if len(ctx.fits) == 2:
            result.state["head[b]"]["w"][0] = math.nan
        return result

    ctx.fit = nan_personal_fit  # type: ignore[method-assign]
    with pytest.raises(FloatingPointError, match=r"personal model .*head\[b\]"):
        ditto.client_update(ctx)  # type: ignore[arg-type]
    assert same(ditto.personal[0], before)


def test_state_dict_round_trip_restores_the_personal_models() -> None:
    ditto = make_ditto()
    for client in (0, 3):
        ditto.client_update(ScriptedVisit(1, global_slice(0.0), client=client))  # type: ignore[arg-type]
    restored = make_ditto()
    restored.load_state_dict(ditto.state_dict())
    assert restored.personal.keys() == {0, 3}
    for algorithm in (ditto, restored):
        algorithm.client_update(ScriptedVisit(2, global_slice(1.0)))  # type: ignore[arg-type]
    assert same(ditto.personal, restored.personal)
    # A client never visited is evaluated on its slice of the initial model.
    assert same(restored.personalized_state(1, global_slice(7.0)), INITIAL)


def test_bad_settings_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"algorithm\.lam"):
        Ditto(lam=-0.1)
    with pytest.raises(ValueError, match=r"algorithm\.personal_steps"):
        Ditto(personal_steps=0)
    assert Ditto().lam == 0.1 and Ditto().personal_steps is None


# -- one real SGD step ----------------------------------------------------------------------------------------

LR, LAM = 0.5, 0.7


def test_one_personal_sgd_step_is_the_task_gradient_plus_lam_times_the_distance(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    config = tiny_config(assets, tmp_path / "run", local_steps=1)
    config["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": LR}}
    orchestrator = TaplCLI(args=config, run=False).orchestrator
    assert orchestrator is not None
    orchestrator.data.setup()
    client = orchestrator.client(2)  # sentiment + shapes
    received = clone(select(orchestrator.global_state, orchestrator.slices[2]))
    generator = torch.Generator().manual_seed(0)
    personal = {
        c: {k: t + 0.1 * torch.randn(t.shape, generator=generator) for k, t in p.items()} for c, p in received.items()
    }

    def visit(lam: float) -> tuple[ComponentState, dict[str, float]]:
        ditto = Ditto(lam=lam)
        ditto.setup(orchestrator)
        ditto.personal[2] = clone(personal)
        update = ditto.client_update(ClientContext(orchestrator, client, 1, clone(received)))
        return ditto.personal[2], update.metrics

    plain, plain_metrics = visit(0.0)
    proximal, metrics = visit(LAM)

    # lam = 0 is a plain fit of the personal model (its stream is the visit's second).
    ctx = ClientContext(orchestrator, client, 1, clone(received))
    ctx.new_stream()
    assert same(plain, ctx.fit(clone(personal)).state)
    assert plain_metrics["proximal_term"] == 0.0

    # One SGD step: v' = v - lr * (grad_task(v) + lam * (v - w)), with grad_task(v) = (v - plain) / lr.
    distance = 0.0
    for component, params in personal.items():
        for key, v in params.items():
            w = received[component][key]
            grad_task = (v - plain[component][key]) / LR
            expected = v - LR * (grad_task + LAM * (v - w))
            torch.testing.assert_close(proximal[component][key], expected, atol=1e-6, rtol=1e-5)
            distance += float((v - w).pow(2).sum())
    assert distance > 0
    assert metrics["proximal_term"] == pytest.approx(LAM / 2 * distance, rel=1e-5)


# -- runs through the CLI -------------------------------------------------------------------------------------

CLIENT_TASKS = {"0": {"sentiment"}, "1": {"shapes"}, "2": {"sentiment", "shapes"}, "3": {"sentiment", "shapes"}}


def run(run_dir: Path, assets: dict[str, Path], *args: str, rounds: int = 2) -> Path:
    return fit_tiny(run_dir, assets, "--algorithm", "Ditto", *args, rounds=rounds, finetune_steps=2)


def final_state(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "final" / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_rounds(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("ditto") / "run", assets)


def test_a_run_reports_fedavg_fedavg_ft_and_ditto_for_every_client_and_task(two_rounds: Path) -> None:
    final = results(two_rounds)
    assert final["algorithm"] == "Ditto"
    labels = {key: info["label"] for key, info in final["models"].items()}
    assert labels == {"global": "FedAvg", "global+FT": "FedAvg+FT", "personalized": "Ditto"}
    for model in labels:
        assert {c: set(tasks) for c, tasks in final["per_client"][model].items()} == CLIENT_TASKS
    records = [json.loads(line) for line in (two_rounds / "metrics.jsonl").read_text().splitlines()]
    visited = {str(c) for r in records for c in r["sampled_clients"]}
    for record in records:
        for client, metrics in record["train"].items():
            personal_tasks = {key.split("/")[1] for key in metrics if key.startswith("personal_loss/")}
            assert personal_tasks and personal_tasks <= CLIENT_TASKS[client]
            assert metrics["proximal_term"] > 0  # the personal model leaves w after its first step
    # Visited clients are evaluated on their own personal model, the others on the initial one.
    personal = final_state(two_rounds)["algorithm"]["personal"]
    assert set(personal) == visited
    for client in visited:
        assert final["per_client"]["personalized"][client] != final["per_client"]["global"][client]


def test_more_rounds_after_a_finished_run_equal_an_uninterrupted_run(
    assets: dict[str, Path], two_rounds: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(two_rounds, resumed)
    run(resumed, assets, "--federation.rounds", "3", "--ckpt_path", "last")
    straight = run(tmp_path / "straight", assets, rounds=3)
    assert final_state(resumed)["round"] == 3
    assert same(final_state(resumed)["algorithm"], final_state(straight)["algorithm"])
    assert results(resumed) == results(straight)
