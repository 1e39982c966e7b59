"""Versioned run directories under a root, Lightning's ``save_dir/name/version_N`` convention.

``--run_root ROOT`` (``run_root:`` in a config) names where runs go; each fresh run gets ``ROOT/version_N``,
one past the highest ``N`` there. ``--run_dir DIR`` names one exact run directory instead, and resuming
continues an existing run rather than starting a version:

=====================================  ===========================================================
command                                run directory
=====================================  ===========================================================
``fit`` / ``test`` with ``--run_dir``  exactly ``--run_dir``
``fit``                                a new ``ROOT/version_N``, created at once
``fit --ckpt_path last``               the newest ``ROOT/version_N``
``test`` (``--ckpt_path last``)        the newest ``ROOT/version_N``
``--ckpt_path DIR``                    the run that holds the checkpoint ``DIR`` (``RUN/checkpoints/DIR``),
                                       else a new version (``fit``) or an error (``test``)
=====================================  ===========================================================

Processes that Lightning launches for the other ranks of a multi-device run re-run the command; they find the
version that rank 0 chose in the environment variable :data:`RUN_DIR_ENV` instead of choosing one of their own.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tapl.run_dir import CHECKPOINTS, RunDirError

#: A version's directory name: ``version_`` and its number.
VERSION_PREFIX = "version_"
_VERSION = re.compile(rf"{VERSION_PREFIX}(\d+)")
#: Where rank 0 leaves its versioned run directory for the processes of the other ranks.
RUN_DIR_ENV = "TAPL_VERSIONED_RUN_DIR"


@dataclass(frozen=True)
class RunChoice:
    """Where a command runs, and why.

    Args:
        path: The run directory.
        reason: Why this one, for the user (e.g. ``"a new version"``).
        created: Whether choosing it created the directory (a new version, reserved at once).
    """

    path: Path
    reason: str
    created: bool = False


def versions(root: str | Path) -> list[int]:
    """The numbers ``N`` of the ``version_N`` directories in ``root``, ascending (none if it does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_VERSION.fullmatch(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def newest_version(root: str | Path) -> Path | None:
    """``root/version_N`` with the highest ``N``; ``None`` when there is none."""
    numbers = versions(root)
    return Path(root) / f"{VERSION_PREFIX}{numbers[-1]}" if numbers else None


def new_version(root: str | Path) -> Path:
    """Create and return ``root/version_N``, one past the highest ``N`` there (``version_0`` for none).

    The directory is made at once, so that two runs started together in the same root never share one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    number = (versions(root) or [-1])[-1] + 1
    while True:
        path = root / f"{VERSION_PREFIX}{number}"
        try:
            path.mkdir()
        except FileExistsError:
            number += 1
            continue
        return path


def checkpoint_run(ckpt_path: str | Path) -> Path | None:
    """The run directory that holds the checkpoint directory ``ckpt_path`` (``RUN/checkpoints/NAME``), if any."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == CHECKPOINTS else None


def choose_run_dir(
    run_dir: str | None, run_root: str, ckpt_path: str | None, command: str, rank: int = 0, reserve: bool = True
) -> RunChoice:
    """The run directory of a ``fit`` or ``test`` (see the module's table).

    Args:
        run_dir: ``--run_dir``: an exact run directory, or ``None`` to version under ``run_root``.
        run_root: ``--run_root``: the root of versioned run directories.
        ckpt_path: ``--ckpt_path``: ``None`` (a new run), ``"last"`` or a checkpoint directory.
        command: ``"fit"`` or ``"test"``.
        rank: This process's global rank; ranks above 0 take rank 0's choice from :data:`RUN_DIR_ENV`.
        reserve: Create a new version's directory (``False``: only name it, e.g. to build without running).

    Raises:
        RunDirError: when there is no run to resume or test, or a rank above 0 cannot know rank 0's choice.
    """
    if run_dir is not None:
        return RunChoice(Path(run_dir), "given as run_dir")
    if rank > 0:
        return _rank_zero_choice(run_root, rank)
    if ckpt_path is not None and ckpt_path != "last":
        holder = checkpoint_run(ckpt_path)
        if holder is not None:
            return RunChoice(holder, f"the run that holds {ckpt_path}")
        if command == "test":
            raise RunDirError(
                f"--ckpt_path {ckpt_path} is not inside a run's {CHECKPOINTS}/ directory: name the run directory "
                "to write the test results to with --run_dir."
            )
    if command == "test" or ckpt_path == "last":
        newest = newest_version(run_root)
        if newest is None:
            action = "test" if command == "test" else "resume"
            raise RunDirError(
                f"no run to {action} under --run_root {run_root} (no {VERSION_PREFIX}N directory there): name the "
                "run with --run_dir, or start one with `tapl fit` without --ckpt_path."
            )
        return RunChoice(newest, f"the newest run under {run_root}")
    if not reserve:
        return RunChoice(Path(run_root) / f"{VERSION_PREFIX}{(versions(run_root) or [-1])[-1] + 1}", "a new version")
    return RunChoice(new_version(run_root), "a new version", created=True)


def _rank_zero_choice(run_root: str, rank: int) -> RunChoice:
    """The versioned run directory that rank 0 chose and left in the environment of the processes it launched."""
    path = os.environ.get(RUN_DIR_ENV)
    if not path:
        raise RunDirError(
            f"process rank {rank} cannot know which {VERSION_PREFIX}N under --run_root {run_root} rank 0 chose: "
            "name the run directory with --run_dir when you start the processes yourself (torchrun, SLURM)."
        )
    return RunChoice(Path(path), "rank 0's choice")


def share_with_other_ranks(choice: RunChoice) -> None:
    """Leave rank 0's versioned run directory for the processes that Lightning launches for the other ranks."""
    os.environ[RUN_DIR_ENV] = str(choice.path)


def release_if_unused(path: Path) -> None:
    """Remove a version directory that a command created but wrote nothing into (it failed before starting)."""
    with contextlib.suppress(OSError):  # it holds the run's files, or is already gone
        path.rmdir()
