"""One run per run directory: an exclusive lock held while a ``tapl`` command writes there."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from tapl.run_dir import RunDirError

#: The lock file inside the run directory; it holds the pid of the process that holds the lock.
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on ``RUN_DIR/.lock``, held from ``__enter__`` to ``__exit__``.

    A second process that asks for it fails at once, naming the holder's pid. The operating system releases the
    lock when its process dies (a kill leaves no stale lock). On release the lock file is removed, and so is the
    run directory when this lock created it and nothing else was written there.

    Args:
        root: The run directory (created if needed).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None
        self._created_root = False

    @staticmethod
    def check_free(root: str | Path) -> None:
        """Fail at once if another process holds ``root``'s lock (before a command spends time building a model).

        Creates nothing; the lock itself is taken later by entering a :class:`RunLock`.

        Raises:
            RunDirError: naming the holder's pid.
        """
        lock = RunLock(root)
        if lock.path.is_file():
            with lock:
                pass

    def __enter__(self) -> RunLock:
        self._created_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(
                    f"{self.root} is in use by another tapl process (pid {holder}): wait for it to finish, or "
                    "choose another --run_dir."
                ) from None
            # The holder may have removed the file between our open and our lock: lock the file now in place.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created_root:
            with contextlib.suppress(OSError):  # the run wrote something there: keep it
                self.root.rmdir()
