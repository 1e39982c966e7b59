"""End-to-end tests of tapl.federation through the CLI entry point: run directory, sampling, resume, faults."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_config
from safetensors.torch import load_file
from scripted import engine_context
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tapl.algorithms import ClientContext, ClientUpdate, Failure, FedAvg
from tapl.cli import TaplCLI, main
from tapl.components import ComponentState, num_bytes
from tapl.federation import FederatedOrchestrator

CLIENT_TASKS = {"0": {"sentiment"}, "1": {"shapes"}, "2": {"sentiment", "shapes"}, "3": {"sentiment", "shapes"}}


# The tests call the CLI in-process, under pytest's own command line.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

# -- helpers ----------------------------------------------------------------------------------------------


def write_config(assets: dict[str, Path], run_dir: Path, **federation: Any) -> Path:
    """Write the tiny federation's config next to ``run_dir`` and return its path."""
    config = tiny_config(assets, run_dir, **federation)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *args: str) -> None:
    main(["fit", "--config", str(config), *args])


def build_orchestrator(config: Path, *args: str) -> FederatedOrchestrator:
    """The orchestrator the CLI builds from ``config``, without running anything."""
    orchestrator = TaplCLI(args=["--config", str(config), *args], run=False).orchestrator
    assert orchestrator is not None
    return orchestrator


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_seconds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def is_finite_state(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- test plugins ------------------------------------------------------------------------------------------


class RecordingFedAvg(FedAvg):
    """FedAvg that records, per round, which clients reached ``aggregate`` and the state it returned."""

    rounds: ClassVar[dict[int, dict[str, Any]]] = {}

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        new_state = super().aggregate(round, global_state, results, failures)
        type(self).rounds[round] = {
            "clients": [r.client for r in results],
            "failures": [f.client for f in failures],
            "before": {c: {k: t.clone() for k, t in p.items()} for c, p in global_state.items()},
            "after": new_state,
        }
        return new_state


class FaultyClients(RecordingFedAvg):
    """Client 1 raises during its visit; client 2 uploads NaN tensors; the others behave."""

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        if ctx.client.id == 1:
            raise RuntimeError("client 1 lost its connection")
        if ctx.client.id == 2:
            nan = {c: {k: torch.full_like(t, math.nan) for k, t in p.items()} for c, p in ctx.received.items()}
            return ClientUpdate(ctx.client.id, nan, ctx.num_train_samples)
        return super().client_update(ctx)


class AlwaysFailing(FedAvg):
    """Every client visit raises."""

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        raise RuntimeError(f"client {ctx.client.id} is down")


# -- fixtures: runs shared by several tests ----------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-round run evaluating every 2 rounds."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    fit(write_config(assets, run_dir, rounds=4, eval_every=2))
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same federation run for 2 rounds (to completion), then resumed to 4 rounds."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    config = write_config(assets, run_dir, rounds=2, eval_every=2)
    fit(config)
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
    fit(config, "--federation.rounds", "4", "--ckpt_path", "last")
    return run_dir


@pytest.fixture(scope="module")
def faulty_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two rounds of every client with a failing and a NaN client; evaluation only after the last round."""
    RecordingFedAvg.rounds.clear()
    run_dir = tmp_path_factory.mktemp("faulty") / "run"
    config = write_config(assets, run_dir, rounds=2, clients_per_round=4, eval_every=3)
    fit(config, "--algorithm", class_path(FaultyClients))
    return run_dir


# -- the run directory ---------------------------------------------------------------------------------------


def test_config_yaml_is_the_resolved_config_and_reruns(full_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = full_run / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["federation"]["rounds"] == 4
    assert config["federation"]["eval_every"] == 2
    assert config["algorithm"]["class_path"].endswith("FedAvg")
    assert config["run_dir"] == str(full_run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        fit(saved, "--print_config")
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_metrics_jsonl_has_one_record_per_round(full_run: Path, assets: dict[str, Path]) -> None:
    records = read_metrics(full_run)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    orchestrator = build_orchestrator(full_run.parent / "run.yaml")
    orchestrator.setup(check_values=False)
    for record in records:
        sampled = record["sampled_clients"]
        assert len(sampled) == 2 and len(set(sampled)) == 2 and set(sampled) <= {0, 1, 2, 3}
        assert record["failed_clients"] == {}
        # Train metrics per sampled client, one loss per task it holds.
        assert set(record["train"]) == {str(c) for c in sampled}
        for cid, metrics in record["train"].items():
            assert set(metrics) == {f"train_loss/{t}" for t in CLIENT_TASKS[cid]}
            assert all(math.isfinite(v) for v in metrics.values())
        # Communication: each sampled client downloads and uploads exactly its slice.
        slice_bytes = sum(num_bytes(orchestrator.info.slice_of(orchestrator.global_state, c)) for c in sampled)
        assert record["bytes_down"] == slice_bytes
        assert record["bytes_up"] == slice_bytes
        assert record["seconds"] > 0
    # Evaluation: per model, per client, per task of that client.
    for record in (records[1], records[3]):
        assert set(record["eval"]) == {"global", "personalized"}
        for per_client in record["eval"].values():
            assert set(per_client) == set(CLIENT_TASKS)
            for cid, per_task in per_client.items():
                assert set(per_task) == CLIENT_TASKS[cid]
                for values in per_task.values():
                    assert 0 <= values["accuracy"] <= 1
                    assert math.isfinite(values["loss"])


def test_tensorboard_holds_round_scalars(full_run: Path) -> None:
    events = list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(full_run / "tensorboard"), size_guidance={"histograms": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"comm/bytes_up", "comm/bytes_down", "global/sentiment/accuracy", "global/shapes/loss"} <= tags
    assert "client_3/global/shapes/accuracy" in tags
    records = read_metrics(full_run)
    bytes_up = accumulator.Scalars("comm/bytes_up")
    assert [e.step for e in bytes_up] == [1, 2, 3, 4]
    assert [e.value for e in bytes_up] == [float(r["bytes_up"]) for r in records]
    # Evaluation scalars exist only for the rounds that evaluated.
    assert [e.step for e in accumulator.Scalars("global/sentiment/accuracy")] == [2, 4]
    # Per task type curves, per-client histograms of each metric, and the hparams view with final metrics.
    classification = accumulator.Scalars("personalized/task_type/classification/accuracy")
    assert [e.step for e in classification] == [2, 4]
    by_type = records[3]["eval"]["personalized"]
    accuracies = [v["accuracy"] for per_task in by_type.values() for v in per_task.values()]
    samples = [v["samples"] for per_task in by_type.values() for v in per_task.values()]
    weighted = sum(a * n for a, n in zip(accuracies, samples, strict=True)) / sum(samples)
    assert classification[-1].value == pytest.approx(weighted, rel=1e-6)
    histogram = accumulator.Histograms("global/shapes/accuracy/clients")
    assert [h.step for h in histogram] == [2, 4] and histogram[-1].histogram_value.num == 3
    hparams = [
        value.tag
        for path in events
        for event in event_file_loader.EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.metadata.plugin_data.plugin_name == "hparams"
    ]
    assert "_hparams_/experiment" in hparams
    assert "final/global/sentiment/accuracy" in tags


def test_checkpoints_every_round(full_run: Path) -> None:
    checkpoints = full_run / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["final", "round-000001", "round-000002", "round-000003", "round-000004"]
    for name in names:
        assert (checkpoints / name / "server.safetensors").is_file()
        assert (checkpoints / name / "state.pt").is_file()
    for round in (1, 4):
        payload = torch.load(checkpoints / f"round-{round:06d}" / "state.pt", weights_only=True)
        assert payload["round"] == round
    first = load_file(checkpoints / "round-000001" / "server.safetensors")
    last = load_file(checkpoints / "round-000004" / "server.safetensors")
    assert first.keys() == last.keys()
    assert is_finite_state(last)
    assert any(not torch.equal(first[k], last[k]) for k in first), "training did not change the global model"


def test_results_json_per_client_per_task(full_run: Path) -> None:
    results = json.loads((full_run / "results.json").read_text())
    assert results["round"] == 4
    assert results["split"] == "test"
    for model in ("global", "personalized"):
        per_client = results["per_client"][model]
        assert set(per_client) == set(CLIENT_TASKS)
        for cid, per_task in per_client.items():
            assert set(per_task) == CLIENT_TASKS[cid]
            for values in per_task.values():
                assert 0 <= values["accuracy"] <= 1
                assert values["samples"] > 0
    # Distributions over clients: every (client, task) of a group counts once, with the per-client values.
    accuracy = results["distribution"]["task_type"]["global"]["classification"]["accuracy"]
    values = [v["accuracy"] for per_task in results["per_client"]["global"].values() for v in per_task.values()]
    assert accuracy["values"] == len(values) == 6
    assert accuracy["min"] == min(values) and accuracy["max"] == max(values)
    shapes = results["distribution"]["pair"]["global"]["image,classification"]["loss"]
    assert shapes["values"] == 3 and shapes["higher_is_better"] is False
    assert "## Distribution across clients, per task type" in (full_run / "results.md").read_text()


def expected_client_records(run_dir: Path) -> dict[str, dict[str, int]]:
    """Each client's visits, failures and last successful round, recounted from ``metrics.jsonl``."""
    records = {cid: {"visits": 0, "failures": 0, "last_visit": 0} for cid in CLIENT_TASKS}
    for record in read_metrics(run_dir):
        for client in record["sampled_clients"]:
            counts = records[str(client)]
            counts["visits"] += 1
            if str(client) in record["failed_clients"]:
                counts["failures"] += 1
            else:
                counts["last_visit"] = record["round"]
    return records


def test_results_record_each_client_s_visits_and_the_last_round_it_trained_in(full_run: Path, faulty_run: Path) -> None:
    for run_dir in (full_run, faulty_run):
        clients = json.loads((run_dir / "results.json").read_text())["clients"]
        expected = expected_client_records(run_dir)
        assert clients == {
            cid: {"tasks": sorted(tasks), "held_out": False, **expected[cid]} for cid, tasks in CLIENT_TASKS.items()
        }
    # Clients 1 (raises) and 2 (uploads NaN) were sampled in both rounds and never trained.
    faulty = json.loads((faulty_run / "results.json").read_text())["clients"]
    assert [faulty[c]["last_visit"] for c in ("0", "1", "2", "3")] == [2, 0, 0, 2]
    assert faulty["1"]["visits"] == faulty["1"]["failures"] == 2
    table = (faulty_run / "results.md").read_text()
    assert "| client | tasks | visits | failed | last trained (of 2) |" in table
    assert "| 1 | shapes | 2 | 2 | never |" in table and "| 3 | sentiment, shapes | 2 | 0 | 2 |" in table


def test_checkpoints_without_last_visit_load_it_as_zero(full_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    state = run_dir / "checkpoints" / "final" / "state.pt"
    payload = torch.load(state, weights_only=True)
    for record in payload["clients"].values():
        del record["last_visit"]
    torch.save(payload, state)
    (state.parent / "checksums.json").unlink()  # as in a checkpoint of that older version
    main(["test", "--config", str(full_run.parent / "run.yaml"), "--run_dir", str(run_dir)])
    clients = json.loads((run_dir / "results.json").read_text())["clients"]
    expected = expected_client_records(full_run)
    assert {cid: (c["visits"], c["last_visit"]) for cid, c in clients.items()} == {
        cid: (e["visits"], 0) for cid, e in expected.items()
    }


def test_evaluation_every_eval_every_rounds_and_after_the_last(full_run: Path, faulty_run: Path) -> None:
    # eval_every=2 over 4 rounds.
    assert [("eval" in r) for r in read_metrics(full_run)] == [False, True, False, True]
    # eval_every=3 over 2 rounds: only after the last round.
    assert [("eval" in r) for r in read_metrics(faulty_run)] == [False, True]
    assert all(("summary" in r) == ("eval" in r) for r in read_metrics(full_run))


# -- client sampling ---------------------------------------------------------------------------------------


def test_sampling_is_a_function_of_seed_and_round(assets: dict[str, Path], tmp_path: Path, full_run: Path) -> None:
    config = write_config(assets, tmp_path / "run", clients_per_round=2)
    a, b = build_orchestrator(config), build_orchestrator(config)
    rounds = range(1, 21)
    first = [a.sample_clients(r) for r in rounds]
    # Global RNG state and call order do not matter.
    torch.manual_seed(123)
    np.random.seed(123)
    assert [b.sample_clients(r) for r in reversed(rounds)] == first[::-1]
    assert all(len(s) == 2 and len(set(s)) == 2 and set(s) <= {0, 1, 2, 3} for s in first)
    assert len({tuple(s) for s in first}) > 1, "every round sampled the same clients"
    # The run logged exactly these clients (same seed 0, 2 clients).
    assert [r["sampled_clients"] for r in read_metrics(full_run)] == first[:4]
    # Another seed, another sequence.
    other = build_orchestrator(config, "--federation.seed", "1")
    assert [other.sample_clients(r) for r in rounds] != first


def test_sampling_fraction_versus_count(assets: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(assets, tmp_path / "run")
    by_count = build_orchestrator(config, "--federation.clients_per_round", "2")
    by_fraction = build_orchestrator(config, "--federation.clients_per_round", "0.5")
    assert by_fraction.config.clients_per_round == 0.5
    assert by_count.config.clients_per_round == 2
    assert [by_fraction.sample_clients(r) for r in range(1, 11)] == [by_count.sample_clients(r) for r in range(1, 11)]
    three = build_orchestrator(config, "--federation.clients_per_round", "0.75")
    assert all(len(three.sample_clients(r)) == 3 for r in range(1, 11))
    everyone = build_orchestrator(config, "--federation.clients_per_round", "1.0")
    assert all(everyone.sample_clients(r) == [0, 1, 2, 3] for r in range(1, 11))
    one = build_orchestrator(config, "--federation.clients_per_round", "1")
    assert all(len(one.sample_clients(r)) == 1 for r in range(1, 11))


def test_cyclic_sampling_visits_every_participant_once_per_pass(assets: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(assets, tmp_path / "run", clients_per_round=2)
    cyclic = build_orchestrator(config, "--federation.sampling", "cyclic")
    assert cyclic.config.sampling == "cyclic"
    rounds = [cyclic.sample_clients(r) for r in range(1, 11)]
    assert all(sorted(rounds[i] + rounds[i + 1]) == [0, 1, 2, 3] for i in range(0, 10, 2))
    held_out = build_orchestrator(config, "--federation.sampling", "cyclic", "--federation.holdout_clients", "[1]")
    # 3 participants, 2 per round: the held-out client never, the others once per pass of 1.5 rounds, so
    # any 3 consecutive rounds (6 slots) hold a whole pass; no round repeats a client.
    sampled = [held_out.sample_clients(r) for r in range(1, 10)]
    assert all(len(set(s)) == 2 and 1 not in s for s in sampled)
    assert all({c for s in sampled[i : i + 3] for c in s} == {0, 2, 3} for i in range(7))


def test_a_fit_trains_only_the_trainable_components_and_returns_all(assets: dict[str, Path], tmp_path: Path) -> None:
    orchestrator = build_orchestrator(write_config(assets, tmp_path / "run"))
    orchestrator.setup()
    ctx = engine_context(orchestrator, 2)  # sentiment + shapes
    start = ctx.received
    heads = ["head[sentiment]", "head[shapes]"]
    result = ctx.fit(start, trainable=heads)
    assert sorted(result.state) == sorted(start)
    for component, tensors in start.items():
        changed = any(not torch.equal(t, result.state[component][k]) for k, t in tensors.items())
        assert changed == (component in heads), component
    with pytest.raises(ValueError, match=r"head\[digits\]"):
        ctx.fit(start, trainable=["head[digits]"])


def test_too_many_clients_per_round_is_a_clear_error(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        fit(write_config(assets, run_dir, clients_per_round=5))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "clients_per_round" in err and "5" in err and "4 clients" in err
    assert not run_dir.exists(), "the error came after the run directory was written"


# -- resume ------------------------------------------------------------------------------------------------


def test_resume_is_equivalent_to_an_uninterrupted_run(full_run: Path, resumed_run: Path) -> None:
    for name in ("round-000004", "final"):
        expected = load_file(full_run / "checkpoints" / name / "server.safetensors")
        actual = load_file(resumed_run / "checkpoints" / name / "server.safetensors")
        assert expected.keys() == actual.keys()
        different = [k for k in expected if not torch.equal(expected[k], actual[k])]
        assert not different, f"{name}: resumed run differs in {different[:5]}"
    assert without_seconds(read_metrics(resumed_run)) == without_seconds(read_metrics(full_run))
    expected_results = json.loads((full_run / "results.json").read_text())
    assert json.loads((resumed_run / "results.json").read_text()) == expected_results


def test_resume_after_a_kill_drops_rounds_logged_after_the_last_checkpoint(
    assets: dict[str, Path], full_run: Path, tmp_path: Path
) -> None:
    # A run killed after logging round 4 but before its round-4 checkpoint: checkpoints up to round 3.
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    for name in ("round-000004", "final"):
        shutil.rmtree(run_dir / "checkpoints" / name)
    (run_dir / "results.json").unlink()
    kept = (run_dir / "metrics.jsonl").read_text().splitlines()[:3]
    fake = {"round": 4, "sampled_clients": [9], "fake": True}
    (run_dir / "metrics.jsonl").write_text("\n".join([*kept, json.dumps(fake)]) + "\n")

    fit(write_config(assets, run_dir, rounds=4, eval_every=2), "--ckpt_path", "last")

    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert not any(r.get("fake") for r in records)
    assert without_seconds(records) == without_seconds(read_metrics(full_run))
    expected = load_file(full_run / "checkpoints" / "round-000004" / "server.safetensors")
    actual = load_file(run_dir / "checkpoints" / "round-000004" / "server.safetensors")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


# -- faults ------------------------------------------------------------------------------------------------


def test_failing_and_nan_clients_are_excluded_and_reported(faulty_run: Path) -> None:
    records = read_metrics(faulty_run)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["sampled_clients"] == [0, 1, 2, 3]
        failed = record["failed_clients"]
        assert set(failed) == {"1", "2"}
        assert "RuntimeError" in failed["1"] and "client 1 lost its connection" in failed["1"]
        assert "non-finite" in failed["2"] or "nan" in failed["2"].lower()
        assert set(record["train"]) == {"0", "3"}
    # The healthy clients' updates, and only theirs, were aggregated, and the engine kept the result.
    # The algorithm is told which visits failed, beside the results it aggregates.
    for round in (1, 2):
        assert RecordingFedAvg.rounds[round]["clients"] == [0, 3]
        assert RecordingFedAvg.rounds[round]["failures"] == [1, 2]
    for round in (1, 2):
        saved = load_file(faulty_run / "checkpoints" / f"round-{round:06d}" / "server.safetensors")
        assert is_finite_state(saved)
        after = RecordingFedAvg.rounds[round]["after"]
        for component, params in after.items():
            for key, tensor in params.items():
                assert torch.equal(saved[f"{component}/{key}"], tensor)
    before, after = RecordingFedAvg.rounds[1]["before"], RecordingFedAvg.rounds[1]["after"]
    changed = [c for c in before if any(not torch.equal(before[c][k], after[c][k]) for k in before[c])]
    assert changed, "the healthy clients' updates did not change the global model"
    # The post-federation stage and the final evaluation still ran.
    assert (faulty_run / "results.json").is_file()


def test_every_client_failing_stops_the_run_naming_the_round(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(assets, run_dir, rounds=2)
    with pytest.raises((RuntimeError, SystemExit)) as error:
        fit(config, "--algorithm", class_path(AlwaysFailing))
    message = str(error.value) + capsys.readouterr().err
    assert "Round 1" in message and "failed" in message
    if isinstance(error.value, SystemExit):
        assert error.value.code != 0
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.jsonl").exists()
