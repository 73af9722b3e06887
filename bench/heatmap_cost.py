"""What the heatmaps of ``MomentStatistics`` cost: training steps, and drawing at the end of fit.

Run: ``python bench/heatmap_cost.py [--cycles C] [--threads T] [--run-folder DIR] [--drawing-only]``

1. **Training steps**, side by side in one fit: the BERT recipe's module around the small random
   BERT of ``bench/callback_overhead.py`` (5.5M parameters, batch 16 x 128 tokens, AdamW), with
   ``MomentStatistics(every_n_steps=1)``, the worst case: every step logs. Blocks of 50 steps
   alternate ``heatmaps=False`` / ``True`` (order off, on, on, off per cycle, so drifting load
   hits both alike); images during training are off (``heatmap_every_n_steps=None``), so the
   difference is what every logging step adds: keeping the per-layer values and the events.
2. **Drawing**, timed alone: every statistic's heatmap (what ``on_fit_end`` draws) and the four
   headline ones (what a training-time image costs) for the recipe's real layer count (53 layers
   of all-MiniLM-L6-v2) and 12, 120 and 1,200 logged steps; with ``--run-folder`` also the run
   page of a finished recipe run (``recipes.pages.run_page.write_run_page``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from callback_overhead import RandomTokens, build_module, quiet_trainer

from optim_callbacks import MomentHistory, MomentStatistics
from optim_callbacks.callbacks.moment_stats import HEADLINE_HEATMAPS
from optim_callbacks.heatmaps import render_heatmaps

BLOCK = 50
CYCLE = (False, True, True, False)  # heatmaps off / on


class HeatmapBlocks(Callback):
    """Switches ``heatmaps`` per block of steps and times every step (placed first)."""

    def __init__(self, moments: MomentStatistics, blocks: list[bool]) -> None:
        self.moments, self.blocks, self.starts = moments, blocks, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        block = trainer.global_step // BLOCK
        if block < len(self.blocks):
            self.moments.heatmaps = self.blocks[block]


def training_steps(cycles: int) -> None:
    module = build_module("small")
    blocks = [False, *(on for _ in range(cycles) for on in CYCLE)]  # a warm-up block first
    steps = BLOCK * len(blocks)
    vocab = module.network.config.vocab_size
    data = DataLoader(RandomTokens((steps + 1) * 16, 128, vocab), batch_size=16)
    moments = MomentStatistics(every_n_steps=1, heatmap_every_n_steps=None)
    schedule = HeatmapBlocks(moments, blocks)
    with tempfile.TemporaryDirectory() as root:
        trainer = quiet_trainer(root, steps + 1, [schedule, moments])
        trainer.fit(module, train_dataloaders=data)
        times = [b - a for a, b in zip(schedule.starts, schedule.starts[1:], strict=False)]
    print(
        f"1. training steps: small BERT, every step logs, {cycles} cycles of {len(CYCLE)} blocks "
        f"of {BLOCK} steps, torch threads {torch.get_num_threads()}"
    )
    ratios = []
    for cycle in range(cycles):
        first = 1 + cycle * len(CYCLE)
        on, off = [], []
        for b in range(first, first + len(CYCLE)):
            (on if blocks[b] else off).extend(times[b * BLOCK : (b + 1) * BLOCK])
        ratios.append(statistics.fmean(on) / statistics.fmean(off))
        print(
            f"   cycle {cycle + 1}: heatmaps off {1000 * statistics.fmean(off):.1f} ms/step, "
            f"on {1000 * statistics.fmean(on):.1f} ms/step, ratio {ratios[-1]:.3f}"
        )
    print(f"   median ratio on/off: {statistics.median(ratios):.3f}")
    recorded = moments.history
    print(
        f"   history kept: {len(recorded)} steps x {len(recorded.layers)} layers x "
        f"{len(recorded.statistics)} statistics"
    )


def synthetic_history(layers: int, steps: int, statistics_count: int = 16) -> MomentHistory:
    generator = torch.Generator().manual_seed(0)
    names = [f"network.bert.encoder.layer.{i // 9}.part{i % 9}" for i in range(layers)]
    history = MomentHistory(names)
    stats = ["update_to_weight", "step_size_p50", "step_size_p95", "step_size_p05"]
    stats += [f"statistic_{i}" for i in range(statistics_count - len(stats))]
    for step in range(steps):
        values = 10 ** (-6 * torch.rand(statistics_count, layers, generator=generator))
        history.record(
            10 * step + 9,
            {n: {s: float(values[k, i]) for k, s in enumerate(stats)} for i, n in enumerate(names)},
        )
    history.add_event(10 * (steps // 2), "switch", "AdamW → SGD")
    return history


def drawing(run_folder: str | None) -> None:
    print("2. drawing (53 layers, 16 statistics):")
    for steps in (12, 120, 1200):
        history = synthetic_history(53, steps)
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            render_heatmaps(history, folder)
            everything = time.perf_counter() - started
            started = time.perf_counter()
            render_heatmaps(history, folder, list(HEADLINE_HEATMAPS))
            headline = time.perf_counter() - started
        print(
            f"   {steps:>5} logged steps: all 16 heatmaps {everything:.2f} s "
            f"({everything / 16 * 1000:.0f} ms each), the 4 headline ones {headline:.2f} s"
        )
    if run_folder:
        from recipes.pages.run_page import write_run_page

        started = time.perf_counter()
        write_run_page(run_folder)
        print(f"   run page of {Path(run_folder).name}: {time.perf_counter() - started:.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3, help="cycles of 4 blocks of 50 steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--run-folder", default=None, help="a finished recipe run's folder")
    parser.add_argument("--drawing-only", action="store_true", help="skip part 1 (training)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if not args.drawing_only:
        training_steps(args.cycles)
    drawing(args.run_folder)


if __name__ == "__main__":
    main()
