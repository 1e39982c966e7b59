"""The Flower runtime: the same federation on Flower's simulation runtime gives the same run as in-process."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import types
from pathlib import Path
from typing import Any, Literal

import psutil
import pytest
from helpers import fit_tiny, read_records, read_results, tiny_config, write_config

from tapl.algorithms import ClientContext, ClientUpdate, FedAvg
from tapl.cli import main
from tapl.run_dir import RunDirectory

HAS_FLOWER = importlib.util.find_spec("flwr") is not None
needs_flower = pytest.mark.skipif(not HAS_FLOWER, reason="Flower is not installed (pip install -e '.[flower]')")


@pytest.fixture(autouse=True)
def node_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated nodes keep their clients' stores in tapl's cache: this test's own."""
    monkeypatch.setenv("TAPL_CACHE", str(tmp_path / "cache"))


def final_global_state(run_dir: Path) -> dict:
    directory = RunDirectory(run_dir)
    state, _ = directory.load_checkpoint(directory.resolve_checkpoint("last", prefer_final=True))
    return state


def assert_same_run(got: Path, expected: Path, failures_alike: bool = False) -> float:
    """Assert that run ``got`` logged, reported and ended with what run ``expected`` did (with ``failures_alike``,
    the same clients failed, whatever the reasons); return the max abs difference of their final global tensors."""

    def records(run: Path) -> list[dict]:
        logged = read_records(run)
        for record in logged if failures_alike else []:
            record["failed_clients"] = sorted(record["failed_clients"])
        return logged

    assert records(got) == records(expected)
    # On Flower the post-federation stage runs on every node at once: its records come as the nodes finish.
    by_client = lambda run: sorted(read_records(run, "post_federation.jsonl"), key=lambda r: r["client"])  # noqa: E731
    assert by_client(got) == by_client(expected)
    assert read_results(got) == read_results(expected)
    expected_state, got_state = final_global_state(expected), final_global_state(got)
    assert got_state.keys() == expected_state.keys()
    differences = {
        f"{c}/{k}": (got_state[c][k] - t).abs().max().item()
        for c, params in expected_state.items()
        for k, t in params.items()
    }
    assert set(differences) == {f"{c}/{k}" for c, params in got_state.items() for k in params}
    assert max(differences.values()) == 0.0
    return max(differences.values())


@pytest.mark.skipif(HAS_FLOWER, reason="Flower is installed")
def test_the_flower_runtime_without_flower_fails_in_one_line_before_building_anything(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        fit_tiny(tmp_path / "run", assets, "--runtime", "flower")
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "tapl: error: --runtime flower needs Flower: pip install -e '.[flower]'\n"
    assert not (tmp_path / "run").exists()


@needs_flower
def test_a_node_builds_its_client_side_once_even_from_a_fresh_copy_of_the_builder() -> None:
    from tapl.runtimes.flower import client_worker

    built: list[str] = []

    def build(config_text: str) -> Any:
        built.append(config_text)
        return object()

    # What a simulation actor gets when it unpickles a builder defined in ``__main__``: a new, equal function.
    copy = types.FunctionType(build.__code__, build.__globals__, build.__name__, closure=build.__closure__)
    first = client_worker(build, "config: 1")
    assert client_worker(copy, "config: 1") is first
    assert built == ["config: 1"]
    assert client_worker(build, "config: 2") is not first  # another run's config: built anew
    assert built == ["config: 1", "config: 2"]


class WindowGrid:
    """A grid whose nodes reply to the oldest message awaiting a reply at each pull; it counts the most awaiting."""

    def __init__(self) -> None:
        self.awaiting: list[tuple[str, Any]] = []
        self.most_awaiting = 0

    def push_messages(self, messages: list[Any]) -> list[str]:
        for message in messages:
            self.awaiting.append((f"id-{message.node}", message))
        self.most_awaiting = max(self.most_awaiting, len(self.awaiting))
        return [f"id-{m.node}" for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Any]:
        if not self.awaiting:
            return []
        message_id, message = self.awaiting.pop(0)
        assert message_id in ids
        content = {"tapl": {"payload": f'{{"node": {message.node}}}'}}
        metadata = types.SimpleNamespace(reply_to_message_id=message_id)
        return [types.SimpleNamespace(metadata=metadata, content=content, has_error=lambda: False)]


@needs_flower
@pytest.mark.parametrize(("in_flight", "most_awaiting"), [(3, 3), (None, 10)])
def test_a_worker_keeps_at_most_in_flight_messages_awaiting_replies_and_gets_every_answer(
    in_flight: int | None, most_awaiting: int
) -> None:
    from tapl.runtimes.flower import FlowerWorker

    grid = WindowGrid()
    worker = object.__new__(FlowerWorker)  # only the sending part: no federation behind it
    worker.grid, worker.in_flight, worker.reply_timeout, worker.poll_seconds = grid, in_flight, None, 0.0
    answers = dict(worker._push({node: types.SimpleNamespace(node=node) for node in range(10)}))
    assert answers == {node: ({"node": node}, {}) for node in range(10)}
    assert grid.most_awaiting == most_awaiting


@needs_flower
def test_the_simulation_keeps_eight_messages_per_cpu_in_flight_and_polls_often(monkeypatch: pytest.MonkeyPatch) -> None:
    from tapl.runtimes import flower

    def run_simulation(server_app: Any, **kwargs: Any) -> None:  # Flower's runtime, down to calling the ServerApp
        server_app(grid=None, context=None)

    monkeypatch.setattr(flower, "run_simulation", run_simulation)
    data = types.SimpleNamespace(clients={})
    orchestrator = types.SimpleNamespace(config_text="config", worker_factory=None, data=data)
    workers = flower.simulate(orchestrator, build=None, job=lambda: dict(orchestrator.worker_factory.keywords))
    assert workers["in_flight"] == 8 * len(os.sched_getaffinity(0))
    assert workers["poll_seconds"] == 0.05


@pytest.mark.slow
@needs_flower
def test_a_tap_run_on_the_flower_simulation_equals_the_in_process_run(assets: dict[str, Path], tmp_path: Path) -> None:
    # FedAvg's runs (with a failing client, and on a deployment) are compared with in-process runs below.
    started = time.perf_counter()
    inprocess = fit_tiny(tmp_path / "inprocess", assets, "--algorithm", "TAP")
    inprocess_seconds = time.perf_counter() - started
    started = time.perf_counter()
    flower = fit_tiny(tmp_path / "flower", assets, "--algorithm", "TAP", "--runtime", "flower")
    flower_seconds = time.perf_counter() - started

    difference = assert_same_run(flower, inprocess)
    print(
        f"TAP: max abs difference of the final global tensors: {difference}; "
        f"in-process {inprocess_seconds:.1f} s, Flower simulation {flower_seconds:.1f} s"
    )


class CountingAndFailing(FedAvg):
    """FedAvg whose clients count their visits in their store and report the count; client 0 fails in round 2,
    after counting."""

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        ctx.store["visits"] = ctx.store.get("visits", 0) + 1
        if ctx.client.id == 0 and ctx.round == 2:
            raise RuntimeError("client 0 fails in round 2")
        update = super().client_update(ctx)
        update.metrics["visits"] = ctx.store["visits"]
        return update


@pytest.mark.slow
@needs_flower
def test_on_flower_stores_stay_on_the_nodes_a_failing_client_fails_its_round_and_a_run_resumes_and_tests(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The simulated nodes import this module by name to build the algorithm of the config.
    tests, root = Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(tests), os.environ.get("PYTHONPATH", "")]))
    args = ("--algorithm", f"{__name__}.CountingAndFailing")
    inprocess = fit_tiny(tmp_path / "inprocess", assets, *args, rounds=3, clients_per_round=4)
    flower = fit_tiny(tmp_path / "flower", assets, *args, "--runtime", "flower", rounds=3, clients_per_round=4)

    expected, got = read_records(inprocess), read_records(flower)
    assert [r["train"]["1"]["visits"] for r in got] == [1, 2, 3]
    assert [r["train"]["0"]["visits"] for r in got if "0" in r["train"]] == [1, 2]  # the failed visit did not count
    assert got[1]["failed_clients"] == {"0": "ClientFailed: RuntimeError: client 0 fails in round 2"}
    assert expected[1]["failed_clients"] == {"0": "RuntimeError: client 0 fails in round 2"}
    assert_same_run(flower, inprocess, failures_alike=True)
    # Nothing of a client's store is in the server's checkpoint: each client's node keeps it.
    directory = RunDirectory(flower)
    _, payload = directory.load_checkpoint(directory.resolve_checkpoint("last", prefer_final=True))
    assert payload["client_store"] == {} and payload["engine_store"] == {}
    kept = (Path(os.environ["TAPL_CACHE"]) / "flower-nodes").glob("*/client-*/post-federation.pt")
    assert sorted(path.parent.name for path in kept) == [f"client-{c}" for c in range(4)]

    # Resumed to a 4th round on Flower, the stores go on from the nodes, as they do from the checkpoint in process.
    more = ("--ckpt_path", "last")
    fit_tiny(inprocess, assets, *args, *more, rounds=4, clients_per_round=4)
    fit_tiny(flower, assets, *args, "--runtime", "flower", *more, rounds=4, clients_per_round=4)
    assert [r["train"]["1"]["visits"] for r in read_records(flower)] == [1, 2, 3, 4]
    assert_same_run(flower, inprocess, failures_alike=True)

    # Tested on Flower, each node evaluates its client's models as they were at the end.
    results = read_results(flower)
    main(["test", "--config", str(flower / "config.yaml"), "--runtime", "flower"])
    assert read_results(flower) == results

    # In process, the run cannot be resumed: its stores are on the nodes.
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        fit_tiny(flower, assets, *args, *more, rounds=5, clients_per_round=4)
    assert stopped.value.code == 1
    assert "resume or test it with --runtime flower" in capsys.readouterr().err


def three_clients(assets: dict[str, Path], run_dir: Path, **federation: object) -> Path:
    """The tiny federation with 3 clients (one per task set), written next to ``run_dir``."""
    config = tiny_config(assets, run_dir, **federation)
    config["data"]["clients"][-1]["count"] = 1
    return write_config(run_dir.parent / f"{run_dir.name}.yaml", config)


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class StallingClient(FedAvg):
    """FedAvg whose clients count their visits in their store and report the count; client 2 fails in round 1: it
    stalls (after creating the file ``mark``) until its node is killed, or raises without a ``mark``. Each round
    logs how many failures the algorithm was told of.

    Args:
        mark: The file client 2 creates when it stalls; empty: it raises instead.
    """

    def __init__(self, mark: str = "", weighting: Literal["samples", "uniform"] = "samples") -> None:
        super().__init__(weighting)
        self.mark = mark

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        if ctx.client.id == 2 and ctx.round == 1:
            if not self.mark:
                raise RuntimeError("client 2 fails in round 1")
            Path(self.mark).touch()
            time.sleep(600)
        ctx.store["visits"] = ctx.store.get("visits", 0) + 1
        update = super().client_update(ctx)
        update.metrics["visits"] = ctx.store["visits"]
        return update

    def aggregate(self, round: int, global_state: Any, results: list, failures: list) -> Any:
        self.log("failures", len(failures))
        return super().aggregate(round, global_state, results, failures)


@pytest.mark.slow
@needs_flower
def test_on_a_deployment_launched_with_flwr_run_a_killed_supernode_fails_its_client_and_a_restarted_one_rejoins(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    from tapl.runtimes.flower_localhost import LocalDeployment

    algorithm = ["--algorithm", f"{__name__}.StallingClient"]
    main(["fit", "--config", str(three_clients(assets, tmp_path / "inprocess", clients_per_round=3)), *algorithm])

    mark = tmp_path / "stalled"

    def kill_the_stalled_node_and_restart_it() -> None:
        deadline = time.monotonic() + 300
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        flower.kill_node(2)
        flower.start_node(2)

    tests, root = Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2]
    env = {  # the nodes import this module by name
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(root), str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    config = three_clients(assets, tmp_path / "deployed", clients_per_round=3)
    started = time.perf_counter()
    with LocalDeployment([0, 1, 2], tmp_path / "flower", env) as flower:
        failed = flower.run(["--config", str(tmp_path / "missing.yaml")])
        assert failed.status == "finished:failed" and "tapl fit --config" in failed.details

        crash = threading.Thread(target=kill_the_stalled_node_and_restart_it, daemon=True)
        crash.start()
        outcome = flower.run(["--config", str(config), *algorithm, "--algorithm.mark", str(mark)])
        crash.join()
        assert outcome.completed, f"{outcome.status}: {outcome.details}\n{outcome.output}"
        started_processes = [psutil.Process(p.pid) for p in (flower.superlink, *flower.supernodes.values()) if p]
        started_processes += [child for process in started_processes for child in process.children(recursive=True)]
    assert len(started_processes) >= 4 and not [p for p in started_processes if alive(p)]  # all stopped
    print(f"FedAvg deployed on localhost (3 SuperNodes, one killed) in {time.perf_counter() - started:.1f} s")

    first, second = read_records(tmp_path / "deployed")
    assert set(first["failed_clients"]) == {"2"} and "Node Unavailable" in first["failed_clients"]["2"]
    assert sorted(first["train"]) == ["0", "1"] and first["algorithm"]["failures"] == 1
    # Node 2 rejoined: client 2 is visited in round 2, from the state the server accepted last (none: its only
    # visit failed).
    assert {c: m["visits"] for c, m in second["train"].items()} == {"0": 2, "1": 2, "2": 1}
    assert second["algorithm"]["failures"] == 0
    # Apart from why client 2 failed, the run is the in-process run where client 2 raised in round 1.
    assert read_records(tmp_path / "inprocess")[0]["failed_clients"] == {"2": "RuntimeError: client 2 fails in round 1"}
    assert_same_run(tmp_path / "deployed", tmp_path / "inprocess", failures_alike=True)
