"""The suite's own rule, checked on a throwaway suite: a skipped test fails (tests/conftest.py),
except a Debian package the machine cannot install (tests/system_packages.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.system_packages import can_install


def test_a_skipped_test_fails_and_says_why(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\n"
    )
    (tmp_path / "test_throwaway.py").write_text(
        "import pytest\n\n"
        "def test_skips():\n    pytest.skip('no widget')\n\n"
        "@pytest.mark.skipif(True, reason='no gadget')\ndef test_skipped_by_mark():\n    pass\n\n"
        "def test_runs():\n    pass\n\n"
        "def test_needs_a_package():\n"
        "    from tests import system_packages\n"
        "    system_packages.require('no-such-package', False, 'a throwaway test')\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    # as root with apt (this machine, CI) the missing package fails too: make test installs it
    expected = (
        "2 failed, 1 passed, 1 error" if can_install() else "1 failed, 1 passed, 1 skipped, 1 error"
    )
    assert expected in result.stdout, result.stdout
    assert "skipped, which this suite does not allow: Skipped: no widget" in result.stdout
    assert "no gadget" in result.stdout
    assert "sudo apt-get install no-such-package" in result.stdout
