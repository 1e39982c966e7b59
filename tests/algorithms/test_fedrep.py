"""Tests for FedRep: heads trained alone then the body alone, bodies uploaded and averaged, heads kept in the
client's store, the model it reports, and runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fit_tiny, tiny_config
from helpers import read_records as records
from helpers import read_results as results
from safetensors.torch import load_file
from scripted import ScriptedTraining, context, engine_context, federation, through_checkpoint, with_slices

from tapl.algorithms import ClientContext, ClientUpdate, FedRep
from tapl.api import ClientInfo, FitResult
from tapl.cli import TaplCLI
from tapl.components import ComponentState, clone, select
from tapl.engine.client_store import ClientStateError, ClientStore
from tapl.federation import FederatedOrchestrator

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

CLIENT_TASKS = {"0": {"sentiment"}, "1": {"shapes"}, "2": {"sentiment", "shapes"}, "3": {"sentiment", "shapes"}}
HEADS = {"head[sentiment]", "head[shapes]"}
CHECKPOINTS = ("round-000001", "round-000002", "final")


def same(a: Any, b: Any) -> bool:
    """Nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def changed(before: ComponentState, after: ComponentState) -> set[str]:
    """The components of ``before`` with a tensor that differs in ``after``."""
    return {c for c, p in before.items() if any(not torch.equal(t, after[c][k]) for k, t in p.items())}


# -- scripted visits ------------------------------------------------------------------------------------------

ENC, HEAD_A, HEAD_B = "encoder[text]", "head[a]", "head[b]"
INITIAL: ComponentState = {c: {"w": torch.full((2,), float(i))} for i, c in enumerate([ENC, HEAD_A, HEAD_B])}
#: Client 0 holds tasks a and b, client 1 task b only.
INFO = with_slices(federation(INITIAL, clients={0: ["a", "b"], 1: ["b"]}), {1: [ENC, HEAD_B]})


def scripted_visit(
    fedrep: FedRep, clients: ClientStore, client: int, received: ComponentState, training: ScriptedTraining
) -> tuple[ClientContext, ClientUpdate]:
    """A visit as the engine runs it: on a copy of the client's store, kept once the visit succeeded."""
    ctx = context(INFO, training, client, received=received, store=clients.checkout(client))
    update = fedrep.client_update(ctx)
    clients.commit(client, ctx.store)
    return ctx, update


def personalized(fedrep: FedRep, clients: ClientStore, client: int, received: ComponentState) -> ComponentState:
    """The model the engine evaluates for ``client``, which receives ``received``."""
    [model] = fedrep.models()
    store = clients.checkout(client)
    state = model.state(context(INFO, ScriptedTraining(), client, received=received, store=store, stage="evaluation"))
    assert state is not None
    return state


def test_a_scripted_visit_fits_the_heads_then_the_body_and_keeps_the_heads_in_the_clients_store() -> None:
    fedrep = FedRep(head_steps=4, body_steps=6)
    fedrep.setup(INFO)
    clients, training = ClientStore(), ScriptedTraining()
    _, update = scripted_visit(fedrep, clients, 0, clone(INITIAL), training)

    heads, body = training.fits
    assert (heads["trainable"], heads["steps"]) == ([HEAD_A, HEAD_B], 4)
    assert same(heads["state"], INITIAL)  # before its first visit: the received heads
    assert (body["trainable"], body["steps"]) == ([ENC], 6)
    # The body fit starts from the trained heads (+100) over the received body.
    trained_heads = {c: {"w": INITIAL[c]["w"] + 100} for c in (HEAD_A, HEAD_B)}
    assert same(body["state"], {ENC: INITIAL[ENC], **trained_heads})
    assert same(update.state, {ENC: {"w": INITIAL[ENC]["w"] + 200}})  # the body alone goes up
    assert same(clients.checkout(0), {"heads": select(body["state"], [HEAD_A, HEAD_B])})
    assert update.metrics == {"head_loss/a": 1.0, "head_loss/b": 10.0, "body_loss/a": 2.0, "body_loss/b": 20.0}


def test_the_personalized_model_is_the_received_body_with_the_clients_own_heads() -> None:
    fedrep = FedRep()
    fedrep.setup(INFO)
    clients = ClientStore()
    scripted_visit(fedrep, clients, 0, clone(INITIAL), ScriptedTraining())
    received = {c: {"w": torch.full((2,), -5.0)} for c in INITIAL}
    own_heads = clients.checkout(0)["heads"]
    assert same(personalized(fedrep, clients, 0, received), {ENC: received[ENC], **own_heads})
    # A client never visited holds the server's heads, which no client trains.
    client_1 = INFO.slice_of(received, 1)
    assert same(personalized(fedrep, clients, 1, client_1), client_1)
    # The next visit starts from the same model.
    training = ScriptedTraining()
    scripted_visit(fedrep, clients, 0, clone(received), training)
    assert same(training.fits[0]["state"], {ENC: received[ENC], **own_heads})


def test_non_finite_heads_fail_the_visit_and_keep_the_old_ones() -> None:
    fedrep = FedRep()
    fedrep.setup(INFO)
    clients = ClientStore()
    scripted_visit(fedrep, clients, 0, clone(INITIAL), ScriptedTraining())
    before = clients.checkout(0)
    nan_heads = ScriptedTraining(shift=lambda n, call: math.nan if n == 1 else 100.0)
    with pytest.raises(ClientStateError, match=r"non-finite.* heads/head\[a\]/w"):
        scripted_visit(fedrep, clients, 0, clone(INITIAL), nan_heads)
    assert same(clients.checkout(0), before)


def test_the_stores_round_trip_a_checkpoint_and_the_server_keeps_nothing() -> None:
    fedrep = FedRep()
    fedrep.setup(INFO)
    clients = ClientStore()
    for client in (0, 1):
        scripted_visit(fedrep, clients, client, INFO.slice_of(INITIAL, client), ScriptedTraining())
    assert fedrep.state_dict() == {}
    restored = through_checkpoint(clients)
    assert same(restored.state_dict(), clients.state_dict())
    assert set(restored.checkout(1)["heads"]) == {HEAD_B}
    for client in (0, 1):
        received = INFO.slice_of(INITIAL, client)
        assert same(personalized(fedrep, restored, client, received), personalized(fedrep, clients, client, received))


def test_settings_and_the_reported_model() -> None:
    assert (FedRep().head_steps, FedRep().body_steps) == (None, None)
    # No global model: no global or "+FT" rows, only the personalized one.
    assert [(m.key, m.label) for m in FedRep().models()] == [("personalized", "FedRep")]
    with pytest.raises(ValueError, match=r"algorithm\.head_steps"):
        FedRep(head_steps=0)
    with pytest.raises(ValueError, match=r"algorithm\.body_steps"):
        FedRep(body_steps=0)


# -- visits with the engine's local training ------------------------------------------------------------------


class RecordingTraining:
    """The engine's local training, keeping what each fit started from, was asked and returned."""

    def __init__(self, training: Any) -> None:
        self.training = training
        self.fits: list[tuple[ComponentState, dict[str, Any], FitResult]] = []

    def fit(self, client: ClientInfo, state: ComponentState, **kwargs: Any) -> FitResult:
        start = clone(state)
        result = self.training.fit(client, state, **kwargs)
        self.fits.append((start, kwargs, result))
        return result

    def evaluate(self, client: ClientInfo, state: ComponentState, split: str) -> dict[str, dict[str, float]]:
        return self.training.evaluate(client, state, split)


@pytest.fixture
def orchestrator(assets: dict[str, Path], tmp_path: Path) -> FederatedOrchestrator:
    config = tiny_config(assets, tmp_path / "run", local_steps=1)
    config["algorithm"] = {"class_path": "FedRep", "init_args": {"head_steps": 2, "body_steps": 3}}
    built = TaplCLI(args=config, run=False).orchestrator
    assert built is not None
    built.setup(check_values=False)
    return built


def visit(
    orchestrator: FederatedOrchestrator, client: int, round: int
) -> tuple[RecordingTraining, ClientContext, ClientUpdate]:
    """A visit as the engine runs it, over its local training, with its client store."""
    training = RecordingTraining(orchestrator.training)
    ctx = engine_context(orchestrator, client, round, training=training)
    update = orchestrator.algorithm.client_update(ctx)
    orchestrator.worker.store.commit(client, ctx.store)
    return training, ctx, update


def test_a_visit_trains_the_heads_alone_then_the_body_alone_and_uploads_the_body(
    orchestrator: FederatedOrchestrator,
) -> None:
    fedrep = orchestrator.algorithm
    assert isinstance(fedrep, FedRep) and (fedrep.head_steps, fedrep.body_steps) == (2, 3)
    training, ctx, update = visit(orchestrator, 2, 1)  # sentiment + shapes
    components = set(orchestrator.info.clients[2].components)
    body = components - HEADS
    assert body and components > HEADS

    (head_start, head_args, head_fit), (body_start, body_args, body_fit) = training.fits
    # First visit: the received slice, heads included.
    assert same(head_start, ctx.received)
    assert sorted(head_args["trainable"]) == sorted(HEADS) and head_fit.steps == 2
    assert changed(head_start, head_fit.state) == HEADS
    # The body fit starts from the trained heads and changes only the body.
    assert same(body_start, head_fit.state)
    assert sorted(body_args["trainable"]) == sorted(body) and body_fit.steps == 3
    assert changed(body_start, body_fit.state) == body

    assert set(update.state) == body
    assert same(update.state, select(body_fit.state, body))
    assert same(orchestrator.worker.store.checkout(2), {"heads": select(head_fit.state, HEADS)})
    for task_name in ("sentiment", "shapes"):
        assert f"head_loss/{task_name}" in update.metrics and f"body_loss/{task_name}" in update.metrics


def test_heads_stay_on_their_client_and_the_servers_heads_never_change(
    orchestrator: FederatedOrchestrator,
) -> None:
    fedrep = orchestrator.algorithm
    initial = clone(orchestrator.global_state)
    uploads = [visit(orchestrator, c, 1)[2] for c in (0, 2)]
    orchestrator.global_state = fedrep.aggregate(1, orchestrator.global_state, uploads, [])
    server_heads = sorted(c for c in initial if c.startswith("head["))
    assert same(select(orchestrator.global_state, server_heads), select(initial, server_heads))
    assert changed(initial, orchestrator.global_state) == set(orchestrator.info.clients[2].components) - HEADS

    heads_after_first = orchestrator.worker.store.checkout(2)["heads"]
    training, _, _ = visit(orchestrator, 2, 2)
    head_start = training.fits[0][0]
    # The second visit starts from the new global body and the client's own heads from its first visit.
    body = sorted(set(orchestrator.info.clients[2].components) - HEADS)
    assert same(select(head_start, body), select(orchestrator.global_state, body))
    assert same(select(head_start, sorted(HEADS)), heads_after_first)
    assert not same(heads_after_first, select(initial, sorted(HEADS)))
    # Client 0's heads (sentiment only) are its own, untouched by client 2's visits.
    heads_0, heads_2 = orchestrator.worker.store.checkout(0)["heads"], orchestrator.worker.store.checkout(2)["heads"]
    assert set(heads_0) == {"head[sentiment]"}
    assert not same(heads_0["head[sentiment]"], heads_2["head[sentiment]"])

    # Personalized: the current global body with the client's heads; a client never visited: its global slice,
    # with the server's untrained heads.
    [model] = fedrep.models()
    assert same(model.state(engine_context(orchestrator, 2)), {**select(orchestrator.global_state, body), **heads_2})
    client_1 = orchestrator.info.slice_of(orchestrator.global_state, 1)
    assert same(model.state(engine_context(orchestrator, 1)), client_1)


def test_a_non_finite_upload_fails_the_visit_and_keeps_the_old_heads(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(assets, tmp_path / "run", rounds=3, finetune_steps=0)
    config["algorithm"] = "FedRep"
    engine = TaplCLI(args=config, run=False).orchestrator
    assert engine is not None
    fit = engine.training.fit

    def nan_body_of_client_3_in_round_3(client: ClientInfo, state: ComponentState, **kwargs: Any) -> FitResult:
        result = fit(client, state, **kwargs)
        if (client.id, kwargs["round"]) == (3, 3) and "encoder[text]" in (kwargs["trainable"] or ()):
            next(iter(result.state["encoder[text]"].values())).fill_(math.nan)
        return result

    monkeypatch.setattr(engine.training, "fit", nan_body_of_client_3_in_round_3)
    engine.fit()

    rounds = records(tmp_path / "run")
    assert [r["sampled_clients"] for r in rounds] == [[1, 3], [0, 2], [1, 3]]
    assert [set(r["failed_clients"]) for r in rounds] == [set(), set(), {"3"}]
    assert "encoder[text]" in rounds[2]["failed_clients"]["3"]
    assert set(rounds[2]["train"]) == {"1"}

    def stores(checkpoint: str) -> dict[str, Any]:
        state = torch.load(tmp_path / "run" / "checkpoints" / checkpoint / "state.pt", weights_only=True)
        return state["client_store"]

    # Client 3 keeps the heads of its round-1 visit; client 1, whose round-3 visit succeeded, has new ones.
    assert same(stores("round-000003")["3"], stores("round-000001")["3"])
    assert not same(stores("round-000003")["1"], stores("round-000001")["1"])
    assert results(tmp_path / "run")["clients"]["3"]["failures"] == 1


# -- runs through the CLI -------------------------------------------------------------------------------------


def run(run_dir: Path, assets: dict[str, Path], *args: str, rounds: int = 2) -> Path:
    return fit_tiny(run_dir, assets, "--algorithm", "FedRep", *args, rounds=rounds, finetune_steps=2)


def final_state(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "final" / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_rounds(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("fedrep") / "run", assets)


def test_a_run_reports_only_the_personalized_model_for_every_client_and_task(two_rounds: Path) -> None:
    final = results(two_rounds)
    assert final["algorithm"] == "FedRep"
    assert {key: info["label"] for key, info in final["models"].items()} == {"personalized": "FedRep"}
    assert {c: set(tasks) for c, tasks in final["per_client"]["personalized"].items()} == CLIENT_TASKS
    # No global model, so no "+FT" fine-tuning either.
    assert final_state(two_rounds)["engine_store"] == {}
    records = [json.loads(line) for line in (two_rounds / "metrics.jsonl").read_text().splitlines()]
    visited = {str(c) for r in records for c in r["sampled_clients"]}
    stores = final_state(two_rounds)["client_store"]
    assert set(stores) == visited
    for client, store in stores.items():
        assert set(store["heads"]) == {f"head[{task}]" for task in CLIENT_TASKS[client]}
    assert final_state(two_rounds)["algorithm"] == {}
    # No client uploads a head: the server's heads are the same after every round.
    servers = [load_file(two_rounds / "checkpoints" / name / "server.safetensors") for name in CHECKPOINTS]
    for key in (k for k in servers[0] if k.startswith("head[")):
        assert all(torch.equal(server[key], servers[0][key]) for server in servers[1:]), key


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
