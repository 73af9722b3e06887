"""Training-step time of a BERT classifier with and without ``MomentStatistics``, in one run.

Run: ``python bench/callback_overhead.py [--rounds R] [--steps N] [--model tiny|minilm]``

The model is the BERT recipe's Lightning module (``recipes.classification.ClassificationModule``,
AdamW + warmup + cosine, torchmetrics, ``self.log``) around a BERT encoder: by default a tiny
random one (``BertConfig`` with 2 layers, hidden 128, 2 heads, BERT's 30,522-token vocabulary:
4.4M parameters), or with ``--model minilm`` the recipe's real all-MiniLM-L6-v2 (22.7M).
Three configurations train side by side, each with a ``CSVLogger``: no callback, the callback
every 50 steps, and every step. Each round fits every configuration for ``N + 1`` steps
(the order alternates between rounds) and times the ``N`` intervals between consecutive
``on_train_batch_start`` calls, so everything one step costs is inside, setup is not. The first
round is a warm-up. Reported: median ms per step over rounds, the median over rounds of each
round's ratio to the baseline round (paired, so slow phases of a shared machine cancel), and
the median extra time of a logging step.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from optim_callbacks import MomentStatistics


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


class StepTimer(Callback):
    """Wall time between consecutive ``on_train_batch_start`` calls."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    @property
    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def build_module(model: str) -> L.LightningModule:
    if model == "minilm":
        from recipes.bert_finetune import BertClassifier

        return BertClassifier(num_classes=2)
    from recipes.classification import ClassificationModule

    return ClassificationModule(
        tiny_bert(), num_classes=2, optimizer="adamw", lr=1e-4, weight_decay=0.01
    )


def fit_once(
    module: L.LightningModule, data: DataLoader, steps: int, callback: Callback | None, root: str
) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + 1,
        logger=CSVLogger(root),
        callbacks=[c for c in (callback, timer) if c is not None],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=data)
    return timer.intervals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds (after one warm-up round)"
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="timed steps per fit (a multiple of 50)"
    )
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    module = build_module(args.model)
    vocab = module.network.config.vocab_size
    data = DataLoader(
        RandomTokens((args.steps + 1) * args.batch_size, args.seq_len, vocab),
        batch_size=args.batch_size,
    )
    parameters = sum(p.numel() for p in module.parameters())
    configurations: dict[str, Callable[[], Callback | None]] = {
        "no callback": lambda: None,
        "every_n_steps=50": lambda: MomentStatistics(every_n_steps=50),
        "every_n_steps=1": lambda: MomentStatistics(every_n_steps=1),
    }
    names = list(configurations)
    times: dict[str, list[float]] = {name: [] for name in names}  # mean ms/step per round
    ratios: dict[str, list[float]] = {name: [] for name in names}
    logging_step_extra: list[float] = []
    print(
        f"model: {args.model} BERT ({parameters / 1e6:.1f}M parameters), batch {args.batch_size} x "
        f"{args.seq_len} tokens, AdamW; {args.rounds} rounds of {args.steps} steps "
        f"(+1 warm-up round), torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds + 1):
            order = names if round_index % 2 == 0 else names[::-1]
            this_round: dict[str, list[float]] = {}
            for name in order:
                this_round[name] = fit_once(module, data, args.steps, configurations[name](), root)
            if round_index == 0:
                continue
            base = statistics.fmean(this_round[names[0]])
            for name in names:
                mean = statistics.fmean(this_round[name])
                times[name].append(1000 * mean)
                ratios[name].append(mean / base)
            sparse = this_round["every_n_steps=50"]
            logging_steps = sparse[49::50]
            others = [t for i, t in enumerate(sparse) if i % 50 != 49]
            logging_step_extra.append(
                1000 * (statistics.median(logging_steps) - statistics.median(others))
            )
            print(
                f"round {round_index}: "
                + ", ".join(f"{n} {1000 * statistics.fmean(this_round[n]):.1f} ms" for n in names)
            )
    print(f"\n{'configuration':<18} {'ms/step':>9} {'ratio':>7} {'overhead':>9}")
    for name in names:
        ratio = statistics.median(ratios[name])
        print(
            f"{name:<18} {statistics.median(times[name]):9.1f} {ratio:7.3f} {100 * (ratio - 1):8.1f}%"
        )
    print(
        f"\none logging step costs {statistics.median(logging_step_extra):.1f} ms more than a plain step (median)"
    )


if __name__ == "__main__":
    main()
