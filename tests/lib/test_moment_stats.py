"""MomentStatistics: logged values equal statistics computed here directly from optimizer state.

Every run is a real Lightning fit on CPU. A ``Recorder`` callback copies, on every step, the
parameters before the step and the optimizer state, gradients and hyperparameters after it; the
expected statistics are then computed from those copies with plain float64 torch code, written
independently of ``optim_callbacks.moment_math`` (the roles of the state tensors are spelled out
below rather than read from the registry).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy

from optim_callbacks import MomentStatistics, ScheduleFreeModes, build_optimizer
from optim_callbacks.callbacks.moment_stats import moment_key
from optim_callbacks.callbacks.optimizer_swap import notify_optimizers_changed
from optim_callbacks.moment_math import PERCENTILE_RELATIVE_ERROR, ParamMoments, moment_statistics
from tests.lib.refusals import assert_refused
from tests.lib.tiny import RecordingLogger, TinyRegressor, fp16_mixed, tiny_trainer

PERCENTILES = (5, 50, 95)
# Logged percentiles are read from log-spaced bins (200 per decade), each within one bin of the
# exact order statistic: 10^(1/200) - 1 = 1.16%.
PERCENTILE_REL = PERCENTILE_RELATIVE_ERROR

# name -> (first moment key, second moment key, bias-corrected, state tensors the optimizer keeps)
ROLES: dict[str, tuple[str | None, str | None, bool]] = {
    "adam": ("exp_avg", "exp_avg_sq", True),
    "adamw": ("exp_avg", "exp_avg_sq", True),
    "adabelief": ("exp_avg", "exp_avg_var", True),
    "momentum": ("momentum_buffer", None, False),
    "rmsprop": (None, "square_avg", False),
    # After the classic nine: no bias-corrected Adam step, so no step sizes are logged.
    "lion": ("exp_avg", None, False),
    "adopt": ("exp_avg", "exp_avg_sq", False),
    "lamb": ("exp_avg", "exp_avg_sq", False),
}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_var", "max_exp_avg_var",
              "momentum_buffer", "square_avg", "grad_avg", "acc_delta", "sum")  # fmt: skip


class Recorder(Callback):
    """Copies what the expected statistics need, keyed by the step Lightning logs the batch at."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, Any]] = {}
        self._before: dict[str, Any] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        hyper = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                hyper[names[id(p)]] = {k: group.get(k) for k in ("lr", "eps", "betas")}
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        # One optimizer step per batch: the steps before this one are the batches that stepped,
        # the step Lightning logs this batch at.
        step = trainer.global_step
        self._before = {"optimizer": optimizer, "params": params, "hyper": hyper, "step": step}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = self._before["optimizer"]
        state = {}
        for name, p in pl_module.named_parameters():
            s = optimizer.state.get(p, {})
            state[name] = {
                k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in s.items()
            }
        self.records[self._before["step"]] = {
            "before": self._before["params"],
            "after": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "grad": {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()},
            "state": state,
            "hyper": self._before["hyper"],
        }


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _layer(name: str) -> str:
    return name.rpartition(".")[0] or name


def expected_statistics(
    record: dict[str, Any], optimizer: str, prefix: str = "moments"
) -> dict[str, float]:
    """Every statistic of every layer and of all parameters, in float64, from a record."""
    first, second, corrected = ROLES[optimizer]
    layers: dict[str, list[str]] = {}
    for name in record["after"]:
        layers.setdefault(_layer(name), []).append(name)
    expected = {}
    for group, names in [*layers.items(), ("global", list(record["after"]))]:
        state = {n: record["state"][n] for n in names}
        out = {}
        for key in STATE_KEYS:
            present = [state[n][key] for n in names if torch.is_tensor(state[n].get(key))]
            if present:
                out[f"{key}_norm"] = _norm(present)
        delta = [record["after"][n].double() - record["before"][n].double() for n in names]
        out["update_to_weight"] = _norm(delta) / _norm(record["before"][n] for n in names)
        out["update_norm"] = _norm(delta)
        out["weight_norm"] = _norm(record["after"][n] for n in names)  # after the step
        out["grad_norm"] = _norm(record["grad"][n] for n in names)
        if first:
            m = torch.cat([state[n][first].double().flatten() for n in names])
            g = torch.cat([record["grad"][n].double().flatten() for n in names])
            out["grad_cosine"] = float(m @ g / (m.norm() * g.norm()))
        if second:
            roots, steps, below, total = [], [], 0, 0
            hat = []
            for n in names:
                hyper, v = record["hyper"][n], state[n][second].double()
                below += int((v < hyper["eps"] ** 2).sum())
                total += v.numel()
                if corrected:
                    beta1, beta2 = hyper["betas"]
                    t = float(state[n]["step"])
                    v = v / (1 - beta2**t)
                    hat.append(state[n][first].double() / (1 - beta1**t))
                    steps.append(hyper["lr"] / (v.sqrt() + hyper["eps"]))
                roots.append(v.sqrt())
            out["second_moment_underflow"] = below / total
            q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
            for label, values in [("sqrt_second_moment", roots), ("step_size", steps)]:
                if values:
                    flat = torch.cat([x.flatten() for x in values])
                    for p, value in zip(PERCENTILES, torch.quantile(flat, q).tolist(), strict=True):
                        out[f"{label}_p{p:02d}"] = value
            if hat:
                out["first_moment_hat_norm"] = _norm(hat)
        layer = None if group == "global" else group
        expected.update({moment_key(k, layer, prefix): v for k, v in out.items()})
    return expected


def assert_statistics_equal(
    logged: dict[str, float], expected: dict[str, float], rel: float = 2e-5
) -> None:
    """Equal to float rounding (``rel``); percentiles within a bin (:data:`PERCENTILE_REL`)."""
    assert set(logged) == set(expected)
    for key, value in expected.items():
        # A float32 dot product errs relative to |m| |g|: in cosine units, absolutely (a cosine
        # near 0 has no relative precision to speak of).
        absolute = 1e-6 if key.endswith("/grad_cosine") else 1e-9
        tolerance = max(rel, PERCENTILE_REL) if re.search(r"_p\d+$", statistic_of(key)) else rel
        assert logged[key] == pytest.approx(value, rel=tolerance, abs=absolute), key


def moment_scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k.startswith("moments") and v not in ("", None)}


def read_csv_rows(logger: CSVLogger) -> dict[int, dict[str, float]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [
            r for r in csv.DictReader(f) if any(k.startswith("moments") and v for k, v in r.items())
        ]
    return {int(r["step"]): moment_scalars(r) for r in rows}


# --------------------------------------------------------------------------------------------
# The acceptance run: W&B offline + CSV in one Trainer, read back, equal to direct computation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer", ["adam", "adamw", "adabelief", "momentum", "rmsprop", "lion", "adopt", "lamb"]
)
def test_wandb_and_csv_log_the_statistics_of_the_optimizer_state(tmp_path, wandb_run, optimizer):
    options = {"momentum": 0.9} if optimizer == "rmsprop" else None  # a momentum_buffer too
    model = TinyRegressor(optimizer=optimizer, optimizer_options=options)
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="moment-stats")
    csv_logger = CSVLogger(str(tmp_path))
    recorder = Recorder()
    trainer = tiny_trainer(
        tmp_path,
        max_steps=6,
        logger=[wandb_logger, csv_logger],
        callbacks=[MomentStatistics(every_n_steps=3), recorder],
    )
    trainer.fit(model)
    wandb_logger.experiment.finish()

    records = wandb_run.records(tmp_path)
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    logged = {
        int(item["trainer/global_step"]): item
        for item in history
        if any(k.startswith("moments") for k in item)
    }
    assert sorted(logged) == [2, 5]  # after optimizer steps 3 and 6
    csv_rows = read_csv_rows(csv_logger)
    assert sorted(csv_rows) == [2, 5]
    for step, item in logged.items():
        expected = expected_statistics(recorder.records[step], optimizer)
        scalars = {
            k: v for k, v in item.items() if k.startswith("moments") and "log10_step_size" not in k
        }
        assert_statistics_equal(scalars, expected)
        assert csv_rows[step] == pytest.approx(scalars, rel=1e-12)

    # Histograms of log10(step size) for Adam-family optimizers: every element of the layer counted,
    # between the smallest and largest step size.
    item = logged[5]
    hist_keys = sorted({k.rsplit(".", 1)[0] for k in item if k.endswith("._type")})
    if ROLES[optimizer][2]:
        assert hist_keys == sorted(
            moment_key("log10_step_size", layer) for layer in (None, "net.0", "net.1", "net.3")
        )
        record, (_, second, _) = recorder.records[5], ROLES[optimizer]
        step_sizes = []
        for name in record["after"]:
            hyper, t = record["hyper"][name], float(record["state"][name]["step"])
            v_hat = record["state"][name][second].double() / (1 - hyper["betas"][1] ** t)
            step_sizes.append((hyper["lr"] / (v_hat.sqrt() + hyper["eps"])).log10().flatten())
        everything = torch.cat(step_sizes)
        bins = item["moments/log10_step_size.bins"]
        assert sum(item["moments/log10_step_size.values"]) == everything.numel()
        # the outer edges of the bins (1/200 decade wide) that hold the smallest and largest
        assert float(everything.min()) - 0.005 <= bins[0] <= float(everything.min())
        assert float(everything.max()) <= bins[-1] <= float(everything.max()) + 0.005
    else:
        assert hist_keys == []

    # define_metric: each key is declared once, against trainer/global_step, with a summary.
    defined = {
        r["metric"]["name"]: r["metric"]
        for r in records
        if r.get("type") == "metric" and "name" in r["metric"]
    }
    for key in expected_statistics(recorder.records[5], optimizer):
        assert defined[key]["step_metric"] == "trainer/global_step"
    assert defined["moments/update_to_weight"]["summary"] == {"max": True, "last": True}


# --------------------------------------------------------------------------------------------
# Precisions
# --------------------------------------------------------------------------------------------


class SmallGradientRegressor(TinyRegressor):
    """The loss scaled by 1e-3, so some gradients are small enough for g^2 to vanish in fp16."""

    def training_step(self, batch, batch_idx):
        return 1e-3 * super().training_step(batch, batch_idx)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true"])
def test_statistics_match_under_reduced_precision(tmp_path, precision):
    model = SmallGradientRegressor(optimizer="adam", lr=1e-3)
    csv_logger = CSVLogger(str(tmp_path))
    recorder = Recorder()
    # On CPU, Lightning turns precision="16-mixed" into bf16; the plugin gives real fp16 autocast
    # with a GradScaler (Lightning unscales the gradients before the callback reads them).
    amp = {"plugins": [fp16_mixed()]} if precision == "16-mixed" else {"precision": precision}
    callbacks = [MomentStatistics(every_n_steps=4), recorder]
    trainer = tiny_trainer(tmp_path, max_steps=4, logger=csv_logger, callbacks=callbacks, **amp)
    trainer.fit(model)
    rows = read_csv_rows(csv_logger)
    assert sorted(rows) == [3]
    expected = expected_statistics(recorder.records[3], "adam")
    # 16-true: parameters, gradients and moments are fp16; the callback reduces them in fp32.
    assert_statistics_equal(rows[3], expected, rel=1e-3 if precision == "16-true" else 2e-5)
    state_dtype = next(iter(trainer.optimizers[0].state.values()))["exp_avg_sq"].dtype
    underflow = rows[3]["moments/second_moment_underflow"]
    if precision == "16-true":
        # The fp16 underflow sign: (1 - beta2) g^2 is below fp16's smallest subnormal.
        assert state_dtype == torch.float16
        assert underflow > 0.05
    else:
        assert state_dtype == torch.float32
        assert underflow == 0.0


# --------------------------------------------------------------------------------------------
# Layers, optimizers the registry does not know, optimizer switches, resume
# --------------------------------------------------------------------------------------------


def test_layer_filter_and_max_layers_choose_the_layers_global_covers_all(tmp_path):
    recorder = Recorder()
    loggers = [RecordingLogger(), RecordingLogger()]
    callbacks = [
        MomentStatistics(every_n_steps=2, layer_filter=r"^net\.[13]$", prefix="filtered"),
        MomentStatistics(
            every_n_steps=2, max_layers=1, statistics=["update_to_weight"], prefix="capped"
        ),
    ]
    trainer = tiny_trainer(tmp_path, max_steps=2, logger=loggers, callbacks=[*callbacks, recorder])
    trainer.fit(TinyRegressor(optimizer="adam"))
    ((step, filtered),) = [
        (s, m) for s, m in loggers[0].rows if any(k.startswith("filtered/") for k in m)
    ]
    layers = {layer_of(k) for k in filtered}
    assert layers == {"net.1", "net.3", None}
    expected = expected_statistics(recorder.records[step], "adam", prefix="filtered")
    assert_statistics_equal(filtered, {k: v for k, v in expected.items() if layer_of(k) in layers})
    ((_, capped),) = [(s, m) for s, m in loggers[1].rows if any(k.startswith("capped/") for k in m)]
    assert set(capped) == {"capped.update_to_weight/net.0", "capped/update_to_weight"}
    assert capped["capped/update_to_weight"] == pytest.approx(
        expected["filtered/update_to_weight"], rel=1e-6
    )


def layer_of(key: str) -> str | None:
    """The layer of a logged key (``None`` for the global statistics)."""
    section, _, rest = key.partition("/")
    return rest if "." in section else None


def statistic_of(key: str) -> str:
    """The statistic of a logged key: ``moments/<statistic>``, ``moments.<statistic>/<layer>``."""
    section, _, rest = key.partition("/")
    return section.partition(".")[2] if "." in section else rest


class Velocity(torch.optim.Optimizer):
    """Heavy-ball SGD the registry does not know; its state tensor is called ``velocity``."""

    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                velocity = state.setdefault("velocity", torch.zeros_like(p))
                velocity.mul_(0.9).add_(p.grad)
                state["scale"] = torch.tensor(1.0)  # a scalar: not shaped like the parameter
                p.add_(velocity, alpha=-group["lr"])
        return loss


class VelocityRegressor(TinyRegressor):
    def configure_optimizers(self):
        return Velocity(self.parameters())


def logged_moments(
    folder: Path, module: TinyRegressor, callbacks: list, steps: int, **fit: Any
) -> dict[int, dict[str, float]]:
    """Fit ``module`` for ``steps`` steps with ``callbacks`` (``fit``: ``Trainer.fit``'s
    ``ckpt_path``, or trainer options); the logged rows that hold moment statistics, by step."""
    logger, ckpt_path = RecordingLogger(), fit.pop("ckpt_path", None)
    trainer = tiny_trainer(folder, max_steps=steps, logger=logger, callbacks=callbacks, **fit)
    trainer.fit(module, ckpt_path=ckpt_path)
    return {s: m for s, m in logger.rows if any(k.startswith("moments") for k in m)}


def test_unregistered_optimizer_logs_every_state_tensor_shaped_like_its_parameter(tmp_path):
    recorder = Recorder()
    callbacks = [MomentStatistics(every_n_steps=2), recorder]
    ((step, metrics),) = logged_moments(tmp_path, VelocityRegressor(), callbacks, 2).items()
    record = recorder.records[step]
    names = list(record["after"])
    assert {statistic_of(k) for k in metrics} == {
        "velocity_norm",
        "update_to_weight",
        "update_norm",
        "weight_norm",
        "grad_norm",
    }
    assert metrics["moments/velocity_norm"] == pytest.approx(
        _norm(record["state"][n]["velocity"] for n in names), rel=1e-6
    )


class SwitchToMomentum(Callback):
    """Replaces Adam with SGD + momentum after step 3 through ``trainer.optimizers`` and tells the
    other callbacks, following the project's ``on_optimizers_changed`` protocol."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            trainer.optimizers = [build_optimizer("momentum", pl_module, lr=0.01)]
            notify_optimizers_changed(trainer, pl_module)


class AdafactorRegressor(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.Adafactor(self.parameters(), lr=1e-2)


def test_an_optimizer_with_a_pair_as_eps_logs_its_state(tmp_path):
    """torch's Adafactor keeps ``eps`` as ``(None, 1e-3)``: read as no single eps, not a crash."""
    callbacks = [MomentStatistics(every_n_steps=2)]
    (metrics,) = logged_moments(tmp_path, AdafactorRegressor(), callbacks, 2).values()
    assert metrics["moments/grad_norm"] > 0 and metrics["moments/update_norm"] > 0
    assert "moments.update_to_weight/net.0" in metrics


def test_keys_continue_across_an_adam_to_sgd_switch(tmp_path):
    recorder = Recorder()
    callbacks = [MomentStatistics(every_n_steps=3), SwitchToMomentum(), recorder]
    rows = logged_moments(tmp_path, TinyRegressor(optimizer="adam", scheduler=None), callbacks, 6)
    assert sorted(rows) == [2, 5]
    assert_statistics_equal(rows[2], expected_statistics(recorder.records[2], "adam"))
    assert_statistics_equal(rows[5], expected_statistics(recorder.records[5], "momentum"))
    for layer in ("net.0", "net.1", "net.3", None):
        for stat in ("update_to_weight", "grad_cosine"):  # the panels that span the switch
            assert moment_key(stat, layer) in rows[2]
            assert moment_key(stat, layer) in rows[5]


def test_resumed_run_logs_the_same_values_at_the_same_steps(tmp_path):
    def run(directory: Path, ckpt_path: str | None = None) -> dict[int, dict[str, float]]:
        # Saved at a batch end: resuming from Lightning's epoch-end checkpoint reruns a batch.
        checkpoint = ModelCheckpoint(dirpath=directory, every_n_train_steps=4, save_top_k=-1)
        callbacks = [MomentStatistics(every_n_steps=2), checkpoint]
        module = TinyRegressor(optimizer="adamw", samples=64)
        return logged_moments(
            directory, module, callbacks, 8, max_epochs=-1, enable_checkpointing=True,
            ckpt_path=ckpt_path,
        )  # fmt: skip

    straight = run(tmp_path / "straight")
    assert sorted(straight) == [1, 3, 5, 7]
    resumed = run(
        tmp_path / "resumed", ckpt_path=str(tmp_path / "straight" / "epoch=0-step=4.ckpt")
    )
    assert sorted(resumed) == [5, 7]
    for step in (5, 7):
        assert resumed[step] == straight[step]


# --------------------------------------------------------------------------------------------
# Sampling, distributed, bad input
# --------------------------------------------------------------------------------------------


def _exact(values: torch.Tensor, q: float) -> float:
    return torch.quantile(values.double().flatten(), q / 100).item()


def test_percentiles_count_every_element_of_each_layer_and_of_the_model():
    """Layers of 64x64 and larger, spread over eight decades, with zeros and a bias-corrected
    step: every percentile of sqrt(v_hat) and of the step size, per layer and over all, within
    one bin (1.16%) of torch.quantile over all elements; underflow and norms exact."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (300, 200), (128,), (1000, 130)]
    tensors = [10 ** (-8 * torch.rand(s, generator=generator)) for s in shapes]
    tensors[1][:5] = 0.0  # some zeros: an underflowing second moment
    moments = [
        ParamMoments(
            param=torch.zeros_like(t),
            second_moment=t,
            states={"exp_avg_sq": t},
            eps=1e-8,
            betas=(0.9, 0.999),
            step=torch.tensor(7.0),
            lr=3e-4,
        )
        for t in tensors
    ]
    percentiles = (0, 1, 5, 25, 50, 75, 95, 99, 100)
    results, _ = moment_statistics(moments, [[0], [1, 2], [3]], percentiles=percentiles)
    groups = [[0], [1, 2], [3], [0, 1, 2, 3]]
    for result, members in zip(results, groups, strict=True):
        v_hat = torch.cat([tensors[i].double().flatten() for i in members]) / (1 - 0.999**7)
        roots, steps = v_hat.sqrt(), 3e-4 / (v_hat.sqrt() + 1e-8)
        for q in percentiles:
            label = f"p{q:02d}"
            for name, values in (("sqrt_second_moment", roots), ("step_size", steps)):
                exact = _exact(values, q)
                assert result[f"{name}_{label}"] == pytest.approx(exact, rel=PERCENTILE_REL, abs=0)
        assert result["second_moment_underflow"] == pytest.approx(
            float((v_hat * (1 - 0.999**7) < 1e-16).double().mean()), rel=1e-12
        )


def test_percentiles_are_not_sampled_at_default_settings(tmp_path):
    """A Lightning fit at default settings with a 96x64 layer (the old default sampled 1024 of
    its elements): every logged percentile within a bin of the exact one."""
    recorder = Recorder()
    module = TinyRegressor(optimizer="adamw", features=64, hidden=96, samples=48)
    callbacks = [MomentStatistics(every_n_steps=3), recorder]
    ((step, metrics),) = logged_moments(tmp_path, module, callbacks, 3).items()
    scalars = {k: v for k, v in metrics.items() if "log10_step_size" not in k}
    expected = expected_statistics(recorder.records[step], "adamw")
    assert "moments.step_size_p95/net.0" in expected
    assert_statistics_equal(scalars, expected)


def test_schedule_free_step_sizes_use_the_warmed_up_lr(tmp_path):
    """Schedule-free AdamW warms its LR up inside the step: ``lr_t = lr * min(1, t / warmup)``
    after its ``t``-th step. The logged step sizes are ``lr_t / (sqrt(v_hat) + eps)``, computed
    here from the optimizer state and that formula, during the warmup (t = 2 and 4 of 10)."""
    recorder = Recorder()
    model = TinyRegressor(
        optimizer="schedule_free_adamw",
        lr=1e-2,
        scheduler=None,
        optimizer_options={"warmup_steps": 10},
    )
    callbacks = [ScheduleFreeModes(), MomentStatistics(every_n_steps=2), recorder]
    rows = logged_moments(tmp_path, model, callbacks, 4)
    assert sorted(rows) == [1, 3]
    for step, metrics in rows.items():
        record = recorder.records[step]
        t = step + 1  # steps done, the state's step count
        lr_t = 1e-2 * t / 10
        roots, sizes = [], []
        for state in record["state"].values():
            assert float(state["step"]) == t
            v_hat = state["exp_avg_sq"].double() / (1 - 0.999**t)
            roots.append(v_hat.sqrt().flatten())
            sizes.append((lr_t / (v_hat.sqrt() + 1e-8)).flatten())
        for q in PERCENTILES:
            label = f"p{q:02d}"
            exact = _exact(torch.cat(sizes), q)
            logged = metrics[f"moments/step_size_{label}"]
            assert logged == pytest.approx(exact, rel=PERCENTILE_REL), (step, label)
            # what the group's lr alone gives is 10/t times larger: not what was logged
            assert logged < 0.5 * _exact(torch.cat(sizes) * 10 / t, q)
            exact_root = _exact(torch.cat(roots), q)
            assert metrics[f"moments/sqrt_second_moment_{label}"] == pytest.approx(
                exact_root, rel=PERCENTILE_REL
            )


def test_max_samples_and_seed_are_accepted_and_have_no_effect():
    MomentStatistics(max_samples=1024, seed=0)  # an old configuration's values: silent
    with pytest.warns(DeprecationWarning, match=r"max_samples=64, seed=0 have no effect"):
        MomentStatistics(max_samples=64)


def test_training_is_identical_with_and_without_the_callback(tmp_path):
    """The callback only reads: training and torch's random stream are untouched."""
    finals = []
    for callbacks in ([], [MomentStatistics(every_n_steps=1)]):
        torch.manual_seed(0)
        model = TinyRegressor(optimizer="adamw")
        tiny_trainer(
            tmp_path, max_steps=6, logger=CSVLogger(str(tmp_path)), callbacks=callbacks
        ).fit(model)
        finals.append((model.losses, torch.rand(3)))
    assert finals[0][0] == finals[1][0]
    assert torch.equal(finals[0][1], finals[1][1])  # the global random stream is untouched


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_logs_once_from_rank_zero(tmp_path, two_processes):
    ranks = two_processes("ddp_moments.py", tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [row["step"] for row in ranks[0]["rows"]] == [2, 5]
    assert ranks[1]["rows"] == []
    for row in ranks[0]["rows"]:
        # Optimizer state is replicated: rank zero's log equals what rank one's own state says.
        assert_statistics_equal(row["metrics"], ranks[1]["expected"][str(row["step"])])
        assert_statistics_equal(row["metrics"], ranks[0]["expected"][str(row["step"])])
    assert not any(r["wandb_imported"] for r in ranks)  # no WandbLogger: wandb never imported


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps: got 0; allowed: an integer >= 1"),
        (
            {"layer_filter": "encoder.(layer"},
            "layer_filter: got 'encoder.(layer', not a valid regular expression",
        ),
        (
            {"statistics": ["step_sizes"]},
            "statistics: unknown value 'step_sizes'; allowed: first_moment_hat_norm",
        ),
        ({"statistics": ["step_sizes"]}, "did you mean 'step_size'?"),
        ({"statistics": "step_size"}, "statistics: got 'step_size'; allowed: a non-empty list of"),
        ({"percentiles": (5, 101)}, "percentiles[1]: got 101; allowed: a number in [0, 100]"),
        ({"percentiles": 95}, "percentiles: got 95; allowed: a list of numbers in [0, 100]"),
        ({"max_layers": 0}, "max_layers: got 0; allowed: an integer >= 1"),
        ({"prefix": "a/b"}, "prefix: got 'a/b'; allowed: a non-empty string without '/'"),
    ],
)
def test_bad_arguments_give_one_clear_value_error(kwargs, message):
    assert_refused(MomentStatistics, kwargs, message)


def test_refuses_a_trainer_without_logger(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, logger=False, callbacks=[MomentStatistics()])
    with pytest.raises(ValueError, match="logger: MomentStatistics got a Trainer without a logger"):
        trainer.fit(TinyRegressor())


class CpuFSDP(FSDPStrategy):
    """Lightning's FSDP strategy; a subclass only so the Trainer accepts it on a CPU machine."""


def test_refuses_sharded_optimizer_state(tmp_path):
    trainer = L.Trainer(
        strategy=CpuFSDP(), accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path
    )
    with pytest.raises(
        ValueError,
        match="strategy: MomentStatistics got CpuFSDP; allowed: single device, DDP, and FSDP2",
    ):
        MomentStatistics().setup(trainer, TinyRegressor(), "fit")


def test_host_buffer_reads_each_packed_tensor_back_by_name():
    from optim_callbacks.moment_math import _HostBuffer

    buffer = _HostBuffer()
    buffer.pack("rows", torch.arange(6.0).reshape(2, 3))
    buffer.pack("empty", torch.zeros(0, 4))
    buffer.pack("flat", torch.tensor([7.0, 8.0]))
    buffer.transfer()
    assert buffer["rows"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert buffer["empty"] == []
    assert buffer["flat"] == [7.0, 8.0]
    assert "flat" in buffer and "missing" not in buffer


# --------------------------------------------------------------------------------- FSDP2
def _csv_moments(path: str) -> dict[int, dict[str, float]]:
    with open(path) as handle:
        rows = {}
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if v != "" and k.startswith("moments")}
            if values:
                rows[int(row["step"])] = values
    return rows


@pytest.fixture(scope="module")
def fsdp_moments(tmp_path_factory, two_processes) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp_moments")
    return two_processes("fsdp_moments.py", out, WANDB_MODE="offline", WANDB_SILENT="true")


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("optimizer", ["adamw", "adabelief", "momentum"])
def test_fsdp2_logs_the_statistics_of_ddp(fsdp_moments, optimizer):
    """Norms, ratios, cosines, underflow: float rounding (1e-5 relative). Percentiles: both
    from the same bins, DDP's counted in one process and FSDP2's summed over the ranks."""
    ddp = _csv_moments(fsdp_moments[0][optimizer]["ddp"]["csv"])
    fsdp2 = _csv_moments(fsdp_moments[0][optimizer]["fsdp2"]["csv"])
    assert sorted(ddp) == sorted(fsdp2) == [1, 3, 5]
    for step, expected in ddp.items():
        assert fsdp2[step].keys() == expected.keys()
        for key, value in expected.items():
            tolerance = 2e-2 if re.search(r"_p\d+$", statistic_of(key)) else 1e-5
            assert fsdp2[step][key] == pytest.approx(value, rel=tolerance, abs=1e-12), key
    assert {"moments/grad_norm", "moments.weight_norm/net.0"} <= set(fsdp2[1])
    assert "moments.update_norm/net.1" in fsdp2[1]  # the LayerNorm, spread over both ranks


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("optimizer", ["adamw", "adabelief"])
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_logged_percentiles_are_those_of_every_element(fsdp_moments, optimizer, kind):
    """At default settings, every logged percentile of sqrt(v_hat) and of the step size, per
    layer (the first one 80x64) and global, within one bin (1.16%) of torch.quantile over all
    elements of the full tensors, under DDP and under FSDP2."""
    logged = _csv_moments(fsdp_moments[0][optimizer][kind]["csv"])
    exact = fsdp_moments[0][optimizer][kind]["exact"]
    assert sorted(int(step) for step in exact) == sorted(logged) == [1, 3, 5]
    for step, values in exact.items():
        assert len(values) == 2 * 3 * 4  # two statistics, three percentiles, three layers + global
        for key, value in values.items():
            assert logged[int(step)][key] == pytest.approx(value, rel=PERCENTILE_REL), key


@pytest.mark.slow
@pytest.mark.ddp
def test_fsdp2_exchanges_one_buffer_per_logging_step_and_nothing_otherwise(fsdp_moments):
    for rank in fsdp_moments:
        for optimizer in ("adamw", "adabelief", "momentum"):
            assert rank[optimizer]["fsdp2"]["collectives"] == [0, 1] * 3  # logs at steps 1, 3, 5
            assert rank[optimizer]["ddp"]["collectives"] == [0] * 6


@pytest.mark.slow
@pytest.mark.ddp
def test_fsdp2_statistics_and_histograms_reach_an_offline_wandb_run(fsdp_moments, wandb_run):
    run = fsdp_moments[0]["adamw"]["fsdp2"]
    rows = [r for r in wandb_run.history(Path(run["wandb_dir"]).parent) if "moments/grad_norm" in r]
    assert len(rows) == 3
    csv_rows = _csv_moments(run["csv"])
    assert rows[0]["moments/grad_norm"] == pytest.approx(csv_rows[1]["moments/grad_norm"])
    values = rows[0]["moments.log10_step_size/net.0.values"]
    assert rows[0]["moments.log10_step_size/net.0._type"] == "histogram"
    assert sum(values) == 80 * 64 + 80  # every element of net.0, from both shards


def test_grad_norm_before_clipping_is_the_clipping_callbacks_own(tmp_path):
    from optim_callbacks import GradientClipping

    logger = RecordingLogger()
    callbacks = [GradientClipping(max_norm=0.05), MomentStatistics(every_n_steps=1)]
    trainer = tiny_trainer(
        tmp_path, max_steps=3, logger=logger, callbacks=callbacks, log_every_n_steps=1
    )
    trainer.fit(TinyRegressor(scheduler=None))
    clipped = {
        s: m["grad_clip/pre_clip_norm"] for s, m in logger.rows if "grad_clip/pre_clip_norm" in m
    }
    moments = {s: m for s, m in logger.rows if "moments/grad_norm" in m}
    assert sorted(moments) == sorted(clipped) == [0, 1, 2]
    for step, metrics in moments.items():
        assert metrics["moments/grad_norm_before_clipping"] == clipped[step]
        assert clipped[step] > 0.05  # it clipped: the gradients the optimizer used are smaller
        assert metrics["moments/grad_norm"] == pytest.approx(0.05, rel=1e-5)
