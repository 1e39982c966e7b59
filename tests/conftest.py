"""Fixtures: a tiny BERT and small datasets built locally, so no test touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_image_parquet, make_text_parquet, make_tiny_bert


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the tiny model and the two small datasets, built once per session."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": make_tiny_bert(root / "tiny-bert"),
        "text": make_text_parquet(root / "text.parquet"),
        "image": make_image_parquet(root / "image.parquet"),
    }
