"""A sweep's child processes end with it.

:func:`die_with_parent` runs in each child between ``fork`` and ``exec``: on Linux it asks the
kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill the child when the thread that started it
dies, whatever killed the sweep, SIGKILL included. Elsewhere it does nothing. (The kernel ties
the signal to the starting *thread*: a sweep's worker thread waits for its run's process.)
"""

from __future__ import annotations

import ctypes
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Make this (child) process receive SIGKILL when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
