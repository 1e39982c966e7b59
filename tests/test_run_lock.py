"""Tests of the run directory's lock (tapl.run_lock): exclusive, named, released, and leaving nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tapl.run_dir import RunDirError
from tapl.run_lock import LOCK_FILE, RunLock


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with RunLock(root):
        assert (root / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirError, match=rf"{root} is in use by another tapl process \(pid {os.getpid()}\)"):
            RunLock(root).__enter__()
        with pytest.raises(RunDirError, match="in use"):
            RunLock.check_free(root)
    # Released: the file is gone and so is the directory the lock created, since nothing else was written.
    assert not root.exists()
    with RunLock(root):
        (root / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in root.iterdir()) == ["metrics.jsonl"]


def test_a_lock_file_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / LOCK_FILE).write_text("12345\n")  # no process holds it any more
    RunLock.check_free(root)
    with RunLock(root):
        assert (root / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert root.is_dir() and not (root / LOCK_FILE).exists()
