"""Tests for tapl.algorithms.fedavg: masked weighted averaging, what a round sends and a visit uploads, the models
it reports, and the server -> client -> server round trip through the engine."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from scripted import ScriptedTraining, context, federation, with_slices

from tapl.algorithms import Algorithm, ClientContext, ClientUpdate, Failure, FedAvg
from tapl.cli import TaplCLI
from tapl.components import ComponentState, clone
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.models.foundation import FoundationModel

ENC, HEAD_A, HEAD_B, HEAD_C = "encoder[text]", "head[a]", "head[b]", "head[c]"


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture
def global_state() -> ComponentState:
    return {
        ENC: {"w": _t(0.0, 0.0)},
        HEAD_A: {"w": _t(-1.0)},
        HEAD_B: {"w": _t(-2.0)},
        HEAD_C: {"w": _t(9.0)},
    }


@pytest.fixture
def updates() -> list[ClientUpdate]:
    """Client 0 holds {enc, head[a]} with 10 samples, client 1 {enc, head[b]} with 30, client 2 {enc} with 60."""
    return [
        ClientUpdate(0, {ENC: {"w": _t(1.0, 10.0)}, HEAD_A: {"w": _t(4.0)}}, num_samples=10),
        ClientUpdate(1, {ENC: {"w": _t(2.0, 20.0)}, HEAD_B: {"w": _t(6.0)}}, num_samples=30),
        ClientUpdate(2, {ENC: {"w": _t(3.0, 30.0)}}, num_samples=60),
    ]


def _assert_equal(actual: ComponentState, expected: ComponentState, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for component, params in expected.items():
        assert actual[component].keys() == params.keys(), f"{what}: {component}"
        for key, tensor in params.items():
            assert torch.equal(actual[component][key], tensor), f"{what}: {component}/{key} changed"


def test_fedavg_weights_clients_by_training_samples(global_state: ComponentState, updates: list) -> None:
    result = FedAvg().aggregate(1, global_state, updates, [])
    # (10 * [1, 10] + 30 * [2, 20] + 60 * [3, 30]) / 100
    torch.testing.assert_close(result[ENC]["w"], _t(2.5, 25.0))
    torch.testing.assert_close(result[HEAD_A]["w"], _t(4.0))  # its only holder, renormalised to weight 1
    torch.testing.assert_close(result[HEAD_B]["w"], _t(6.0))
    torch.testing.assert_close(result[HEAD_C]["w"], _t(9.0))  # held by no sampled client: unchanged


def test_fedavg_uniform_weighting_ignores_sample_counts(global_state: ComponentState, updates: list) -> None:
    result = FedAvg(weighting="uniform").aggregate(1, global_state, updates, [])
    torch.testing.assert_close(result[ENC]["w"], _t(2.0, 20.0))
    torch.testing.assert_close(result[HEAD_A]["w"], _t(4.0))
    torch.testing.assert_close(result[HEAD_B]["w"], _t(6.0))
    torch.testing.assert_close(result[HEAD_C]["w"], _t(9.0))


def test_fedavg_averages_heads_only_over_their_holders(global_state: ComponentState) -> None:
    updates = [
        ClientUpdate(0, {ENC: {"w": _t(0.0, 0.0)}, HEAD_A: {"w": _t(2.0)}}, num_samples=1),
        ClientUpdate(1, {HEAD_A: {"w": _t(8.0)}, HEAD_B: {"w": _t(5.0)}}, num_samples=3),
        ClientUpdate(2, {ENC: {"w": _t(4.0, 8.0)}}, num_samples=1),
    ]
    result = FedAvg().aggregate(1, global_state, updates, [])
    torch.testing.assert_close(result[ENC]["w"], _t(2.0, 4.0))  # clients 0 and 2, one sample each
    torch.testing.assert_close(result[HEAD_A]["w"], _t((1 * 2.0 + 3 * 8.0) / 4))  # clients 0 and 1
    torch.testing.assert_close(result[HEAD_B]["w"], _t(5.0))


def test_fedavg_averages_the_results_alone_whatever_failed(global_state: ComponentState, updates: list) -> None:
    # A failed visit uploaded nothing usable: it neither counts in the weights nor moves a component it held.
    failures = [Failure(3, "FloatingPointError: upload holds NaN"), Failure(4, "RuntimeError: out of memory")]
    with_failures = FedAvg().aggregate(1, global_state, updates, failures)
    _assert_equal(with_failures, FedAvg().aggregate(1, global_state, updates, []), "with failures")
    torch.testing.assert_close(with_failures[ENC]["w"], _t(2.5, 25.0))


def test_fedavg_does_not_modify_the_global_state(global_state: ComponentState, updates: list) -> None:
    before = clone(global_state)
    FedAvg().aggregate(1, global_state, updates, [])
    for component, params in before.items():
        assert torch.equal(global_state[component]["w"], params["w"])


def test_fedavg_rejects_an_unknown_weighting() -> None:
    with pytest.raises(ValueError, match=r"algorithm\.weighting .*'by_loss'"):
        FedAvg(weighting="by_loss")  # type: ignore[arg-type]


# -- a round's instructions and a visit, scripted ---------------------------------------------------------------


def test_a_round_sends_each_sampled_client_a_copy_of_its_slice(global_state: ComponentState) -> None:
    info = federation(global_state, clients={0: ["a"], 1: ["b"], 2: ["a", "b"]})
    info = with_slices(info, {0: [ENC, HEAD_A], 1: [ENC, HEAD_B], 2: [ENC]})
    fedavg = FedAvg()
    fedavg.setup(info)
    instructions = fedavg.configure_round(1, [2, 0], global_state)

    assert [i.client for i in instructions] == [2, 0]  # the sampled clients, in the engine's order
    _assert_equal(instructions[0].state, {ENC: global_state[ENC]}, "client 2's slice")
    _assert_equal(instructions[1].state, {ENC: global_state[ENC], HEAD_A: global_state[HEAD_A]}, "client 0's slice")
    assert all(i.config == {} for i in instructions)
    # Each client gets its own copy: a visit that trains in place cannot change the server's model.
    instructions[1].state[ENC]["w"].add_(1.0)
    assert torch.equal(global_state[ENC]["w"], _t(0.0, 0.0))
    assert not torch.equal(instructions[0].state[ENC]["w"], instructions[1].state[ENC]["w"])


def test_a_visit_trains_the_received_slice_with_the_federation_settings_and_uploads_it(
    global_state: ComponentState,
) -> None:
    info = federation(global_state)
    fedavg = FedAvg()
    fedavg.setup(info)
    training = ScriptedTraining()
    received = {c: {k: t + 0.5 for k, t in p.items()} for c, p in global_state.items()}
    ctx = context(info, training, client=1, round=3, received=clone(received))
    update = fedavg.client_update(ctx)

    [fit] = training.fits
    _assert_equal(fit["state"], received, "the fitted state")
    # No setting of its own: local_steps, the configured optimizer and learning rate, the task loss.
    settings = ("steps", "lr", "objective", "optimizer", "trainable", "trainer_overrides")
    assert {name: fit[name] for name in settings} == dict.fromkeys(settings)
    assert fit["round"] == 3
    assert (update.client, update.num_samples) == (1, 10)
    _assert_equal(update.state, {c: {k: t + 100 for k, t in p.items()} for c, p in received.items()}, "upload")
    assert update.metrics == {"train_loss/a": 1.0, "train_loss/b": 10.0}
    assert update.events == []
    assert ctx.store == {}  # FedAvg keeps nothing on the client


def test_fedavg_reports_the_global_slice_as_both_its_global_and_personalized_model(
    global_state: ComponentState,
) -> None:
    fedavg = FedAvg()
    models = fedavg.models()
    assert [(m.key, m.label) for m in models] == [("global", "FedAvg"), ("personalized", "FedAvg (personalized)")]
    ctx = context(federation(global_state), ScriptedTraining(), stage="evaluation")
    # The very same state: the engine evaluates it once and reports it under both keys.
    assert all(m.state(ctx) is ctx.received for m in models)
    assert fedavg.state_dict() == {}


# -- through the orchestrator ----------------------------------------------------------------------------------


def _orchestrator(
    assets: dict[str, Path],
    run_dir: Path,
    algorithm: Callable[[FoundationModel], Algorithm] = lambda model: FedAvg(),
    clients: list | None = None,
    random_start: bool = False,
    **federation: object,
) -> FederatedOrchestrator:
    """A federation of the tiny config, built by the CLI and driven by ``algorithm(model)`` (default: FedAvg).

    With ``random_start`` every trainable tensor starts from distinct non-zero values (fresh LoRA B matrices
    are zero, which would hide a tensor that a transfer skipped).
    """
    config = tiny_config(assets, run_dir, **federation)
    if clients is not None:
        config["data"]["clients"] = clients
    built = TaplCLI(args=config, run=False).orchestrator
    assert built is not None
    if random_start:
        generator = torch.Generator().manual_seed(0)
        shapes = built.model.component_shapes()
        built.model.load_state(
            {c: {k: torch.randn(s, generator=generator) for k, s in params.items()} for c, params in shapes.items()}
        )
    return FederatedOrchestrator(
        model=built.model,
        data=built.data,
        algorithm=algorithm(built.model),
        federation=FederationConfig(**config["federation"]),
        run_dir=str(run_dir),
        trainer=config["trainer"],
    )


class _EchoSlice(FedAvg):
    """Passes the received slice through the client's model with a fit that cannot move it (lr 0) and uploads
    what the fit returns."""

    def __init__(self, model: FoundationModel) -> None:
        super().__init__()
        self.model = model
        self.received: dict[int, ComponentState] = {}
        self.uploaded: dict[int, ComponentState] = {}

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        with torch.no_grad():
            for parameter in self.model.parameters_of(ctx.components):
                parameter.zero_()  # so a tensor the transfer skipped would show
        state = ctx.fit(ctx.received, lr=0.0).state
        self.received[ctx.client.id] = clone(ctx.received)
        self.uploaded[ctx.client.id] = clone(state)
        return ClientUpdate(ctx.client.id, state, ctx.num_train_samples)


@pytest.fixture(autouse=True)
def _no_cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])


def test_every_component_round_trips_server_client_server(assets: dict[str, Path], tmp_path: Path) -> None:
    orchestrator = _orchestrator(assets, tmp_path / "run", _EchoSlice, random_start=True, rounds=1, clients_per_round=4)
    algorithm = orchestrator.algorithm
    assert isinstance(algorithm, _EchoSlice)
    start = clone(orchestrator.global_state)
    assert all(t.abs().min() > 0 for params in start.values() for t in params.values())

    orchestrator.fit()

    model = orchestrator.model
    assert sorted(algorithm.uploaded) == [c.id for c in orchestrator.data.clients]
    for client in orchestrator.data.clients:
        expected = {c: start[c] for c in model.components_for(client.tasks)}
        _assert_equal(algorithm.received[client.id], expected, f"server -> client {client.id}")
        _assert_equal(algorithm.uploaded[client.id], expected, f"client {client.id} model -> upload")
    _assert_equal(orchestrator.global_state, start, "server after aggregation")


def test_fedavg_round_changes_only_components_of_sampled_clients(assets: dict[str, Path], tmp_path: Path) -> None:
    # Two clients with disjoint slices and one sampled per round: whichever it is, half the model is not held.
    clients = [{"tasks": ["sentiment"]}, {"tasks": ["shapes"]}]
    orchestrator = _orchestrator(assets, tmp_path / "run", clients=clients, rounds=1, clients_per_round=1)
    start = clone(orchestrator.global_state)

    orchestrator.fit()

    [sampled] = orchestrator.sample_clients(1)
    held = set(orchestrator.info.clients[sampled].components)
    assert held and held != set(start)
    for component, params in start.items():
        changed = any(not torch.equal(orchestrator.global_state[component][k], t) for k, t in params.items())
        assert changed == (component in held), (
            f"{component}: changed={changed}, held by the sampled client={component in held}"
        )
