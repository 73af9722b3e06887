"""AdaBelief against the authors' adabelief-pytorch 0.2.1, in all three implementations.

Equivalence runs in float64, where rounding is ~1e-16 and any difference in the algorithm
(eps placement, bias correction, rectification, decay) shows up far above the tolerance. In
float32 the reference itself drifts from its float64 run by up to ~1e-4 relative over 100 steps
on these problems (rounding amplified by the dynamics), so float32 is checked more loosely.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief

from optim_callbacks.algorithms import adabelief
from optim_callbacks.algorithms.adabelief import AdaBelief

# A transposed (non-contiguous) tensor and a 0-d one among them. Kept small: tensors above
# torch's parallel grain size (32k elements) run multi-threaded, which crawls on a busy 2-core
# machine.
# The fused path falls back to foreach (with this warning) when compiling fails; here that is a
# failure, or the fused tests would silently compare the foreach path.
pytestmark = pytest.mark.filterwarnings(r"error:AdaBelief\(fused=True\)")

SHAPES = [(7,), (5, 3), (2, 3, 4), (), (33, 17)]
SMALL_SHAPES = [(7,), (5, 3), (2, 3, 4), (), (1, 1)]
IMPLS = {"for-loop": {"foreach": False}, "foreach": {}, "fused": {"fused": True}}

# (rectify, amsgrad, decoupled_weight_decay, eps)
CONFIGS = [
    pytest.param(False, False, True, 1e-16, id="plain"),
    pytest.param(False, False, True, 1e-3, id="plain-big-eps"),
    pytest.param(False, True, True, 1e-3, id="amsgrad"),
    pytest.param(True, False, True, 1e-3, id="rectify"),
    pytest.param(True, True, True, 1e-8, id="rectify-amsgrad"),
    pytest.param(False, False, False, 1e-3, id="l2"),
    pytest.param(True, True, False, 1e-8, id="l2-rectify-amsgrad"),
]


def make_params(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float64)
        if shape == (5, 3):
            p = p.t().contiguous().t()  # same values, transposed strides
        params.append(torch.nn.Parameter(p.to(dtype)))
    return params


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def run(optimizer, params, steps=100, seed=1, lrs=None, skip=None, gen=None):
    """Step with gradients ``0.5 p + noise`` (a noisy quadratic); ``lrs`` sets the LR per step,
    ``skip(t, i)`` leaves parameter ``i`` without a gradient at step ``t``; ``gen`` continues a
    noise stream (else one seeded with ``seed``)."""
    gen = gen or torch.Generator().manual_seed(seed)
    for t in range(steps):
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[t]
        for i, p in enumerate(params):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            grad = 0.5 * p.detach().double() + noise
            p.grad = None if skip is not None and skip(t, i) else grad.to(p.dtype)
        optimizer.step()


def shared_options(rectify, amsgrad, eps, lr, weight_decay):
    """The options both implementations name alike (the decay form they name differently)."""
    return dict(
        lr=lr,
        betas=(0.9, 0.999),
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        rectify=rectify,
    )


def reference(params, rectify, amsgrad, decoupled, eps, lr=1e-2, weight_decay=0.1):
    options = shared_options(rectify, amsgrad, eps, lr, weight_decay)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints which options are on
        return ReferenceAdaBelief(
            params, weight_decouple=decoupled, print_change_log=False, **options
        )


def ours(params, rectify, amsgrad, decoupled, eps, impl, lr=1e-2, weight_decay=0.1):
    options = shared_options(rectify, amsgrad, eps, lr, weight_decay)
    return AdaBelief(params, decoupled_weight_decay=decoupled, **options, **IMPLS[impl])


def relative_error(actual, expected):
    a = torch.cat([t.detach().double().reshape(-1) for t in actual])
    e = torch.cat([t.detach().double().reshape(-1) for t in expected])
    return ((a - e).norm() / e.norm()).item()


def assert_matches_reference(ours_opt, ref_opt, ours_params, ref_params, tol):
    assert relative_error(ours_params, ref_params) <= tol
    for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
        ref_state = [ref_opt.state[p].get(key) for p in ref_params]
        if ref_state[0] is None:
            assert all(key not in ours_opt.state[p] for p in ours_params)
            continue
        assert relative_error([ours_opt.state[p][key] for p in ours_params], ref_state) <= tol
    for p, q in zip(ours_params, ref_params, strict=True):
        assert torch.is_tensor(ours_opt.state[p]["step"])
        assert ours_opt.state[p]["step"].item() == ref_opt.state[q]["step"]


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "foreach-small-blocks"])
@pytest.mark.parametrize(("rectify", "amsgrad", "decoupled", "eps"), CONFIGS)
def test_matches_reference_float64(impl, rectify, amsgrad, decoupled, eps, monkeypatch):
    if impl == "foreach-small-blocks":
        # The CPU foreach path works in cache-sized blocks (1 << 17 elements) that cut tensors
        # into slices; with 50-element blocks these small tensors are cut too.
        monkeypatch.setattr(adabelief, "_CPU_BLOCK", 50)
        impl = "foreach"
    init = make_params(SHAPES)
    ref_params, our_params = clone_params(init), clone_params(init)
    ref_opt = reference(ref_params, rectify, amsgrad, decoupled, eps)
    our_opt = ours(our_params, rectify, amsgrad, decoupled, eps, impl)
    run(ref_opt, ref_params)
    run(our_opt, our_params)
    assert_matches_reference(our_opt, ref_opt, our_params, ref_params, tol=1e-9)


@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
@pytest.mark.parametrize(("rectify", "amsgrad", "decoupled", "eps"), CONFIGS[1:5])
def test_matches_reference_float32(impl, rectify, amsgrad, decoupled, eps):
    init = make_params(SHAPES, dtype=torch.float32)
    ref_params, our_params = clone_params(init), clone_params(init)
    ref_opt = reference(ref_params, rectify, amsgrad, decoupled, eps)
    our_opt = ours(our_params, rectify, amsgrad, decoupled, eps, impl)
    run(ref_opt, ref_params)
    run(our_opt, our_params)
    tol = 0.0 if impl == "for-loop" else 1e-5  # the loop repeats the reference's operations
    assert relative_error(our_params, ref_params) <= tol


@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
@pytest.mark.parametrize("rectify", [False, True])
def test_parameters_at_different_step_counts(impl, rectify):
    """Some parameters miss gradients on some steps, so their step counts (and bias
    corrections, and with rectification their SGD/adaptive phase) differ within a group."""
    init = make_params(SMALL_SHAPES)
    ref_params, our_params = clone_params(init), clone_params(init)
    ref_opt = reference(ref_params, rectify, False, True, 1e-3)
    our_opt = ours(our_params, rectify, False, True, 1e-3, impl)
    skip = lambda t, i: (t + i) % (i + 2) == 0  # noqa: E731
    run(ref_opt, ref_params, steps=30, skip=skip)
    run(our_opt, our_params, steps=30, skip=skip)
    steps = {our_opt.state[p]["step"].item() for p in our_params}
    assert len(steps) > 1
    assert_matches_reference(our_opt, ref_opt, our_params, ref_params, tol=1e-9)


def test_fused_matches_reference_without_recompiling():
    """The compiled path, every option set, in float64; an LR that changes every step (as under
    a scheduler) and the step count must not recompile after each graph's first call."""
    torch.compiler.reset()
    lrs = [1e-2 * (0.5 + 0.5 * math.cos(math.pi * t / 30)) + 1e-4 for t in range(30)]
    init = make_params(SMALL_SHAPES)
    for config in CONFIGS:
        rectify, amsgrad, decoupled, eps = config.values
        ref_params, our_params = clone_params(init), clone_params(init)
        ref_opt = reference(ref_params, rectify, amsgrad, decoupled, eps)
        our_opt = ours(our_params, rectify, amsgrad, decoupled, eps, "fused")
        run(ref_opt, ref_params, steps=30, lrs=lrs)
        gen = torch.Generator().manual_seed(1)
        run(our_opt, our_params, steps=1, lrs=lrs, gen=gen)  # may compile (new option set)
        with torch.compiler.set_stance("fail_on_recompile"):
            run(our_opt, our_params, steps=29, lrs=lrs[1:], gen=gen)
        assert_matches_reference(our_opt, ref_opt, our_params, ref_params, tol=1e-9)
        assert our_opt.compile_failure is None  # every step above ran the compiled update


@pytest.mark.parametrize(
    ("impl", "dtype", "eps"),
    [
        *[(impl, torch.bfloat16, 1e-16) for impl in IMPLS],
        # fp16 runs the fused graph's code for another dtype: a compile saved.
        *[(impl, torch.float16, 1e-7) for impl in ("for-loop", "foreach")],
    ],
)
def test_low_precision_steps_stay_finite(impl, dtype, eps):
    """State stays in the parameter's dtype. fp16 needs eps >= ~1e-7 (1e-16 rounds to 0 there;
    see the module docstring); bf16 works with the default."""
    params = make_params(SMALL_SHAPES, dtype=dtype)
    expected = clone_params(params)
    optimizer = AdaBelief(params, lr=1e-2, eps=eps, weight_decay=0.1, amsgrad=True, **IMPLS[impl])
    exp_opt = AdaBelief(expected, lr=1e-2, eps=eps, weight_decay=0.1, amsgrad=True, foreach=False)
    run(optimizer, params, steps=20)
    run(exp_opt, expected, steps=20)
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
        for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
            assert optimizer.state[p][key].dtype == dtype
            assert torch.isfinite(optimizer.state[p][key]).all()
    # Different rounding orders, same algorithm: agree to a few low-precision ulps.
    assert relative_error(params, expected) < 2e-2


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
def test_state_dict_resume_continues_identically(impl):
    # Shapes, dtype and options of a graph the fused test above has compiled already.
    params = make_params(SMALL_SHAPES)
    optimizer = ours(params, True, True, True, 1e-8, impl)
    run(optimizer, params, steps=10, seed=1)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(optimizer.state_dict())
    assert all(torch.is_tensor(s["step"]) for s in saved_state["state"].values())
    run(optimizer, params, steps=10, seed=2)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    optimizer2 = ours(resumed, True, True, True, 1e-8, impl)
    optimizer2.load_state_dict(saved_state)
    run(optimizer2, resumed, steps=10, seed=2)
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), optimizer2.state.values(), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradients_are_not_modified():
    """Unlike the reference, L2 decay does not write into ``p.grad``."""
    for impl in ("for-loop", "foreach"):
        params = make_params(SMALL_SHAPES, dtype=torch.float32)
        optimizer = ours(params, False, False, False, 1e-8, impl)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"fused": True, "foreach": True}, "fused"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaBelief([torch.nn.Parameter(torch.zeros(2))], **kwargs)
