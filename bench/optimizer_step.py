"""Time ``optimizer.step()`` on a ~20M-parameter stack of tensors, all optimizers side by side.

Run: ``python bench/optimizer_step.py [--steps N] [--warmup W] [--layers L] [--width D]``

Every optimizer in the registry (built by ``build_optimizer`` with its defaults and automatic
implementation choice), torch's fused AdamW (the reference every ratio is taken against), our
AdaBelief in each implementation, and the authors' adabelief-pytorch 0.2.1 (if installed) step
the same parameters with the same fixed random gradients. Reported per row: median ms per step
after warm-up steps (rows interleaved step by step), the ratio to fused AdamW, and the bytes held in optimizer state tensors.
AdaBelief ``fused`` compiles on its first (warm-up) step; compile time is printed separately.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from optim_callbacks import OPTIMIZERS, AdaBelief, build_optimizer


def make_params(layers: int, width: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """``layers`` Linear(width, width)-shaped weight + bias pairs, with random gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        for shape in ((width, width), (width,)):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
            p.grad = torch.randn(shape, generator=gen) * 1e-3
            params.append(p)
    return params


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                ptr = value.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += value.untyped_storage().nbytes()
    return total


def impl_of(optimizer: Optimizer) -> str:
    defaults = optimizer.defaults
    if defaults.get("fused"):
        return "fused"
    if defaults.get("foreach") is False:
        return "for-loop"
    if defaults.get("foreach") or isinstance(optimizer, AdaBelief):
        return "foreach"  # AdaBelief's default (None) is foreach; torch's None on CPU is not
    return "for-loop"


def time_round_robin(
    optimizers: list[Optimizer], warmup: int, steps: int
) -> tuple[list[float], list[float]]:
    """Warm each optimizer up, then time one step of each in turn, ``steps`` rounds.

    Interleaving spreads background load on a shared machine over all rows alike.
    Returns (seconds of each one's first step, median seconds per timed step of each).
    """
    first = []
    for optimizer in optimizers:
        for i in range(warmup):
            start = time.perf_counter()
            optimizer.step()
            if i == 0:
                first.append(time.perf_counter() - start)
    times: list[list[float]] = [[] for _ in optimizers]
    for _ in range(steps):
        for k, optimizer in enumerate(optimizers):
            start = time.perf_counter()
            optimizer.step()
            times[k].append(time.perf_counter() - start)
    return first, [statistics.median(t) for t in times]


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--layers", type=int, default=19)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = make_params(args.layers, args.width)
    n = sum(p.numel() for p in params)
    print(
        f"{n / 1e6:.2f}M parameters in {len(params)} tensors (float32, CPU), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps, "
        f"load average {_load_average()}\n"
    )

    def quiet(factory: Callable[[], Optimizer]) -> Callable[[], Optimizer]:
        def build() -> Optimizer:
            with contextlib.redirect_stdout(io.StringIO()):  # adabelief-pytorch prints banners
                return factory()

        return build

    runs: list[tuple[str, str | None, Callable[[], Optimizer]]] = [
        ("torch AdamW (reference)", "fused", lambda: torch.optim.AdamW(params, fused=True)),
    ]
    for name, _ in OPTIMIZERS.items():
        runs.append((f"registry: {name}", None, lambda name=name: build_optimizer(name, params)))
    for impl, flags in (
        ("for-loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        runs.append(("AdaBelief (ours)", impl, lambda flags=flags: AdaBelief(params, **flags)))
    try:
        from adabelief_pytorch import AdaBelief as AuthorsAdaBelief

        runs.append(
            (
                "adabelief-pytorch 0.2.1",
                "for-loop",
                quiet(
                    lambda: AuthorsAdaBelief(
                        params, weight_decouple=True, rectify=False, print_change_log=False
                    )
                ),
            )
        )
    except ImportError:
        print("(adabelief-pytorch not installed: its row is skipped)\n")

    optimizers = [factory() for _, _, factory in runs]
    firsts, medians = time_round_robin(optimizers, max(args.warmup, 1), args.steps)
    results = [
        (label, impl or impl_of(opt), first, seconds, state_bytes(opt))
        for (label, impl, _), opt, first, seconds in zip(
            runs, optimizers, firsts, medians, strict=True
        )
    ]

    reference = results[0][3]
    print("| optimizer | impl | ms/step | vs fused AdamW | state MiB | state bytes/param |")
    print("|---|---|---:|---:|---:|---:|")
    for label, impl, _, seconds, nbytes in results:
        print(
            f"| {label} | {impl} | {seconds * 1e3:.1f} | {seconds / reference:.2f}x "
            f"| {nbytes / 2**20:.1f} | {nbytes / n:.1f} |"
        )

    by_key = {(label, impl): (first, seconds) for label, impl, first, seconds, _ in results}
    authors = by_key.get(("adabelief-pytorch 0.2.1", "for-loop"))
    print()
    for impl in ("for-loop", "foreach", "fused"):
        first, ours = by_key[("AdaBelief (ours)", impl)]
        line = f"AdaBelief {impl}: {ours / reference:.2f}x fused AdamW"
        if authors:
            line += f", {authors[1] / ours:.1f}x faster than adabelief-pytorch 0.2.1"
        if impl == "fused":
            line += f" (first step incl. compile: {first:.1f} s)"
        print(line)


if __name__ == "__main__":
    main()
