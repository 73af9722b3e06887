"""Training-step time of a BERT classifier with and without ``MomentStatistics`` (or, with
``--health``, ``SpikeSkip`` + ``TrainingFindings``), in one run.

Run: ``python bench/callback_overhead.py [--cycles C] [--model small|tiny|base100m|minilm]
[--threads T] [--fsdp2] [--quick N] [--health]``

``--fsdp2``: two gloo processes under ``FSDP2Strategy``, each encoder layer and the root
sharded (``ClassificationModule.configure_model``); the callback then exchanges one packed
buffer per logging step. Rank zero's step times are reported.

The model is the BERT recipe's Lightning module (``recipes.core.classification.ClassificationModule``:
AdamW + warmup + cosine, torchmetrics, ``self.log``, a ``CSVLogger``) around a BERT encoder: by
default a small random one (4 layers, hidden 256, 4 heads, 8,192-token vocabulary: 5.5M
parameters); ``--model tiny`` (2 layers, hidden 128, BERT's 30,522-token vocabulary: 4.4M,
91% embeddings); ``--model base100m`` a BERT-base-shaped stand-in for a 100M-parameter model
(12 layers, hidden 768, 12 heads, 16,384-token vocabulary: 98.6M); ``--model minilm`` the
recipe's real all-MiniLM-L6-v2 (22.7M parameters, ``recipes.bert_finetune.BertClassifier``).

One fit runs blocks of 50 optimizer steps, each block in one configuration: the callback off
(``every_n_steps`` beyond the run: one integer test per step, which is what a non-logging step
costs), every 50 steps (one logging step per block) and every step. Blocks follow the order
off, 50, 1, 1, 50, off in each cycle, so a drifting machine load hits every configuration
alike. Step time is the wall time between consecutive ``on_train_batch_start`` calls (forward,
backward, optimizer step, every callback and logger). Reported: per configuration the median
over cycles of its mean ms/step, and the median over cycles of its ratio to the "off" blocks of
the same cycle; and the median extra time of one logging step. The first block is a warm-up.

``--quick N`` (for models whose steps take seconds): after two warm-up steps, ``N`` pairs of
steps, one without logging and one logging (``every_n_steps`` set per step), alternating;
reported: the median plain step, the median logging step, the extra time of a logging step and
the overhead it implies with logging every 50 steps, ``extra / (50 * plain step)``.

``--health``: the recipe's training-health callbacks, ``SpikeSkip`` (default window) and
``TrainingFindings``, on or off per block of 50 steps (order off, on, on, off in each cycle),
with the recipe's ``GradientClipping(max_norm=1.0)`` in every block and no ``MomentStatistics``.
Clipping comes first here, so it computes the gradient norm in every block and SpikeSkip reuses
it (in the recipes SpikeSkip comes first and computes the one norm that clipping then reuses:
the same work, counted on the other side). Off, their hooks are not called at all (a gate around
each). No spike occurs (random tokens, a healthy loss). Reported per cycle: the mean wall and
CPU (``time.thread_time``: the one torch thread's work) ms/step of the on and off blocks and
their ratio; then the medians over cycles, and each callback's CPU time inside its hooks per step
against the median off step's CPU time. On a loaded machine the CPU figures are the steadier.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from optim_callbacks import (
    FSDP2Strategy,
    GradientClipping,
    MomentStatistics,
    SpikeSkip,
    TrainingFindings,
)

BLOCK = 50
CYCLE = ("off", "every_n_steps=50", "every_n_steps=1", "every_n_steps=1", "every_n_steps=50", "off")
EVERY = {"off": 10**9, "every_n_steps=50": 50, "every_n_steps=1": 1}
HEALTH_CYCLE = ("off", "on", "on", "off")


class RandomTokens(Dataset):
    """Fixed random token ids and labels: the step time does not depend on the text."""

    def __init__(self, size: int, seq_len: int, vocab_size: int, num_classes: int = 2) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(1000, vocab_size, (size, seq_len), generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


class BlockSchedule(Callback):
    """Configures each block (``configure(name)``, e.g. the callback's ``every_n_steps``) and
    times every step.

    Placed first among the callbacks, so the change is made before the callback's own hooks.
    """

    def __init__(
        self, configure: Callable[[str], None], blocks: list[str], block: int = BLOCK
    ) -> None:
        self.configure = configure
        self.blocks = blocks
        self.block = block
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []  # this thread's CPU time (the one torch thread's work)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.thread_time())
        block = trainer.global_step // self.block
        if block < len(self.blocks):
            self.configure(self.blocks[block])

    def step_times(self, cpu: bool = False) -> list[float]:
        starts = self.cpu_starts if cpu else self.starts
        return [b - a for a, b in itertools.pairwise(starts)]


class Gate(Callback):
    """Calls the wrapped callback's training hooks only while ``on`` (switched at a step's
    start, so a step is wholly on or off); ``cpu`` sums this thread's CPU time inside them."""

    HOOKS = (
        "on_fit_start",
        "on_train_batch_start",
        "on_before_backward",
        "on_before_optimizer_step",
        "on_train_batch_end",
    )

    def __init__(self, inner: Callback) -> None:
        self.inner = inner
        self.on = False
        self.cpu = 0.0
        for hook in self.HOOKS:
            setattr(self, hook, self._forward(getattr(inner, hook)))

    def _forward(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def hook(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return None
            start = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.cpu += time.thread_time() - start

        return hook

    @property
    def state_key(self) -> str:
        return f"Gate[{self.inner.state_key}]"

    def setup(self, trainer, pl_module, stage) -> None:
        self.inner.setup(trainer, pl_module, stage)


# Random BERT stand-ins: "small" has a BERT-like mix of parameters (41% embeddings; BERT-base 22%,
# MiniLM 52%); "tiny" (google/bert_uncased_L-2_H-128_A-2's shape) is 91% embeddings, which cost
# the callback as much as any weight but cost training almost nothing: its worst case.
STAND_INS = {
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 8192,
    },
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 30522,
    },
    "base100m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 16384,
    },
}


def stand_in_bert(model: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    shape = STAND_INS[model]
    config = BertConfig(**shape, intermediate_size=4 * shape["hidden_size"], num_labels=2)
    return BertForSequenceClassification(config)


def build_module(model: str) -> L.LightningModule:
    if model == "minilm":
        from recipes.bert_finetune import BertClassifier

        return BertClassifier(num_classes=2)
    from recipes.bert_finetune import PRESET
    from recipes.core.classification import ClassificationModule

    return ClassificationModule(stand_in_bert(model), num_classes=2, optimization=PRESET)


def quiet_trainer(root: str, steps: int, callbacks: list[Callback], **options: Any) -> L.Trainer:
    """A CPU Trainer of ``steps`` steps logging to CSV under ``root``, without checkpoints,
    progress bar or model summary."""
    quiet = ("enable_checkpointing", "enable_progress_bar", "enable_model_summary")
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        **dict.fromkeys(quiet, False),
        logger=CSVLogger(root),
        log_every_n_steps=BLOCK,
        default_root_dir=root,
        **options,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3, help="cycles of 6 blocks of 50 steps")
    parser.add_argument("--model", choices=(*STAND_INS, "minilm"), default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--fsdp2", action="store_true", help="two processes, sharded (FSDP2)")
    parser.add_argument(
        "--quick", type=int, default=0, help="N alternating plain/logging step pairs instead"
    )
    parser.add_argument(
        "--health",
        action="store_true",
        help="SpikeSkip + TrainingFindings on/off instead of MomentStatistics",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    module = build_module(args.model)
    if args.health:
        health_run(module, args)
        return
    if args.quick:
        # one step per block: two warm-up steps, then plain and logging steps alternating
        blocks = ["off", "off", *(["off", "every_n_steps=1"] * args.quick)]
        block = 1
    else:
        blocks = ["off", *(name for _ in range(args.cycles) for name in CYCLE)]  # warm-up first
        block = BLOCK
    steps = block * len(blocks)
    vocab = module.network.config.vocab_size
    data = DataLoader(
        RandomTokens((steps + 1) * args.batch_size, args.seq_len, vocab), batch_size=args.batch_size
    )
    parameters = sum(p.numel() for p in module.parameters())
    where = "FSDP2 over 2 gloo processes, batch per rank" if args.fsdp2 else "one process, batch"
    plan = (
        f"{args.quick} alternating plain/logging step pairs after 2 warm-up steps"
        if args.quick
        else f"{args.cycles} cycles of {len(CYCLE)} blocks of {BLOCK} steps (+1 warm-up block)"
    )
    header = (
        f"model: {args.model} BERT ({parameters / 1e6:.1f}M parameters), {where} "
        f"{args.batch_size} x {args.seq_len} tokens, AdamW; {plan}, "
        f"torch threads {torch.get_num_threads()}"
    )
    moments = MomentStatistics(every_n_steps=EVERY["off"])

    def configure(name: str) -> None:
        moments.every_n_steps = EVERY[name]

    schedule = BlockSchedule(configure, blocks, block)
    with tempfile.TemporaryDirectory() as root:
        trainer = quiet_trainer(
            root,
            steps + 1,
            [schedule, moments],
            devices=2 if args.fsdp2 else 1,
            strategy=FSDP2Strategy(data_parallel_size=2) if args.fsdp2 else "auto",
        )
        trainer.fit(module, train_dataloaders=data)
    if not trainer.is_global_zero:
        return
    print(header)
    times = schedule.step_times()
    if args.quick:
        report_quick(times[2:])
        return

    names = list(EVERY)
    means: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    logging_step_extra: list[float] = []
    for cycle in range(args.cycles):
        first = 1 + cycle * len(CYCLE)
        block_times = {name: [] for name in names}
        for b in range(first, first + len(CYCLE)):
            block_times[blocks[b]].extend(times[b * BLOCK : (b + 1) * BLOCK])
            if blocks[b] == "every_n_steps=50":
                block = times[b * BLOCK : (b + 1) * BLOCK]
                plain = statistics.median(block[:-1])
                logging_step_extra.append(1000 * (block[-1] - plain))
        base = statistics.fmean(block_times["off"])
        for name in names:
            mean = statistics.fmean(block_times[name])
            means[name].append(1000 * mean)
            ratios[name].append(mean / base)
        print(
            f"cycle {cycle + 1}: "
            + ", ".join(f"{n} {1000 * statistics.fmean(block_times[n]):.1f} ms" for n in names)
        )
    print(f"\n{'configuration':<18} {'ms/step':>9} {'ratio':>7} {'overhead':>9}")
    for name in names:
        ratio = statistics.median(ratios[name])
        print(
            f"{name:<18} {statistics.median(means[name]):9.1f} {ratio:7.3f} {100 * (ratio - 1):8.1f}%"
        )
    print(
        f"\none logging step takes {statistics.median(logging_step_extra):.1f} ms more than the "
        "median step of its block (median over blocks)"
    )


def health_run(module: L.LightningModule, args: argparse.Namespace) -> None:
    """``--health``: SpikeSkip + TrainingFindings on and off in blocks, clipping always on."""
    blocks = ["off", *(name for _ in range(args.cycles) for name in HEALTH_CYCLE)]
    steps = BLOCK * len(blocks)
    data = DataLoader(
        RandomTokens((steps + 1) * args.batch_size, args.seq_len, module.network.config.vocab_size),
        batch_size=args.batch_size,
    )
    gates = [Gate(SpikeSkip()), Gate(TrainingFindings())]

    def configure(name: str) -> None:
        for gate in gates:
            gate.on = name == "on"

    schedule = BlockSchedule(configure, blocks)
    parameters = sum(p.numel() for p in module.parameters())
    with tempfile.TemporaryDirectory() as root:
        trainer = quiet_trainer(root, steps + 1, [schedule, GradientClipping(max_norm=1.0), *gates])
        trainer.fit(module, train_dataloaders=data)
    spike_skip = gates[0].inner
    print(
        f"model: {args.model} BERT ({parameters / 1e6:.1f}M parameters), one process, batch "
        f"{args.batch_size} x {args.seq_len} tokens, AdamW, GradientClipping(max_norm=1.0) "
        f"always; SpikeSkip + TrainingFindings off/on in {args.cycles} cycles of "
        f"{len(HEALTH_CYCLE)} blocks of {BLOCK} steps (+1 warm-up block), torch threads "
        f"{torch.get_num_threads()}; SpikeSkip judged {spike_skip.judged_steps} steps, skipped "
        f"{spike_skip.skipped_steps}"
    )
    walls, cpus = schedule.step_times(), schedule.step_times(cpu=True)
    on_steps = sum(BLOCK for name in blocks if name == "on")
    rows: dict[str, list[float]] = {"wall": [], "cpu": []}
    for cycle in range(args.cycles):
        first = 1 + cycle * len(HEALTH_CYCLE)
        line = []
        for label, times in (("wall", walls), ("cpu", cpus)):
            per: dict[str, list[float]] = {"off": [], "on": []}
            for b in range(first, first + len(HEALTH_CYCLE)):
                per[blocks[b]].extend(times[b * BLOCK : (b + 1) * BLOCK])
            off, on = statistics.fmean(per["off"]), statistics.fmean(per["on"])
            rows[label].append(on / off)
            line.append(f"{label} off {1000 * off:.1f} ms, on {1000 * on:.1f} ms, {on / off:.4f}x")
        print(f"cycle {cycle + 1}: " + "; ".join(line))
    off_cpu = statistics.median(
        cpus[b * BLOCK + i]
        for b, name in enumerate(blocks)
        if name == "off" and b > 0  # block 0 warms up
        for i in range(BLOCK)
    )
    inside = ", ".join(
        f"{type(gate.inner).__name__} {1000 * gate.cpu / on_steps:.2f} ms "
        f"({100 * gate.cpu / on_steps / off_cpu:.2f}%)"
        for gate in gates
    )
    print(
        f"median over cycles of the on/off ratio: wall {statistics.median(rows['wall']):.4f}x, "
        f"CPU {statistics.median(rows['cpu']):.4f}x; CPU per step inside the hooks, against the "
        f"median off step's {1000 * off_cpu:.1f} ms: {inside}"
    )


def report_quick(times: list[float]) -> None:
    """Step times alternating plain, logging, plain, ...: medians and the implied overhead."""
    plain = statistics.median(times[0::2])
    logging_step = statistics.median(times[1::2])
    extra = logging_step - plain
    print(
        f"plain step {1000 * plain:.1f} ms, logging step {1000 * logging_step:.1f} ms "
        f"(medians of {len(times[0::2])} and {len(times[1::2])}): a logging step costs "
        f"{1000 * extra:.1f} ms more; logging every 50 steps: {1 + extra / (50 * plain):.4f}x"
    )


if __name__ == "__main__":
    main()
