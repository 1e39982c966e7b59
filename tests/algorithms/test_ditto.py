"""Tests for Ditto: what each visit fits and uploads, its proximal update by hand, the client's store, the models
it reports, and full runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fit_tiny, tiny_config
from helpers import read_results as results
from scripted import ScriptedTraining, Shift, context, engine_context, federation, through_checkpoint

from tapl.algorithms import ClientContext, ClientUpdate, Ditto
from tapl.algorithms.proximal import Proximal
from tapl.cli import TaplCLI
from tapl.components import ComponentState, clone
from tapl.engine.client_store import ClientStateError, ClientStore

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

COMPONENTS = ["encoder[image]", "encoder[text]", "head[a]", "head[b]"]
INITIAL: ComponentState = {c: {"w": torch.full((2,), float(i))} for i, c in enumerate(COMPONENTS)}
INFO = federation(INITIAL, clients={0: ("a", "b"), 1: ("a", "b"), 3: ("a", "b")})


def make_ditto(**kwargs: Any) -> Ditto:
    ditto = Ditto(**kwargs)
    ditto.setup(INFO)
    return ditto


def visit(
    ditto: Ditto,
    round: int,
    received: ComponentState,
    store: dict[str, Any],
    client: int = 0,
    shift: Shift | None = None,
) -> tuple[ScriptedTraining, ClientContext, ClientUpdate]:
    """A visit over ``store`` (the client's working copy) whose first fit (the global slice) adds ``100 * round``
    and second fit (the personal model) ``1000 * round``, unless ``shift`` says otherwise."""
    training = ScriptedTraining(shift or (lambda n, call: (100 if n == 1 else 1000) * round))
    ctx = context(INFO, training, client=client, round=round, received=received, store=store)
    return training, ctx, ditto.client_update(ctx)


def committed_visit(
    ditto: Ditto, clients: ClientStore, round: int, received: ComponentState, client: int = 0
) -> tuple[ScriptedTraining, ClientContext, ClientUpdate]:
    """A visit as the engine runs it: on a copy of the client's store, kept once the visit succeeded."""
    training, ctx, update = visit(ditto, round, received, clients.checkout(client), client)
    clients.commit(client, ctx.store)
    return training, ctx, update


def personalized(ditto: Ditto, clients: ClientStore, client: int, received: ComponentState) -> ComponentState | None:
    """The personalized model the engine evaluates for ``client``."""
    [model] = [m for m in ditto.models() if m.key == "personalized"]
    ctx = context(
        INFO, ScriptedTraining(), client, received=received, store=clients.checkout(client), stage="evaluation"
    )
    return model.state(ctx)


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
    training, ctx, update = visit(ditto, 1, clone(received), store={})

    first, second = training.fits
    assert same(first["state"], received)
    assert first["objective"] is None and first["steps"] is None
    # Before its first visit the personal model is the client's slice of the initial model.
    assert same(second["state"], INITIAL)
    assert second["steps"] == 5
    proximal = second["objective"]
    assert isinstance(proximal, Proximal) and proximal.mu == 0.3
    assert same(proximal.reference, received)
    # Two fits, two random streams.
    assert first["seed_key"] != second["seed_key"]

    assert same(update.state, shifted(received, 100))  # the trained global slice
    assert ctx.store.keys() == {"personal"}
    assert same(ctx.store["personal"], shifted(INITIAL, 1000))  # the trained personal model


def test_metrics_hold_both_losses_and_the_proximal_term() -> None:
    ditto = make_ditto(lam=0.3)
    _, _, update = visit(ditto, 1, global_slice(0.5), store={})
    # The personal model starts at INITIAL: 0.3 / 2 * ||INITIAL - received||^2, 4 components x 2 values of 0.5.
    expected_term = 0.15 * 8 * 0.5**2
    assert update.metrics["proximal_term"] == pytest.approx(expected_term)
    assert update.metrics["train_loss/a"] == 1.0 and update.metrics["train_loss/b"] == 10.0
    assert update.metrics["personal_loss/a"] == 2.0 and update.metrics["personal_loss/b"] == 20.0


def test_the_personal_model_carries_over_visits_and_is_never_uploaded() -> None:
    ditto = make_ditto()
    clients = ClientStore()
    personal_values: list[torch.Tensor] = []
    for round in range(1, 4):
        before = clients.checkout(0).get("personal", INITIAL)
        training, ctx, update = committed_visit(ditto, clients, round, global_slice(round / 10))
        assert same(training.fits[1]["state"], before)
        assert same(update.state, shifted(global_slice(round / 10), 100 * round))
        personal_values += [t for p in ctx.store["personal"].values() for t in p.values()]
        uploaded = [t for p in update.state.values() for t in p.values()]
        assert not any(torch.equal(u, p) or u.data_ptr() == p.data_ptr() for u in uploaded for p in personal_values)
    assert same(clients.checkout(0)["personal"], shifted(INITIAL, 1000 * (1 + 2 + 3)))
    assert same(personalized(ditto, clients, 0, global_slice(9.0)), clients.checkout(0)["personal"])


def test_a_non_finite_personal_model_fails_the_visit_and_keeps_the_old_one() -> None:
    ditto = make_ditto()
    clients = ClientStore()
    committed_visit(ditto, clients, 1, global_slice(0.0))
    before = clients.checkout(0)

    def nan_personal_fit(n: int, call: dict[str, Any]) -> float:
        return math.nan if n == 2 else 100.0

    _, ctx, update = visit(ditto, 2, global_slice(0.0), clients.checkout(0), shift=nan_personal_fit)
    assert torch.isfinite(update.state["head[b]"]["w"]).all()  # the upload alone would pass the engine's checks
    with pytest.raises(ClientStateError, match=r"non-finite.* personal/head\[b\]"):
        clients.commit(0, ctx.store)
    assert same(clients.checkout(0), before)


def test_the_stores_round_trip_a_checkpoint_and_the_server_keeps_nothing() -> None:
    ditto = make_ditto()
    clients = ClientStore()
    for client in (0, 3):
        committed_visit(ditto, clients, 1, global_slice(0.0), client=client)
    assert ditto.state_dict() == {}  # every personal model lives in the client's store
    restored = through_checkpoint(clients)
    assert list(restored) == [0, 3]
    for store in (clients, restored):
        committed_visit(make_ditto(), store, 2, global_slice(1.0))
    assert same(clients.state_dict(), restored.state_dict())
    # A client never visited is evaluated on its slice of the initial model.
    assert same(personalized(ditto, restored, 1, global_slice(7.0)), INITIAL)


def test_ditto_reports_fedavgs_global_model_and_its_personal_one() -> None:
    ditto = make_ditto(lam=0.25)
    models = ditto.models()
    assert [(m.key, m.label) for m in models] == [("global", "FedAvg"), ("personalized", "Ditto")]
    assert "lam = 0.25" in models[1].description
    received = global_slice(2.0)
    ctx = context(INFO, ScriptedTraining(), received=received, store={"personal": global_slice(5.0)})
    assert models[0].state(ctx) is received
    assert same(models[1].state(ctx), global_slice(5.0))


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
    engine = TaplCLI(args=config, run=False).orchestrator
    assert engine is not None
    engine.setup(check_values=False)
    received = engine.info.slice_of(engine.global_state, 2)  # sentiment + shapes
    generator = torch.Generator().manual_seed(0)
    personal = {
        c: {k: t + 0.1 * torch.randn(t.shape, generator=generator) for k, t in p.items()} for c, p in received.items()
    }

    def personal_fit(lam: float) -> tuple[ComponentState, dict[str, float]]:
        ditto = Ditto(lam=lam)
        ditto.setup(engine.info)
        ctx = engine_context(engine, 2, received=clone(received), store={"personal": clone(personal)})
        update = ditto.client_update(ctx)
        return ctx.store["personal"], update.metrics

    plain, plain_metrics = personal_fit(0.0)
    proximal, metrics = personal_fit(LAM)

    # lam = 0 is a plain fit of the personal model (its stream is the visit's second).
    ctx = engine_context(engine, 2, received=clone(received), store={})
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
    # Visited clients keep a personal model in their store (the server keeps nothing) and are evaluated on it.
    state = final_state(two_rounds)
    assert state["algorithm"] == {}
    assert {client for client, store in state["client_store"].items() if "personal" in store} == visited
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
    for key in ("algorithm", "client_store"):
        assert same(final_state(resumed)[key], final_state(straight)[key]), key
    assert results(resumed) == results(straight)
