import math
import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from optim_callbacks import SCHEDULES, build_scheduler, schedule_multiplier
from tests.lib.tiny import TinyRegressor, tiny_trainer

T, W = 100, 10  # total steps, warmup steps
H = T - W  # decay horizon after warmup


def _closed(name, s):
    """The documented closed forms, evaluated at step s after warmup (default options)."""
    p = min(s, H) / H
    return {
        "constant": 1.0,
        "step": 0.1 ** (s // (H // 3)),
        "multistep": 0.1 ** sum(s >= m for m in (H // 2, 3 * H // 4)),
        "exponential": 0.01 ** (min(s, H) / H),
        "cosine": 0.5 * (1 + math.cos(math.pi * p)),
        "cosine_restarts": 0.5 * (1 + math.cos(math.pi * (s % (H // 4)) / (H // 4))),
        "linear": 1 - p,
        "polynomial": (1 - p) ** 0.9,
        "wsd": 1.0 if s < H - 18 else 1 - min(s - (H - 18), 18) / 18,
    }[name]


def test_registry_holds_every_schedule():
    assert SCHEDULES.names() == [
        "constant",
        "step",
        "multistep",
        "exponential",
        "cosine",
        "cosine_restarts",
        "linear",
        "polynomial",
        "wsd",
    ]


@pytest.mark.parametrize("name", SCHEDULES.names())
@pytest.mark.parametrize("step", [W, W + H // 2, T - 1, T])
def test_schedule_matches_its_closed_form_after_warmup(name, step):
    f = schedule_multiplier(name, T, warmup=W)
    assert f(step) == pytest.approx(_closed(name, step - W), abs=1e-12)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_linear_warmup_composes_with_every_schedule(name):
    f = schedule_multiplier(name, T, warmup=W)
    assert [f(s) for s in range(W)] == pytest.approx([(s + 1) / (W + 1) for s in range(W)])
    assert f(W) == pytest.approx(1.0)  # warmup ends at the full base LR


def test_exponential_warmup_and_fractional_warmup():
    f = schedule_multiplier(
        "cosine", T, warmup=0.1, warmup_kind="exponential", warmup_start_ratio=0.01
    )
    assert f(0) == pytest.approx(0.01)
    assert f(5) == pytest.approx(0.01**0.5)
    assert f(10) == pytest.approx(1.0)


def test_options_change_the_shape():
    assert schedule_multiplier("cosine", 100, min_lr_ratio=0.1)(100) == pytest.approx(0.1)
    assert schedule_multiplier("step", 100, step_size=10, gamma=0.5)(25) == pytest.approx(0.25)
    assert schedule_multiplier("multistep", 100, milestones=[10, 20])(20) == pytest.approx(0.01)
    assert schedule_multiplier("exponential", 100, gamma=0.9)(3) == pytest.approx(0.729)
    sgdr = schedule_multiplier(
        "cosine_restarts", 70, cycle_steps=10, cycle_mult=2.0, cycle_decay=0.5
    )
    # cycles [0, 10), [10, 30), [30, 70): each restart peaks lower
    assert sgdr(10) == pytest.approx(0.5) and sgdr(30) == pytest.approx(0.25)
    assert sgdr(20) == pytest.approx(0.25)  # middle of the second cycle: half its peak
    assert schedule_multiplier("polynomial", 100, power=2.0)(50) == pytest.approx(0.25)
    wsd = schedule_multiplier("wsd", 100, decay_fraction=0.5, decay_shape="cosine")
    assert wsd(49) == 1.0 and wsd(75) == pytest.approx(0.5)


def test_epoch_options_convert_through_steps_per_epoch():
    f = schedule_multiplier("step", 100, step_size_epochs=2, steps_per_epoch=10, gamma=0.1)
    assert f(19) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    g = schedule_multiplier("multistep", 100, milestones_epochs=[3, 6], steps_per_epoch=10)
    assert (
        g(29) == pytest.approx(1.0) and g(30) == pytest.approx(0.1) and g(60) == pytest.approx(0.01)
    )


def _optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)


def test_scheduler_honours_per_group_learning_rates():
    optimizer = _optimizer()
    scheduler = build_scheduler("linear", optimizer, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([0.05, 0.005])


def test_scheduler_pickles_and_resumes_the_same_sequence():
    reference_opt = _optimizer()
    reference = build_scheduler("cosine", reference_opt, total_steps=50, warmup=5)
    expected = []
    for _ in range(50):
        reference_opt.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])

    first_opt = _optimizer()
    first = build_scheduler("cosine", first_opt, total_steps=50, warmup=5)
    for _ in range(20):
        first_opt.step()
        first.step()
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    pickle.dumps(first)  # the whole scheduler pickles, multiplier included

    resumed_opt = _optimizer()
    resumed = build_scheduler("cosine", resumed_opt, total_steps=50, warmup=5)
    resumed.load_state_dict(saved)
    got = expected[:20]
    for _ in range(30):
        resumed_opt.step()
        resumed.step()
        got.append(resumed.get_last_lr()[0])
    assert got == pytest.approx(expected, abs=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"name": "cosin"}, r"scheduler: unknown value 'cosin'.*did you mean 'cosine'"),
        (
            {"warmup": 100},
            r"warmup: got 100 \(100 steps\); allowed: fewer than total_steps \(100\)",
        ),
        ({"warmup": 0.999999}, r"warmup: .*allowed: fewer than total_steps"),
        ({"warmup": -1}, r"warmup: got -1; allowed: an integer >= 0"),
        ({"warmup": 1.5}, r"warmup: got 1.5"),
        ({"warmup": "10%"}, r"warmup: got '10%'"),
        (
            {"min_lr": 0.1},
            r"cosine scheduler options: unknown option 'min_lr'.*did you mean 'min_lr_ratio'",
        ),
        ({"min_lr_ratio": 2.0}, r"min_lr_ratio: got 2.0"),
        ({"total_steps": 0}, r"total_steps: got 0"),
        ({"warmup_kind": "cubic"}, r"warmup_kind: unknown value 'cubic'"),
        ({"name": "step", "gamma": 0.0}, r"gamma: got 0.0; allowed: a finite number > 0"),
        ({"name": "step", "gamma": math.inf}, r"gamma: got inf; allowed: a finite number > 0"),
        ({"name": "polynomial", "power": math.nan}, r"power: got nan"),
        ({"warmup": math.nan}, r"warmup: got nan"),
        (
            {"name": "step", "step_size": 5, "step_size_epochs": 1, "steps_per_epoch": 10},
            r"step_size: give either step_size or step_size_epochs, not both",
        ),
        ({"name": "multistep", "milestones": 5}, r"milestones: got 5; allowed: a list of steps"),
        ({"name": "step", "step_size_epochs": 2}, r"step_size_epochs: needs steps_per_epoch"),
        (
            {"name": "cosine_restarts", "cycle_mult": 0.5},
            r"cycle_mult: got 0.5; allowed: a number >= 1",
        ),
        ({"name": "wsd", "decay_shape": "cubic"}, r"decay_shape: unknown value 'cubic'"),
    ],
)
def test_bad_schedule_input_names_the_parameter(kwargs, pattern):
    kwargs = {"name": "cosine", "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        build_scheduler(kwargs.pop("name"), _optimizer(), **kwargs)


class _RecordLR(L.Callback):
    """Records the LR each optimizer step uses; optionally stops after the first epoch."""

    def __init__(self, stop_after_first_epoch: bool = False):
        self.lrs: dict[int, float] = {}
        self.stop_after_first_epoch = stop_after_first_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer, pl_module):
        if self.stop_after_first_epoch:
            trainer.should_stop = True


def test_lightning_run_follows_the_schedule_and_resumes_it(tmp_path):
    """A real Trainer steps the schedule once per optimizer step; a run stopped after one of
    two epochs and resumed from its checkpoint continues the same LR curve."""

    def run(stop=False, ckpt_path=None):
        L.seed_everything(0)
        model = TinyRegressor(
            optimizer="adamw", lr=1e-2, scheduler="cosine", warmup=0.25, samples=128
        )
        recorder = _RecordLR(stop_after_first_epoch=stop)
        trainer = tiny_trainer(
            tmp_path,
            max_epochs=2,
            callbacks=[recorder, LearningRateMonitor()],
            logger=CSVLogger(tmp_path, name="lr"),
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return trainer, recorder.lrs

    full, full_lrs = run()
    assert full.global_step == 16
    expected = schedule_multiplier("cosine", 16, warmup=0.25)
    assert [full_lrs[s] for s in range(16)] == pytest.approx(
        [1e-2 * expected(s) for s in range(16)], abs=1e-15
    )

    half, _ = run(stop=True)
    assert half.global_step == 8
    half.save_checkpoint(tmp_path / "half.ckpt")
    resumed, resumed_lrs = run(ckpt_path=tmp_path / "half.ckpt")
    assert resumed.global_step == 16
    assert [resumed_lrs[s] for s in range(8, 16)] == pytest.approx(
        [full_lrs[s] for s in range(8, 16)], abs=0
    )


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_check_options_accepts_every_schedule_with_its_defaults(name):
    spec = SCHEDULES.get(name)
    options = {k: v for k, v in spec.defaults.items() if v is not None}
    assert spec.check_options() is None
    assert spec.check_options(warmup=0.1, **options) is None
    assert spec.check_options(warmup=100, warmup_kind="exponential", **options) is None


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("cosine", {"warmup": 1.0}, r"warmup: got 1.0; allowed: a number in \[0.0, 1.0\)"),
        ("cosine", {"warmup": -2}, r"warmup: got -2; allowed: an integer >= 0"),
        ("cosine", {"warmup": True}, r"warmup: got True; allowed: steps \(an int >= 0\)"),
        ("cosine", {"warmup": "5"}, r"warmup: got '5'"),
        ("cosine", {"warmup_kind": "cubic"}, r"warmup_kind: unknown value 'cubic'"),
        (
            "cosine",
            {"min_lr": 0.1},
            r"cosine scheduler options: unknown option 'min_lr'.*did you mean 'min_lr_ratio'",
        ),
        (
            "step",
            {"step_size_epoch": 2},
            r"step scheduler options: unknown option 'step_size_epoch'.*'step_size_epochs'",
        ),
        ("cosine", {"cycle_steps_epochs": 2}, r"cosine scheduler options: unknown option"),
        ("step", {"step_size_epochs": 0}, r"step_size_epochs: got 0; allowed: a finite number > 0"),
        ("step", {"step_size": 0}, r"step_size: got 0; allowed: an integer >= 1"),
        ("multistep", {"milestones_epochs": [1, -2]}, r"milestones_epochs\[1\]: got -2"),
        ("multistep", {"milestones_epochs": 3}, r"milestones_epochs: got 3; allowed: a list"),
        ("wsd", {"decay_fraction": 0.0}, r"decay_fraction: got 0.0"),
        ("cosine", {"min_lr_ratio": math.inf}, r"min_lr_ratio: got inf"),
    ],
)
def test_check_options_refuses_what_the_builder_refuses_before_knowing_the_steps(
    name, kwargs, pattern
):
    with pytest.raises(ValueError, match=pattern):
        SCHEDULES.get(name).check_options(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        schedule_multiplier(name, 100, steps_per_epoch=10, **kwargs)


def test_what_needs_the_step_count_is_checked_by_the_builder_only():
    spec = SCHEDULES.get("step")
    spec.check_options(warmup=500, step_size_epochs=2)  # no total steps or steps per epoch yet
    with pytest.raises(ValueError, match=r"warmup: got 500 \(500 steps\); allowed: fewer than"):
        schedule_multiplier("step", 100, warmup=500)
    with pytest.raises(ValueError, match=r"step_size_epochs: needs steps_per_epoch"):
        schedule_multiplier("step", 100, step_size_epochs=2)
