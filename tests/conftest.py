"""Fixtures: a tiny BERT and small datasets built locally, so no test touches the network."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import make_image_parquet, make_text_parquet, make_tiny_bert, tiny_config, write_config


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


@pytest.fixture(scope="module")
def finished_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed 2-round run of the tiny federation (checkpoints round-000001, round-000002 and final)."""
    from tapl.cli import main

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    main(["fit", "--config", str(write_config(run_dir.parent / "run.yaml", tiny_config(assets, run_dir)))])
    return run_dir


@pytest.fixture
def existing_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of :func:`finished_run` that a test may damage."""
    run_dir = tmp_path / "existing"
    shutil.copytree(finished_run, run_dir)
    return run_dir
