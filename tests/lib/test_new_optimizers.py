"""Lion, ADOPT and the schedule-free pair against their reference implementations, in each of
our three implementations, in float64 over 60 steps (relative error <= 1e-6; in practice
rounding only), with the schedule-free train/eval switches between steps."""

from __future__ import annotations

import copy
import csv
import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lion_pytorch import Lion as ReferenceLion
from pytorch_optimizer import ADOPT as ReferenceADOPT
from pytorch_optimizer import Lamb as ReferenceLamb
from schedulefree import AdamWScheduleFree, SGDScheduleFree
from torch import nn
from torch.utils.data import DataLoader

from optim_callbacks import (
    OPTIMIZERS,
    AdamToSGD,
    AmpEpsilon,
    GradientClipping,
    MomentStatistics,
    OptimizerSwitch,
    ScheduleFreeModes,
    build_optimizer,
    register_optimizer,
    spec_for,
)
from optim_callbacks.algorithms.muon import muon_parameter_names
from optim_callbacks.moment_math import PERCENTILE_RELATIVE_ERROR
from tests.lib.tiny import TinyRegressor, regression_data, tiny_trainer

pytestmark = pytest.mark.filterwarnings(r"error:.*compiling the update failed")

SHAPES = [(40, 30), (7,), (), (5, 3)]
IMPLS = ["for-loop", "foreach", "auto"]


def pytorch_optimizer_case(reference, **options):
    """A case against a pytorch-optimizer class, which takes the registry's options under the
    same names but for ``decoupled_weight_decay`` (its ``weight_decouple``)."""
    renamed = {
        "weight_decouple" if key == "decoupled_weight_decay" else key: value
        for key, value in options.items()
    }
    return (lambda ps: reference(ps, **renamed), options)


# name -> (reference factory, registry options that mean the same)
CASES = {
    "lion": (
        lambda ps: ReferenceLion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        {"lr": 1e-3, "weight_decay": 0.1},
    ),
    "adopt": (
        lambda ps: ReferenceADOPT(ps, lr=1e-2, betas=(0.9, 0.9999), weight_decay=0.01),
        {"lr": 1e-2, "weight_decay": 0.01},
    ),
    "adopt-decoupled": pytorch_optimizer_case(
        ReferenceADOPT, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled_weight_decay=True
    ),
    "lamb": pytorch_optimizer_case(ReferenceLamb, lr=1e-2, weight_decay=0.1),
    "lamb-l2": pytorch_optimizer_case(
        ReferenceLamb, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled_weight_decay=False
    ),
    "schedule_free_adamw": (
        lambda ps: AdamWScheduleFree(ps, lr=1e-2, weight_decay=0.01, warmup_steps=10),
        {"lr": 1e-2, "weight_decay": 0.01, "warmup_steps": 10},
    ),
    "schedule_free_sgd": (
        lambda ps: SGDScheduleFree(ps, lr=0.1, momentum=0.9, weight_decay=0.01, warmup_steps=5),
        {"lr": 0.1, "weight_decay": 0.01, "warmup_steps": 5},
    ),
}


def make_params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def clone(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def run(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], steps: int) -> list[float]:
    """Gradients of a fixed quadratic-plus-sine loss; schedule-free optimizers switch to eval
    every 10 steps (the loss there is recorded: it is the evaluated average's) and back."""
    evaluated = []
    schedule_free = hasattr(optimizer, "train") and hasattr(optimizer, "eval")
    if schedule_free:
        optimizer.train()
    for t in range(steps):
        for i, p in enumerate(params):
            # a fresh tensor each step: the references modify p.grad in place
            p.grad = (torch.sin(p.detach() * (i + 1) + t) + 0.5 * p.detach()).clone()
        optimizer.step()
        if schedule_free and t % 10 == 9:
            optimizer.eval()
            evaluated.append(sum(float((p.detach() ** 2).sum()) for p in params))
            optimizer.train()
    if schedule_free:
        optimizer.eval()
    return evaluated


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        ((x.detach() - y.detach()).abs().max() / y.detach().abs().max().clamp_min(1e-300)).item()
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_reference_implementation(case, impl):
    reference_factory, options = CASES[case]
    name = case.split("-")[0]
    init = make_params()
    ref_params, our_params = clone(init), clone(init)
    reference = reference_factory(ref_params)
    ours = build_optimizer(name, our_params, impl=impl, **options)
    assert bool(ours.defaults["fused"]) is (impl == "auto")
    ref_evaluated = run(reference, ref_params, 60)
    our_evaluated = run(ours, our_params, 60)
    assert relative_error(our_params, ref_params) <= 1e-6
    for ours_value, ref_value in zip(our_evaluated, ref_evaluated, strict=True):
        assert math.isclose(ours_value, ref_value, rel_tol=1e-9)
    assert getattr(ours, "compile_failure", None) is None
    assert spec_for(ours).name == name
    state_keys = {k for k in ours.state[our_params[0]] if k != "step"}
    assert state_keys == set(OPTIMIZERS.get(name).state_keys)


def test_schedule_free_evaluates_the_average_not_the_training_point():
    params = make_params()
    optimizer = build_optimizer("schedule_free_adamw", params, lr=1e-2)
    assert not optimizer.training  # starts in eval mode, like schedulefree
    with pytest.raises(RuntimeError, match=r"in eval mode; call optimizer\.train\(\)"):
        params[0].grad = torch.ones_like(params[0])
        optimizer.step()
    run(optimizer, params, 20)
    x = [p.detach().clone() for p in params]
    optimizer.train()
    y = [p.detach().clone() for p in params]
    assert relative_error(x, y) > 1e-3  # the two points differ
    optimizer.eval()
    assert relative_error(x, [p.detach() for p in params]) < 1e-12  # and switch back


def test_adafactor_is_torchs_own_with_its_eps_pair_checked():
    model = nn.Linear(4, 3)
    optimizer = build_optimizer("adafactor", model, impl="foreach")
    assert type(optimizer) is torch.optim.Adafactor
    assert isinstance(build_optimizer("adafactor", model), torch.optim.Adafactor)  # compiled
    assert optimizer.defaults["eps"] == (None, 1e-3)
    with pytest.raises(ValueError, match=r"^eps\[1\]: got -1.0; allowed: a finite number > 0"):
        build_optimizer("adafactor", model, eps=(None, -1.0))


# --- real Lightning fits ------------------------------------------------------------------------
class Validated(TinyRegressor):
    """TinyRegressor with a validation loop (the loss on a held-out draw)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def val_dataloader(self):
        return DataLoader(regression_data(64, self.hparams.features, seed=1), batch_size=32)


NEW_ENTRIES = {
    "lion": {"lr": 1e-3},
    "lamb": {"lr": 1e-2},
    "muon": {"lr": 0.02},
    "adopt": {"lr": 1e-2},
    "adafactor": {"lr": 1e-2},
    "schedule_free_adamw": {"lr": 1e-2},
    "schedule_free_sgd": {"lr": 0.1},
}


def _fit(root, name: str, max_steps: int, ckpt_path: str | None = None):
    torch.manual_seed(0)
    # 6 steps per epoch; checkpoints at the end of each (the data loader resumes at epochs).
    module = Validated(optimizer=name, scheduler="constant", samples=96, **NEW_ENTRIES[name])
    # Saved from on_train_batch_end, in train mode: ScheduleFreeModes writes the eval weights.
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=6, save_top_k=-1)
    trainer = tiny_trainer(
        root,
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=[
            GradientClipping(max_norm=0.5),
            AmpEpsilon(),
            MomentStatistics(every_n_steps=3),
            ScheduleFreeModes(),
            checkpoints,
        ],
        logger=CSVLogger(root, name="csv", version=0),
        log_every_n_steps=1,
        val_check_interval=3,
        enable_checkpointing=True,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("name", list(NEW_ENTRIES))
def test_each_new_entry_fits_with_every_callback_and_resumes_exactly(tmp_path, name):
    """Clipping, AMP epsilon, moment statistics (CSV), schedule-free switching and a resume
    from a mid-run checkpoint that ends bit-identical to the run that was not interrupted."""
    trainer, module = _fit(tmp_path / "full", name, 12)
    assert trainer.global_step == 12
    with open(tmp_path / "full" / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    moments = {k for row in rows for k, v in row.items() if k.startswith("moments") and v}
    assert any(k.endswith("_norm") for k in moments), moments
    assert any(k.startswith("grad_clip/") and v for row in rows for k, v in row.items())
    _, resumed = _fit(
        tmp_path / "resumed",
        name,
        12,
        ckpt_path=str(tmp_path / "full" / "ckpt" / "epoch=0-step=6.ckpt"),
    )
    for a, b in zip(module.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    optimizer = trainer.optimizers[0]
    assert getattr(optimizer, "compile_failure", None) is None


def test_schedule_free_validates_with_the_average_weights(tmp_path):
    """ScheduleFreeModes evaluates x: the logged validation loss is x's, and it differs from
    the loss at the training point y (computed here by switching by hand)."""
    trainer, module = _fit(tmp_path, "schedule_free_adamw", 12)
    optimizer = trainer.optimizers[0]
    assert not optimizer.training  # eval mode after fit: the model holds x
    data = regression_data(64, 16, seed=1)
    x, y = data.tensors
    with torch.no_grad():
        loss_x = nn.functional.mse_loss(module(x), y).item()
        optimizer.train()
        loss_y = nn.functional.mse_loss(module(x), y).item()
        optimizer.eval()
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(loss_x, rel=1e-5)
    assert abs(loss_x - loss_y) > 1e-4 * loss_x
    # the checkpoint written during training holds x too
    saved = torch.load(tmp_path / "ckpt" / "epoch=1-step=12.ckpt", weights_only=True)
    assert all(g["train_mode"] is False for g in saved["optimizer_states"][0]["param_groups"])
    for key, value in module.state_dict().items():  # x, as the model holds after fit (up to
        # the rounding of the eval -> train -> eval round trip the run made after saving)
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=1e-5, atol=1e-7)


def test_muon_steps_matrices_with_torchs_muon_and_the_rest_with_adamw():
    """The registry's muon on a small transformer-like model: the standard split, and every
    parameter bit-identical to torch.optim.Muon (hidden matrices) plus torch.optim.AdamW (the
    rest) stepping side by side with the same options."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(11, 8),
            "layers": nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)),
            "classifier": nn.Linear(8, 3),
        }
    )
    twin = copy.deepcopy(model)
    ours = build_optimizer("muon", model, lr=0.02, weight_decay=0.0)
    split = {name for name in muon_parameter_names(model)}
    assert split == {"layers.0.weight", "layers.2.weight"}
    hidden = [p for n, p in twin.named_parameters() if n in split]
    rest = [p for n, p in twin.named_parameters() if n not in split]
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.0)
    adamw = torch.optim.AdamW(rest, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    tokens = torch.randint(0, 11, (16, 5))
    for _ in range(20):
        for net, optimizers in ((model, [ours]), (twin, [muon, adamw])):
            for optimizer in optimizers:
                optimizer.zero_grad()
            h = net["layers"](net["embed"](tokens)).mean(1)
            net["classifier"](h).logsumexp(-1).mean().backward()
            for optimizer in optimizers:
                optimizer.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert spec_for(ours).name == "muon"
    # one state dict for both parts, and it loads into a fresh instance
    fresh = build_optimizer("muon", copy.deepcopy(model), lr=0.02, weight_decay=0.0)
    fresh.load_state_dict(ours.state_dict())
    assert {k for state in fresh.state.values() for k in state} == {
        "momentum_buffer",
        "step",
        "exp_avg",
        "exp_avg_sq",
    }


def test_a_third_party_optimizer_registered_directly_works_with_every_callback(tmp_path):
    """torch.optim.Adafactor registered by a user with register_optimizer (its state and its
    eps pair look nothing like Adam's): clipping, AMP epsilon, moment statistics, schedule-free
    switching (a no-op) and a scheduled switch to SGD all run; AdamToSGD refuses it by name."""

    class UserAdafactor(torch.optim.Adafactor):
        """torch's Adafactor as a user's own registered class."""

    register_optimizer(
        "user_adafactor",
        state_keys=("row_var", "col_var", "variance"),
        second_moment="variance",
    )(UserAdafactor)
    try:
        switch = OptimizerSwitch(at_step=4, lr=0.05)
        stats = MomentStatistics(every_n_steps=2)
        trainer = tiny_trainer(
            tmp_path,
            max_steps=6,
            callbacks=[
                GradientClipping(max_norm=0.5),
                AmpEpsilon(),
                stats,
                ScheduleFreeModes(),
                switch,
            ],
            logger=CSVLogger(tmp_path, name="csv", version=0),
            log_every_n_steps=1,
        )
        module = TinyRegressor(optimizer="user_adafactor", lr=1e-2, scheduler="constant")
        trainer.fit(module)
        assert switch.switched and trainer.global_step == 6
        with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        logged = {k for row in rows for k, v in row.items() if v}
        assert any(k.startswith("moments") and k.endswith("row_var_norm") for k in logged)
        assert any(k.startswith("grad_clip/") for k in logged)
        with pytest.raises(
            ValueError, match=r"optimizer: got 'user_adafactor'; allowed for AdamToSGD"
        ):
            tiny_trainer(tmp_path / "swats", max_steps=2, callbacks=[AdamToSGD()]).fit(
                TinyRegressor(optimizer="user_adafactor", lr=1e-2, scheduler="constant")
            )
    finally:
        OPTIMIZERS.unregister("user_adafactor")


def test_adafactor_percentiles_come_from_its_factors(tmp_path):
    """Adafactor keeps a matrix's second moment as row and column factors. The logged
    percentiles of sqrt(v) equal those of v = row col / mean(row) expanded here (the callback
    never expands it: it samples elements from the factors); layers this small are exact."""
    module = TinyRegressor(optimizer="adafactor", lr=1e-2, scheduler="constant", samples=64)
    stats = MomentStatistics(every_n_steps=4, percentiles=(5.0, 50.0, 95.0))
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = tiny_trainer(
        tmp_path, max_steps=4, callbacks=[stats], logger=logger, log_every_n_steps=1
    )
    trainer.fit(module)
    optimizer = trainer.optimizers[0]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("moments.sqrt_second_moment_p50/net.0")]
    assert len(rows) == 1
    weight, bias = module.net[0].weight, module.net[0].bias
    state_w, state_b = optimizer.state[weight], optimizer.state[bias]
    assert "row_var" in state_w and "variance" in state_b  # factored matrix, stored vector
    row, col = state_w["row_var"].double(), state_w["col_var"].double()
    v = torch.cat(
        [(row @ col / row.mean(dim=-2, keepdim=True)).flatten(), state_b["variance"].double()]
    )
    expected = torch.quantile(v.sqrt(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    for label, value in zip(("p05", "p50", "p95"), expected.tolist(), strict=True):
        assert float(rows[0][f"moments.sqrt_second_moment_{label}/net.0"]) == pytest.approx(
            value, rel=PERCENTILE_RELATIVE_ERROR
        )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lamb", 1e-4),
        ("schedule_free_adamw", 1e-4),
        ("adopt", 1e-6),  # its default is already safe: max(sqrt(v), eps), then clipped
        ("muon", 1e-4),  # the AdamW part; the Muon part keeps its Newton-Schulz eps
        ("adafactor", (None, 1e-3)),  # a pair: left alone
        ("lion", None),  # no eps at all
    ],
)
def test_amp_epsilon_under_true_float16_knows_each_new_entry(tmp_path, name, expected):
    module = TinyRegressor(optimizer=name, lr=NEW_ENTRIES.get(name, {}).get("lr", 1e-3))
    module.hparams.scheduler = "constant"
    trainer = tiny_trainer(
        tmp_path, max_steps=3, precision="16-true", callbacks=[AmpEpsilon(), ScheduleFreeModes()]
    )
    trainer.fit(module)
    groups = trainer.optimizers[0].param_groups
    if name == "muon":
        assert {g["eps"] for g in groups if not g["use_muon"]} == {expected}
        assert {g["eps"] for g in groups if g["use_muon"]} == {1e-7}
    elif expected is None:
        assert all("eps" not in g for g in groups)
    else:
        assert {g["eps"] for g in groups} == {expected}
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _adafactor_run(optimizer, params, steps, start=0):
    for t in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = torch.sin(p.detach() * (i + 1) + t) + 0.3 * p.detach()
        optimizer.step()


ADAFACTOR_SHAPES = [(40, 30), (2, 5, 6), (7,), (1, 9), ()]  # () : a 0-d parameter


def test_compiled_adafactor_is_torchs_adafactor():
    """The registry's default (compiled) Adafactor against torch.optim.Adafactor's for-loop in
    float64 over 60 steps, matrices, a 3-D tensor and a vector, weight decay and maximize; its
    state dict continues in torch's class."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ADAFACTOR_SHAPES]
    ours_params = [nn.Parameter(x.clone()) for x in init]
    ref_params = [nn.Parameter(x.clone()) for x in init]
    options = {"weight_decay": 0.1, "maximize": True, "lr": 3e-2}
    ours = build_optimizer("adafactor", ours_params, **options)
    reference = torch.optim.Adafactor(ref_params, foreach=False, **options)
    assert ours.defaults["fused"] is True and spec_for(ours).name == "adafactor"
    _adafactor_run(ours, ours_params, 30)
    _adafactor_run(reference, ref_params, 30)
    assert relative_error(ours_params, ref_params) <= 1e-6
    continued = torch.optim.Adafactor(ours_params, foreach=False, **options)
    continued.load_state_dict(ours.state_dict())
    _adafactor_run(continued, ours_params, 30, start=30)
    _adafactor_run(reference, ref_params, 30, start=30)
    assert relative_error(ours_params, ref_params) <= 1e-6
    assert ours.compile_failure is None


def test_compiled_adafactor_falls_back_to_torchs_when_compiling_fails():
    from optim_callbacks import _compat

    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ADAFACTOR_SHAPES]
    ours_params = [nn.Parameter(x.clone()) for x in init]
    ref_params = [nn.Parameter(x.clone()) for x in init]
    ours = build_optimizer("adafactor", ours_params)
    reference = torch.optim.Adafactor(ref_params, foreach=False)
    torch.compiler.reset()
    broken = _compat.inductor_cpp_compiler("/nonexistent/c++")
    with warnings.catch_warnings(record=True) as caught, broken:
        warnings.simplefilter("always")
        _adafactor_run(ours, ours_params, 1)
    assert any("compiling the update failed" in str(w.message) for w in caught)
    assert "C++ compiler" in ours.compile_failure
    _adafactor_run(ours, ours_params, 9, start=1)  # torch's own step from here on
    _adafactor_run(reference, ref_params, 10)
    assert relative_error(ours_params, ref_params) <= 1e-6


def test_muon_on_plain_parameters_sends_matrices_to_muon():
    matrix, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    optimizer = build_optimizer("muon", [matrix, bias])
    flags = {id(p): g["use_muon"] for g in optimizer.param_groups for p in g["params"]}
    assert flags == {id(matrix): True, id(bias): False}


def test_a_schedule_with_a_schedule_free_optimizer_is_refused_but_warmup_is_not():
    from optim_callbacks import build_scheduler

    optimizer = build_optimizer("schedule_free_sgd", [nn.Parameter(torch.zeros(3))])
    with pytest.raises(
        ValueError, match=r"^schedule: got 'cosine' with the schedule-free .*'constant'"
    ):
        build_scheduler("cosine", optimizer, total_steps=10)
    scheduler = build_scheduler("constant", optimizer, total_steps=10, warmup=4)
    assert scheduler.get_last_lr()[0] < 1.0  # the warmup still ramps the LR up
