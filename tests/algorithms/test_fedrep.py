"""Tests for FedRep: heads trained alone then the body alone, bodies uploaded and averaged, local heads, runs."""

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
from safetensors.torch import load_file

from tapl.algorithms import FedRep
from tapl.cli import TaplCLI
from tapl.components import ComponentState, clone, select
from tapl.context import ClientContext, FitResult
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


class RecordingVisit(ClientContext):
    """A real visit that keeps what each fit started from, trained and returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fits: list[tuple[ComponentState, dict[str, Any], FitResult]] = []

    def fit(self, state: ComponentState, **kwargs: Any) -> FitResult:
        start = clone(state)
        result = super().fit(state, **kwargs)
        self.fits.append((start, kwargs, result))
        return result


@pytest.fixture
def orchestrator(assets: dict[str, Path], tmp_path: Path) -> FederatedOrchestrator:
    config = tiny_config(assets, tmp_path / "run", local_steps=1)
    config["algorithm"] = {"class_path": "FedRep", "init_args": {"head_steps": 2, "body_steps": 3}}
    built = TaplCLI(args=config, run=False).orchestrator
    assert built is not None
    built.data.setup()
    built.algorithm.setup(built)
    return built


def visit(orchestrator: FederatedOrchestrator, client: int, round: int) -> RecordingVisit:
    ctx = RecordingVisit(
        orchestrator,
        orchestrator.client(client),
        round,
        clone(select(orchestrator.global_state, orchestrator.slices[client])),
    )
    ctx.update = orchestrator.algorithm.client_update(ctx)  # type: ignore[attr-defined]
    return ctx


def test_a_visit_trains_the_heads_alone_then_the_body_alone_and_uploads_the_body(
    orchestrator: FederatedOrchestrator,
) -> None:
    fedrep = orchestrator.algorithm
    assert isinstance(fedrep, FedRep) and (fedrep.head_steps, fedrep.body_steps) == (2, 3)
    ctx = visit(orchestrator, 2, 1)  # sentiment + shapes
    components = set(orchestrator.slices[2])
    body = components - HEADS
    assert body and components > HEADS

    (head_start, head_args, head_fit), (body_start, body_args, body_fit) = ctx.fits
    # First visit: the received slice, heads included.
    assert same(head_start, ctx.global_state)
    assert sorted(head_args["trainable"]) == sorted(HEADS) and head_fit.steps == 2
    assert changed(head_start, head_fit.state) == HEADS
    # The body fit starts from the trained heads and changes only the body.
    assert same(body_start, head_fit.state)
    assert sorted(body_args["trainable"]) == sorted(body) and body_fit.steps == 3
    assert changed(body_start, body_fit.state) == body

    update = ctx.update  # type: ignore[attr-defined]
    assert set(update.state) == body
    assert same(update.state, select(body_fit.state, body))
    assert same(fedrep.heads[2], select(head_fit.state, HEADS))
    for task in ("sentiment", "shapes"):
        assert f"head_loss/{task}" in update.metrics and f"body_loss/{task}" in update.metrics


def test_heads_stay_on_their_client_and_the_servers_heads_never_change(
    orchestrator: FederatedOrchestrator,
) -> None:
    fedrep = orchestrator.algorithm
    initial = clone(orchestrator.global_state)
    first = [visit(orchestrator, c, 1) for c in (0, 2)]
    uploads = [v.update for v in first]  # type: ignore[attr-defined]
    orchestrator.global_state = fedrep.aggregate(1, orchestrator.global_state, uploads)
    server_heads = sorted(c for c in initial if c.startswith("head["))
    assert same(select(orchestrator.global_state, server_heads), select(initial, server_heads))
    assert changed(initial, orchestrator.global_state) == set(orchestrator.slices[2]) - HEADS

    heads_after_first = clone(fedrep.heads[2])
    second = visit(orchestrator, 2, 2)
    head_start = second.fits[0][0]
    # The second visit starts from the new global body and the client's own heads from its first visit.
    body = sorted(set(orchestrator.slices[2]) - HEADS)
    assert same(select(head_start, body), select(orchestrator.global_state, body))
    assert same(select(head_start, sorted(HEADS)), heads_after_first)
    assert not same(heads_after_first, select(initial, sorted(HEADS)))
    # Client 0's heads (sentiment only) are its own, untouched by client 2's visit.
    assert set(fedrep.heads[0]) == {"head[sentiment]"}
    assert not same(fedrep.heads[0]["head[sentiment]"], fedrep.heads[2]["head[sentiment]"])

    # Personalized: the current global body with the client's heads; a client never visited: the global slice.
    global_slice = clone(select(orchestrator.global_state, orchestrator.slices[2]))
    personalized = fedrep.personalized_state(2, global_slice)
    assert same(personalized, {**select(global_slice, body), **fedrep.heads[2]})
    assert fedrep.personalized_state(1, global_slice) is None


def test_a_non_finite_result_fails_the_visit_and_keeps_the_old_heads(
    orchestrator: FederatedOrchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fedrep = orchestrator.algorithm
    visit(orchestrator, 0, 1)
    before = clone(fedrep.heads[0])
    original = RecordingVisit.fit

    def nan_body_fit(self: RecordingVisit, state: ComponentState, **kwargs: Any) -> FitResult:
        result = original(self, state, **kwargs)
        if len(self.fits) == 2:
            next(iter(result.state["encoder[text]"].values())).fill_(math.nan)
        return result

    monkeypatch.setattr(RecordingVisit, "fit", nan_body_fit)
    with pytest.raises(FloatingPointError, match=r"encoder\[text\]"):
        visit(orchestrator, 0, 2)
    assert same(fedrep.heads[0], before)


def test_state_dict_round_trip_and_settings() -> None:
    heads = {3: {"head[a]": {"w": torch.tensor([1.0, 2.0])}}}
    fedrep = FedRep()
    fedrep.heads = {3: clone(heads[3])}
    restored = FedRep()
    restored.load_state_dict(fedrep.state_dict())
    assert same(restored.heads, heads)
    assert (FedRep().head_steps, FedRep().body_steps) == (None, None)
    assert FedRep.has_global_model is False
    with pytest.raises(ValueError, match=r"algorithm\.head_steps"):
        FedRep(head_steps=0)
    with pytest.raises(ValueError, match=r"algorithm\.body_steps"):
        FedRep(body_steps=0)


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
    assert final_state(two_rounds)["post_federation"]["finetuned"] == {}
    records = [json.loads(line) for line in (two_rounds / "metrics.jsonl").read_text().splitlines()]
    visited = {str(c) for r in records for c in r["sampled_clients"]}
    heads = final_state(two_rounds)["algorithm"]["heads"]
    assert set(heads) == visited
    for client, state in heads.items():
        assert set(state) == {f"head[{task}]" for task in CLIENT_TASKS[client]}
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
    assert same(final_state(resumed)["algorithm"], final_state(straight)["algorithm"])
    assert results(resumed) == results(straight)
