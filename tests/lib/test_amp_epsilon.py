"""AmpEpsilon in real Lightning runs on CPU: the 16-true failure it prevents, precisions where it
must do nothing, policies, optimizer changes, resume and the underflow report read back from W&B."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from optim_callbacks import OPTIMIZERS, AmpEpsilon, build_optimizer
from optim_callbacks.callbacks.optimizer_swap import notify_optimizers_changed
from tests.lib.refusals import assert_refused
from tests.lib.tiny import TinyRegressor, fp16_mixed, tiny_trainer

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class ScaledLossRegressor(TinyRegressor):
    """Trains on ``loss_scale * loss``: gradients of order 1e-3 and below, as in fine-tuning."""

    def __init__(self, loss_scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.loss_scale = loss_scale

    def training_step(self, batch, batch_idx):
        return self.loss_scale * super().training_step(batch, batch_idx)


def _regressor(
    impl: str = "auto",
    lr: float = 1e-2,
    eps: float = 1e-8,
    samples: int = 128,
    loss_scale: float = 1.0,
):
    torch.manual_seed(0)
    options = {"impl": impl, "eps": eps}
    return ScaledLossRegressor(
        loss_scale,
        optimizer="adamw",
        lr=lr,
        scheduler=None,
        samples=samples,
        optimizer_options=options,
    )


def _eps(trainer) -> list[float]:
    return [group["eps"] for group in trainer.optimizers[0].param_groups]


def _finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters()) and all(
        math.isfinite(loss) for loss in module.losses
    )


# ------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"eps": 0.0}, ["eps", "0.0", "[5.96"]),
        ({"eps": 1e-9}, ["eps", "1e-09", "[5.96"]),
        ({"policy": "forse"}, ["policy", "'forse'", "auto, force, never", "did you mean 'force'"]),
        ({"eps_by_optimizer": {"adamx": 1e-4}}, ["optimizer", "'adamx'", "did you mean 'adam"]),
        ({"eps_by_optimizer": {"adamw": -1.0}}, ["eps_by_optimizer['adamw']", "-1.0"]),
        ({"log_underflow_every_n_steps": -1}, ["log_underflow_every_n_steps", "integer >= 0"]),
    ],
)
def test_bad_arguments_raise_one_value_error_naming_the_argument(kwargs, needles):
    assert_refused(AmpEpsilon, kwargs, *needles)


# ------------------------------------------------------------------- the failure it prevents
def test_16_true_adamw_with_eps_1e8_blows_up_without_the_callback_and_learns_with_it(tmp_path):
    """Foreach (and for-loop) AdamW on float16 state: eps=1e-8 rounds to 0 and v underflows, so
    m / (sqrt(v) + eps) is x / 0 and the parameters are non-finite after the first step."""
    without = _regressor(impl="foreach")
    tiny_trainer(tmp_path / "without", precision="16-true", max_epochs=2).fit(without)
    assert not _finite(without)
    assert math.isfinite(without.losses[0]) and math.isnan(without.losses[2])

    callback = AmpEpsilon()
    module = _regressor(impl="foreach")
    trainer = tiny_trainer(
        tmp_path / "with", precision="16-true", max_epochs=2, callbacks=[callback]
    )
    trainer.fit(module)
    assert _finite(module)
    assert _eps(trainer) == [1e-4, 1e-4]
    assert trainer.optimizers[0].defaults["foreach"] is True
    first_epoch, second_epoch = module.losses[:8], module.losses[8:]
    assert sum(second_epoch) / 8 < 0.75 * sum(first_epoch) / 8
    assert callback.adjustments == [
        {"optimizer": 0, "name": "adamw", "group": g, "old": 1e-8, "new": 1e-4} for g in (0, 1)
    ]


@pytest.mark.parametrize(
    ("name", "lr", "safe_eps", "blows_up_without"),
    [
        ("adabelief", 1e-2, 1e-7, True),
        ("rmsprop", 1e-2, 1e-4, True),
        ("adagrad", 1e-2, 1e-4, True),
        ("adadelta", 1.0, 1e-6, False),  # eps inside both square roots: its default is safe
    ],
)
def test_per_optimizer_safe_eps_keeps_16_true_finite_and_learning(
    tmp_path, name, lr, safe_eps, blows_up_without
):
    def run(callbacks):
        torch.manual_seed(0)
        module = TinyRegressor(
            optimizer=name,
            lr=lr,
            scheduler=None,
            samples=128,
            optimizer_options={"impl": "foreach"},
        )
        trainer = tiny_trainer(tmp_path, precision="16-true", max_epochs=2, callbacks=callbacks)
        trainer.fit(module)
        return module, trainer

    without, _ = run([])
    assert _finite(without) is not blows_up_without
    module, trainer = run([AmpEpsilon()])
    expected = max(safe_eps, OPTIMIZERS.get(name).defaults["eps"])
    assert set(_eps(trainer)) == {expected}
    assert _finite(module)
    assert sum(module.losses[8:]) < 0.9 * sum(module.losses[:8])


def test_16_true_fused_adamw_stays_finite_but_its_second_moment_underflows(tmp_path, wandb_run):
    """The registry's default path on CPU is torch's fused AdamW, which computes each step in
    float32 from float16 state: no inf/NaN with eps=1e-8, but with small gradients the stored
    second moment is mostly zeros (read back from the W&B offline run), so Adam's steps are
    wrong. policy='never' keeps eps and warns."""
    callback = AmpEpsilon(policy="never", log_underflow_every_n_steps=1)
    module = _regressor(loss_scale=1e-3)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = tiny_trainer(
        tmp_path, precision="16-true", callbacks=[callback], logger=logger, log_every_n_steps=1
    )
    with pytest.warns(UserWarning, match=r"float16 and eps=1e-08 is below the safe 0.0001"):
        trainer.fit(module)
    logger.experiment.finish()
    assert trainer.optimizers[0].defaults["fused"] is True
    assert _finite(module)
    assert _eps(trainer) == [1e-8, 1e-8] and callback.adjustments == []

    fractions = [
        row["amp_epsilon/second_moment_zero_fraction"]
        for row in wandb_run.history(tmp_path)
        if "amp_epsilon/second_moment_zero_fraction" in row
    ]
    assert len(fractions) == 8
    assert all(fraction > 0.5 for fraction in fractions), fractions


def test_fused_float16_adamw_takes_inflated_steps_where_the_second_moment_underflows():
    """The module docstring's figure: a constant gradient of 1e-4 for 200 steps moves a float16
    parameter about 9x as far as float32 AdamW does, because the stored v stays 0."""

    def distance(dtype: torch.dtype) -> float:
        parameter = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        optimizer = torch.optim.AdamW([parameter], lr=1e-3, eps=1e-8, weight_decay=0.0, fused=True)
        for _ in range(200):
            parameter.grad = torch.full((1,), 1e-4, dtype=dtype)
            optimizer.step()
        assert (optimizer.state[parameter]["exp_avg_sq"] == 0).item() == (dtype == torch.float16)
        return abs(parameter.item())

    ratio = distance(torch.float16) / distance(torch.float32)
    assert 8.0 < ratio < 10.0


# ------------------------------------------------------------- precisions where it stays out
@pytest.mark.parametrize(
    ("precision", "state_dtype"),
    [
        ("32-true", "float32"),
        ("16-mixed", "float32"),
        ("bf16-mixed", "float32"),
        ("bf16-true", "bfloat16"),
    ],
)
def test_eps_is_left_alone_where_the_state_is_not_float16(tmp_path, caplog, precision, state_dtype):
    callback = AmpEpsilon(log_underflow_every_n_steps=1)
    module = _regressor(samples=32)
    options = (
        {"plugins": [fp16_mixed(2.0**8)]} if precision == "16-mixed" else {"precision": precision}
    )
    trainer = tiny_trainer(tmp_path, callbacks=[callback], **options)
    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        trainer.fit(module)
    assert trainer.precision == precision
    assert _eps(trainer) == [1e-8, 1e-8] and callback.adjustments == []
    state = next(iter(trainer.optimizers[0].state.values()))
    assert str(state["exp_avg_sq"].dtype) == f"torch.{state_dtype}"
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("AmpEpsilon")]
    assert len(messages) == 1
    assert f"state is {state_dtype}" in messages[0] and "eps left at 1e-08" in messages[0]
    assert trainer.callback_metrics["amp_epsilon/second_moment_zero_fraction"] < 0.01


def test_policy_force_raises_eps_even_in_float32(tmp_path):
    callback = AmpEpsilon(eps=3e-4, policy="force")
    trainer = tiny_trainer(tmp_path, callbacks=[callback], max_steps=1)
    trainer.fit(_regressor(samples=32))
    assert _eps(trainer) == [3e-4, 3e-4]


# ------------------------------------------------------------------- optimizer changes, resume
class ReplaceOptimizer(Callback):
    """Swaps in a fresh AdamW (eps=1e-8) before step 3 through the documented setter, then tells
    every callback, as the project's optimizer-switching callbacks do."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != 3:
            return
        trainer.optimizers = [
            build_optimizer("adamw", pl_module, lr=1e-2, eps=1e-8, impl="foreach")
        ]
        notify_optimizers_changed(trainer, pl_module)


def test_reapplies_after_the_optimizer_is_replaced_and_is_idempotent(tmp_path, caplog):
    callback = AmpEpsilon()
    module = _regressor(impl="foreach")
    trainer = tiny_trainer(
        tmp_path, precision="16-true", callbacks=[ReplaceOptimizer(), callback], max_epochs=2
    )
    with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
        trainer.fit(module)
    assert _finite(module)
    optimizer = trainer.optimizers[0]
    assert int(next(iter(optimizer.state.values()))["step"]) == 16 - 3  # the replacement ran
    assert _eps(trainer) == [1e-4, 1e-4]
    callback.apply(trainer)
    callback.on_optimizers_changed(trainer, module)
    assert _eps(trainer) == [1e-4, 1e-4]
    assert len(callback.adjustments) == 2
    raised = [r.getMessage() for r in caplog.records if "eps 1e-08 -> 0.0001" in r.getMessage()]
    assert len(raised) == 2  # once per group, not again for the identical replacement


def test_resume_keeps_the_raised_eps_and_continues_identically(tmp_path):
    def run(directory, ckpt_path=None):
        callback = AmpEpsilon()
        module = _regressor(impl="foreach", samples=64)
        checkpoints = ModelCheckpoint(dirpath=directory / "ckpt", every_n_epochs=1, save_top_k=-1)
        trainer = tiny_trainer(
            directory,
            precision="16-true",
            callbacks=[callback, checkpoints],
            max_epochs=2,
            enable_checkpointing=True,
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        return callback, module, trainer

    full, full_module, _ = run(tmp_path / "full")
    first_epoch = next((tmp_path / "full" / "ckpt").glob("epoch=0-*.ckpt"))
    checkpoint = torch.load(first_epoch, weights_only=False)
    assert [g["eps"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == [1e-4, 1e-4]

    resumed, resumed_module, trainer = run(tmp_path / "resumed", ckpt_path=first_epoch)
    assert resumed.adjustments == full.adjustments
    assert _eps(trainer) == [1e-4, 1e-4]
    for a, b in zip(full_module.parameters(), resumed_module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_checkpoint_saved_without_the_callback_gets_eps_raised_after_it_is_restored(tmp_path):
    """Lightning restores the optimizer state (with its eps) after on_fit_start; the callback
    applies itself again on_train_start, after the restore."""
    first = tiny_trainer(tmp_path / "first", precision="16-true", max_epochs=1)
    first.fit(_regressor(samples=32))  # fused: finite even with eps=1e-8
    path = tmp_path / "no_callback.ckpt"
    first.save_checkpoint(path)
    assert [
        g["eps"]
        for g in torch.load(path, weights_only=False)["optimizer_states"][0]["param_groups"]
    ] == [1e-8, 1e-8]

    callback = AmpEpsilon()
    resumed = tiny_trainer(
        tmp_path / "resumed", precision="16-true", max_epochs=2, callbacks=[callback]
    )
    resumed.fit(_regressor(samples=32), ckpt_path=path)
    assert _eps(resumed) == [1e-4, 1e-4]
    assert [record["old"] for record in callback.adjustments] == [1e-8, 1e-8]
