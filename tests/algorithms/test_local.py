"""Tests for tapl.algorithms.local: each client continues its own model kept in its store, nothing goes down or
up, nothing is aggregated, only local models are reported, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fit_tiny
from helpers import read_records as records
from helpers import read_results as results
from safetensors.torch import load_file
from scripted import ScriptedTraining, context, engine_context, federation, through_checkpoint, with_slices

from tapl.algorithms import ClientContext, ClientUpdate, Failure, Local
from tapl.components import ComponentState, clone, flatten, select
from tapl.engine.client_store import ClientStateError, ClientStore
from tapl.federation import FederatedOrchestrator

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

ENC, HEAD_A, HEAD_B = "encoder[text]", "head[a]", "head[b]"
INITIAL: ComponentState = {c: {"w": torch.full((2,), float(i))} for i, c in enumerate([ENC, HEAD_A, HEAD_B])}
#: Clients 0, 1 and 3 hold task a, client 5 task b.
INFO = with_slices(
    federation(INITIAL, clients={0: ["a"], 1: ["a"], 3: ["a"], 5: ["b"]}),
    {0: [ENC, HEAD_A], 1: [ENC, HEAD_A], 3: [ENC, HEAD_A], 5: [ENC, HEAD_B]},
)
#: A global model unlike the initial one: Local must never train or report it.
GLOBAL: ComponentState = {c: {"w": torch.full((2,), -100.0)} for c in INITIAL}


# -- scripted visits ------------------------------------------------------------------------------------------------


def make_local() -> Local:
    local = Local()
    local.setup(INFO)
    return local


def visit(
    local: Local, clients: ClientStore, client: int, round: int, fit_value: float | None = None
) -> tuple[ScriptedTraining, ClientContext, ClientUpdate]:
    """A visit as the engine runs it, whose fit returns its input plus ``10 * round + client`` (so every tensor tells
    who trained it), or ``fit_value`` everywhere when given; the client's store is kept if the visit succeeds."""
    training = ScriptedTraining(
        shift=lambda n, call: 10.0 * call["round"] + call["client"] if fit_value is None else fit_value,
        losses=lambda n, call: {"a": 0.5},
    )
    [instruction] = local.configure_round(round, [client], GLOBAL)
    ctx = context(INFO, training, client, round, received=instruction.state, store=clients.checkout(client))
    update = local.client_update(ctx)
    clients.commit(client, ctx.store)
    return training, ctx, update


def personalized(local: Local, clients: ClientStore, client: int) -> ComponentState | None:
    """The model the engine evaluates for ``client``: the client's slice of the global model is received."""
    [model] = local.models()
    received = INFO.slice_of(GLOBAL, client)
    ctx = context(
        INFO, ScriptedTraining(), client, received=received, store=clients.checkout(client), stage="evaluation"
    )
    return model.state(ctx)


def same(a: ComponentState, b: ComponentState) -> bool:
    return a.keys() == b.keys() and all(
        a[c].keys() == b[c].keys() and all(torch.equal(a[c][k], b[c][k]) for k in a[c]) for c in a
    )


def plus(state: ComponentState, value: float) -> ComponentState:
    return {c: {k: t + value for k, t in p.items()} for c, p in state.items()}


def test_a_round_sends_nothing_down() -> None:
    instructions = make_local().configure_round(4, [3, 0], GLOBAL)
    assert [(i.client, i.state, i.config) for i in instructions] == [(3, {}, {}), (0, {}, {})]


def test_a_first_visit_trains_the_clients_slice_of_the_initial_model_and_uploads_nothing() -> None:
    local, clients = make_local(), ClientStore()
    training, _, update = visit(local, clients, client=0, round=1)
    assert len(training.fits) == 1
    assert same(training.fits[0]["state"], select(INITIAL, [ENC, HEAD_A]))
    assert update.state == {}
    assert (update.client, update.num_samples, update.metrics) == (0, 10, {"train_loss/a": 0.5})
    assert same(clients.checkout(0)["model"], plus(select(INITIAL, [ENC, HEAD_A]), 10.0))
    assert same(personalized(local, clients, 0), plus(select(INITIAL, [ENC, HEAD_A]), 10.0))


def test_each_visit_continues_the_clients_own_model_and_no_one_elses() -> None:
    local, clients = make_local(), ClientStore()
    slice_ = select(INITIAL, [ENC, HEAD_A])
    visit(local, clients, client=0, round=1)
    visit(local, clients, client=1, round=2)
    training0, _, _ = visit(local, clients, client=0, round=3)
    training1, _, _ = visit(local, clients, client=1, round=4)
    assert same(training0.fits[0]["state"], plus(slice_, 10.0))  # client 0's round-1 model, not client 1's
    assert same(training1.fits[0]["state"], plus(slice_, 21.0))
    assert same(personalized(local, clients, 0), plus(slice_, 10.0 + 30.0))
    assert same(personalized(local, clients, 1), plus(slice_, 21.0 + 41.0))


def test_a_never_visited_client_is_evaluated_with_its_initial_slice() -> None:
    local, clients = make_local(), ClientStore()
    visit(local, clients, client=0, round=1)
    assert same(personalized(local, clients, 5), select(INITIAL, [ENC, HEAD_B]))


def test_aggregation_returns_the_global_state_unchanged() -> None:
    local = make_local()
    global_state = clone(INITIAL)
    _, _, update = visit(local, ClientStore(), client=0, round=1)
    assert local.aggregate(1, global_state, [update], [Failure(3, "RuntimeError: boom")]) is global_state
    assert same(global_state, INITIAL)


def test_a_visit_that_trains_to_nan_fails_and_keeps_the_clients_model() -> None:
    local, clients = make_local(), ClientStore()
    visit(local, clients, client=0, round=1)
    with pytest.raises(ClientStateError, match=r"non-finite.* model/encoder\[text\]/w"):
        visit(local, clients, client=0, round=2, fit_value=float("nan"))
    assert same(personalized(local, clients, 0), plus(select(INITIAL, [ENC, HEAD_A]), 10.0))


def test_the_stores_round_trip_a_checkpoint_and_the_server_keeps_nothing() -> None:
    local, clients = make_local(), ClientStore()
    visit(local, clients, client=0, round=1)
    visit(local, clients, client=3, round=1)
    assert local.state_dict() == {}
    restored = through_checkpoint(clients)
    for client in (0, 3, 5):
        assert same(personalized(local, restored, client), personalized(local, clients, client))


def test_local_reports_only_the_local_models() -> None:
    [model] = Local().models()
    assert (model.key, model.label) == ("personalized", "Local")
    assert "initial" in model.description


# -- through the CLI --------------------------------------------------------------------------------------------

CLIENT_TASKS = {"0": ["sentiment"], "1": ["shapes"], "2": ["sentiment", "shapes"], "3": ["sentiment", "shapes"]}
ROUNDS = 3  # seed 0 samples clients [1, 3], [0, 2], [1, 3]: clients 1 and 3 train twice


def run(run_dir: Path, assets: dict[str, Path], rounds: int, *args: str) -> Path:
    return fit_tiny(run_dir, assets, "--algorithm", "Local", *args, rounds=rounds, finetune_steps=2)


def checkpoint_state(run_dir: Path, checkpoint: str) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / checkpoint / "state.pt", weights_only=True)


def local_models(run_dir: Path, checkpoint: str) -> dict[str, ComponentState]:
    """Each client's local model in the checkpoint's client stores."""
    return {client: store["model"] for client, store in checkpoint_state(run_dir, checkpoint)["client_store"].items()}


def server_state(run_dir: Path, checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / checkpoint / "server.safetensors")


def same_flat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class LocalRun:
    """A finished run, the engine that ran it and its global state when ``fit`` began."""

    run_dir: Path
    orchestrator: FederatedOrchestrator
    initial: ComponentState


@pytest.fixture(scope="module")
def local_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    started: list[tuple[FederatedOrchestrator, ComponentState]] = []
    fit = FederatedOrchestrator.fit

    def recording_fit(self: FederatedOrchestrator, ckpt_path: str | None = None) -> dict[str, Any]:
        started.append((self, clone(self.global_state)))
        return fit(self, ckpt_path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FederatedOrchestrator, "fit", recording_fit)
        run_dir = run(tmp_path_factory.mktemp("local") / "run", assets, ROUNDS)
    [(orchestrator, initial)] = started
    return LocalRun(run_dir, orchestrator, initial)


def test_the_global_model_never_changes(local_run: LocalRun) -> None:
    initial = flatten(local_run.initial)
    for checkpoint in [f"round-{r:06d}" for r in range(1, ROUNDS + 1)] + ["final"]:
        assert same_flat(server_state(local_run.run_dir, checkpoint), initial), checkpoint


def test_nothing_is_uploaded_or_downloaded(local_run: LocalRun) -> None:
    rounds = records(local_run.run_dir)
    assert [r["sampled_clients"] for r in rounds] == [[1, 3], [0, 2], [1, 3]]
    for record in rounds:
        assert record["bytes_up"] == 0 and record["bytes_down"] == 0
        assert record["failed_clients"] == {}
        assert set(record["train"]) == {str(c) for c in record["sampled_clients"]}
        for client, metrics in record["train"].items():
            assert set(metrics) == {f"train_loss/{task}" for task in CLIENT_TASKS[client]}


def test_results_report_only_the_local_models(local_run: LocalRun) -> None:
    final = results(local_run.run_dir)
    assert final["algorithm"] == "Local"
    assert set(final["models"]) == {"personalized"}
    assert final["models"]["personalized"]["label"] == "Local"
    assert set(final["per_client"]) == set(final["summary"]) == {"personalized"}
    assert set(final["per_client"]["personalized"]) == {"0", "1", "2", "3"}
    assert "| Local |" in (local_run.run_dir / "results.md").read_text()
    # No global model, so no fine-tuned "+FT" model after the rounds either.
    assert all("finetune_loss" not in r for r in records(local_run.run_dir, "post_federation.jsonl"))


def test_a_local_model_after_two_visits_continues_its_own_training(local_run: LocalRun) -> None:
    engine = local_run.orchestrator

    def initial(client: int) -> ComponentState:
        return engine.info.slice_of(local_run.initial, client)

    def fit(client: int, round: int, state: ComponentState) -> ComponentState:
        """The client's fit of ``round`` (the engine's visit seeds), started from ``state``."""
        return engine_context(engine, client, round, received={}, store={}).fit(state).state

    saved = local_models(local_run.run_dir, f"round-{ROUNDS:06d}")
    assert set(saved) == {"0", "1", "2", "3"}
    # Client 3 trained in rounds 1 and 3; client 2, with the same slice, in round 2 only.
    expected = fit(3, 3, fit(3, 1, initial(3)))
    assert same(saved["3"], expected)
    assert same(saved["2"], fit(2, 2, initial(2)))
    # The check tells apart restarting from the initial slice and continuing client 2's model.
    assert not same(expected, fit(3, 3, initial(3)))
    assert not same(expected, fit(3, 3, saved["2"]))


def test_resume_from_two_rounds_to_three_equals_the_uninterrupted_run(
    assets: dict[str, Path], tmp_path: Path, local_run: LocalRun
) -> None:
    uninterrupted_dir = local_run.run_dir
    run_dir = run(tmp_path / "run", assets, 2)
    assert set(local_models(run_dir, "final")) == {"0", "1", "2", "3"}
    run(run_dir, assets, ROUNDS, "--ckpt_path", "last")

    for checkpoint in (f"round-{ROUNDS:06d}", "final"):
        assert same_flat(server_state(run_dir, checkpoint), server_state(uninterrupted_dir, checkpoint))
        assert checkpoint_state(run_dir, checkpoint)["algorithm"] == {}
        resumed = checkpoint_state(run_dir, checkpoint)["client_store"]
        uninterrupted = checkpoint_state(uninterrupted_dir, checkpoint)["client_store"]
        assert resumed.keys() == uninterrupted.keys()
        for client, store in uninterrupted.items():
            assert resumed[client].keys() == store.keys() == {"model"}
            assert same(resumed[client]["model"], store["model"]), (checkpoint, client)
    assert records(run_dir) == records(uninterrupted_dir)
    assert records(run_dir, "post_federation.jsonl") == records(uninterrupted_dir, "post_federation.jsonl")
    assert results(run_dir) == results(uninterrupted_dir)
