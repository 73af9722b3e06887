"""The three Debian packages some tests need: Fashion-MNIST, Chromium, the PostgreSQL server.

``make test`` installs them where ``apt-get`` runs as root (``make system``), as on CI. There a
missing package fails its test: setup should have installed it. On a machine that cannot
install them (no root, no apt: a newcomer's laptop, a non-root runner) the test is skipped
with one line naming the package; that is the only skip the suite allows (``tests/conftest.py``
fails every other).
"""

from __future__ import annotations

import os
import shutil

import pytest

SKIP_PREFIX = "needs Debian's"


def can_install() -> bool:
    """Whether ``make system`` installs packages here: ``apt-get`` present and run as root."""
    return shutil.which("apt-get") is not None and os.geteuid() == 0


def require(package: str, present: bool, needed_for: str) -> None:
    """Return where ``package`` is installed; else fail (where ``make test`` would have
    installed it) or skip with the one line that says how to get it."""
    if present:
        return
    how = f"`make test` as root installs it, or: sudo apt-get install {package}"
    if can_install():
        pytest.fail(f"Debian's {package} is missing ({needed_for}): {how}", pytrace=False)
    pytest.skip(f"{SKIP_PREFIX} {package} ({needed_for}): {how}")
