"""Findings in words: each rule fires on a case built to trigger it (real Lightning runs where a
tiny run can show it) and a healthy tiny run has none."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from optim_callbacks import (
    GradientClipping,
    MomentHistory,
    MomentStatistics,
    SpikeSkip,
    TrainingFindings,
    diagnose,
)
from optim_callbacks.health import HealthInputs
from tests.lib.tiny import RecordingLogger, TinyRegressor, tiny_trainer


def run(tmp_path, module: TinyRegressor, *, clip: float = 100.0, **options: Any):
    findings = TrainingFindings(loss_steps=20)
    callbacks = [
        SpikeSkip(window=16, warmup=8),
        GradientClipping(max_norm=clip),
        MomentStatistics(every_n_steps=2, heatmaps=True),
        findings,
    ]
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, logger=RecordingLogger(), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return {f.rule: f for f in findings.findings}


def test_a_healthy_tiny_run_has_no_findings(tmp_path):
    assert (
        run(tmp_path, TinyRegressor(optimizer="adamw", lr=3e-3, batch_size=128, samples=4096)) == {}
    )


def test_a_tiny_lr_gives_a_flat_loss_and_a_low_update_ratio(tmp_path):
    found = run(tmp_path, TinyRegressor(optimizer="adamw", lr=1e-9, batch_size=128, samples=4096))
    assert set(found) == {"loss_flat", "update_ratio_low"}
    assert found["loss_flat"].seen.startswith("the loss did not move in the first 20 steps")
    assert "below 1e-6" in found["update_ratio_low"].seen


def test_a_huge_lr_gives_a_high_update_ratio(tmp_path):
    found = run(
        tmp_path,
        TinyRegressor(optimizer="sgd", lr=1.0, scheduler=None, batch_size=128, samples=4096),
        clip=1e9,
    )
    assert "update_ratio_high" in found
    assert "the LR is high" in found["update_ratio_high"].line


def test_clipping_every_step_is_said_with_its_coefficient(tmp_path):
    found = run(
        tmp_path,
        TinyRegressor(optimizer="momentum", lr=1e-2, batch_size=128, samples=4096),
        clip=0.01,
    )
    finding = found["clipping_every_step"]
    assert finding.seen.startswith("100% of 32 steps clipped at a coefficient of ")
    assert finding.cause == "the clip, not the LR, sets the step size"


def test_a_huge_eps_dominates_the_denominator(tmp_path):
    module = TinyRegressor(optimizer="adamw", lr=1e-2, optimizer_options={"eps": 1.0})
    found = run(tmp_path, module)
    finding = found["eps_dominates"]
    assert "100% of its elements have sqrt(v) < eps" in finding.seen
    assert finding.seen.startswith("step size p95 of ") and " on net." in finding.seen
    assert " (also net." in finding.seen  # the other layers it holds for, by name


class HalfDead(TinyRegressor):
    """A second head whose output is multiplied by zero: its gradient is always zero."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unused = nn.Linear(self.hparams.features, 1)

    def forward(self, x):
        return self.net(x) + 0.0 * self.unused(x)


def test_a_layer_whose_gradient_stays_zero(tmp_path):
    found = run(tmp_path, HalfDead(optimizer="adamw", lr=3e-3, batch_size=128, samples=4096))
    assert set(found) == {"zero_gradients"}
    assert found["zero_gradients"].seen == "zero gradient at all 16 logged steps in unused"


def test_fp16_state_with_an_eps_that_rounds_to_zero():
    param = nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = torch.optim.Adam([param], eps=1e-8)
    param.grad = torch.ones_like(param)
    optimizer.step()
    (finding,) = diagnose(HealthInputs(optimizer=optimizer))
    assert finding.rule == "fp16_eps_underflow" and "eps 1e-08" in finding.seen
    assert diagnose(HealthInputs(optimizer=torch.optim.Adam([param], eps=1e-4))) == []


def adagrad_history(first: float, last: float) -> MomentHistory:
    history = MomentHistory(["a", "b"])
    for step, value in enumerate([first, (first + last) / 2, last]):
        history.record(step, {"a": {"step_size_p50": value}, "b": {"step_size_p50": value}})
    return history


def test_adagrads_effective_lr_decayed_by_orders_of_magnitude():
    optimizer = torch.optim.Adagrad([nn.Parameter(torch.ones(2))])
    decayed = HealthInputs(history=adagrad_history(1e-1, 1e-4), optimizer=optimizer)
    (finding,) = diagnose(decayed)
    assert finding.rule == "adagrad_decay"
    assert "(3.0 orders of magnitude)" in finding.seen
    steady = HealthInputs(history=adagrad_history(1e-1, 5e-2), optimizer=optimizer)
    assert diagnose(steady) == []


def test_skipped_spikes_are_named():
    events = [{"step": 7, "layer": "net.3.weight"}, {"step": 9, "layer": "net.3.weight"}]
    (finding,) = diagnose(HealthInputs(spike_events=events, spike_skipped=2))
    assert finding.seen == (
        "2 step(s) skipped as loss/gradient spikes (global steps 7, 9); largest gradient share "
        "in net.3.weight"
    )


@pytest.mark.parametrize("loss_steps", [5, 1.5])
def test_bad_arguments(loss_steps):
    with pytest.raises(ValueError, match=r"loss_steps: got .*; allowed: an integer >= 20"):
        TrainingFindings(loss_steps=loss_steps)


def test_a_rising_loss_is_not_called_flat():
    rising = [1.0 + 0.1 * i + 0.01 * (i % 2) for i in range(30)]
    (finding,) = diagnose(HealthInputs(losses=rising))
    assert finding.rule == "loss_rising" and "(1.204 → 3.706)" in finding.seen
    falling = rising[::-1]
    assert diagnose(HealthInputs(losses=falling)) == []
