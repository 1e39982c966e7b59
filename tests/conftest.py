"""Fixtures: a tiny BERT and small datasets built locally, so no test touches the network."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_image_parquet, make_text_parquet, make_tiny_bert


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run as fast on one thread, and several threads thrash when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the tiny model and the two small datasets, built once per session."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": make_tiny_bert(root / "tiny-bert"),
        "text": make_text_parquet(root / "text.parquet"),
        "image": make_image_parquet(root / "image.parquet"),
    }
