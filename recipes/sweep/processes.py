"""A sweep's child processes end with it, and one sweep at a time uses a sweep folder.

- :func:`die_with_parent` runs in each child between ``fork`` and ``exec``: on Linux it asks
  the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill the child when the sweep process
  dies, whatever killed it, SIGKILL included. Elsewhere it does nothing.
- :class:`FolderLock` holds an exclusive ``flock`` on ``<folder>/sweep.lock`` for the sweep's
  lifetime. The kernel drops it when the process dies, so a lock left by a dead sweep is simply
  taken over; a second sweep on a folder in use is refused with one line naming the process.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from pathlib import Path
from types import TracebackType

__all__ = ["FolderLock", "die_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Make this (child) process receive SIGKILL when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class FolderLock:
    """``with FolderLock(folder):`` holds the folder for this process, or raises ``ValueError``
    (the ``out`` option's one-line usage error) while another live process holds it."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "sweep.lock"
        self._handle = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ValueError(
                f"out: {str(self.path.parent)!r} is in use by a running sweep (process "
                f"{holder}); allowed: wait for it to finish, stop it, or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
