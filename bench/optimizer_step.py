"""Time ``optimizer.step()`` on a ~20M-parameter stack of tensors, all optimizers side by side.

Run: ``python bench/optimizer_step.py [--threads 1,2] [--steps N] [--layers L] [--width D]
[--entries adadelta,lion]`` (``--entries``: only those registry entries' rows next to the
reference, for a quick before/after of one change); ``--bert-paths lion,lamb`` instead times
each implementation of those entries on BERT-base's parameter list (see :func:`bert_paths`).

For each thread count, every optimizer in the registry (built by ``build_optimizer`` with its
defaults, i.e. ``impl="auto"``), torch's fused AdamW (the reference every ratio is taken
against), the compiled entries' foreach path, our AdaBelief's for-loop and the authors'
adabelief-pytorch 0.2.1 (if installed) step the same parameters with the same fixed random
gradients, rows interleaved step by step. Reported per row: median ms per step after warm-up
steps, the ratio to fused AdamW, the bytes a step must move per parameter (read parameter,
gradient and state, write parameter and state) and the bandwidth that achieves.

Then, for some compiled entries (``FIRST_STEP_ENTRIES``), two fresh processes
sharing one new inductor cache folder time the first step: cold (compiles and runs the C++
compiler) and warm (torch's on-disk cache from the first process).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from optim_callbacks import OPTIMIZERS, SCHEDULE_FREE, AdaBelief, build_optimizer


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


def bytes_moved_per_parameter(optimizer: Optimizer) -> float:
    """The traffic floor of one step per parameter: read the parameter, its gradient and its
    state once, write the parameter and its state once (4 bytes per float32 element). Adam-like
    updates with two state tensors: 28 bytes; factored state (Adafactor) counts as the few
    elements it has."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    numel = sum(p.numel() for p in params)
    state = sum(
        v.numel()
        for s in optimizer.state.values()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and k != "step"
    )
    return 4 * (3 * numel + 2 * state) / numel


COMPILED_ENTRIES = (
    "adadelta",
    "rmsprop",
    "adabelief",
    "lion",
    "lamb",
    "adopt",
    "schedule_free_adamw",
)
# Whose cold and warm first steps are timed (each costs two fresh processes).
FIRST_STEP_ENTRIES = ("adadelta", "rmsprop", "adabelief", "lion", "schedule_free_adamw")


def first_step_child(name: str, layers: int, width: int) -> None:
    """In a fresh process: build ``name`` with its defaults and print its first step's time."""
    params = make_params(layers, width)
    optimizer = build_optimizer(name, params)
    if name in SCHEDULE_FREE:
        optimizer.train()
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step()
    print(json.dumps({"first": first, "second": time.perf_counter() - start}))


def first_step_costs(args: argparse.Namespace, threads: int) -> None:
    """Cold (empty compile cache) and warm (a second process, same cache) first steps."""
    print(f"\nFirst step of the compiled entries, {threads} thread(s), one process each:\n")
    print(
        "| optimizer | cold first step (s) | warm first step, 2nd process (s) | later step (ms) |"
    )
    print("|---|---:|---:|---:|")
    for name in FIRST_STEP_ENTRIES:
        with tempfile.TemporaryDirectory() as cache:
            env = {
                **os.environ,
                "TORCHINDUCTOR_CACHE_DIR": cache,
                "OMP_NUM_THREADS": str(threads),
            }
            command = [
                sys.executable,
                __file__,
                "--first-step-of",
                name,
                "--threads",
                str(threads),
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
            ]
            times = [
                json.loads(
                    subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                for _ in range(2)
            ]
        print(
            f"| `{name}` | {times[0]['first']:.1f} | {times[1]['first']:.1f} "
            f"| {times[1]['second'] * 1e3:.1f} |"
        )


Row = tuple[str, str | None, Callable[[], Optimizer]]


def adabelief_rows(params: list[torch.nn.Parameter]) -> list[Row]:
    """Our AdaBelief's for-loop and the authors' adabelief-pytorch 0.2.1 (if installed)."""
    rows: list[Row] = [("AdaBelief (ours)", "for-loop", lambda: AdaBelief(params, foreach=False))]
    try:
        from adabelief_pytorch import AdaBelief as AuthorsAdaBelief
    except ImportError:
        print("(adabelief-pytorch not installed: its row is skipped)\n")
        return rows

    def build() -> Optimizer:
        with contextlib.redirect_stdout(io.StringIO()):  # adabelief-pytorch prints banners
            return AuthorsAdaBelief(
                params, weight_decouple=True, rectify=False, print_change_log=False
            )

    rows.append(("adabelief-pytorch 0.2.1", "for-loop", build))
    return rows


def steady_state(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> None:
    n = sum(p.numel() for p in params)

    runs: list[Row] = [
        ("torch AdamW (reference)", "fused", lambda: torch.optim.AdamW(params, fused=True)),
    ]
    chosen = args.entries.split(",") if args.entries else OPTIMIZERS.names()
    for name in chosen:
        runs.append((f"registry: `{name}`", None, lambda name=name: build_optimizer(name, params)))
    for name in (n for n in COMPILED_ENTRIES if n in chosen):
        runs.append(
            (
                f"registry: `{name}`, impl=foreach",
                "foreach",
                lambda name=name: build_optimizer(name, params, impl="foreach"),
            )
        )
    if "adabelief" in chosen:
        runs.extend(adabelief_rows(params))

    optimizers = [factory() for _, _, factory in runs]
    for optimizer in optimizers:
        if isinstance(optimizer, tuple(OPTIMIZERS.get(n).optimizer_class for n in SCHEDULE_FREE)):
            optimizer.train()  # schedule-free: steps only in train mode
    _, medians = time_round_robin(optimizers, max(args.warmup, 1), args.steps)
    reference = medians[0]
    print(
        f"{n / 1e6:.2f}M parameters in {len(params)} tensors (float32, CPU), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"median of {args.steps} steps after {args.warmup} warm-up steps, "
        f"load average {_load_average()}\n"
    )
    print("| optimizer | impl | ms/step | vs fused AdamW | bytes moved/param | GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for (label, impl, _), optimizer, seconds in zip(runs, optimizers, medians, strict=True):
        moved = bytes_moved_per_parameter(optimizer)
        print(
            f"| {label} | {impl or impl_of(optimizer)} | {seconds * 1e3:.1f} "
            f"| {seconds / reference:.2f}x | {moved:.0f} | {moved * n / seconds / 1e9:.1f} |"
        )
    del optimizers


# BERT-base (bert-base-uncased): embeddings, 12 encoder layers, pooler; 199 tensors, 109.5M.
def bert_base_shapes() -> list[tuple[int, ...]]:
    hidden, ffn = 768, 3072
    shapes: list[tuple[int, ...]] = [(30522, hidden), (512, hidden), (2, hidden), (hidden,)]
    shapes += [(hidden,)]  # embedding LayerNorm weight and bias
    for _ in range(12):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,), (hidden,), (hidden,)]
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def bert_paths(args: argparse.Namespace) -> None:
    """Each implementation of each entry in ``args.bert_paths`` on BERT-base's parameters
    (fixed random gradients), one entry at a time (three optimizers' state at most in memory):
    ``impl`` fused (the compiled rule), foreach and for-loop as the registry builds them, and
    the rule run eagerly through the compiled path's own frame (``torch.compiler.set_stance(
    "force_eager")``: the per-element function applied as plain torch ops, small tensors
    packed). Median of ``--steps`` steps after ``--warmup``, rows interleaved."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in bert_base_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    n = sum(p.numel() for p in params)
    print(
        f"BERT-base parameter list: {n / 1e6:.1f}M parameters in {len(params)} tensors "
        f"(float32, CPU), torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"median of {args.steps} steps after {args.warmup} warm-up, "
        f"load average {_load_average()}\n"
    )
    print("| optimizer | impl | ms/step | vs fused |")
    print("|---|---|---:|---:|")
    for name in args.bert_paths.split(","):
        rows = [
            ("fused", lambda name=name: build_optimizer(name, params, impl="fused")),
            ("foreach", lambda name=name: build_optimizer(name, params, impl="foreach")),
            ("for-loop", lambda name=name: build_optimizer(name, params, impl="for-loop")),
        ]
        optimizers = [factory() for _, factory in rows]
        eager = _EagerStep(build_optimizer(name, params, impl="fused"))
        labelled = [*zip((label for label, _ in rows), optimizers, strict=True)]
        labelled.append(("the rule, eager (force_eager)", eager))  # type: ignore[arg-type]
        for _, optimizer in labelled:
            if name in SCHEDULE_FREE:
                optimizer.train()
        _, medians = time_round_robin(
            [o for _, o in labelled],
            max(args.warmup, 1),
            args.steps,  # type: ignore[misc]
        )
        for (label, _), seconds in zip(labelled, medians, strict=True):
            print(f"| `{name}` | {label} | {seconds * 1e3:.0f} | {seconds / medians[0]:.2f}x |")
        del optimizers, eager, labelled


class _EagerStep:
    """A compiled entry whose ``step`` runs under ``force_eager``: its rule, uncompiled."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer

    def train(self) -> None:
        self.optimizer.train()  # type: ignore[attr-defined]

    def step(self) -> None:
        with torch.compiler.set_stance("force_eager"):
            self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--layers", type=int, default=19)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument(
        "--threads", default="1,2", help="torch thread counts to run, comma-separated"
    )
    parser.add_argument(
        "--entries", help="only these registry entries, comma-separated (default: all)"
    )
    parser.add_argument(
        "--bert-paths", help="time every implementation of these entries on BERT-base's tensors"
    )
    parser.add_argument("--first-step-of", help=argparse.SUPPRESS)  # the child process
    parser.add_argument(
        "--no-first-step", action="store_true", help="skip the cold/warm first-step processes"
    )
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.first_step_of:
        torch.set_num_threads(thread_counts[0])
        first_step_child(args.first_step_of, args.layers, args.width)
        return
    if args.bert_paths:
        torch.set_num_threads(thread_counts[0])
        bert_paths(args)
        return
    params = make_params(args.layers, args.width)
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s)\n")
        steady_state(args, params)
        if not args.no_first_step:
            first_step_costs(args, threads)


if __name__ == "__main__":
    main()
