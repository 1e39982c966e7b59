"""The engine's rooms and callbacks: the client store, engine callbacks with state, and user-named loggers."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import fit_tiny, read_results, tiny_config

from tapl.algorithms import ClientContext, ClientUpdate, FedAvg
from tapl.cli import TaplCLI
from tapl.engine.callbacks import Engine, EngineCallback
from tapl.engine.client_store import ClientStateError, ClientStore
from tapl.engine.clients import STORES_ON_NODES
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.run_dir import RunDirectory, RunDirError

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


# -- the client store -----------------------------------------------------------------------------------------


def test_a_checked_out_store_is_a_copy_kept_only_when_committed() -> None:
    store = ClientStore()
    assert store.checkout(3) == {}
    work = store.checkout(3)
    work["personal"] = {"c": {"w": torch.ones(2)}}
    assert 3 not in store  # nothing kept before the commit
    store.commit(3, work)
    again = store.checkout(3)
    again["personal"]["c"]["w"].add_(5)  # a later visit changing its copy in place
    assert torch.equal(store.checkout(3)["personal"]["c"]["w"], torch.ones(2))


def test_a_store_with_non_finite_tensors_is_refused_and_the_previous_one_kept() -> None:
    store = ClientStore()
    store.commit(0, {"personal": {"c": {"w": torch.zeros(2)}}, "losses": {"a": math.inf}})
    with pytest.raises(ClientStateError, match=r"in personal/c/w$"):
        store.commit(0, {"personal": {"c": {"w": torch.tensor([0.0, math.nan])}}})
    assert torch.equal(store.checkout(0)["personal"]["c"]["w"], torch.zeros(2))


def test_the_store_round_trips_through_its_state_dict() -> None:
    store = ClientStore()
    store.commit(2, {"heads": {"h": {"w": torch.arange(3.0)}}, "lam": 0.5})
    restored = ClientStore()
    restored.load_state_dict(store.state_dict())
    assert list(restored) == [2]
    assert restored.checkout(2)["lam"] == 0.5
    assert torch.equal(restored.checkout(2)["heads"]["h"]["w"], torch.arange(3.0))


class CountingVisits(FedAvg):
    """FedAvg whose clients count their successful visits in their store; client 0 fails in round 2."""

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        ctx.store["visits"] = ctx.store.get("visits", 0) + 1
        if ctx.client.id == 0 and ctx.round == 2:
            raise RuntimeError("client 0 fails after changing its store")
        return super().client_update(ctx)


def test_a_failed_visit_leaves_the_clients_store_unchanged(assets: dict[str, Path], tmp_path: Path) -> None:
    run_dir = fit_tiny(
        tmp_path / "run", assets, "--algorithm", f"{__name__}.CountingVisits", rounds=3, clients_per_round=4
    )
    _, payload = RunDirectory(run_dir).load_checkpoint(RunDirectory(run_dir).resolve_checkpoint("last"))
    stores = payload["client_store"]
    records = read_results(run_dir)["clients"]
    assert records["0"]["failures"] == 1
    for client, record in records.items():
        assert stores[client]["visits"] == record["visits"] - record["failures"]


# -- engine callbacks -----------------------------------------------------------------------------------------


class Recorder(EngineCallback):
    """Records the hooks fired and counts rounds in its state."""

    def __init__(self) -> None:
        self.hooks: list[str] = []
        self.rounds = 0
        self.loaded: dict[str, Any] | None = None

    def on_fit_start(self, engine: Engine) -> None:
        self.hooks.append("fit_start")

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self.rounds += 1
        self.hooks.append(f"round_end {record['round']}")

    def on_post_federation_end(self, engine: Engine) -> None:
        self.hooks.append("post_federation_end")

    def on_fit_end(self, engine: Engine, results: dict[str, Any]) -> None:
        self.hooks.append(f"fit_end {results['round']}")

    def teardown(self, engine: Engine) -> None:
        self.hooks.append("teardown")

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state
        self.rounds = state["rounds"]


def orchestrator(config: dict[str, Any], run_dir: Path, callback: EngineCallback, rounds: int) -> FederatedOrchestrator:
    built = TaplCLI(args=config, run=False).orchestrator
    assert built is not None
    federation = FederationConfig(**{**vars(built.config), "rounds": rounds})
    return FederatedOrchestrator(
        built.model, built.data, FedAvg(), federation, str(run_dir), trainer=config["trainer"], callbacks=[callback]
    )


def test_engine_callbacks_fire_in_order_and_resume_with_their_state(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    run_dir = tmp_path / "run"
    config = tiny_config(assets, run_dir)
    first = Recorder()
    orchestrator(config, run_dir, first, rounds=2).fit()
    assert first.hooks == ["fit_start", "round_end 1", "round_end 2", "post_federation_end", "fit_end 2", "teardown"]
    _, payload = RunDirectory(run_dir).load_checkpoint(run_dir / "checkpoints" / "round-000002")
    assert payload["callbacks"]["Recorder"] == {"rounds": 2}

    resumed = Recorder()
    orchestrator(config, run_dir, resumed, rounds=3).fit(ckpt_path=str(run_dir / "checkpoints" / "round-000002"))
    assert resumed.loaded == {"rounds": 2}
    assert resumed.rounds == 3 and resumed.hooks[:2] == ["fit_start", "round_end 3"]


def test_a_user_named_lightning_logger_replaces_tensorboard(assets: dict[str, Path], tmp_path: Path) -> None:
    logs = tmp_path / "csv"
    run_dir = fit_tiny(
        tmp_path / "run",
        assets,
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(logs),
    )
    assert not (run_dir / "tensorboard").exists()
    (metrics,) = logs.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert {"comm/bytes_up", "global/sentiment/accuracy"} <= set(rows[0])
    assert sorted({int(r["step"]) for r in rows}) == [1, 2]


def test_every_piece_of_client_work_goes_through_the_client_worker(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round loop hands a client only what it receives and gets back only what it reports: the seam a
    distributed runtime replaces."""
    monkeypatch.setattr(sys, "argv", ["tapl"])
    run_dir = tmp_path / "run"
    engine = orchestrator(tiny_config(assets, run_dir, eval_every=2), run_dir, Recorder(), rounds=2)
    engine.setup()
    calls: list[tuple[str, int]] = []
    worker = engine.worker
    for name in ("visit", "evaluate", "post_federation"):
        method = getattr(worker, name)

        def recording(*args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
            client = args[1].client if _name == "visit" else args[0]
            calls.append((_name, client))
            return _method(*args, **kwargs)

        monkeypatch.setattr(worker, name, recording)
    monkeypatch.setattr(engine, "setup", lambda check_values=True: None)  # keep the recording worker
    engine.fit()
    records = [r for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r]
    assert len(records) == 2
    visits = [c for name, c in calls if name == "visit"]
    assert len(visits) == 2 * 2  # two rounds of two sampled clients
    # Evaluation after round 2 (val) and at the end (test), post-federation once: every client each time.
    assert [c for name, c in calls if name == "evaluate"] == [0, 1, 2, 3] * 2
    assert [c for name, c in calls if name == "post_federation"] == [0, 1, 2, 3]


def test_a_checkpoint_whose_stores_stayed_on_the_nodes_is_refused_in_process(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    engine = orchestrator(tiny_config(assets, tmp_path / "run"), tmp_path / "run", Recorder(), rounds=2)
    engine.setup()
    with pytest.raises(RunDirError, match="stores on their nodes"):
        engine.worker.load_state_dict({"client_store": {}, "engine_store": {}, STORES_ON_NODES: True})
