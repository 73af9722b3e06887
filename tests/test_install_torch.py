"""``make setup``'s choice of torch build (tools/install_torch.py): what it detects and decides.

The installs themselves are checked by running ``make setup`` in a fresh clone; here the
decisions are, with stand-in ``nvidia-smi`` programs and pip install reports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import install_torch  # noqa: E402


def program(path: Path, output: str, status: int = 0) -> str:
    path.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {status}\n")
    path.chmod(0o755)
    return str(path)


def test_cuda_only_where_nvidia_smi_lists_a_gpu(tmp_path):
    two = program(
        tmp_path / "two", "GPU 0: NVIDIA H100 (UUID: a)\\nGPU 1: NVIDIA H100 (UUID: b)\\n"
    )
    assert install_torch.detect_build(two) == ("cuda", "nvidia-smi lists 2 GPUs")
    none = program(tmp_path / "none", "No devices were found\\n", status=6)
    assert install_torch.detect_build(none) == ("cpu", "nvidia-smi lists no GPU")
    assert install_torch.detect_build(str(tmp_path / "missing"))[0] == "cpu"


def report(*packages: tuple[str, str]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in packages]}


def test_a_cuda_build_is_told_from_a_cpu_build_by_the_install_report():
    assert not install_torch.is_cuda_build(report(("torch", "2.13.0+cpu"), ("sympy", "1.14")))
    assert not install_torch.is_cuda_build(report(("torch", "2.13.0")))  # macOS: CPU only
    linux_pypi = report(("torch", "2.13.0"), ("nvidia-cublas-cu12", "12.8.4.1"))
    assert install_torch.is_cuda_build(linux_pypi)
    assert install_torch.is_cuda_build(report(("torch", "2.13.0+cu128")))
    assert install_torch.is_cuda_build(report(("torch", "2.13.0+rocm6.4")))


@pytest.mark.parametrize("build", ["gpu", "CPU"])
def test_an_unknown_build_is_one_line_and_exit_status_2(build):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "install_torch.py"), "--build", build],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"TORCH_BUILD: got {build!r}; allowed: auto, cpu, cuda, keep"
