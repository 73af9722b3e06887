"""OptimizerSwitch / AdamToSGD in real Lightning Trainer runs on CPU."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optim_callbacks import AdamToSGD, OptimizerSwitch, build_optimizer, build_scheduler
from tests.lib.tiny import TinyRegressor, fp16_mixed, regression_data, tiny_trainer


@pytest.fixture(autouse=True)
def _seeded():
    """The same initial weights in every run (the SWATS tests rely on where the criterion fires)."""
    torch.manual_seed(0)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The closed form of build_scheduler("cosine", warmup=W): linear warmup, then half cosine."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


class ScaledGroupsRegressor(TinyRegressor):
    """Adam on two named groups, ``body`` (first layer, lr_scale 0.1) and ``head`` (the rest,
    lr_scale 1), with a cosine schedule whose config has no name."""

    def configure_optimizers(self):
        body = list(self.net[0].parameters())
        head = [p for p in self.parameters() if all(p is not b for b in body)]
        groups = [
            {"params": body, "lr_scale": 0.1, "name": "body"},
            {"params": head, "lr_scale": 1.0, "name": "head"},
        ]
        optimizer = build_optimizer("adam", groups, lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        scheduler = build_scheduler(
            "cosine", optimizer, total_steps=total, warmup=self.hparams.warmup
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class StepRecorder(Callback):
    """Per optimizer step: the optimizer class, its group LRs, and whether the trainer (its
    strategy's list), the module's ``LightningOptimizer`` wrapper (the strategy re-wraps on
    every set) and the scheduler all point at the optimizer that is really stepping."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        configs = trainer.lr_scheduler_configs
        self.steps.append(
            {
                "class": type(optimizer).__name__,
                "lrs": [group["lr"] for group in optimizer.param_groups],
                "views_agree": optimizer is trainer.optimizers[0]
                and pl_module.optimizers().optimizer is optimizer
                and all(c.scheduler.optimizer is optimizer for c in configs),
            }
        )


class ChangeListener(Callback):
    """A callback of the interplay protocol: records each ``on_optimizers_changed`` call."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_optimizers_changed(self, trainer, pl_module):
        self.seen.append(type(trainer.optimizers[0]).__name__)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"at_step": 5, "at_epoch": 2},
            r"at_step/at_epoch/at_fraction: got at_step=5, at_epoch=2; allowed: at most one",
        ),
        ({"at_step": -3}, r"at_step: got -3; allowed: an integer >= 1"),
        ({"at_epoch": 0}, r"at_epoch: got 0; allowed: an integer >= 1"),
        ({"at_fraction": 1.5}, r"at_fraction: got 1.5; allowed: a number in \(0.0, 1.0\)"),
        ({"lr": -0.1}, r"lr: got -0.1; allowed: a finite number > 0"),
        ({"lr": math.inf}, r"lr: got inf; allowed: a finite number > 0"),
        (
            {"to": "nestrov"},
            r"to: unknown value 'nestrov'; allowed: momentum, nesterov, sgd; did you mean 'nesterov'\?",
        ),
        ({"to": "adam"}, r"to: unknown value 'adam'; allowed: momentum, nesterov, sgd"),
        ({"granularity": "layers"}, r"granularity: unknown value 'layers'.*did you mean 'layer'\?"),
        ({"momentum": -0.5}, r"momentum: got -0.5; allowed: a number in \[0.0, 1.0\)"),
        ({"to": "nesterov", "momentum": 0.0}, r"momentum: got 0 with to='nesterov'"),
        ({"to": "sgd", "momentum_init": "adam"}, r"momentum_init: got 'adam' with momentum=0"),
        ({"weight_decay": -1e-4}, r"weight_decay: got -0.0001; allowed: a finite number >= 0"),
        ({"epsilon": 0}, r"epsilon: got 0; allowed: a finite number > 0"),
        ({"min_steps": 0}, r"min_steps: got 0; allowed: an integer >= 1"),
    ],
)
def test_bad_arguments_raise_one_value_error_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSwitch(**kwargs)


class StepLRRegressor(TinyRegressor):
    def configure_optimizers(self):
        optimizer = build_optimizer("adam", self, lr=1e-2)
        return {
            "optimizer": optimizer,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5),
        }


@pytest.mark.parametrize(
    ("module", "callback", "message"),
    [
        (
            TinyRegressor(optimizer="momentum"),
            OptimizerSwitch(at_step=2),
            r"optimizer: got 'momentum' \(SGD\), which keeps no adaptive second moment to "
            r"estimate the SGD learning rate from; allowed: .*or any registry optimizer with a "
            r"given lr=",
        ),
        (
            TinyRegressor(optimizer="rmsprop", lr=1e-3),
            AdamToSGD(at_step=2),
            r"optimizer: got 'rmsprop'; allowed for AdamToSGD: adabelief, adam, adamw \(SWATS",
        ),
        (
            TinyRegressor(optimizer="adopt", lr=1e-3),
            AdamToSGD(),
            r"optimizer: got 'adopt'; allowed for AdamToSGD: adabelief, adam, adamw \(SWATS",
        ),
        (
            TinyRegressor(optimizer="lion", lr=1e-4),
            AdamToSGD(at_step=2),
            r"optimizer: got 'lion'; allowed for AdamToSGD: adabelief, adam, adamw \(SWATS",
        ),
        (
            TinyRegressor(optimizer="rmsprop", lr=1e-3),
            OptimizerSwitch(at_step=2, momentum_init="adam"),
            r"momentum_init: got 'adam' but optimizer 'rmsprop' keeps no first moment",
        ),
        (
            StepLRRegressor(),
            OptimizerSwitch(at_step=2, lr=0.1),
            r"lr_scheduler: got StepLR; allowed: LambdaLR",
        ),
    ],
    ids=[
        "sgd-source-estimated-lr",
        "adam-preset-on-rmsprop",
        "adopt-not-adam-like",
        "lion-not-adaptive",
        "first-moment-missing",
        "steplr",
    ],
)
def test_unusable_trainer_setup_is_rejected_before_training(tmp_path, module, callback, message):
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    with pytest.raises(ValueError, match=message):
        trainer.fit(module)
    assert trainer.global_step == 0


# ----------------------------------------------------------------------------- the switch


def test_switch_goes_through_the_strategy_so_every_view_sees_sgd(tmp_path):
    recorder, listener = StepRecorder(), ChangeListener()
    switch = OptimizerSwitch(at_step=5, lr=0.05)
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[switch, recorder, listener])
    trainer.fit(ScaledGroupsRegressor())

    assert [s["class"] for s in recorder.steps] == ["Adam"] * 5 + ["SGD"] * 11
    assert all(s["views_agree"] for s in recorder.steps)
    assert listener.seen == ["SGD"]  # told once, after the new optimizer was in place
    sgd = trainer.optimizers[0]
    assert [g["name"] for g in sgd.param_groups] == ["body", "head"]
    assert [g["lr_scale"] for g in sgd.param_groups] == [0.1, 1.0]
    assert [(g["momentum"], g["nesterov"], g["dampening"]) for g in sgd.param_groups] == [
        (0.9, False, 0)
    ] * 2
    assert switch.switched and switch.switch_step == 5 and switch.estimated_lrs is None


@pytest.mark.parametrize(("weight_decay", "expected"), [(None, [0.01, 0.0]), (5e-4, [5e-4, 0.0])])
def test_sgd_keeps_no_decay_groups_and_takes_the_given_weight_decay(
    tmp_path, weight_decay, expected
):
    switch = OptimizerSwitch("nesterov", at_step=3, lr=0.05, weight_decay=weight_decay)
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[switch])
    trainer.fit(TinyRegressor(optimizer="adamw"))  # groups "decay" (0.01) and "no_decay"

    sgd = trainer.optimizers[0]
    assert [g["name"] for g in sgd.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in sgd.param_groups] == expected
    assert all(g["nesterov"] for g in sgd.param_groups)


def test_lr_schedule_continues_from_where_it_was_scaled_to_the_sgd_base_lr(tmp_path):
    recorder = StepRecorder()
    switch = OptimizerSwitch(at_fraction=0.4, lr=0.05)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[switch, recorder])
    trainer.fit(ScaledGroupsRegressor(lr=1e-2, warmup=4))

    total, switch_step = 32, round(0.4 * 32)  # a cosine at 40% (after warmup 4)
    assert switch.switch_step == switch_step
    for step, seen in enumerate(recorder.steps):
        base = 1e-2 if step < switch_step else 0.05
        expected = [base * scale * warmup_cosine(step, 4, total) for scale in (0.1, 1.0)]
        assert seen["lrs"] == pytest.approx(expected, rel=1e-12), step
        assert seen["class"] == ("Adam" if step < switch_step else "SGD")
    assert trainer.lr_scheduler_configs[0].name == "lr"  # named so the logged series survives


def test_logged_lr_stays_one_series_and_the_switch_is_logged_to_wandb(tmp_path, wandb_run):
    switch = OptimizerSwitch(at_fraction=0.4, lr=0.05)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="switch")
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[switch, LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(ScaledGroupsRegressor(lr=1e-2, warmup=4))
    logger.experiment.finish()

    rows = wandb_run.history(tmp_path)
    lr_keys = {k for row in rows for k in row if k.startswith("lr")}
    assert lr_keys == {"lr/body", "lr/head"}
    series = [
        (row["trainer/global_step"], row["lr/body"], row["lr/head"])
        for row in rows
        if "lr/body" in row
    ]
    total, switch_step = 32, round(0.4 * 32)
    assert [step for step, _, _ in series] == list(range(total))
    for step, body, head in series:
        base = 1e-2 if step < switch_step else 0.05
        assert (body, head) == pytest.approx(
            (base * 0.1 * warmup_cosine(step, 4, total), base * warmup_cosine(step, 4, total)),
            rel=1e-12,
        )
    (logged,) = [row for row in rows if "optimizer_switch/step" in row]
    assert logged["optimizer_switch/step"] == switch_step
    assert logged["optimizer_switch/lr/body"] == pytest.approx(
        0.05 * 0.1 * warmup_cosine(switch_step, 4, total), rel=1e-12
    )
    assert logged["optimizer_switch/lr/head"] == pytest.approx(
        0.05 * warmup_cosine(switch_step, 4, total), rel=1e-12
    )


class SnapshotAtSwitch(Callback):
    """The module's weights and the batch index right after the switch."""

    def __init__(self, switch: OptimizerSwitch) -> None:
        self.switch = switch
        self.weights: dict | None = None
        self.batch_idx: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.switch.switched and self.weights is None:
            self.weights = copy.deepcopy(pl_module.state_dict())
            self.batch_idx = batch_idx


@pytest.mark.parametrize("to", ["momentum", "nesterov"])
def test_sgd_phase_steps_equal_plain_torch_sgd_with_accumulation(tmp_path, to):
    accumulate, warmup, total = 2, 2, 16
    switch = OptimizerSwitch(to, at_step=6, lr=0.05, weight_decay=1e-3)
    snapshot = SnapshotAtSwitch(switch)
    trainer = tiny_trainer(
        tmp_path, max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[switch, snapshot]
    )
    module = TinyRegressor(optimizer="adamw", warmup=warmup)
    trainer.fit(module)
    # The switch waited for the accumulation window to close: after batch 11, the 6th step.
    assert switch.switch_step == 6 and snapshot.batch_idx == 11

    sgd = trainer.optimizers[0]
    name_of = {id(p): n for n, p in module.named_parameters()}
    replay = TinyRegressor(optimizer="adamw", warmup=warmup)
    replay.load_state_dict(snapshot.weights)
    params = dict(replay.named_parameters())
    reference = torch.optim.SGD(
        [
            {
                "params": [params[name_of[id(p)]] for p in g["params"]],
                "weight_decay": g["weight_decay"],
            }
            for g in sgd.param_groups
        ],
        lr=0.05,
        momentum=0.9,
        nesterov=to == "nesterov",
        fused=sgd.defaults["fused"],
        foreach=sgd.defaults["foreach"],
    )
    batches = list(DataLoader(regression_data(), batch_size=16))
    remaining = batches[12:] + batches  # rest of epoch 0, then epoch 1
    for step in range(6, total):
        for x, y in remaining[(step - 6) * accumulate : (step - 5) * accumulate]:
            loss = nn.functional.mse_loss(replay(x).float(), y.float()) / accumulate
            loss.backward()
        for group in reference.param_groups:
            group["lr"] = 0.05 * warmup_cosine(step, warmup, total)
        reference.step()
        reference.zero_grad()
    for name, param in module.named_parameters():
        assert torch.equal(param, params[name]), name


def test_epoch_switch_happens_at_the_epoch_start_with_accumulation(tmp_path):
    recorder = StepRecorder()
    switch = OptimizerSwitch(at_epoch=1, lr=0.05)
    trainer = tiny_trainer(
        tmp_path, max_epochs=2, accumulate_grad_batches=3, callbacks=[switch, recorder]
    )
    trainer.fit(TinyRegressor())
    # 16 batches / 3 = 5 full windows + the epoch's last batch: 6 Adam steps in epoch 0
    assert switch.switch_step == 6
    assert [s["class"] for s in recorder.steps] == ["Adam"] * 6 + ["SGD"] * 6


# ----------------------------------------------------------------------------- SWATS


class ConstantGradient(L.LightningModule):
    """``loss = c1 . w1 + c2 . w2``: the gradient never changes, so every Adam step is
    ``-lr * g / (|g| + eps)`` and ``gamma_k = lr * sum(g^2/(|g|+eps)^2) / sum(g^2/(|g|+eps))``,
    i.e. ``lr * n / ||c||_1``, at every step: the SWATS criterion holds from its first check."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(6))
        self.w2 = nn.Parameter(torch.zeros(3))
        self.register_buffer("c1", torch.tensor([0.5, -1.0, 2.0, -0.25, 1.5, 0.75]))
        self.register_buffer("c2", torch.tensor([4.0, -3.0, 0.5]))

    def training_step(self, batch, batch_idx):
        return (self.c1 * self.w1).sum() + (self.c2 * self.w2).sum()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(12, 1)), batch_size=1)

    def configure_optimizers(self):
        return build_optimizer("adam", self.parameters(), lr=1e-2)


@pytest.mark.parametrize("granularity", ["group", "layer"])
def test_swats_fires_on_a_constant_gradient_with_the_lr_the_formula_gives(tmp_path, granularity):
    switch = OptimizerSwitch(epsilon=1e-6, min_steps=5, granularity=granularity)
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[switch])
    module = ConstantGradient()
    trainer.fit(module)

    c1, c2 = module.c1.abs(), module.c2.abs()
    if granularity == "group":
        expected = {"pg1": 1e-2 * 9 / float(c1.sum() + c2.sum())}
    else:
        expected = {"pg1.w1": 1e-2 * 6 / float(c1.sum()), "pg1.w2": 1e-2 * 3 / float(c2.sum())}
    assert switch.switch_step == 5  # the first step the criterion may be checked
    assert switch.estimated_lrs == pytest.approx(list(expected.values()), rel=1e-5)
    sgd = trainer.optimizers[0]
    assert [g.get("name", "pg1") for g in sgd.param_groups] == list(expected)
    # no schedule: SGD runs at exactly the estimate
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx(switch.estimated_lrs, rel=1e-12)


def test_swats_reads_unscaled_gradients_of_a_fused_adam_under_a_grad_scaler(tmp_path):
    """Real fp16 AMP with the fused Adam the registry picks: gradients reach the hooks scaled by
    the loss scale; the estimate must still be the formula's, not 2**16 times too small."""
    switch = OptimizerSwitch(epsilon=1e-6, min_steps=5)
    trainer = tiny_trainer(tmp_path, callbacks=[switch], plugins=[fp16_mixed()])
    module = ConstantGradient()
    trainer.fit(module)
    assert switch.switch_step is not None
    c = torch.cat([module.c1, module.c2]).abs()
    assert switch.estimated_lrs == pytest.approx([1e-2 * 9 / float(c.sum())], rel=1e-4)


class ParameterTrace(Callback):
    def __init__(self) -> None:
        self.after_step: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(torch.cat([p.detach().clone() for p in pl_module.parameters()]))


@pytest.mark.parametrize(
    ("momentum_init", "multiples"),
    [("zero", [1.0, 1.9, 2.71]), ("adam", [10.0, 10.0, 10.0])],
)
def test_sgd_momentum_is_the_plain_heavy_ball_buffer(tmp_path, momentum_init, multiples):
    """On a constant gradient g, heavy ball gives steps -lr * g * (1, 1.9, 2.71, ...) from a zero
    buffer and -lr * g / (1 - 0.9) = -10 lr g at once from Adam's first moment (which is g).
    Public SWATS code that rescales the buffer by (1 - beta1) each step fails both."""
    trace = ParameterTrace()
    switch = OptimizerSwitch(at_step=3, lr=0.01, momentum_init=momentum_init)
    trainer = tiny_trainer(tmp_path, max_steps=6, callbacks=[switch, trace])
    module = ConstantGradient()
    trainer.fit(module)

    gradient = torch.cat([module.c1, module.c2])
    for k, multiple in enumerate(multiples):  # SGD steps 4, 5, 6
        step = trace.after_step[3 + k] - trace.after_step[2 + k]
        torch.testing.assert_close(step, -0.01 * multiple * gradient, rtol=1e-5, atol=0)


class SwatsByHand(Callback):
    """Keskar & Socher's Algorithm 1 written out again, in float64, per parameter group."""

    def __init__(self, beta2: float, epsilon: float, min_steps: int) -> None:
        self.beta2, self.epsilon, self.min_steps = beta2, epsilon, min_steps
        self.average: list[float] = []
        self.count: list[int] = []
        self.fired: list[tuple[int, float, float] | None] = []  # (step, Lambda, lr used)
        self.before = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if type(optimizer).__name__ == "SGD":
            self.before = None
            return
        if not self.average:
            n = len(optimizer.param_groups)
            self.average, self.count, self.fired = [0.0] * n, [0] * n, [None] * n
        self.before = [
            ([p.detach().double().clone() for p in g["params"]], g["params"], g["lr"])
            for g in optimizer.param_groups
        ]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is None:
            return
        for index, (old, params, lr) in enumerate(self.before):
            step = [p.detach().double() - o for p, o in zip(params, old, strict=True)]
            squared = sum(float((s * s).sum()) for s in step)
            descent = -sum(
                float((s * p.grad.double()).sum()) for s, p in zip(step, params, strict=True)
            )
            gamma = squared / descent
            self.average[index] = self.beta2 * self.average[index] + (1 - self.beta2) * gamma
            self.count[index] += 1
            estimate = self.average[index] / (1 - self.beta2 ** self.count[index])
            if (
                self.fired[index] is None
                and self.count[index] >= self.min_steps
                and estimate > 0
                and abs(estimate - gamma) < self.epsilon
            ):
                self.fired[index] = (trainer.global_step, estimate, lr)
        self.before = None


def test_swats_switch_step_and_estimate_match_the_algorithm_written_out(tmp_path):
    by_hand = SwatsByHand(beta2=0.999, epsilon=1e-2, min_steps=5)
    switch = OptimizerSwitch(epsilon=1e-2, min_steps=5)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[by_hand, switch])
    trainer.fit(TinyRegressor(optimizer="adamw", warmup=4))

    assert all(fired is not None for fired in by_hand.fired), by_hand.fired
    assert switch.switch_step == max(step for step, _, _ in by_hand.fired) > 5
    assert switch.estimated_lrs == pytest.approx([est for _, est, _ in by_hand.fired], rel=1e-9)
    # SGD base = Lambda / (LR Adam used then) * Adam's base LR (1e-2)
    assert switch.sgd_base_lrs == pytest.approx(
        [est / lr * 1e-2 for _, est, lr in by_hand.fired], rel=1e-9
    )


def test_swats_that_never_fires_says_so(tmp_path):
    switch = OptimizerSwitch(min_steps=5)  # the paper's epsilon 1e-9
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[switch])
    with pytest.warns(
        UserWarning,
        match=r"the SWATS criterion never fired \(epsilon=1e-09, last \|Lambda - gamma\|",
    ):
        trainer.fit(TinyRegressor())
    assert not switch.switched and type(trainer.optimizers[0]).__name__ == "Adam"


# ----------------------------------------------------------------------------- AMP


class PoisonedRegressor(TinyRegressor):
    """Makes the scaled loss overflow at one chosen step, so the GradScaler must skip it."""

    poison_step = 9

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e38 if self.trainer.global_step == self.poison_step else loss


class ScalerRecorder(Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def _snapshot(self, trainer):
        optimizer = trainer.optimizers[0]
        buffers = [
            optimizer.state.get(p, {}).get("momentum_buffer")
            for g in optimizer.param_groups
            for p in g["params"]
        ]
        return {
            "params": [p.detach().clone() for p in trainer.lightning_module.parameters()],
            "buffers": [None if b is None else b.clone() for b in buffers],
            "scale": trainer.precision_plugin.scaler.get_scale(),
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(
            {
                "class": type(optimizer).__name__,
                "step": trainer.global_step,
                "before": self._snapshot(trainer),
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = self._snapshot(trainer)


def _same(first, second):
    return all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(first, second, strict=True)
    )


def test_grad_scaler_keeps_governing_sgd_under_16_mixed(tmp_path):
    recorder = ScalerRecorder()
    switch = OptimizerSwitch(at_step=4, lr=0.05)
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=1,
        plugins=[fp16_mixed()],
        callbacks=[switch, recorder],
    )
    trainer.fit(PoisonedRegressor())

    sgd_steps = [s for s in recorder.steps if s["class"] == "SGD"]
    assert len(sgd_steps) == 12
    taken = 0
    for s in sgd_steps:
        before, after = s["before"], s["after"]
        skipped = after["scale"] == before["scale"] / 2
        if skipped:  # overflow: the scaler skipped SGD's step
            assert _same(before["params"], after["params"]) and _same(
                before["buffers"], after["buffers"]
            )
        else:
            assert not _same(before["params"], after["params"])
            assert all(b is not None for b in after["buffers"])
            taken += 1
    (poisoned,) = [s for s in sgd_steps if s["step"] == PoisonedRegressor.poison_step]
    assert poisoned["after"]["scale"] == poisoned["before"]["scale"] / 2
    assert taken >= 6


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-true"])
def test_switch_with_estimated_lr_works_in_low_precision(tmp_path, precision):
    switch = OptimizerSwitch(at_step=6, momentum_init="adam")
    trainer = tiny_trainer(tmp_path, max_epochs=1, precision=precision, callbacks=[switch])
    module = TinyRegressor(optimizer="adamw")
    trainer.fit(module)

    assert switch.switch_step == 6
    assert all(math.isfinite(lr) and lr > 0 for lr in switch.estimated_lrs)
    assert all(math.isfinite(loss) for loss in module.losses[6:])
    sgd = trainer.optimizers[0]
    for group in sgd.param_groups:
        for param in group["params"]:
            assert sgd.state[param]["momentum_buffer"].dtype == param.dtype


# ----------------------------------------------------------------------------- resume


def _run_with_checkpoints(tmp_path, switch, module, max_epochs, ckpt_path=None, listener=None):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    callbacks = [switch, checkpoints] + ([listener] if listener else [])
    trainer = tiny_trainer(
        tmp_path, max_epochs=max_epochs, enable_checkpointing=True, callbacks=callbacks
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _assert_same_run(first_trainer, first_module, second_trainer, second_module, resumed_at):
    assert second_module.losses == first_module.losses[resumed_at:]
    for (name, a), (_, b) in zip(
        first_module.named_parameters(), second_module.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    first_state = first_trainer.optimizers[0].state_dict()
    second_state = second_trainer.optimizers[0].state_dict()
    assert first_state["param_groups"] == second_state["param_groups"]
    for key, state in first_state["state"].items():
        assert torch.equal(state["momentum_buffer"], second_state["state"][key]["momentum_buffer"])


def test_resume_after_switch_continues_identically(tmp_path):
    def module():
        return TinyRegressor(optimizer="adamw", warmup=2, samples=128)  # 8 steps per epoch

    def switch():
        return OptimizerSwitch("nesterov", at_step=6, momentum_init="adam")  # LR estimated

    uninterrupted, first_switch = module(), switch()
    first = _run_with_checkpoints(tmp_path / "a", first_switch, uninterrupted, max_epochs=4)
    checkpoint = tmp_path / "a" / "ckpt" / "epoch=1-step=16.ckpt"
    resumed_switch, resumed, listener = switch(), module(), ChangeListener()
    second = _run_with_checkpoints(
        tmp_path / "b",
        resumed_switch,
        resumed,
        max_epochs=4,
        ckpt_path=checkpoint,
        listener=listener,
    )

    assert type(second.optimizers[0]).__name__ == "SGD"
    assert listener.seen == ["SGD"]  # SGD rebuilt in on_fit_start, before its state was loaded
    assert resumed_switch.switch_step == 6
    assert resumed_switch.sgd_base_lrs == first_switch.sgd_base_lrs
    _assert_same_run(first, uninterrupted, second, resumed, resumed_at=16)


def test_resume_before_switch_keeps_tracking_and_switches_at_the_same_step(tmp_path):
    def module():
        return TinyRegressor(optimizer="adamw", warmup=2, samples=128)

    def switch():
        return AdamToSGD(epsilon=1e-2, min_steps=10)

    uninterrupted, first_switch = module(), switch()
    first = _run_with_checkpoints(tmp_path / "a", first_switch, uninterrupted, max_epochs=4)
    assert first_switch.switched and first_switch.switch_step > 8  # after the checkpoint below
    resumed, resumed_switch = module(), switch()
    checkpoint = tmp_path / "a" / "ckpt" / "epoch=0-step=8.ckpt"
    second = _run_with_checkpoints(
        tmp_path / "b", resumed_switch, resumed, max_epochs=4, ckpt_path=checkpoint
    )

    assert resumed_switch.switch_step == first_switch.switch_step
    assert resumed_switch.estimated_lrs == first_switch.estimated_lrs
    _assert_same_run(first, uninterrupted, second, resumed, resumed_at=8)


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_switch_at_the_same_step_and_stay_identical(tmp_path, two_processes):
    ranks = two_processes("ddp_switch.py", tmp_path, timeout=400)

    for rank in ranks:
        assert rank["switched"] and rank["final_step"] > rank["switch_step"]
        assert rank["classes"][: rank["switch_step"]] == ["AdamW"] * rank["switch_step"]
        assert set(rank["classes"][rank["switch_step"] :]) == {"SGD"}
        assert rank["params_at_switch"] != rank["final_params"]  # SGD really moved them
    zero, one = ranks
    assert zero["losses"] != one["losses"]  # each rank saw its own half of the data ...
    for key in (
        "switch_step",
        "estimated_lrs",
        "sgd_base_lrs",
        "params_at_switch",
        "final_params",
        "statistics",
    ):
        assert zero[key] == one[key], key  # ... yet decided and stepped identically


@pytest.mark.parametrize("name", ["lion", "muon", "schedule_free_sgd", "lamb", "adafactor"])
def test_a_scheduled_switch_works_from_any_entry(tmp_path, name):
    """OptimizerSwitch with a given lr needs nothing of the source's state: it switches from
    every registry entry, the new ones included, and SGD trains on."""
    from optim_callbacks import ScheduleFreeModes

    switch = OptimizerSwitch(at_step=3, lr=0.05, momentum=0.9)
    trainer = tiny_trainer(tmp_path, max_steps=6, callbacks=[switch, ScheduleFreeModes()])
    lr = {"lion": 1e-4, "muon": 0.02, "schedule_free_sgd": 0.1, "lamb": 1e-2}.get(name, 1e-2)
    module = TinyRegressor(optimizer=name, lr=lr, scheduler="constant")
    trainer.fit(module)
    assert switch.switched and switch.switch_step == 3 and trainer.global_step == 6
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert all(math.isfinite(loss) for loss in module.losses)


class ScheduleFreeAtSwitch(Callback):
    """Listed before the OptimizerSwitch: at the end of step ``at`` (before the switch) the
    schedule-free optimizer's ``y`` (the parameters, train mode), ``z`` and beta, in float64;
    at every step the optimizer class, the parameters and the gradients it steps with, and the
    parameters after it."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.y: list[torch.Tensor] = []
        self.z: list[torch.Tensor] = []
        self.beta = math.nan
        self.before: list[tuple[str, list[torch.Tensor], list[torch.Tensor]]] = []
        self.after: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = list(pl_module.parameters())
        self.before.append(
            (
                type(optimizer).__name__,
                [p.detach().clone() for p in params],
                [p.grad.detach().clone() for p in params],
            )
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = list(pl_module.parameters())
        self.after.append([p.detach().clone() for p in params])
        if trainer.global_step != self.at:
            return
        optimizer = trainer.optimizers[0]
        assert optimizer.training  # the parameters hold y
        self.y = [p.detach().double() for p in params]
        self.z = [optimizer.state[p]["z"].double() for p in params]
        group = optimizer.param_groups[0]
        self.beta = float(group["betas"][0] if "betas" in group else group["momentum"])


@pytest.mark.parametrize(
    ("name", "lr"), [("schedule_free_adamw", 1e-2), ("schedule_free_sgd", 0.1)]
)
def test_a_switch_from_schedule_free_continues_from_the_average_x(tmp_path, name, lr):
    """SGD takes over the schedule-free average x = y + (1 - 1/beta)(z - y), computed here from
    the optimizer's y and z, not the training point y; its first step is x - lr * g with g taken
    at x, and after the switch nothing toggles the parameters any more (the end of fit leaves
    them where SGD's last step put them)."""
    from optim_callbacks import ScheduleFreeModes

    at = 3
    watch = ScheduleFreeAtSwitch(at)
    switch = OptimizerSwitch(at_step=at, lr=0.05, momentum=0.9)
    trainer = tiny_trainer(tmp_path, max_steps=6, callbacks=[watch, switch, ScheduleFreeModes()])
    module = TinyRegressor(optimizer=name, lr=lr, scheduler="constant", samples=96)
    trainer.fit(module)
    assert switch.switch_step == at and trainer.global_step == 6
    source_class = type(build_optimizer(name, nn.Linear(1, 1))).__name__
    assert [c for c, _, _ in watch.before] == [source_class] * at + ["SGD"] * 3
    x = [y + (1.0 - 1.0 / watch.beta) * (z - y) for y, z in zip(watch.y, watch.z, strict=True)]
    assert max((a - b).abs().max().item() for a, b in zip(x, watch.y, strict=True)) > 1e-4
    _, at_switch, grads = watch.before[at]
    for param, expected in zip(at_switch, x, strict=True):
        torch.testing.assert_close(param.double(), expected, rtol=1e-6, atol=1e-7)
    sgd = trainer.optimizers[0]
    assert isinstance(sgd, torch.optim.SGD) and not hasattr(sgd, "eval")
    sgd_lr = sgd.param_groups[0]["lr"]
    assert sgd_lr == pytest.approx(0.05)
    for before, grad, after in zip(at_switch, grads, watch.after[at], strict=True):
        # SGD's first heavy-ball step (buffer = g; no weight decay: the source had none)
        torch.testing.assert_close(after, before - sgd_lr * grad, rtol=1e-6, atol=1e-7)
    for final, last in zip(module.parameters(), watch.after[-1], strict=True):
        assert torch.equal(final, last)
