"""Tiny models, datasets and configs built locally, so no test touches the network."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from lightning.pytorch import Callback

if TYPE_CHECKING:
    from tapl.models import FoundationModel

WORDS = ["good", "great", "fine", "love", "bad", "awful", "poor", "hate", "the", "a", "movie", "day", "food"]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def save_tiny_tokenizer(directory: Path) -> None:
    """Save a word-level BERT tokenizer over :data:`VOCAB` into ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)})
    assert len(tokenizer) == len(VOCAB), "the tiny tokenizer must know every word"
    tokenizer.save_pretrained(directory)


def make_tiny_bert(directory: Path, dropout: float = 0.1) -> Path:
    """Save a 2-layer BERT (hidden 32) with a word-level tokenizer into ``directory``; its weights are drawn
    from seed 0, whatever ran before (golden runs depend on them). ``dropout``: its hidden and attention dropout."""
    import torch
    from transformers import BertConfig, BertModel

    save_tiny_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(directory)
    return directory


def make_text_image_model(bert: Path, tasks: list) -> FoundationModel:
    """A FoundationModel over the tiny BERT with a text and an image encoder (LoRA r=2, no dropout)."""
    from tapl.models import FoundationModel, LoraSettings, PatchImageEncoder, TextEncoder

    lora = LoraSettings(r=2, alpha=4, dropout=0.0)
    encoders = {
        "text": TextEncoder(str(bert), max_length=16, lora=lora),
        "image": PatchImageEncoder(str(bert), image_size=8, patch_size=4, channels=1, lora=lora),
    }
    return FoundationModel(encoders, tasks)


def make_text_parquet(path: Path, rows: int = 240, seed: int = 0) -> Path:
    """Short sentences labelled 1 when they hold a positive word, 0 for a negative one.

    The ``answer`` column (a text-generation target) repeats the sentiment word and the first word.
    """
    rng = np.random.default_rng(seed)
    texts, labels, answers = [], [], []
    for i in range(rows):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        filler = rng.choice(WORDS[8:], size=3)
        texts.append(" ".join([filler[0], word, *filler[1:]]))
        answers.append(f"{word} {filler[0]}")
        labels.append(label)
    pd.DataFrame({"sentence": texts, "label": labels, "answer": answers}).to_parquet(path)
    return path


def make_image_parquet(path: Path, rows: int = 240, seed: int = 0) -> Path:
    """8x8 grey images: class 0 bright on the left half, class 1 bright on the right half, plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(rows):
        label = i % 2
        image = rng.uniform(0, 0.3, size=(8, 8))
        image[:, 4:] += 0.7 * label
        image[:, :4] += 0.7 * (1 - label)
        images.append(image.clip(0, 1).reshape(-1).tolist())
        labels.append(label)
    pd.DataFrame({"pixels": images, "label": labels}).to_parquet(path)
    return path


def tiny_config(assets: dict[str, Path], run_dir: Path, **federation: object) -> dict:
    """A complete config dict of a 4-client text+image federation over the tiny BERT."""
    bert = str(assets["bert"])
    lora = {"r": 2, "alpha": 4, "dropout": 0.0}
    return {
        "model": {
            "encoders": {
                "text": {
                    "class_path": "tapl.models.TextEncoder",
                    "init_args": {"name_or_path": bert, "max_length": 16, "lora": lora},
                },
                "image": {
                    "class_path": "tapl.models.PatchImageEncoder",
                    "init_args": {
                        "name_or_path": bert,
                        "image_size": 8,
                        "patch_size": 4,
                        "channels": 1,
                        "lora": lora,
                    },
                },
            }
        },
        "data": {
            "tasks": [
                {
                    "name": "sentiment",
                    "inputs": {"text": "sentence"},
                    "target": "label",
                    "num_classes": 2,
                    "dataset": "parquet",
                    "data_files": str(assets["text"]),
                    "head_hidden": 16,
                },
                {
                    "name": "shapes",
                    "inputs": {"image": "pixels"},
                    "target": "label",
                    "num_classes": 2,
                    "dataset": "parquet",
                    "data_files": str(assets["image"]),
                    "head_hidden": 16,
                },
            ],
            "clients": [
                {"tasks": ["sentiment"], "count": 1},
                {"tasks": ["shapes"], "count": 1},
                {"tasks": ["sentiment", "shapes"], "count": 2},
            ],
            "batch_size": 8,
        },
        "federation": {
            "rounds": 2,
            "clients_per_round": 2,
            "local_steps": 2,
            "seed": 0,
            "progress": False,
            "finetune_steps": 2,
            **federation,
        },
        "trainer": {"accelerator": "cpu", "devices": 1},
        "run_dir": str(run_dir),
    }


def write_config(path: Path, config: dict) -> Path:
    """Write ``config`` as YAML to ``path``; return ``path``."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and modification time."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


def command_env(**extra: str) -> dict[str, str]:
    """The environment of a ``tapl`` subprocess: offline, one thread per process."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def tapl_command() -> list[str]:
    """The installed ``tapl`` console script (the module when the script is not on PATH)."""
    import shutil

    executable = shutil.which("tapl")
    return [executable] if executable else [sys.executable, "-m", "tapl.cli"]


def write_tiny_config(assets: dict[str, Path], run_dir: Path, **federation: object) -> Path:
    """Write :func:`tiny_config` (with ``federation`` overrides) next to ``run_dir``; return its path."""
    import yaml

    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_config(assets, run_dir, **federation)))
    return path


def fit_tiny(run_dir: Path, assets: dict[str, Path], *args: str, **federation: object) -> Path:
    """``tapl fit`` of the tiny federation into ``run_dir`` (extra command-line ``args``); return ``run_dir``."""
    from tapl.cli import main

    main(["fit", "--config", str(write_tiny_config(assets, run_dir, **federation)), *args])
    return run_dir


def read_records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The records of a run's JSON-lines file, without their wall-clock ``seconds``."""
    lines = (run_dir / name).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines if line.strip()]


def read_results(run_dir: Path) -> dict:
    """A run's ``results.json``."""
    return json.loads((run_dir / "results.json").read_text())


class BatchCounter(Callback):
    """Counts the training batches of a fit."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args: object) -> None:
        self.batches += 1


def load_script(name: str) -> ModuleType:
    """Import ``experiments/<name>.py`` (a script, not a package module) as the module ``name``."""
    path = Path(__file__).parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
