"""SpikeSkip in real Lightning runs on CPU.

The oracle: a run whose data holds one bad batch, which SpikeSkip skips, ends with the same
weights, optimizer state and learning rates (bit for bit) as a run whose data lacks that batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader

from optim_callbacks import (
    AdamToSGD,
    GradientClipping,
    ScheduleFreeModes,
    SpikeSkip,
    build_optimizer,
    build_scheduler,
    lightning_scheduler_config,
)
from optim_callbacks.callbacks.spike_skip import describe_event
from tests.lib.refusals import assert_refused
from tests.lib.tiny import fp16_mixed, tiny_trainer

NORMAL, LOSS_SPIKE, GRAD_SPIKE = 0, 1, 2
SMALL = {"window": 16, "warmup": 8}  # a short window, so the sigma rule acts in a short run


def clean_batches(n: int, batch_size: int = 8, features: int = 8) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(features, 1, generator=generator)
    batches = []
    for _ in range(n):
        x = torch.randn(batch_size, features, generator=generator)
        y = x @ w + 0.1 * torch.randn(batch_size, 1, generator=generator)
        batches.append((x, y, torch.tensor(NORMAL)))
    return batches


def bad_batch(kind: int, batch_size: int = 8, features: int = 8) -> tuple[torch.Tensor, ...]:
    """``LOSS_SPIKE``: labels scrambled (permuted, sign flipped) and the loss scaled x100;
    ``GRAD_SPIKE``: an ordinary loss value whose gradient is scaled x1000."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, features, generator=generator)
    y = -x.sum(dim=1, keepdim=True)[torch.randperm(batch_size, generator=generator)]
    return (x, y, torch.tensor(kind))


def with_batch(batches: list, index: int, batch: tuple) -> list:
    return [*batches[:index], batch, *batches[index:]]


class SpikyModule(L.LightningModule):
    """A small MLP trained on an explicit list of batches, with a fixed-length schedule (so a
    run that lacks a batch has the same LR curve per optimizer step)."""

    def __init__(
        self,
        batches: list,
        optimizer: str = "adamw",
        lr: float = 1e-2,
        schedule: str = "cosine",
        total_steps: int = 60,
        warmup: int = 4,
        options: dict[str, Any] | None = None,
        lr_jump_at: int | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))
        self.batches = batches
        self.optimizer_name, self.lr, self.schedule = optimizer, lr, schedule
        self.total_steps, self.warmup, self.options = total_steps, warmup, options or {}
        self.lr_jump_at = lr_jump_at

    def training_step(self, batch, batch_idx):
        x, y, kind = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y.float())
        kind = int(kind)
        if kind == LOSS_SPIKE:
            loss = loss * 100
        elif kind == GRAD_SPIKE:
            loss = loss + 999 * (loss - loss.detach())
        return loss

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_name, self, lr=self.lr, **self.options)
        if self.lr_jump_at is not None:
            jump = self.lr_jump_at
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 1.0 if step < jump else 1e4
            )
        else:
            scheduler = build_scheduler(
                self.schedule, optimizer, total_steps=self.total_steps, warmup=self.warmup
            )
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler_config(scheduler)}


def fit(tmp_path: Path, module: SpikyModule, callbacks: list, **options: Any) -> L.Trainer:
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return trainer


def flat_state(trainer: L.Trainer) -> dict[str, Any]:
    """Weights, optimizer state (every tensor and number) and LRs at the end of a fit."""
    module = trainer.lightning_module
    optimizer = trainer.optimizers[0]
    state = optimizer.state_dict()
    tensors = []
    numbers = []
    for entry in state["state"].values():
        for key in sorted(entry):
            value = entry[key]
            if isinstance(value, torch.Tensor):
                tensors.append(value.detach().float().flatten())
            else:
                numbers.append((key, value))
    groups = [
        {k: v for k, v in g.items() if k != "params" and not isinstance(v, torch.Tensor)}
        for g in state["param_groups"]
    ]
    return {
        "weights": torch.cat([p.detach().float().flatten() for p in module.parameters()]),
        "state": torch.cat(tensors) if tensors else torch.empty(0),
        "numbers": numbers,
        "groups": groups,
        "scheduler": [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs],
    }


def assert_same_run(a: L.Trainer, b: L.Trainer) -> None:
    sa, sb = flat_state(a), flat_state(b)
    torch.testing.assert_close(sa["weights"], sb["weights"], rtol=0, atol=0)
    torch.testing.assert_close(sa["state"], sb["state"], rtol=0, atol=0)
    assert sa["numbers"] == sb["numbers"]
    assert sa["groups"] == sb["groups"]
    assert sa["scheduler"] == sb["scheduler"]


def spike(callbacks: list) -> SpikeSkip:
    return next(c for c in callbacks if isinstance(c, SpikeSkip))


def oracle(
    tmp_path: Path,
    bad: tuple,
    at: int,
    n: int = 30,
    skip_options: dict[str, Any] | None = None,
    module_options: dict[str, Any] | None = None,
    extra: Callable[[], list[Callback]] = list,
    **trainer_options: Any,
) -> tuple[L.Trainer, L.Trainer]:
    """Fit with the bad batch inserted at ``at``, and fit without it; both with SpikeSkip (the
    second must skip nothing). Returns both trainers."""
    clean = clean_batches(n)
    options = dict(module_options or {})
    skips = [SpikeSkip(**(SMALL if skip_options is None else skip_options)) for _ in range(2)]
    a = fit(
        tmp_path / "a",
        SpikyModule(with_batch(clean, at, bad), **options),
        [skips[0], *extra()],
        **trainer_options,
    )
    b = fit(tmp_path / "b", SpikyModule(clean, **options), [skips[1], *extra()], **trainer_options)
    assert skips[1].skipped_steps == 0, skips[1].events
    return a, b


# ------------------------------------------------------------------------------ the oracle
@pytest.mark.parametrize(
    ("kind", "at", "spiked"),
    [
        (LOSS_SPIKE, 20, {"loss", "grad_norm"}),
        (GRAD_SPIKE, 20, {"grad_norm"}),
        (LOSS_SPIKE, 5, {"loss", "grad_norm"}),  # in the very first window: the early rule
    ],
    ids=["loss_x100_scrambled", "gradient_x1000", "first_window"],
)
def test_a_skipped_spike_equals_a_run_without_that_batch(tmp_path, kind, at, spiked):
    a, b = oracle(tmp_path, bad_batch(kind), at)
    skip = spike(a.callbacks)
    assert skip.skipped_steps == 1
    (event,) = skip.events
    assert event["step"] == at and event["batches"] == [at]
    assert set(event["spiked"]) == spiked
    assert event["layer"].startswith("net.") and 0 < event["layer_share"] <= 1
    assert a.global_step == b.global_step + 1  # Lightning counts the skipped batch
    assert_same_run(a, b)


def test_default_window_skips_a_spike_after_64_steps(tmp_path):
    a, b = oracle(
        tmp_path,
        bad_batch(LOSS_SPIKE),
        at=70,
        n=75,
        skip_options={},
        module_options={"total_steps": 80},
    )
    skip = spike(a.callbacks)
    assert skip.window == 128 and skip.sigmas == 6 and skip.warmup == 64
    assert [e["step"] for e in skip.events] == [70]
    assert skip.events[0]["loss_threshold"] is not None  # the sigma rule, not the early one
    assert_same_run(a, b)


@pytest.mark.parametrize(
    ("optimizer", "module_options"),
    [
        ("adamw", {}),
        ("momentum", {"lr": 1e-2}),
        ("adabelief", {}),
        ("lion", {"lr": 1e-3}),
        ("adafactor", {}),
        ("schedule_free_adamw", {"schedule": "constant", "warmup": 6}),
    ],
)
def test_every_kind_of_optimizer_skips_as_if_the_batch_was_never_seen(
    tmp_path, optimizer, module_options
):
    options = {"optimizer": optimizer, **module_options}
    extra = (lambda: [ScheduleFreeModes()]) if optimizer.startswith("schedule_free") else list
    a, b = oracle(tmp_path, bad_batch(LOSS_SPIKE), at=12, n=20, module_options=options, extra=extra)
    assert spike(a.callbacks).skipped_steps == 1
    assert_same_run(a, b)


def test_gradient_accumulation_drops_the_whole_accumulated_step(tmp_path):
    """Micro-batches 24 and 25 form one step: the spike in 24 drops both (the oracle run lacks
    both)."""
    clean = clean_batches(40)
    data_a = [*clean[:24], bad_batch(LOSS_SPIKE), *clean[25:]]
    data_b = clean[:24] + clean[26:]
    a = fit(tmp_path / "a", SpikyModule(data_a), [SpikeSkip(**SMALL)], accumulate_grad_batches=2)
    b = fit(tmp_path / "b", SpikyModule(data_b), [SpikeSkip(**SMALL)], accumulate_grad_batches=2)
    (event,) = spike(a.callbacks).events
    assert event["batches"] == [24, 25] and event["worst_batch"] == 24
    assert event["step"] == 12
    assert_same_run(a, b)


@pytest.mark.parametrize("spike_first", [True, False], ids=["spike_first", "clipping_first"])
def test_with_gradient_clipping_one_norm_is_shared(tmp_path, spike_first):
    clean = clean_batches(30)
    data_a = with_batch(clean, 20, bad_batch(GRAD_SPIKE))

    def callbacks():
        skip, clip = SpikeSkip(**SMALL), GradientClipping(max_norm=0.5)
        return [skip, clip] if spike_first else [clip, skip]

    cb_a, cb_b = callbacks(), callbacks()
    a = fit(tmp_path / "a", SpikyModule(data_a), cb_a)
    b = fit(tmp_path / "b", SpikyModule(clean), cb_b)
    (event,) = spike(cb_a).events
    clip = next(c for c in cb_a if isinstance(c, GradientClipping))
    # The spike's norm is the pre-clip norm, the one GradientClipping computed (or reused).
    assert event["grad_norm"] > 100 * 0.5
    assert clip.finite_steps == 31 - int(spike_first)
    assert_same_run(a, b)


def test_fp16_amp_with_its_scaler_is_put_back(tmp_path):
    a, b = oracle(
        tmp_path,
        bad_batch(LOSS_SPIKE),
        at=15,
        n=24,
        module_options={"options": {"impl": "foreach"}},
        plugins=[fp16_mixed(init_scale=1.0)],  # the spike's fp16 gradients stay finite
    )
    assert spike(a.callbacks).skipped_steps == 1
    scaler_a = a.precision_plugin.scaler.state_dict()
    assert scaler_a == b.precision_plugin.scaler.state_dict()
    assert_same_run(a, b)


def test_after_an_adam_to_sgd_switch(tmp_path):
    clean = clean_batches(30)
    data_a = with_batch(clean, 20, bad_batch(LOSS_SPIKE))
    cb_a = [SpikeSkip(**SMALL), AdamToSGD(at_step=10, lr=0.05)]
    cb_b = [SpikeSkip(**SMALL), AdamToSGD(at_step=10, lr=0.05)]
    a = fit(tmp_path / "a", SpikyModule(data_a, optimizer="adam"), cb_a)
    b = fit(tmp_path / "b", SpikyModule(clean, optimizer="adam"), cb_b)
    assert isinstance(a.optimizers[0], torch.optim.SGD)
    assert [e["step"] for e in spike(cb_a).events] == [20]
    assert_same_run(a, b)


# ---------------------------------------------------------------------------------- resume
class SpikeAtSteps(SpikyModule):
    """Spikes chosen by global step (a resumed run sees the same ones)."""

    def __init__(self, steps: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(clean_batches(10), **kwargs)
        self.spike_steps = set(steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 100 if self.trainer.global_step in self.spike_steps else loss


def test_a_resumed_run_decides_as_an_uninterrupted_one(tmp_path):
    """10 batches per epoch, a window of 8: the checkpoint at the end of epoch 2 lies past the
    first wrap of the window; spikes before and after it."""
    options = {"window": 8, "warmup": 6, "max_skip_fraction": 0.5}
    steps = (7, 14, 24)
    full = fit(tmp_path / "full", SpikeAtSteps(steps), [SpikeSkip(**options)], max_epochs=3)
    first = fit(tmp_path / "first", SpikeAtSteps(steps), [SpikeSkip(**options)], max_epochs=2)
    path = tmp_path / "two_epochs.ckpt"
    first.save_checkpoint(path)
    resumed_skip = SpikeSkip(**options)
    resumed = tiny_trainer(tmp_path / "resumed", callbacks=[resumed_skip], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.fit(SpikeAtSteps(steps), ckpt_path=path)
    full_skip = spike(full.callbacks)
    assert [e["step"] for e in full_skip.events] == list(steps)
    assert resumed_skip.events == full_skip.events
    assert resumed_skip.state_dict()["accepted"] == full_skip.state_dict()["accepted"]
    torch.testing.assert_close(
        resumed_skip.state_dict()["values"], full_skip.state_dict()["values"], rtol=0, atol=0
    )
    assert_same_run(full, resumed)


# ------------------------------------------------------------------------- a diverging run
def test_a_diverging_lr_stops_with_a_checkpoint_and_one_line(tmp_path):
    module = SpikyModule(clean_batches(40), optimizer="adam", lr=1e-2, lr_jump_at=15)
    skip = SpikeSkip(window=16, warmup=8, max_skip_fraction=0.25)
    trainer = tiny_trainer(tmp_path, callbacks=[skip], max_epochs=1)
    with pytest.warns(UserWarning) as caught:
        trainer.fit(module)
    lines = [str(w.message) for w in caught if "stopping training" in str(w.message)]
    assert len(lines) == 1, [str(w.message) for w in caught]
    assert "5 of the last" in lines[0] and "max_skip_fraction=0.25" in lines[0]
    assert skip.skipped_steps == 5 and trainer.global_step < 40
    assert skip.stop_checkpoint_path and Path(skip.stop_checkpoint_path).is_file()
    assert f"Checkpoint of the last finite state: {skip.stop_checkpoint_path}" in lines[0]
    saved = torch.load(skip.stop_checkpoint_path, weights_only=True)
    assert saved["global_step"] == trainer.global_step


def test_a_healthy_run_skips_nothing(tmp_path):
    skip = SpikeSkip(**SMALL)
    fit(tmp_path, SpikyModule(clean_batches(40)), [skip])
    assert skip.skipped_steps == 0 and skip.judged_steps == 40


def test_an_event_reads_as_one_line(tmp_path):
    a, _ = oracle(tmp_path, bad_batch(GRAD_SPIKE), at=20)
    line = describe_event(spike(a.callbacks).events[0])
    assert line.startswith("skipped global step 20 (epoch 0, batch 20): gradient norm ")
    assert "largest share of the squared gradient norm: net." in line


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 1}, "window: got 1; allowed: an integer >= 2"),
        ({"sigmas": 0}, "sigmas: got 0"),
        ({"warmup": 200}, "warmup: got 200 with window=128; allowed: an integer in [2, window]"),
        ({"early_factor": 0.5}, "early_factor: got 0.5"),
        ({"monitor": ["los"]}, "monitor: got ['los']; allowed: a non-empty list of loss"),
        ({"max_skip_fraction": 0}, "max_skip_fraction: got 0"),
        ({"min_relative_excess": -1}, "min_relative_excess: got -1"),
    ],
)
def test_bad_arguments_name_the_parameter_and_what_is_allowed(kwargs, message):
    assert_refused(SpikeSkip, kwargs, message)


def test_monitor_loss_only_ignores_a_gradient_spike(tmp_path):
    clean = clean_batches(30)
    skip = SpikeSkip(monitor=["loss"], **SMALL)
    fit(tmp_path, SpikyModule(with_batch(clean, 20, bad_batch(GRAD_SPIKE))), [skip])
    assert skip.skipped_steps == 0 and math.isfinite(skip.state_dict()["values"][0, 0])


def test_counts_and_thresholds_reach_the_logger_on_its_logging_steps(tmp_path):
    """self.log is called only where Lightning writes (every log_every_n_steps): the rows hold
    the count before each step's verdict and both thresholds once the window is warm."""
    from tests.lib.tiny import RecordingLogger

    logger = RecordingLogger()
    clean = clean_batches(27)
    fit(
        tmp_path,
        SpikyModule(with_batch(clean, 20, bad_batch(LOSS_SPIKE))),
        [SpikeSkip(**SMALL)],
        logger=logger,
        log_every_n_steps=4,
    )
    rows = {step: m for step, m in logger.rows if "spike_skip/skipped_steps" in m}
    assert sorted(rows) == [3, 7, 11, 15, 19, 23, 27]
    assert [rows[s]["spike_skip/skipped_steps"] for s in (19, 23)] == [0.0, 1.0]
    assert {"spike_skip/loss_threshold", "spike_skip/grad_norm_threshold"} <= rows[23].keys()
    assert "spike_skip/loss_threshold" not in rows[3]  # 3 values: no rule acts yet
