"""The optimizer registry: every entry against its reference implementation, its state roles,
kernel choice, defaults, identity (``spec_for``) and the checks of its options."""

import contextlib
import copy
import io
import math
import pickle

import pytest
import torch
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief
from torch import nn

from optim_callbacks import (
    OPTIMIZERS,
    AdaBelief,
    Registry,
    build_optimizer,
    register_optimizer,
    spec_for,
)

TORCH_CLASSES = {
    "sgd": torch.optim.SGD,
    "momentum": torch.optim.SGD,
    "nesterov": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adabelief": AdaBelief,
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def _train(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 25
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=generator)
        y = torch.randint(0, 3, (32,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


# The entries after the classic nine (tests/lib/test_new_optimizers.py holds them to their
# references).
NEWER = ["lion", "adafactor", "lamb", "muon", "adopt", "schedule_free_adamw", "schedule_free_sgd"]


def test_registry_holds_the_practitioners_optimizers():
    assert OPTIMIZERS.names() == [*TORCH_CLASSES, *NEWER]


def _reference(name: str, params) -> torch.optim.Optimizer:
    """The implementation an entry must reproduce with the entry's defaults: torch's own
    single-tensor loop, or for AdaBelief the authors' adabelief-pytorch 0.2.1 with our class's
    defaults (decoupled decay, no rectification, no AMSGrad)."""
    defaults = dict(OPTIMIZERS.get(name).defaults)
    if name != "adabelief":
        return TORCH_CLASSES[name](params, **defaults, foreach=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints which options are on
        return ReferenceAdaBelief(
            params, **defaults, weight_decouple=True, rectify=False, print_change_log=False
        )


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
def test_every_optimizer_matches_its_reference_implementation(name):
    """The registry's kernel choice (fused where torch has it, else foreach) and defaults give the
    reference's trajectory. AdaBelief's reference is the authors' package: our foreach path
    against the for-loop of another implementation, not against itself."""
    ours_model, ref_model = _model(), _model()
    ours = build_optimizer(name, ours_model.parameters(), impl="auto")
    reference = _reference(name, ref_model.parameters())
    assert type(reference).__module__ != "optim_callbacks.algorithms.adabelief"
    for got, want in zip(_train(ours_model, ours), _train(ref_model, reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# The state tensors each entry keeps after a few steps with its defaults (plain SGD: none).
STATE_AFTER_STEPS = {
    "sgd": set(),
    "momentum": {"momentum_buffer"},
    "nesterov": {"momentum_buffer"},
    "adagrad": {"sum"},
    "adadelta": {"square_avg", "acc_delta"},
    "rmsprop": {"square_avg"},
    "adam": {"exp_avg", "exp_avg_sq"},
    "adamw": {"exp_avg", "exp_avg_sq"},
    "adabelief": {"exp_avg", "exp_avg_var"},
}


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
def test_state_tensors_are_the_ones_the_entry_names(name):
    spec = OPTIMIZERS.get(name)
    model = _model()
    optimizer = build_optimizer(name, model)
    _train(model, optimizer, steps=2)
    expected = STATE_AFTER_STEPS[name]
    assert expected <= set(spec.state_keys)
    assert {spec.first_moment, spec.second_moment} - {None} <= expected
    assert len(optimizer.state) == (len(list(model.parameters())) if expected else 0)
    for state in optimizer.state.values():
        tensors = {k for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"}
        assert tensors == expected


def test_fast_kernels_are_chosen_where_torch_supports_them():
    params = list(_model().parameters())
    assert build_optimizer("adamw", params).defaults["fused"] is True
    assert build_optimizer("nesterov", params).defaults["fused"] is True
    # The entries without torch fused kernels get the compiled update by default.
    for name in ("adadelta", "rmsprop", "adabelief"):
        assert build_optimizer(name, params).defaults["fused"] is True
        assert build_optimizer(name, params, impl="foreach").defaults["foreach"] is True
    # The torch class itself is still what the registry recognizes.
    assert spec_for(torch.optim.RMSprop(params)).name == "rmsprop"
    assert spec_for(build_optimizer("adadelta", params)).name == "adadelta"
    loop = build_optimizer("adam", params, impl="for-loop").defaults
    assert loop["fused"] is False and loop["foreach"] is False
    # An explicit choice by the user wins.
    assert build_optimizer("adam", params, foreach=True).defaults["fused"] in (None, False)


def test_defaults_follow_practice():
    adam = build_optimizer("adam", _model()).defaults
    assert adam["betas"] == (0.9, 0.999) and adam["eps"] == 1e-8 and adam["lr"] == 1e-3
    assert build_optimizer("adamw", _model()).defaults["weight_decay"] == 0.01
    momentum = build_optimizer("momentum", _model()).defaults
    assert momentum["momentum"] == 0.9 and momentum["nesterov"] is False
    nesterov = build_optimizer("nesterov", _model()).defaults
    assert nesterov["momentum"] == 0.9 and nesterov["nesterov"] is True
    assert build_optimizer("rmsprop", _model()).defaults["alpha"] == 0.9


def test_capability_flags_and_roles():
    adam = OPTIMIZERS.get("adam")
    assert adam.has_eps and adam.has_betas and not adam.has_momentum and adam.adaptive
    assert adam.first_moment == "exp_avg" and adam.second_moment == "exp_avg_sq"
    sgd = OPTIMIZERS.get("momentum")
    assert sgd.has_momentum and not sgd.has_eps and not sgd.adaptive
    assert OPTIMIZERS.get("adabelief").second_moment == "exp_avg_var"


def _reloaded(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fresh instance of the same class with the class's own defaults, given the state dict."""
    fresh = type(optimizer)([{"params": group["params"]} for group in optimizer.param_groups])
    fresh.load_state_dict(optimizer.state_dict())
    return fresh


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
@pytest.mark.parametrize(
    "transform",
    [
        lambda o: o,
        copy.deepcopy,
        lambda o: pickle.loads(pickle.dumps(o)),
        _reloaded,
    ],
    ids=["built", "deepcopy", "pickle", "state_dict"],
)
def test_spec_for_names_the_entry_from_class_and_groups_only(name, transform):
    model = _model()
    optimizer = build_optimizer(name, model)
    _train(model, optimizer, steps=1)
    # A copy or a pickle would carry an attribute patched onto the instance; a state dict
    # loaded into a fresh instance would not, and neither has one built directly with torch.
    assert "registry_name" not in vars(optimizer)
    assert spec_for(transform(optimizer)).name == name


def test_spec_for_an_optimizer_built_directly_with_torch():
    params = list(_model().parameters())
    sgd = torch.optim.SGD
    assert spec_for(sgd(params, lr=0.1, momentum=0.9, nesterov=True)).name == "nesterov"
    assert spec_for(sgd(params, lr=0.1, momentum=0.5)).name == "momentum"
    assert spec_for(sgd(params, lr=0.1)).name == "sgd"
    # Momentum in one group only: that group keeps a buffer, so the optimizer is "momentum".
    mixed = sgd([{"params": params[:2]}, {"params": params[2:], "momentum": 0.9}], lr=0.1)
    assert spec_for(mixed).name == "momentum"
    assert spec_for(torch.optim.AdamW(params)).name == "adamw"
    assert spec_for(torch.optim.Adam(params)).name == "adam"  # AdamW's base class

    class Unknown(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    class MyAdam(torch.optim.Adam):
        pass

    assert spec_for(Unknown(params)) is None
    assert spec_for(MyAdam(params)).name == "adam"


def test_matches_is_the_rule_of_the_entry():
    params = list(_model().parameters())
    nesterov = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    assert [n for n in ("sgd", "momentum", "nesterov") if OPTIMIZERS.get(n).matches(nesterov)] == [
        "nesterov"
    ]
    assert OPTIMIZERS.get("nesterov").identity == ("momentum", "nesterov")
    assert not OPTIMIZERS.get("adam").matches(nesterov)


def test_lr_and_weight_decay_override_defaults_and_no_decay_groups_exist():
    optimizer = build_optimizer("adamw", _model(), lr=5e-5, weight_decay=0.1)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 5e-5 for g in optimizer.param_groups)


def test_group_lr_scale_multiplies_the_learning_rate():
    model = _model()
    groups = [
        {"params": list(model[0].parameters()), "lr_scale": 0.5},
        {"params": list(model[3].parameters())},
    ]
    optimizer = build_optimizer("adam", groups, lr=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.1]


def test_register_optimizer_adds_a_user_optimizer():
    @register_optimizer("signsgd_test", description="sign of the gradient", defaults={"lr": 0.01})
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params, lr: float = 0.01):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-group["lr"])

    try:
        model = _model()
        optimizer = build_optimizer("signsgd_test", model)
        assert (
            isinstance(optimizer, SignSGD)
            and spec_for(optimizer).description == "sign of the gradient"
        )
        assert not OPTIMIZERS.get("signsgd_test").has_eps
        with pytest.raises(ValueError, match="already registered"):
            register_optimizer("signsgd_test")(SignSGD)
    finally:
        OPTIMIZERS.unregister("signsgd_test")
    assert "signsgd_test" not in OPTIMIZERS


def test_registry_unregister_drops_the_entry_and_its_aliases():
    registry: Registry[int] = Registry("thing")
    registry.register("one", 1, aliases=("uno",))
    registry.register("two", 2)
    assert registry.unregister("uno") == 1
    assert registry.names() == ["two"] and registry.aliases() == {}
    with pytest.raises(ValueError, match=r"thing: unknown value 'one'"):
        registry.unregister("one")


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda m: build_optimizer("adamx", m),
            r"optimizer: unknown value 'adamx'.*did you mean 'adam",
        ),
        (lambda m: build_optimizer("adam", m, lr=0), r"lr: got 0; allowed: a finite number > 0"),
        (
            lambda m: build_optimizer("adam", m, lr=math.inf),
            r"lr: got inf; allowed: a finite number > 0",
        ),
        (lambda m: build_optimizer("adam", m, lr=math.nan), r"lr: got nan; allowed: a finite"),
        (
            lambda m: build_optimizer("adamw", m, weight_decay=math.inf),
            r"weight_decay: got inf; allowed: a finite number >= 0",
        ),
        (lambda m: build_optimizer("adam", m, eps=math.nan), r"eps: got nan"),
        (lambda m: build_optimizer("adam", m, betas=(0.9, math.nan)), r"betas\[1\]: got nan"),
        (lambda m: build_optimizer("adam", m, lr=-1e-3), r"lr: got -0.001"),
        (
            lambda m: build_optimizer("adam", m, betas=(0.9, 1.0)),
            r"betas\[1\]: got 1.0; allowed: a number in \[0.0, 1.0\)",
        ),
        (lambda m: build_optimizer("adam", m, betas=(-0.1, 0.9)), r"betas\[0\]"),
        (
            lambda m: build_optimizer("adam", m, eps=0.0),
            r"eps: got 0.0; allowed: a finite number > 0",
        ),
        (
            lambda m: build_optimizer("momentum", m, momentum=-0.9),
            r"momentum: got -0.9; allowed: a finite number >= 0",
        ),
        (lambda m: build_optimizer("adamw", m, weight_decay=-0.01), r"weight_decay: got -0.01"),
        (
            lambda m: build_optimizer("adam", m, bettas=(0.9, 0.99)),
            r"adam options: unknown option 'bettas'.*did you mean 'betas'",
        ),
        (lambda m: build_optimizer("sgd", m, impl="fastest"), r"impl: unknown value 'fastest'"),
        (
            lambda m: build_optimizer("rmsprop", nn.Linear(2, 2, device="meta"), impl="fused"),
            r"impl: 'fused' is not available",
        ),
        (lambda m: build_optimizer("adam", m, layer_decay=1.5), r"layer_decay: got 1.5"),
        (lambda m: build_optimizer("adam", []), r"model_or_params: got no parameters"),
    ],
)
def test_bad_input_names_the_parameter(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(_model())


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
def test_check_options_accepts_every_entry_with_its_defaults(name):
    spec = OPTIMIZERS.get(name)
    assert spec.check_options() is None
    options = {k: v for k, v in spec.defaults.items() if k not in ("lr", "weight_decay")}
    assert spec.check_options(lr=1e-3, weight_decay=0.0, layer_decay=0.8, **options) is None


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("adam", {"lr": math.inf}, r"lr: got inf; allowed: a finite number > 0"),
        ("adam", {"lr": -1.0}, r"lr: got -1.0"),
        ("adamw", {"weight_decay": -0.1}, r"weight_decay: got -0.1"),
        ("adam", {"layer_decay": 0.0}, r"layer_decay: got 0.0; allowed: a number in \(0.0, 1.0\]"),
        ("adam", {"bettas": (0.9, 0.99)}, r"adam options: unknown option 'bettas'.*'betas'"),
        ("sgd", {"nesterow": True}, r"sgd options: unknown option 'nesterow'.*'nesterov'"),
        ("adam", {"betas": (0.9, 1.5)}, r"betas\[1\]: got 1.5"),
        ("rmsprop", {"alpha": 1.5}, r"alpha: got 1.5"),
        ("momentum", {"momentum": math.inf}, r"momentum: got inf"),
        ("adam", {"impl": "fastest"}, r"impl: unknown value 'fastest'"),
    ],
)
def test_check_options_refuses_what_build_optimizer_refuses(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        OPTIMIZERS.get(name).check_options(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        build_optimizer(name, _model(), **kwargs)
