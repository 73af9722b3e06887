"""The conformance matrix: every registry entry (and a user-registered one) x every way to run
and every callback, each cell against an oracle (see :mod:`tests.conformance.cells`).

Runs are shared between cells: each Lightning fit is made once per entry and module
(:class:`Fits`), and the distributed cells read one two-process job that trains every entry
under DDP and under FSDP2 (``tests/scripts/conformance_dist.py``). A refused cell must be
refused by the library with a message naming the entry; the support table in
docs/conformance.md must be the generated one.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from optim_callbacks import SCHEDULE_FREE, build_optimizer, build_scheduler
from optim_callbacks.callbacks import (
    AmpEpsilon,
    GradientClipping,
    MomentStatistics,
    OptimizerSwitch,
    ScheduleFreeModes,
)
from tests.conformance import references as ref
from tests.conformance.cells import CELLS, refusal, support_table
from tests.lib.tiny import RecordingLogger, tiny_trainer

ENTRIES = ref.entry_names()
REPO = Path(__file__).resolve().parents[2]
NAN_STEP = 3  # the batch whose loss GradientClipping sees as non-finite
SWITCH_STEP = 5
CHECKPOINT_STEP = 4  # mid-epoch
TOLERANCE = dict(rtol=1e-5, atol=2e-6)


def close(actual: torch.Tensor, expected: torch.Tensor, **tolerance: float) -> None:
    tolerance = {**TOLERANCE, **tolerance}
    assert torch.isfinite(actual).all(), "non-finite weights"
    difference = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, **tolerance), (
        f"max |difference| {difference:.3g} (moved {(expected - ref.weights(ref.model())).abs().max():.3g})"
    )


# ------------------------------------------------------------------------------- the oracles
def reference_run(
    name: str,
    *,
    drop: int | None = None,
    max_norm: float | None = None,
    scheduler: bool = True,
    steps: int = ref.STEPS,
    switch: list[dict[str, Any]] | None = None,
    evals_every: int | None = None,
) -> torch.Tensor:
    """``name``'s reference implementation in the plain loop over the matrix's batches (without
    batch ``drop``); with ``switch`` (groups: parameter indices and SGD options), torch's SGD
    from ``SWITCH_STEP`` on."""
    module = ref.model(name)
    reference = ref.reference_for(name, build_optimizer(name, module, **ref.OPTIONS.get(name, {})))
    schedule = (
        build_scheduler(ref.schedule_for(name), reference, total_steps=ref.STEPS)
        if scheduler
        else None
    )
    data = [b for i, b in enumerate(ref.batches()[:steps]) if i != drop]
    if switch is not None:
        ref.train(module, reference, data[:SWITCH_STEP], max_norm=max_norm)
        params = list(module.parameters())
        sgd = torch.optim.SGD(
            [{**g, "params": [params[i] for i in g["params"]]} for g in switch], foreach=False
        )
        data = data[SWITCH_STEP:]
        reference = sgd
    if evals_every:
        for start in range(0, len(data), evals_every):
            ref.train(module, reference, data[start : start + evals_every], scheduler=schedule)
    else:
        ref.train(module, reference, data, scheduler=schedule, max_norm=max_norm)
    return ref.weights(module)


def own_run(name: str, impl: str, **train_options: Any) -> torch.Tensor:
    """Our optimizer (``impl``) in the same plain loop and schedule."""
    module = ref.model(name)
    optimizer = build_optimizer(name, module, impl=impl, **ref.OPTIONS.get(name, {}))
    schedule = build_scheduler(ref.schedule_for(name), optimizer, total_steps=ref.STEPS)
    ref.train(module, optimizer, ref.batches(), scheduler=schedule, **train_options)
    return ref.weights(module)


# ------------------------------------------------------------------------------- the fits
class NanAt(Callback):
    """Makes one gradient element NaN at one global step (a bad batch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            pl_module.net[0].weight.grad[0, 0] = float("nan")


class AppliedLR(Callback):
    """The first group's LR at each optimizer step, as the step reads it."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))


class WithValidation(ref.TinyRegressor):
    """The matrix's model with a validation loop (ScheduleFreeModes switches around it)."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", ref.loss_of(self, batch))

    def val_dataloader(self):
        return self.train_dataloader()


class ResumableOrder(ref.TinyRegressor):
    """The matrix's model whose data loader continues where a checkpoint's epoch stopped
    (a plain DataLoader restarts the epoch; the recipes' data modules do the same thing)."""

    batches_done = 0

    def on_load_checkpoint(self, checkpoint):
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        self.batches_done = progress["current"]["processed"]  # saved before "completed" counts it

    def train_dataloader(self):
        data = ref.regression_data(self.hparams.samples, self.hparams.features)
        start = self.batches_done * self.hparams.batch_size
        # Lightning counts the restored batches against the loader's length: keep the length,
        # put the batches not yet seen first.
        order = [*range(start, len(data)), *range(start)]
        rest = torch.utils.data.Subset(data, order)
        return torch.utils.data.DataLoader(rest, batch_size=self.hparams.batch_size)


class Fits:
    """Lightning fits of the matrix, each made once and shared by the cells that read it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[tuple[str, str], Any] = {}

    def get(self, name: str, variant: str) -> Any:
        key = (name, variant)
        if key not in self.done:
            self.done[key] = getattr(self, "_" + variant.replace("-", "_"))(name)
        return self.done[key]

    def _fit(self, name, tag, *, module=None, callbacks=(), ckpt_path=None, **trainer_options):
        module = module or ref.model(name)
        callbacks = list(callbacks)
        if name in SCHEDULE_FREE and not any(isinstance(c, ScheduleFreeModes) for c in callbacks):
            callbacks.append(ScheduleFreeModes())
        options = dict(max_steps=ref.STEPS, callbacks=callbacks)
        options.update(trainer_options)
        trainer = tiny_trainer(self.folder / name / tag, **options)
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, trainer

    def _32_true(self, name):
        return self._fit(name, "32-true")

    def _bf16_mixed(self, name):
        return self._fit(name, "bf16-mixed", precision="bf16-mixed")

    def _clipping(self, name):
        module = ref.model(name, scheduler=None)
        clipping = GradientClipping(max_norm=1.0)
        return self._fit(name, "clipping", module=module, callbacks=[clipping, NanAt(NAN_STEP)])

    def _amp_32(self, name):
        return self._fit(name, "amp-32", callbacks=[AmpEpsilon()])

    def _amp_16(self, name):
        return self._fit(name, "amp-16", callbacks=[AmpEpsilon()], precision="16-true")

    def _moments(self, name):
        logger = RecordingLogger()
        statistics = MomentStatistics(every_n_steps=ref.STEPS, heatmaps=False, histograms=False)
        applied = AppliedLR()
        module, trainer = self._fit(
            name, "moments", callbacks=[statistics, applied], logger=logger, log_every_n_steps=1
        )
        return module, trainer, logger, applied.lrs[-1]

    @staticmethod
    def _resumable(name):
        return ref.model(name, cls=ResumableOrder)

    def _all_callbacks(self, name):
        return [
            GradientClipping(max_norm=1.0),
            AmpEpsilon(),
            MomentStatistics(every_n_steps=2, heatmaps=False, histograms=False),
            NanAt(NAN_STEP),
        ]

    def _uninterrupted(self, name):
        checkpoints = ModelCheckpoint(
            dirpath=self.folder / name / "ckpt",
            every_n_train_steps=CHECKPOINT_STEP,
            save_top_k=-1,
        )
        return self._fit(
            name,
            "uninterrupted",
            module=self._resumable(name),
            callbacks=[*self._all_callbacks(name), checkpoints],
            enable_checkpointing=True,
            logger=RecordingLogger(),
        )

    def _resumed(self, name):
        self.get(name, "uninterrupted")
        (path,) = (self.folder / name / "ckpt").glob(f"*step={CHECKPOINT_STEP}.ckpt")
        return self._fit(
            name,
            "resumed",
            module=self._resumable(name),
            callbacks=self._all_callbacks(name),
            ckpt_path=str(path),
            logger=RecordingLogger(),
        )

    def _switch(self, name):
        module = ref.model(name, scheduler=None)
        switch = OptimizerSwitch(to="momentum", at_step=SWITCH_STEP, lr=0.01)
        return self._fit(name, "switch", module=module, callbacks=[switch])

    def _validated(self, name):
        module = ref.model(name, cls=WithValidation)
        return self._fit(name, "validated", module=module, val_check_interval=5)


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> Fits:
    return Fits(tmp_path_factory.mktemp("matrix"))


def supported_or_refused(name: str, cell: str) -> bool:
    """``True`` where ``cell`` is supported for ``name``. Where the library refuses it, check
    that the refusal names the entry and what is allowed, and return ``False``: the cell then
    has nothing more to compare (a refusal is a checked outcome, not a skip)."""
    why = refusal(name, cell)
    if why is None:
        return True
    assert name in why and "allowed" in why, why
    return False


# ------------------------------------------------------------------------------- the cells
@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("name", ENTRIES)
def test_plain_loop_matches_the_reference(name, impl):
    if not supported_or_refused(name, f"plain-{impl}"):
        return
    close(own_run(name, impl), reference_run(name))


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("name", ENTRIES)
def test_step_bumps_parameter_versions_like_torch(name, impl):
    """A backward through a graph that saved a weight, run after the step changed that
    weight, raises torch's in-place error, whatever the tensor's size (the first layer's
    weight is large, the output layer's small). torch's own fused kernels are the exception
    torch makes: they do not bump versions (torch 2.13), so that cell is reported, not run."""
    if not supported_or_refused(name, f"plain-{impl}"):
        return
    torch.manual_seed(0)
    # 40,000 weights: above PACK_BELOW, so the compiled path writes it in place of its own
    module = torch.nn.Sequential(
        torch.nn.Linear(200, 200), torch.nn.Tanh(), torch.nn.Linear(200, 1)
    )
    optimizer = build_optimizer(name, module, impl=impl, **ref.OPTIONS.get(name, {}))
    torch_fused = impl == "fused" and type(optimizer).__module__.startswith("torch.")
    if hasattr(optimizer, "train"):
        optimizer.train()

    def loss(x):
        return (module(x) ** 2).mean()

    loss(torch.randn(4, 200)).backward()
    optimizer.step()  # ADOPT's first step only initializes its second moment
    loss(torch.randn(4, 200)).backward()
    # saves the large weight alone (the small ones, packed, would raise by themselves)
    stale = module[0](torch.randn(4, 200, requires_grad=True)).sum()
    optimizer.step()
    if torch_fused:  # torch's own class, as torch ships it: the stale backward goes through
        stale.backward()
        return
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("name", ENTRIES)
def test_group_added_later_trains_like_the_reference(name, impl):
    """``add_param_group`` mid-run (an unfreezing callback's way): the new group trains from
    that step exactly as the reference's."""
    if not supported_or_refused(name, f"plain-{impl}"):
        return
    late = 3
    results = []
    for use_reference in (False, True):
        module = ref.model(name)
        first = [p for n, p in module.named_parameters() if not n.startswith("net.3")]
        head = [p for n, p in module.named_parameters() if n.startswith("net.3")]
        ours = build_optimizer(name, first, impl=impl, **ref.OPTIONS.get(name, {}))
        optimizer = ref.reference_for(name, ours) if use_reference else ours
        data = ref.batches()
        ref.train(module, optimizer, data[:late])
        before = len(ours.param_groups)
        ours.add_param_group({"params": head})
        if use_reference:
            ref.add_groups_like(name, optimizer, ours.param_groups[before:])
        ref.train(module, optimizer, data[late:])
        results.append(ref.weights(module))
    close(*results)


@pytest.mark.parametrize("name", ENTRIES)
def test_weight_decay_options_reach_their_groups(name):
    """``weight_decay`` (and Muon's ``adamw_weight_decay`` for its AdamW part) lands on every
    group that decays; no-decay groups (biases, norms) stay at 0."""
    layers = {"body": torch.nn.Linear(16, 8), "norm": torch.nn.LayerNorm(8)}
    # a head: Muon's split trains it with AdamW, so AdamW has a group that decays
    model = torch.nn.Sequential(OrderedDict(**layers, head=torch.nn.Linear(8, 2)))
    options = dict(ref.OPTIONS.get(name, {}), weight_decay=0.05)
    if name == "muon":
        options["adamw_weight_decay"] = 0.0  # 0.0 is a value, not "unset"
    optimizer = build_optimizer(name, model, **options)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        decays = any(names[id(p)].endswith("weight") and p.ndim > 1 for p in group["params"])
        expected = 0.05 if group.get("use_muon", name != "muon") else 0.0
        assert group["weight_decay"] == (expected if decays else 0.0), (
            [names[id(p)] for p in group["params"]],
            group["weight_decay"],
        )


@pytest.mark.parametrize("name", ENTRIES)
def test_lightning_fit_matches_the_reference(name, fits):
    module, _ = fits.get(name, "32-true")
    close(ref.weights(module), reference_run(name))


@pytest.mark.parametrize("name", ENTRIES)
def test_bf16_mixed_fit_matches_the_plain_loop(name, fits):
    module, _ = fits.get(name, "bf16-mixed")
    close(ref.weights(module), own_run(name, "auto", autocast=torch.bfloat16))


@pytest.mark.parametrize("name", ENTRIES)
def test_resume_continues_exactly(name, fits):
    uninterrupted, first = fits.get(name, "uninterrupted")
    resumed, second = fits.get(name, "resumed")
    assert second.global_step == first.global_step == ref.STEPS
    assert torch.equal(ref.weights(resumed), ref.weights(uninterrupted)), (
        (ref.weights(resumed) - ref.weights(uninterrupted)).abs().max()
    )
    state, expected = second.optimizers[0].state_dict(), first.optimizers[0].state_dict()
    assert state["param_groups"] == expected["param_groups"]
    for key, values in expected["state"].items():
        for field, value in values.items():
            got = state["state"][key][field]
            same = torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
            assert same, f"optimizer state {key}.{field} differs after resume"


@pytest.mark.parametrize("name", ENTRIES)
def test_skipped_nonfinite_step_is_a_batch_never_seen(name, fits):
    module, trainer = fits.get(name, "clipping")
    (clipping,) = [c for c in trainer.callbacks if isinstance(c, GradientClipping)]
    assert clipping.nonfinite_steps == 1
    close(ref.weights(module), reference_run(name, drop=NAN_STEP, max_norm=1.0, scheduler=False))


@pytest.mark.parametrize("name", ENTRIES)
def test_amp_epsilon_leaves_fp32_alone_and_raises_fp16_eps_before_the_first_step(name, fits):
    plain, _ = fits.get(name, "32-true")
    with_callback, _ = fits.get(name, "amp-32")
    assert torch.equal(ref.weights(with_callback), ref.weights(plain))

    half, trainer = fits.get(name, "amp-16")
    used = [
        {k: g[k] for k in g if k == "eps" or k.endswith("_eps")}
        for g in trainer.optimizers[0].param_groups
    ]
    module = ref.model(name).half()
    optimizer = build_optimizer(name, module, **ref.OPTIONS.get(name, {}))
    for group, eps in zip(optimizer.param_groups, used, strict=True):
        group.update(eps)
    schedule = build_scheduler(ref.schedule_for(name), optimizer, total_steps=ref.STEPS)
    data = [(x.half(), y.half()) for x, y in ref.batches()]
    ref.train(module, optimizer, data, scheduler=schedule)
    close(ref.weights(half), ref.weights(module), rtol=1e-3, atol=1e-3)


def _exact_percentile(values: torch.Tensor, q: float) -> float:
    return torch.quantile(values.double().flatten(), q / 100).item()


@pytest.mark.parametrize("name", ENTRIES)
def test_moment_statistics_change_nothing_and_log_exact_percentiles(name, fits):
    plain, _ = fits.get(name, "32-true")
    module, trainer, logger, last_lr = fits.get(name, "moments")
    assert torch.equal(ref.weights(module), ref.weights(plain)), "the statistics moved training"
    logged = {k: v for _, row in logger.rows for k, v in row.items() if k.startswith("moments")}
    assert logged, "nothing logged"
    spec = ref.spec(name)
    optimizer = trainer.optimizers[0]
    layer = module.net[0]  # the logged layer: its weight (1,296 elements) and bias
    group = next(g for g in optimizer.param_groups if any(p is layer.weight for p in g["params"]))
    second = spec.second_moment
    states = [optimizer.state[p] for p in layer.parameters()]
    if second is None or any(
        second not in s or s[second].shape != p.shape
        for s, p in zip(states, layer.parameters(), strict=True)
    ):
        return  # no per-element second moment to read percentiles of (tested: logs exist)
    parts = []
    for state in states:
        v = state[second].double().flatten()
        if spec.bias_corrected and "betas" in group:
            steps = float(state["step"]) if "step" in state else float(group.get("k", ref.STEPS))
            v = v / (1 - group["betas"][1] ** steps)
        parts.append(v)
    v = torch.cat(parts)
    keys = {k.split("/", 1)[0].split(".", 1)[1]: v for k, v in logged.items() if "/net.0" in k}
    for q in (5, 50, 95):
        label = f"p{q:02d}"
        got = keys.get(f"sqrt_second_moment_{label}")
        if got is not None:
            exact = _exact_percentile(v.sqrt(), q)
            assert abs(got - exact) <= 0.02 * abs(exact), (label, got, exact)
        got = keys.get(f"step_size_{label}")
        if got is not None:
            lr = _applied_lr(name, group, last_lr)
            exact = _exact_percentile(lr / (v.sqrt() + group["eps"]), q)
            assert abs(got - exact) <= 0.02 * abs(exact), (f"step_size_{label}", got, exact)


def _applied_lr(name: str, group: dict[str, Any], scheduled: float) -> float:
    """The LR the last step applied, from the papers: schedule-free warms up linearly over
    ``warmup_steps`` (``k`` steps done), the others apply the group's scheduled ``lr``."""
    if name in SCHEDULE_FREE:
        warmup = group["warmup_steps"]
        return group["lr"] * (min(1.0, group["k"] / warmup) if warmup else 1.0)
    return scheduled


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE))
def test_schedule_free_modes_around_validation_match_the_reference(name, fits):
    module, _ = fits.get(name, "validated")
    close(ref.weights(module), reference_run(name, evals_every=5))


@pytest.mark.parametrize("name", ENTRIES)
def test_switch_to_sgd_continues_from_the_evaluated_weights(name, fits):
    if not supported_or_refused(name, "switch"):
        return
    module, trainer = fits.get(name, "switch")
    sgd = trainer.optimizers[0]
    assert isinstance(sgd, torch.optim.SGD)
    index = {id(p): i for i, p in enumerate(module.parameters())}
    groups = [
        {
            "params": [index[id(p)] for p in g["params"]],
            **{k: g[k] for k in ("lr", "momentum", "weight_decay", "nesterov", "dampening")},
        }
        for g in sgd.param_groups
    ]
    close(ref.weights(module), reference_run(name, scheduler=False, switch=groups))


# ------------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def distributed(two_processes, tmp_path_factory) -> dict[str, Any]:
    """Every entry trained under DDP and under FSDP2 by one two-process job."""
    results = two_processes(
        "conformance_dist.py", tmp_path_factory.mktemp("conformance-dist"), timeout=900
    )
    return results[0]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", ENTRIES)
def test_distributed_fit_matches_one_process(name, strategy, distributed):
    result = distributed[name][strategy]
    assert "error" not in result, result.get("error")
    expected = reference_run(name, steps=result["steps"])
    close(torch.tensor(result["weights"], dtype=torch.float64), expected, rtol=2e-5, atol=1e-5)


# ------------------------------------------------------------------------------- the table
def test_every_entry_meets_every_cell():
    table = support_table()
    assert all(f"| {name} |" in table for name in ENTRIES)
    assert table.splitlines()[0].count("|") == len(CELLS) + 2


@pytest.mark.parametrize("document", ["README.md", "docs/conformance.md"])
def test_documented_support_table_is_the_generated_one(document):
    assert support_table() in (REPO / document).read_text(), (
        f"{document} is stale: regenerate with python -m tests.conformance.cells"
    )
