"""Install the torch build that fits this machine into the running Python (``make setup``).

``--build auto`` (the default) picks ``cuda`` where ``nvidia-smi`` lists a GPU and ``cpu``
elsewhere; ``cpu``, ``cuda`` and ``keep`` (leave an installed torch alone) force a choice. It
prints what it chose and why, then installs:

- ``cpu``: first asks the configured package index, without downloading the wheel
  (``pip install --dry-run --report``), which build ``torch==VERSION`` would be. A CPU build
  (a ``+cpu`` version, or no ``nvidia-*`` packages beside it, as on macOS and Windows) is
  installed from there. A CUDA build (PyPI's Linux wheels: several GB with their ``nvidia-*``
  libraries) is not: the CPU wheel comes from PyTorch's CPU index instead (``--cpu-index``),
  and only if that index cannot be reached does the default build come from the package index,
  with a note that says so.
- ``cuda``: ``torch==VERSION`` from the package index (PyPI's Linux wheels are CUDA builds).
- ``keep``: nothing, when torch is importable; else the package index's default build.

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUILDS = ("auto", "cpu", "cuda", "keep")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def detect_build(nvidia_smi: str | None = None) -> tuple[str, str]:
    """``("cuda", why)`` where ``nvidia-smi -L`` lists a GPU, else ``("cpu", why)``."""
    tool = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    if tool is None:
        return "cpu", "nvidia-smi not found: no NVIDIA GPU"
    try:
        listed = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return "cpu", f"nvidia-smi did not run ({error})"
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode != 0 or not gpus:
        return "cpu", "nvidia-smi lists no GPU"
    return "cuda", f"nvidia-smi lists {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}"


def is_cuda_build(report: dict) -> bool:
    """Whether a ``pip install --report`` would install a CUDA (or ROCm) build of torch."""
    for item in report.get("install", []):
        name = item["metadata"]["name"].lower()
        version = item["metadata"]["version"]
        if name.startswith("nvidia-") or (
            name == "torch" and ("+cu" in version or "+rocm" in version)
        ):
            return True
    return False


def _pip(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pip", *args])


def _index_offers_cuda(requirement: str) -> bool | None:
    """What the configured index would install for ``requirement``; None if it cannot say."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        resolved = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             "--report", str(report), requirement],
            capture_output=True, text=True,
        )  # fmt: skip
        if resolved.returncode != 0 or not report.is_file():
            return None
        return is_cuda_build(json.loads(report.read_text()))


def install(build: str, version: str, cpu_index: str) -> int:
    requirement = f"torch=={version}"
    if build == "keep":
        try:
            import torch  # noqa: F401 (only whether it imports)
        except ImportError:
            print("  no torch installed: the package index's default build comes with the package")
            return _pip("install", "--quiet", requirement)
        print("  keeping the installed torch")
        return 0
    if build == "cuda":
        return _pip("install", "--quiet", requirement)
    offers_cuda = _index_offers_cuda(requirement)
    if offers_cuda is False:
        print("  the package index has a CPU build: installing it")
        return _pip("install", "--quiet", requirement)
    print(f"  the package index offers a CUDA build: the CPU wheel comes from {cpu_index}")
    if _pip("install", "--quiet", "--index-url", cpu_index, requirement) == 0:
        return 0
    print(
        f"  note: {cpu_index} could not be reached; installing the package index's default "
        "build of torch instead (TORCH_CPU_INDEX=URL names another CPU index)"
    )
    return _pip("install", "--quiet", requirement)


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # in order with pip's own output
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="auto")
    parser.add_argument("--version", default="2.13.0")
    parser.add_argument("--cpu-index", default=CPU_INDEX)
    args = parser.parse_args(argv)
    if args.build not in BUILDS:
        print(f"TORCH_BUILD: got {args.build!r}; allowed: {', '.join(BUILDS)}", file=sys.stderr)
        return 2
    if args.build == "auto":
        build, why = detect_build()
    else:
        build, why = args.build, f"TORCH_BUILD={args.build}"
    print(f"torch {args.version}: {build} build ({why}; TORCH_BUILD=cpu|cuda|keep overrides)")
    return install(build, args.version, args.cpu_index)


if __name__ == "__main__":
    sys.exit(main())
