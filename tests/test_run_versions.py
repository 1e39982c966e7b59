"""Tests of versioned run directories (tapl.run_versions): which directory each command runs in."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapl.run_dir import RunDirError
from tapl.run_versions import (
    RUN_DIR_ENV,
    checkpoint_run,
    choose_run_dir,
    new_version,
    newest_version,
    release_if_unused,
    share_with_other_ranks,
    versions,
)


def make_versions(root: Path, *numbers: int) -> None:
    for number in numbers:
        (root / f"version_{number}").mkdir(parents=True)


def test_versions_are_numbered_directories_and_others_are_ignored(tmp_path: Path) -> None:
    assert versions(tmp_path / "missing") == [] and newest_version(tmp_path / "missing") is None
    make_versions(tmp_path, 0, 2, 10)
    (tmp_path / "version_x").mkdir()
    (tmp_path / "compare").mkdir()
    (tmp_path / "version_7").write_text("a file, not a run")
    assert versions(tmp_path) == [0, 2, 10]
    assert newest_version(tmp_path) == tmp_path / "version_10"


def test_a_new_version_is_one_past_the_highest_and_is_created_at_once(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "demo"
    assert new_version(root) == root / "version_0" and (root / "version_0").is_dir()
    assert new_version(root) == root / "version_1"
    make_versions(root, 5)
    assert new_version(root) == root / "version_6"


def test_a_fresh_fit_gets_a_new_version_and_resume_and_test_the_newest(tmp_path: Path) -> None:
    root = str(tmp_path)
    first = choose_run_dir(None, root, None, "fit")
    assert (first.path, first.created) == (tmp_path / "version_0", True)
    second = choose_run_dir(None, root, None, "fit")
    assert second.path == tmp_path / "version_1" and "new version" in second.reason
    for ckpt_path, command in (("last", "fit"), (None, "test"), ("last", "test")):
        choice = choose_run_dir(None, root, ckpt_path, command)
        assert (choice.path, choice.created) == (tmp_path / "version_1", False)
    # Only naming it (e.g. building without running) creates nothing.
    assert choose_run_dir(None, root, None, "fit", reserve=False).path == tmp_path / "version_2"
    assert versions(tmp_path) == [0, 1]


def test_an_exact_run_directory_is_taken_as_it_is(tmp_path: Path) -> None:
    make_versions(tmp_path, 0)
    for ckpt_path, command in ((None, "fit"), ("last", "fit"), ("last", "test")):
        choice = choose_run_dir(str(tmp_path / "mine"), str(tmp_path), ckpt_path, command)
        assert (choice.path, choice.created) == (tmp_path / "mine", False)
    assert versions(tmp_path) == [0]


def test_a_checkpoint_directory_names_the_run_that_holds_it(tmp_path: Path) -> None:
    checkpoint = tmp_path / "version_3" / "checkpoints" / "round-000002"
    assert checkpoint_run(checkpoint) == tmp_path / "version_3"
    for command in ("fit", "test"):
        assert choose_run_dir(None, str(tmp_path / "other"), str(checkpoint), command).path == tmp_path / "version_3"
    # A checkpoint outside a run: fit starts a new version from it, test has nowhere to write its results.
    loose = tmp_path / "saved"
    assert choose_run_dir(None, str(tmp_path / "root"), str(loose), "fit").path == tmp_path / "root" / "version_0"
    with pytest.raises(RunDirError, match=r"--ckpt_path .*saved is not inside a run's checkpoints/ .*--run_dir"):
        choose_run_dir(None, str(tmp_path / "root"), str(loose), "test")


@pytest.mark.parametrize(("ckpt_path", "command", "action"), [("last", "fit", "resume"), (None, "test", "test")])
def test_nothing_to_resume_or_test_under_the_root_says_what_to_do(
    tmp_path: Path, ckpt_path: str | None, command: str, action: str
) -> None:
    with pytest.raises(RunDirError, match=rf"no run to {action} under --run_root .*--run_dir.*`tapl fit`"):
        choose_run_dir(None, str(tmp_path), ckpt_path, command)
    assert not any(tmp_path.iterdir())


def test_other_ranks_take_rank_zero_s_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    with pytest.raises(RunDirError, match=r"rank 1 cannot know which version_N .* --run_dir"):
        choose_run_dir(None, str(tmp_path), None, "fit", rank=1)
    chosen = choose_run_dir(None, str(tmp_path), None, "fit")
    share_with_other_ranks(chosen)
    assert choose_run_dir(None, str(tmp_path), None, "fit", rank=1).path == chosen.path
    assert versions(tmp_path) == [0]  # rank 1 created nothing


def test_an_unused_version_is_released_and_a_used_one_kept(tmp_path: Path) -> None:
    unused, used = new_version(tmp_path), new_version(tmp_path)
    (used / "metrics.jsonl").write_text("{}\n")
    release_if_unused(unused)
    release_if_unused(used)
    release_if_unused(tmp_path / "gone")
    assert versions(tmp_path) == [1]
