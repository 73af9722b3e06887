"""The compiled update (``impl="auto"``'s path for AdaBelief, Adadelta and RMSprop) against
each entry's for-loop: same numbers, one graph per dtype whatever the shapes, no recompile
under a changing LR, a fallback confined to the instance whose compile failed."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from optim_callbacks import AdaBelief, Adadelta, RMSprop, _compat, build_optimizer, compiled_update
from optim_callbacks.compiled_update import PACK_BELOW
from optim_callbacks.optimizers import OPTIMIZERS, SCHEDULE_FREE

# A silent fallback would make every comparison below compare foreach with itself.
pytestmark = pytest.mark.filterwarnings(r"error:.*compiling the update failed")

# Contiguous, transposed (dense, not contiguous), 0-d and one-element tensors; the two large
# ones (over PACK_BELOW elements) get a call each, the small ones share one packed call.
SHAPES = [(200, 170), (7,), "transposed", (), (1,), (33, 17), "transposed-large"]

VARIANTS = [
    pytest.param("adadelta", {}, id="adadelta"),
    pytest.param("adadelta", {"weight_decay": 0.1, "maximize": True}, id="adadelta-wd-max"),
    pytest.param("rmsprop", {"weight_decay": 0.01}, id="rmsprop"),
    pytest.param("rmsprop", {"momentum": 0.9}, id="rmsprop-momentum"),
    pytest.param("rmsprop", {"centered": True}, id="rmsprop-centered"),
    pytest.param("rmsprop", {"centered": True, "momentum": 0.5}, id="rmsprop-centered-momentum"),
    pytest.param("adabelief", {"weight_decay": 0.1}, id="adabelief"),
    pytest.param("adabelief", {"amsgrad": True}, id="adabelief-amsgrad"),
    pytest.param("adabelief", {"rectify": True, "amsgrad": True}, id="adabelief-rectify"),
]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        if shape == "transposed":
            data = torch.randn(6, 4, generator=gen, dtype=torch.float64).t()
        elif shape == "transposed-large":
            data = torch.randn(190, 180, generator=gen, dtype=torch.float64).t()
        else:
            data = torch.randn(shape, generator=gen, dtype=torch.float64)
        params.append(nn.Parameter(data.to(dtype)))
    assert not params[2].is_contiguous() and not params[-1].is_contiguous()
    assert params[0].numel() >= PACK_BELOW > params[5].numel()
    return params


def clone(params: list[nn.Parameter]) -> list[nn.Parameter]:
    # p.clone() keeps the transposed tensor's strides (preserve_format).
    return [nn.Parameter(p.detach().clone()) for p in params]


def run(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], start: int, steps: int):
    """Deterministic gradients of the current weights and an LR that changes every step."""
    for t in range(start, start + steps):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * (0.6 + 0.4 * math.cos(t / 7))
        for p in params:
            p.grad = torch.sin(3.0 * p.detach() + t) + 0.1 * p.detach()
        optimizer.step()


def build(name: str, params: list[nn.Parameter], impl: str, options: dict) -> torch.optim.Optimizer:
    optimizer = build_optimizer(
        name, params, lr=1e-2 if name != "adadelta" else 0.5, impl=impl, **options
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item()
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_compiled_path_equals_for_loop_in_float64(name, options):
    """Same algorithm to float64 rounding over 60 steps, with the LR changing every step; after
    each graph's first call nothing recompiles (the LR and step counts are data)."""
    init = make_params(torch.float64)
    loop_params, compiled_params = clone(init), clone(init)
    loop = build(name, loop_params, "for-loop", options)
    compiled = build(name, compiled_params, "auto", options)
    assert compiled.defaults["fused"] is True
    run(loop, loop_params, 0, 60)
    run(compiled, compiled_params, 0, 1)
    with torch.compiler.set_stance("fail_on_recompile"):
        run(compiled, compiled_params, 1, 59)
    assert compiled.compile_failure is None
    assert relative_error(compiled_params, loop_params) < 1e-10
    for p, q in zip(compiled_params, loop_params, strict=True):
        assert compiled.state[p].keys() == loop.state[q].keys()
        assert compiled.state[p]["step"].item() == loop.state[q]["step"].item() == 60
        for key, value in compiled.state[p].items():
            expected = loop.state[q][key]
            scale = expected.abs().max().item()
            torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)],
    ids=["float32", "bfloat16", "float16"],
)
@pytest.mark.parametrize("name", ["adadelta", "rmsprop", "adabelief"])
def test_implementations_agree_and_load_each_others_state(name, dtype, tolerance):
    """Compiled, foreach and for-loop agree to the dtype's rounding; a state dict saved by one
    implementation continues in another. The state stays in the parameter's dtype."""
    # fp16 needs a larger eps (an underflowing second moment divides by eps; see AmpEpsilon).
    options = {} if name == "adadelta" else {"eps": 1e-4 if dtype == torch.float16 else 1e-6}
    init = make_params(dtype)
    results = {}
    for first, second in (("auto", "for-loop"), ("for-loop", "foreach"), ("foreach", "auto")):
        params = clone(init)
        optimizer = build(name, params, first, options)
        run(optimizer, params, 0, 15)
        saved = copy.deepcopy(optimizer.state_dict())
        resumed = build(name, params, second, options)
        resumed.load_state_dict(saved)
        run(resumed, params, 15, 15)
        for p in params:
            assert all(v.dtype == dtype for k, v in resumed.state[p].items() if k != "step"), (
                "state left the parameter's dtype"
            )
        results[(first, second)] = params
    reference = results[("for-loop", "foreach")]
    for params in results.values():
        assert all(torch.isfinite(p).all() for p in params)
        assert relative_error(params, reference) < tolerance


def shapes_300() -> list[nn.Parameter]:
    """300 shapes; with PACK_BELOW lowered to 64 by the test, 240 of them get their own call."""
    params = []
    for i in range(150):
        params.append(nn.Parameter(torch.randn(i + 2) * 0.1))
        params.append(nn.Parameter(torch.randn(i + 2, 3) * 0.1))
    assert len({p.shape for p in params}) == 300
    return params


def test_three_hundred_shapes_keep_the_compiled_path_for_every_optimizer(monkeypatch):
    monkeypatch.setattr(compiled_update, "PACK_BELOW", 64)  # most shapes get their own call
    params = shapes_300()
    for name in ("adadelta", "rmsprop", "adabelief"):
        optimizer = build_optimizer(name, params)
        warm = build_optimizer(name, [nn.Parameter(torch.randn(5))])
        warm.param_groups[0]["params"][0].grad = torch.ones(5)
        warm.step()  # compiles the float32 graph if no earlier test did
        for p in params:
            p.grad = torch.randn_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with torch.compiler.set_stance("fail_on_recompile"):
                optimizer.step()
                optimizer.step()
        assert optimizer.defaults["fused"] is True and optimizer.compile_failure is None
        assert all(optimizer.state[p]["step"].item() == 2 for p in params)


@pytest.mark.filterwarnings("ignore:.*compiling the update failed")
def test_a_failed_compile_falls_back_for_that_instance_only():
    """A real compile failure (inductor pointed at a C++ compiler that does not exist, caches
    off): that instance finishes the step uncompiled, warns once and steps with foreach; an
    instance built before and one built after keep the compiled path."""
    init = [nn.Parameter(torch.randn(8, 3, dtype=torch.float64)) for _ in range(2)]
    before, failing, reference = clone(init), clone(init), clone(init)
    before_opt = RMSprop(before, lr=1e-2, fused=True)
    failing_opt = RMSprop(failing, lr=1e-2, fused=True)
    reference_opt = RMSprop(reference, lr=1e-2, foreach=False)
    for opt in (before_opt, failing_opt, reference_opt):
        opt.param_groups[0]["initial_lr"] = 1e-2
    torch.compiler.reset()  # forget graphs compiled by earlier tests, so this one compiles
    broken = _compat.inductor_cpp_compiler("/nonexistent/c++")
    with warnings.catch_warnings(record=True) as caught, broken:
        warnings.simplefilter("always")
        run(failing_opt, failing, 0, 1)
    ours = [w for w in caught if "compiling the update failed" in str(w.message)]
    assert len(ours) == 1
    assert "RMSprop(fused=True)" in str(ours[0].message)
    assert "C++ compiler" in str(ours[0].message)
    assert "InvalidCxxCompiler" in failing_opt.compile_failure

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run(failing_opt, failing, 1, 9)  # foreach now: no second warning
        run(before_opt, before, 0, 10)
        after = clone(init)
        after_opt = RMSprop(after, lr=1e-2, fused=True)
        after_opt.param_groups[0]["initial_lr"] = 1e-2
        run(after_opt, after, 0, 10)
    assert before_opt.compile_failure is None and after_opt.compile_failure is None
    run(reference_opt, reference, 0, 10)
    for params in (failing, before, after):
        assert relative_error(params, reference) < 1e-10


@pytest.mark.parametrize(
    "make",
    [
        lambda params, lr: build_optimizer("adabelief", params, lr=lr),
        lambda params, lr: AdaBelief(params, lr=lr),
        lambda params, lr: Adadelta(params, lr=lr),
        lambda params, lr: RMSprop(params, lr=lr),
    ],
    ids=["registry", "AdaBelief", "Adadelta", "RMSprop"],
)
def test_tensor_lr_must_have_one_element(make):
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(
        ValueError, match=r"^lr: got a tensor of shape \(2,\).*Tensor lr must be 1-element"
    ):
        make(params, torch.tensor([1e-3, 1e-3]))
    optimizer = make(params, torch.tensor(1e-3))
    params[0].grad = torch.ones(3)
    optimizer.step()
    assert torch.isfinite(params[0]).all() and not torch.equal(params[0], torch.zeros(3))


@pytest.mark.parametrize("cls", [AdaBelief, Adadelta, RMSprop, torch.optim.Adam])
def test_fused_on_an_unsupported_device_raises_like_torch(cls):
    param = nn.Parameter(torch.zeros(4, device="meta"))
    param.grad = torch.zeros(4, device="meta")
    optimizer = cls([param], lr=1e-3, fused=True)
    with pytest.raises(RuntimeError, match="requires all the params to be floating point Tensors"):
        optimizer.step()


def test_fused_refuses_what_torch_fused_refuses():
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"^fused: cannot be True together with foreach=True"):
        RMSprop(params, fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"^fused: cannot be True together with differentiable"):
        Adadelta(params, fused=True, differentiable=True)


def compiled_by_default() -> list[str]:
    """The registry's entries whose default implementation on CPU is our compiled update."""
    names = []
    for name, _ in OPTIMIZERS.items():
        optimizer = build_optimizer(name, [nn.Parameter(torch.zeros(2, 2))])
        module = type(optimizer).__module__
        if module.startswith("optim_callbacks.") and optimizer.defaults.get("fused") is True:
            names.append(name)
    return names


COMPILED_BY_DEFAULT = compiled_by_default()


def test_the_version_test_covers_the_compiled_entries():
    expected = {"adadelta", "rmsprop", "adabelief", "lion", "lamb", "adopt", "adafactor"}
    assert expected | set(SCHEDULE_FREE) <= set(COMPILED_BY_DEFAULT)


def _step_then_backward(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> list[str]:
    """Save ``param`` and each state tensor in a graph, step, backward through each graph;
    return the names of the tensors whose backward did not raise torch's in-place error."""
    if hasattr(optimizer, "train"):  # schedule-free: steps only in train mode
        optimizer.train()
    param.grad = torch.randn_like(param)
    optimizer.step()  # creates the state
    param.grad = torch.randn_like(param)
    state = {k: v for k, v in optimizer.state[param].items() if torch.is_tensor(v)}
    graphs = {"param": (param * param).sum()}
    # mul(a, s) with a requiring grad saves s: a graph that reads the state tensor.
    graphs.update({key: (param.sum() * value).sum() for key, value in state.items()})
    optimizer.step()
    silent = []
    for key, loss in graphs.items():
        try:
            loss.backward()
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
        else:
            silent.append(key)
    return silent


@pytest.mark.parametrize("shape", [(8, 8), (192, 192)], ids=["packed", "own-call"])
@pytest.mark.parametrize("name", COMPILED_BY_DEFAULT)
def test_a_backward_after_the_step_raises_like_torch(name, shape):
    """The compiled step writes the parameter and its state in place (through ``set_``
    aliases for tensors of PACK_BELOW elements or more): a backward through a graph saved
    before the step raises torch's in-place error, as after torch's foreach AdamW, whatever
    the tensor's size. Every state tensor written by the step counts too."""
    assert (math.prod(shape) < PACK_BELOW) == (shape == (8, 8))
    torch.manual_seed(0)
    reference = nn.Parameter(torch.randn(shape))
    assert _step_then_backward(torch.optim.AdamW([reference], foreach=True), reference) == []
    param = nn.Parameter(torch.randn(shape))
    optimizer = build_optimizer(name, [param])
    assert optimizer.defaults["fused"] is True
    assert _step_then_backward(optimizer, param) == []


def _two_sizes(name: str) -> list[nn.Parameter]:
    """A tensor of its own for each graph an entry compiles per dtype: packed small ones and
    one large one; LAMB and Adafactor reduce per tensor, and inductor's C++ reductions take
    another graph above 4096 elements; Adafactor also has a vector graph."""
    shapes = [(8, 8), (192, 192)] + ([(5,), (300,)] if name == "adafactor" else [])
    return [nn.Parameter(torch.randn(shape)) for shape in shapes]


def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    if hasattr(optimizer, "train"):  # schedule-free: steps only in train mode
        optimizer.train()
    for p in params:
        if p.grad is None:
            p.grad = torch.randn_like(p)
    optimizer.step()


@pytest.mark.parametrize("mode", ["FlopCounterMode", "CommDebugMode"])
@pytest.mark.parametrize("name", COMPILED_BY_DEFAULT)
def test_a_step_under_a_dispatch_mode_is_applied_once(name, mode):
    """Under a ``TorchDispatchMode`` torch.compile runs the function eagerly and then raises
    ("found no compiled frames"); the step must still be applied exactly once, without a
    compile failure recorded (the next step outside the mode is compiled again)."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    init = _two_sizes(name)
    for p in init:
        p.grad = torch.randn_like(p)
    outside, inside = clone(init), clone(init)
    for p, q, r in zip(init, outside, inside, strict=True):
        q.grad, r.grad = p.grad.clone(), p.grad.clone()
    reference, measured = build_optimizer(name, outside), build_optimizer(name, inside)
    _step(reference, outside)
    context = FlopCounterMode(display=False) if mode == "FlopCounterMode" else CommDebugMode()
    with context:
        _step(measured, inside)
    assert getattr(measured, "compile_failure", None) is None
    for p, q in zip(inside, outside, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert float(measured.state[p].get("step", 1)) == 1  # Muon's matrices keep no step
    _step(measured, inside)  # outside the mode: compiled, still no failure
    assert getattr(measured, "compile_failure", None) is None


def _views(shapes: list[tuple[int, ...]], start: int) -> list[nn.Parameter]:
    """Parameters and gradients as views into two flat buffers, as FSDP2's shards and
    gradients are: the first at storage offset ``start``, the others after it, 3 apart."""
    sizes = [math.prod(shape) for shape in shapes]
    total = start + sum(sizes) + 3 * len(shapes)
    weights, grads = torch.randn(total) * 0.1, torch.randn(total)
    params, offset = [], start
    for shape, size in zip(shapes, sizes, strict=True):
        p = nn.Parameter(weights[offset : offset + size].view(shape))
        p.grad = grads[offset : offset + size].view(shape)
        assert p.storage_offset() == offset
        params.append(p)
        offset += size + 3
    return params


# Per entry, the first graphs' inputs with sizes that duck sizing would tie: the first view's
# storage offset equals its length (rank 1 of an even FSDP2 split; Lion and ADOPT see no packed
# small tensors at offset 0 before the test's second instance does), LAMB's 9 coefficients
# next to a 9-element bias, Adafactor's square matrices and 7 coefficients next to 7 elements.
WARM_SHAPES = {
    "lion": [(192, 192)],
    "adopt": [(192, 192)],
    "lamb": [(192, 192), (9,)],
    "adafactor": [(192, 192), (64, 64), (300,), (7,)],
}


@pytest.mark.parametrize("name", sorted(WARM_SHAPES))
def test_shapes_and_storage_offsets_do_not_recompile(name):
    """After an entry's first graphs of one dtype exist, other shapes and views at other
    storage offsets (0 and 1 among them), in a second optimizer instance, run without a single
    recompile: duck sizing ties no sizes, offsets, or the coefficient vector's length, offsets
    are not specialized on 0 and 1, and parameters' shapes are not static."""
    torch.compiler.reset()  # this test counts on compiling its own graphs
    warm = _views(WARM_SHAPES[name], math.prod(WARM_SHAPES[name][0]))
    _step(build_optimizer(name, warm), warm)
    shapes = [(200, 170), (7, 300), (300, 7), (96, 96), (9,), (40, 40), (130, 257), (300,), (2,)]
    for start in (0, 1):
        params = _views(shapes, start)
        optimizer = build_optimizer(name, params)
        assert optimizer.defaults["fused"] is True
        with torch.compiler.set_stance("fail_on_recompile"):
            _step(optimizer, params)
            _step(optimizer, params)
        assert optimizer.compile_failure is None
        assert all(torch.isfinite(p).all() for p in params)
