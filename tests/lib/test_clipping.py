"""GradientClipping in real Lightning runs on CPU: every mode, AMP, non-finite steps, resume, DDP."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy

from optim_callbacks import GradientClipping
from optim_callbacks.callbacks._strategy import check_supported_strategy
from tests.lib.refusals import assert_refused
from tests.lib.tiny import TinyRegressor, fp16_mixed, regression_data, tiny_trainer


class BrokenRegressor(TinyRegressor):
    """TinyRegressor whose loss is NaN at the given global steps (so every gradient is NaN)."""

    def __init__(self, nonfinite_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.nonfinite_steps = set(nonfinite_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step in self.nonfinite_steps:
            loss = loss * float("nan")
        return loss


class GradientProbe(Callback):
    """Records the flattened gradients this hook sees, and the parameters around each step."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    @staticmethod
    def _flat(tensors) -> torch.Tensor:
        return torch.cat([t.detach().float().flatten().clone() for t in tensors])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._flat(pl_module.parameters()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grads.append(self._flat(grads) if grads else torch.empty(0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._flat(pl_module.parameters()))

    def updates(self) -> list[torch.Tensor]:
        return [a - b for a, b in zip(self.after, self.before, strict=True)]


def _logged(tmp_path: Path) -> list[dict[str, float]]:
    """Rows of the CSVLogger's metrics that carry grad_clip values, in step order."""
    (path,) = tmp_path.glob("csv/**/metrics.csv")
    with open(path) as handle:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
    return [row for row in rows if any(k.startswith("grad_clip/") for k in row)]


def _fit(tmp_path, module, callbacks, **trainer_options):
    trainer = tiny_trainer(
        tmp_path,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=1,
        **trainer_options,
    )
    trainer.fit(module)
    return trainer


# ------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"max_norm": -1.0}, ["max_norm", "-1.0", "> 0"]),
        ({"mode": "nrom"}, ["mode", "'nrom'", "agc, auto, norm, value", "did you mean 'norm'"]),
        ({"mode": "auto", "percentile": 0}, ["percentile", "0", "(0.0, 100.0]"]),
        ({"mode": "auto", "percentile": 100.5}, ["percentile", "100.5", "(0.0, 100.0]"]),
        ({"mode": "auto", "history_size": 0}, ["history_size", "integer >= 1"]),
        ({"norm_type": 0}, ["norm_type", "> 0"]),
        ({"norm_type": math.nan}, ["norm_type", "nan", "a finite number > 0 or math.inf"]),
        ({"max_norm": math.inf}, ["max_norm", "inf", "a finite number > 0"]),
        ({"mode": "value", "max_norm": 0.5}, ["max_norm", "mode='norm'", "max_value"]),
        ({"mode": "agc", "clip_factor": 0}, ["clip_factor", "> 0"]),
        ({"max_consecutive_nonfinite": 0}, ["max_consecutive_nonfinite", "integer >= 1"]),
    ],
)
def test_bad_arguments_raise_one_value_error_naming_the_argument(kwargs, needles):
    assert_refused(GradientClipping, kwargs, *needles)


def test_trainer_gradient_clip_val_together_with_the_callback_is_refused(tmp_path):
    trainer = tiny_trainer(
        tmp_path, callbacks=[GradientClipping()], gradient_clip_val=0.5, max_steps=1
    )
    with pytest.raises(ValueError, match=r"gradient_clip_val: got .*0\.5.*Keep one"):
        trainer.fit(TinyRegressor(samples=32))


def test_fsdp1_is_refused_with_what_is_supported():
    # FSDP1 flattens parameters; FSDP2 (ModelParallelStrategy) is the supported sharding. The
    # FSDP1 strategy needs CUDA to join a Trainer here, so the check is called on it directly.
    with pytest.raises(ValueError) as error:
        check_supported_strategy("GradientClipping", FSDPStrategy())
    assert str(error.value) == (
        "strategy: GradientClipping got FSDPStrategy; allowed: single device, DDP, and FSDP2 "
        "data parallelism (ModelParallelStrategy with fully_shard, tensor_parallel_size=1)"
    )


def test_agc_exclude_that_matches_no_parameter_is_refused(tmp_path):
    clipping = GradientClipping(mode="agc", exclude=["head"])
    with pytest.raises(ValueError, match=r"exclude: got \['head'\], which matches no parameter"):
        clipping.setup(tiny_trainer(tmp_path), TinyRegressor(), "fit")


# ----------------------------------------------------------------------------------- the modes
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_mode_clips_the_global_norm_and_logs_the_pre_clip_norm(tmp_path, norm_type):
    before, after = GradientProbe(), GradientProbe()
    clipping = GradientClipping(max_norm=0.5, norm_type=norm_type)
    lr = 0.1
    module = TinyRegressor(optimizer="sgd", lr=lr, scheduler=None, samples=64)
    _fit(tmp_path, module, [before, clipping, after])

    rows = _logged(tmp_path)
    assert len(rows) == 4
    clipped = 0
    for grads, clipped_grads, update, row in zip(
        before.grads, after.grads, after.updates(), rows, strict=True
    ):
        norm = torch.linalg.vector_norm(grads, norm_type).item()
        assert row["grad_clip/pre_clip_norm"] == pytest.approx(norm, rel=1e-5)
        expected = grads * min(1.0, 0.5 / norm)
        torch.testing.assert_close(clipped_grads, expected, rtol=1e-5, atol=1e-7)
        # SGD without momentum: the parameters moved by exactly -lr * clipped gradient.
        torch.testing.assert_close(update, -lr * expected, rtol=1e-4, atol=1e-6)
        assert row["grad_clip/coefficient"] == pytest.approx(min(1.0, 0.5 / norm), rel=1e-5)
        clipped += norm > 0.5
        assert row["grad_clip/clipped_fraction"] == pytest.approx(clipped / (rows.index(row) + 1))
    assert clipped >= 2  # the threshold is low enough that the test exercises clipping


def test_value_mode_clamps_every_element(tmp_path):
    before, after = GradientProbe(), GradientProbe()
    module = TinyRegressor(optimizer="sgd", lr=0.1, scheduler=None, samples=64)
    _fit(tmp_path, module, [before, GradientClipping(mode="value", max_value=0.2), after])
    rows = _logged(tmp_path)
    for grads, clipped_grads, row in zip(before.grads, after.grads, rows, strict=True):
        torch.testing.assert_close(clipped_grads, grads.clamp(-0.2, 0.2))
        ratio = clipped_grads.norm().item() / grads.norm().item()
        assert row["grad_clip/coefficient"] == pytest.approx(ratio, rel=1e-5)
    assert rows[-1]["grad_clip/clipped_fraction"] > 0


def test_agc_clips_each_unit_relative_to_its_weight_norm_and_leaves_excluded_layers(tmp_path):
    module = TinyRegressor(optimizer="sgd", lr=0.1, scheduler=None, samples=32)
    shapes = [(name, p.shape) for name, p in module.named_parameters()]
    probe_params = GradientProbe()
    before, after = GradientProbe(), GradientProbe()
    clipping = GradientClipping(mode="agc", clip_factor=0.05, exclude=["net.3"])
    _fit(tmp_path, module, [probe_params, before, clipping, after])

    for weights, grads, clipped_grads in zip(
        probe_params.before, before.grads, after.grads, strict=True
    ):
        offset, any_clipped = 0, False
        for name, shape in shapes:
            size = math.prod(shape)
            w = weights[offset : offset + size].reshape(shape)
            g = grads[offset : offset + size].reshape(shape)
            got = clipped_grads[offset : offset + size].reshape(shape)
            offset += size
            if name.startswith("net.3"):
                torch.testing.assert_close(got, g)
                continue
            # Brock et al. 2021: per output unit (row), ||G_i|| <= 0.05 * max(||W_i||, 1e-3).
            dims = tuple(range(1, w.ndim)) if w.ndim > 1 else None
            w_norm = w.norm(dim=dims, keepdim=True).clamp_min(1e-3)
            g_norm = g.norm(dim=dims, keepdim=True)
            allowed = 0.05 * w_norm
            expected = torch.where(g_norm > allowed, g * allowed / g_norm, g)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
            any_clipped |= bool((g_norm > allowed).any())
        assert any_clipped


def test_auto_mode_clips_to_the_percentile_of_the_norm_history(tmp_path):
    before, after = GradientProbe(), GradientProbe()
    clipping = GradientClipping(mode="auto", percentile=25, history_size=5)
    module = TinyRegressor(optimizer="adam", lr=0.05, scheduler=None, samples=128)
    _fit(tmp_path, module, [before, clipping, after])

    norms = [g.norm().item() for g in before.grads]
    rows = _logged(tmp_path)
    assert len(norms) == len(rows) == 8
    for step, (row, clipped_grads) in enumerate(zip(rows, after.grads, strict=True)):
        threshold = float(np.percentile(norms[max(0, step - 4) : step + 1], 25))
        assert row["grad_clip/threshold"] == pytest.approx(threshold, rel=1e-5)
        assert clipped_grads.norm().item() == pytest.approx(min(norms[step], threshold), rel=1e-4)
    assert list(clipping.history) == pytest.approx(norms[-5:], rel=1e-6)


# -------------------------------------------------------------------------------------- AMP
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_16_mixed_clips_unscaled_gradients(tmp_path, impl):
    """Lightning unscales before the hook for foreach optimizers; fused ones unscale inside their
    step, so the callback unscales them itself. Either way SGD moves by -lr * clipped gradient."""
    lr, max_norm = 0.1, 0.5
    module = TinyRegressor(
        optimizer="sgd", lr=lr, scheduler=None, samples=128, optimizer_options={"impl": impl}
    )
    after = GradientProbe()
    clipping = GradientClipping(max_norm=max_norm)
    trainer = _fit(tmp_path, module, [clipping, after], plugins=[fp16_mixed()])
    assert trainer.optimizers[0].defaults.get(impl) is True
    assert trainer.precision_plugin.scaler is not None

    data = regression_data(128, 16)
    reference = TinyRegressor()
    norms = iter(
        row["grad_clip/pre_clip_norm"]
        for row in _logged(tmp_path)
        if "grad_clip/pre_clip_norm" in row
    )
    stepped = 0
    for step, (grads, update) in enumerate(zip(after.grads, after.updates(), strict=True)):
        if update.abs().sum() == 0:  # the GradScaler skipped an overflowing step
            continue
        stepped += 1
        # The logged norm is that of the unscaled gradient: float32 gives the same within fp16 error.
        torch.nn.utils.vector_to_parameters(after.before[step], reference.parameters())
        reference.zero_grad()
        x, y = data[16 * step : 16 * step + 16]
        torch.nn.functional.mse_loss(reference(x), y).backward()
        fp32_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()
        assert next(norms) == pytest.approx(fp32_norm, rel=0.02)
        assert grads.norm().item() <= max_norm * (1 + 1e-3)
        torch.testing.assert_close(update, -lr * grads, rtol=1e-3, atol=1e-6)
    assert stepped >= 3


def test_16_mixed_nonfinite_steps_are_left_to_the_grad_scaler(tmp_path):
    probe = GradientProbe()
    clipping = GradientClipping()
    module = BrokenRegressor(nonfinite_steps=(2,), optimizer="adam", scheduler=None, samples=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, module, [clipping, probe], plugins=[fp16_mixed(2.0**8)])
    assert not [w for w in caught if "GradientClipping" in str(w.message)]
    assert clipping.nonfinite_steps == 1
    assert probe.updates()[2].abs().sum() == 0
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**7
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ------------------------------------------------------------------------- non-finite gradients
def test_nonfinite_step_is_skipped_counted_logged_and_warned_once(tmp_path):
    probe = GradientProbe()
    clipping = GradientClipping()
    module = BrokenRegressor(
        nonfinite_steps=(1, 3), optimizer="adam", scheduler="cosine", samples=96
    )
    with pytest.warns(UserWarning, match="non-finite gradients") as caught:
        trainer = _fit(tmp_path, module, [clipping, probe])
    assert len([w for w in caught if "GradientClipping" in str(w.message)]) == 1
    updates = probe.updates()
    assert [bool(u.abs().sum() == 0) for u in updates] == [False, True, False, True, False, False]
    assert trainer.global_step == 6
    # Lightning still stepped the LR scheduler on skipped steps: it stays aligned with global_step.
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    # Adam saw 4 steps: skipped ones touched neither parameters nor moments.
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {4}
    assert clipping.nonfinite_steps == 2 and clipping.finite_steps == 4
    rows = _logged(tmp_path)
    assert [row["grad_clip/nonfinite_steps"] for row in rows] == [0, 1, 1, 2, 2, 2]
    assert all(math.isfinite(row.get("grad_clip/pre_clip_norm", 0.0)) for row in rows)


def test_consecutive_nonfinite_steps_stop_training_with_a_checkpoint(tmp_path):
    probe = GradientProbe()
    clipping = GradientClipping(max_consecutive_nonfinite=3)
    module = BrokenRegressor(
        nonfinite_steps=tuple(range(2, 100)), optimizer="adam", scheduler=None, samples=256
    )
    with pytest.warns(UserWarning) as caught:
        trainer = _fit(tmp_path, module, [clipping, probe])
    messages = [str(w.message) for w in caught if "GradientClipping" in str(w.message)]
    assert len(messages) == 2 and "stopping training" in messages[1]
    assert f"Checkpoint of the last finite state: {clipping.stop_checkpoint_path}." in messages[1]
    assert trainer.global_step == 5  # steps 0, 1 finite; 2, 3, 4 not; stopped after the third
    checkpoint = torch.load(clipping.stop_checkpoint_path, weights_only=False)
    saved = torch.cat([t.flatten() for t in checkpoint["state_dict"].values()])
    # The checkpoint holds the last finite state: the parameters after step 1.
    torch.testing.assert_close(saved, probe.after[1], rtol=0, atol=0)
    torch.testing.assert_close(probe.after[-1], probe.after[1], rtol=0, atol=0)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("GradientClipping"))
    assert state["consecutive_nonfinite"] == 3 and state["nonfinite_steps"] == 3


class DivergedRegressor(TinyRegressor):
    """TinyRegressor whose output bias becomes inf at step 2, as a step with finite gradients
    but an enormous learning rate would leave it; every later gradient is NaN."""

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            with torch.no_grad():
                self.net[3].bias.fill_(float("inf"))
        return super().training_step(batch, batch_idx)


def test_the_stop_checkpoint_says_when_its_weights_are_not_finite(tmp_path):
    clipping = GradientClipping(max_consecutive_nonfinite=3)
    module = DivergedRegressor(optimizer="adam", scheduler=None, samples=256)
    with pytest.warns(UserWarning) as caught:
        _fit(tmp_path, module, [clipping])
    (stop,) = [str(w.message) for w in caught if "stopping training" in str(w.message)]
    assert "last finite state" not in stop
    assert (
        f"Checkpoint saved ({clipping.stop_checkpoint_path}), but its weights are already "
        "non-finite" in stop
    )
    checkpoint = torch.load(clipping.stop_checkpoint_path, weights_only=True)
    assert not torch.isfinite(checkpoint["state_dict"]["net.3.bias"]).all()


# ------------------------------------------------------------------------------------- resume
def test_resume_restores_history_and_counters_and_continues_identically(tmp_path):
    def run(directory, ckpt_path=None):
        clipping = GradientClipping(mode="auto", percentile=50)
        module = BrokenRegressor(nonfinite_steps=(2,), optimizer="adam", scheduler=None, samples=64)
        checkpoints = ModelCheckpoint(dirpath=directory / "ckpt", every_n_epochs=1, save_top_k=-1)
        trainer = tiny_trainer(
            directory, callbacks=[clipping, checkpoints], max_epochs=2, enable_checkpointing=True
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        return clipping, module

    with pytest.warns(UserWarning, match="non-finite"):
        full, full_module = run(tmp_path / "full")
    first_epoch = next((tmp_path / "full" / "ckpt").glob("epoch=0-*.ckpt"))
    resumed, resumed_module = run(tmp_path / "resumed", ckpt_path=first_epoch)

    assert resumed.state_dict() == full.state_dict()
    assert len(resumed.history) == 7 and resumed.nonfinite_steps == 1
    for a, b in zip(full_module.parameters(), resumed_module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_compute_the_same_norm_and_take_the_same_decisions(tmp_path, two_processes):
    """Two gloo processes in ``16-true``: a NaN on rank 0 only reaches both ranks through the
    gradient all-reduce; both skip that step, clip identically and raise eps identically."""
    ranks = two_processes("ddp_clipping.py", tmp_path, timeout=240)
    assert ranks[0] == ranks[1]
    observed = ranks[0]
    assert observed["nonfinite_steps"] == 1
    assert observed["skipped"] == [False, False, True, False, False, False]
    assert sum(observed["clipped"]) >= 2
    assert all(math.isfinite(n) for n in observed["norms"])
    assert observed["eps"] == [1e-4, 1e-4]
    # SpikeSkip in the same job: rank 0's loss spike at step 5 is skipped on both ranks (the
    # non-finite step 2 is left to GradientClipping, neither judged nor kept).
    assert observed["spike_events"] == [[5, 0, ["loss", "grad_norm"]]]
    assert observed["spike_judged"] == 5
