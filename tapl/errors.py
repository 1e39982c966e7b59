"""The failures tapl expects, which the ``tapl`` command reports in one line, and the Ctrl-C stop.

A :class:`TaplError` is caused by what the user gave (a configuration, data, a checkpoint, a run directory), not
by a bug: the command prints ``tapl: error: <message>`` and exits with status 1 (``TAPL_DEBUG=1`` shows the
traceback too). Its message names the setting, file or value at fault and, where there is one, the fix.
"""

from __future__ import annotations

from pathlib import Path


class TaplError(Exception):
    """A failure the user can fix from its message (bad configuration, data, checkpoint or run directory)."""


class DataError(TaplError, ValueError):
    """A task's data cannot be used: an unreadable file, a missing or non-finite value, an empty table."""


class CheckpointError(TaplError):
    """A checkpoint cannot be loaded: a missing, truncated or corrupted file, or one whose checksum differs."""


class Stopped(BaseException):
    """The user stopped the run (Ctrl-C).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` (a failing client's) swallows
    it; unlike ``KeyboardInterrupt``, Lightning's trainer lets it through instead of exiting the process.

    Attributes:
        run_dir: The run directory of the stopped run, once the engine has added it.
        round: The last round whose record was written when the run stopped.
    """

    def __init__(self) -> None:
        super().__init__("stopped by the user (Ctrl-C)")
        self.run_dir: Path | None = None
        self.round: int | None = None
