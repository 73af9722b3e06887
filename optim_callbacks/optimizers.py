"""The optimizer registry: one ``OptimizerSpec`` per name, one builder.

Each entry knows its torch class, defaults taken from practice, capability flags and the names
of the per-parameter state tensors it keeps, so callbacks can read optimizer state without
``isinstance`` chains (``spec_for(optimizer).second_moment``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from optim_callbacks.adabelief import AdaBelief
from optim_callbacks.param_groups import ParamsT, param_groups
from optim_callbacks.registry import Registry
from optim_callbacks.validation import (
    check_betas,
    check_choice,
    check_in_range,
    check_non_negative,
    check_positive,
    check_unknown_options,
)

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "build_optimizer",
    "register_optimizer",
    "spec_for",
]

IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


@dataclass(frozen=True)
class OptimizerSpec:
    """What the registry knows about one optimizer.

    ``state_keys`` names the per-parameter state tensors the optimizer may keep;
    ``first_moment`` / ``second_moment`` name the ones that play those roles (``None`` when the
    optimizer has none), so ``adaptive`` is true exactly for optimizers with a per-element
    second-moment estimate.
    """

    name: str
    optimizer_class: type[Optimizer]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    state_keys: tuple[str, ...] = ()
    first_moment: str | None = None
    second_moment: str | None = None
    has_eps: bool = False
    has_betas: bool = False
    has_momentum: bool = False
    factory: Callable[..., Optimizer] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def adaptive(self) -> bool:
        return self.second_moment is not None

    def build(self, params: Any, **kwargs: Any) -> Optimizer:
        return (self.factory or self.optimizer_class)(params, **kwargs)

    def options(self) -> list[str]:
        """Keyword options the optimizer accepts (besides ``params``)."""
        signature = inspect.signature(self.optimizer_class.__init__)
        return [
            name
            for name, p in signature.parameters.items()
            if name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer")


def register_optimizer(
    name: str,
    *,
    description: str = "",
    defaults: Mapping[str, Any] | None = None,
    state_keys: tuple[str, ...] = (),
    first_moment: str | None = None,
    second_moment: str | None = None,
    has_eps: bool | None = None,
    has_betas: bool | None = None,
    has_momentum: bool | None = None,
    aliases: tuple[str, ...] = (),
    replace: bool = False,
) -> Callable[[type[Optimizer]], type[Optimizer]]:
    """Class decorator that adds a user optimizer to ``OPTIMIZERS``.

    Capability flags left as ``None`` are read from the constructor's keyword names::

        @register_optimizer("lion", description="sign of an EMA", state_keys=("exp_avg",))
        class Lion(torch.optim.Optimizer): ...
    """

    def decorate(cls: type[Optimizer]) -> type[Optimizer]:
        accepted = set(inspect.signature(cls.__init__).parameters)
        spec = OptimizerSpec(
            name=name,
            optimizer_class=cls,
            description=description or (cls.__doc__ or cls.__name__).strip().splitlines()[0],
            defaults=defaults or {},
            state_keys=state_keys,
            first_moment=first_moment,
            second_moment=second_moment,
            has_eps="eps" in accepted if has_eps is None else has_eps,
            has_betas="betas" in accepted if has_betas is None else has_betas,
            has_momentum="momentum" in accepted if has_momentum is None else has_momentum,
        )
        OPTIMIZERS.register(name, spec, aliases=aliases, replace=replace)
        return cls

    return decorate


def _add(spec: OptimizerSpec, aliases: tuple[str, ...] = ()) -> None:
    OPTIMIZERS.register(spec.name, spec, aliases=aliases)


_SGD_STATE = ("momentum_buffer",)
_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

_add(
    OptimizerSpec(
        "sgd",
        torch.optim.SGD,
        "plain stochastic gradient descent: simple, generalizes well, LR-sensitive",
        defaults={"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0},
        state_keys=_SGD_STATE,
        has_momentum=True,
    )
)
_add(
    OptimizerSpec(
        "momentum",
        torch.optim.SGD,
        "SGD with heavy-ball momentum 0.9: damps oscillation, the CNN workhorse",
        defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        state_keys=_SGD_STATE,
        first_moment="momentum_buffer",
        has_momentum=True,
    )
)
_add(
    OptimizerSpec(
        "nesterov",
        torch.optim.SGD,
        "SGD with Nesterov momentum 0.9: gradient at the look-ahead point",
        defaults={"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
        state_keys=_SGD_STATE,
        first_moment="momentum_buffer",
        has_momentum=True,
    )
)
_add(
    OptimizerSpec(
        "adagrad",
        torch.optim.Adagrad,
        "accumulated squared gradients: per-parameter LR for sparse features",
        defaults={"lr": 0.01, "eps": 1e-10, "weight_decay": 0.0},
        state_keys=("sum",),
        second_moment="sum",
        has_eps=True,
    )
)
_add(
    OptimizerSpec(
        "adadelta",
        torch.optim.Adadelta,
        "windowed squared gradients with unit correction: no global LR decay",
        defaults={"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
        state_keys=("square_avg", "acc_delta"),
        second_moment="square_avg",
        has_eps=True,
    )
)
_add(
    OptimizerSpec(
        "rmsprop",
        torch.optim.RMSprop,
        "EMA of squared gradients (rho 0.9): non-stationary objectives, RNNs, RL",
        defaults={"lr": 1e-3, "alpha": 0.9, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0},
        state_keys=("square_avg", "momentum_buffer", "grad_avg"),
        second_moment="square_avg",
        has_eps=True,
        has_momentum=True,
    )
)
_add(
    OptimizerSpec(
        "adam",
        torch.optim.Adam,
        "first and second moments with bias correction: the robust default",
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        state_keys=_ADAM_STATE,
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        has_eps=True,
        has_betas=True,
    )
)
_add(
    OptimizerSpec(
        "adamw",
        torch.optim.AdamW,
        "Adam with decoupled weight decay: the transformer standard",
        defaults={"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
        state_keys=_ADAM_STATE,
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        has_eps=True,
        has_betas=True,
    )
)
_add(
    OptimizerSpec(
        "adabelief",
        AdaBelief,
        "second moment of (g - m), the belief in the gradient: smooth, stable steps",
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.0},
        state_keys=("exp_avg", "exp_avg_var", "max_exp_avg_var"),
        first_moment="exp_avg",
        second_moment="exp_avg_var",
        has_eps=True,
        has_betas=True,
    )
)


def spec_for(optimizer: Optimizer) -> OptimizerSpec | None:
    """The registry entry an optimizer instance was built from (or, failing that, the first
    entry with its class); ``None`` for an optimizer the registry does not know."""
    name = getattr(optimizer, "registry_name", None)
    if name in OPTIMIZERS:
        return OPTIMIZERS.get(name)
    for cls in type(optimizer).__mro__:
        for _, spec in OPTIMIZERS.items():
            if spec.optimizer_class is cls:
                return spec
    return None


def _validate_hyperparameters(kwargs: Mapping[str, Any]) -> None:
    for key in ("lr",):
        if key in kwargs and not isinstance(kwargs[key], torch.Tensor):
            check_positive(key, kwargs[key])
    for key in ("eps",):
        if key in kwargs:
            check_positive(key, kwargs[key])
    for key in ("momentum", "weight_decay", "dampening", "lr_decay", "initial_accumulator_value"):
        if key in kwargs:
            check_non_negative(key, kwargs[key])
    for key in ("rho", "alpha"):
        if key in kwargs:
            check_in_range(key, kwargs[key], 0.0, 1.0, high_inclusive=True)
    if "betas" in kwargs:
        check_betas("betas", kwargs["betas"])


def _all_tensors(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [p for group in groups for p in group["params"]]


def _choose_implementation(
    spec: OptimizerSpec, kwargs: dict[str, Any], groups: list[dict[str, Any]], impl: str
) -> None:
    """Prefer torch's fused kernels, then foreach, where the class and the device allow it.

    ``auto`` picks torch's own fused kernels when every parameter is floating point and on a
    device torch has fused kernels for, else foreach. ``fused`` also accepts any other class
    with a ``fused`` option (our AdaBelief: one ``torch.compile``d update, ~10 s to compile on
    first use, so it is opt-in); ``for-loop`` turns both off.
    """
    accepted = set(spec.options())
    if "fused" in kwargs or "foreach" in kwargs or impl == "for-loop":
        if impl == "for-loop":
            for key in ("fused", "foreach"):
                if key in accepted:
                    kwargs.setdefault(key, False)
        return
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    tensors = _all_tensors(groups)
    torch_kernels = spec.optimizer_class.__module__.startswith("torch.")
    fused_ok = (
        "fused" in accepted
        and bool(tensors)
        and all(t.is_floating_point() for t in tensors)
        and (
            not torch_kernels
            or all(t.device.type in _get_fused_kernels_supported_devices() for t in tensors)
        )
        and not kwargs.get("differentiable", False)
    )
    if fused_ok and (impl == "fused" or (impl == "auto" and torch_kernels)):
        kwargs["fused"] = True
    elif impl == "fused":
        raise ValueError(
            f"impl: 'fused' is not available for optimizer {spec.name!r} on these parameters; "
            "allowed: 'auto', 'foreach', 'for-loop'"
        )
    elif "foreach" in accepted and tensors:
        kwargs["foreach"] = True


def build_optimizer(
    name: str,
    model_or_params: nn.Module | ParamsT,
    lr: float | None = None,
    weight_decay: float | None = None,
    *,
    no_decay: bool = True,
    layer_decay: float | None = None,
    impl: str = "auto",
    **options: Any,
) -> Optimizer:
    """Build the optimizer registered as ``name``.

    ``model_or_params`` is a module (split into parameter groups by :func:`param_groups`: no
    weight decay on biases, normalization weights and 1-D parameters unless ``no_decay=False``;
    layer-wise LR decay with ``layer_decay``) or an iterable of parameters / group dicts.
    ``lr`` and ``weight_decay`` default to the entry's defaults; ``options`` are the torch
    class's keyword arguments (validated: an unknown key is an error naming the valid ones).
    A group's ``lr_scale`` multiplies its learning rate. ``impl`` picks torch's ``fused`` or
    ``foreach`` kernels (``auto``: fused where supported, else foreach).
    """
    spec = OPTIMIZERS.get(name)
    check_choice("impl", impl, IMPLEMENTATIONS)
    allowed = spec.options()
    check_unknown_options(
        f"{spec.name} options", options, [k for k in allowed if k not in ("lr", "weight_decay")]
    )
    kwargs: dict[str, Any] = {**spec.defaults, **options}
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    _validate_hyperparameters(kwargs)
    if layer_decay is not None:
        check_in_range(
            "layer_decay", layer_decay, 0.0, 1.0, low_inclusive=False, high_inclusive=True
        )

    if isinstance(model_or_params, nn.Module):
        groups = param_groups(
            model_or_params,
            weight_decay=kwargs.get("weight_decay", 0.0),
            no_decay=no_decay,
            layer_decay=layer_decay,
        )
    else:
        if layer_decay is not None:
            raise ValueError(
                "layer_decay: needs a model (nn.Module), got an iterable of parameters"
            )
        groups = _as_groups(model_or_params)
    base_lr = kwargs.get("lr")
    for group in groups:
        if "lr_scale" in group and "lr" not in group and base_lr is not None:
            group["lr"] = base_lr * group["lr_scale"]
        for key in ("lr", "weight_decay", "eps", "momentum"):
            if key in group:
                _validate_hyperparameters({key: group[key]})
    if not _all_tensors(groups):
        raise ValueError(
            f"model_or_params: got no parameters to optimize for optimizer {spec.name!r}"
        )
    _choose_implementation(spec, kwargs, groups, impl)
    optimizer = spec.build(groups, **kwargs)
    optimizer.registry_name = spec.name  # lets spec_for() tell momentum from plain sgd
    return optimizer


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise ValueError(
            "model_or_params: got a single tensor; allowed: an nn.Module or an iterable of parameters"
        )
    items = list(params)
    if items and isinstance(items[0], dict):
        return [dict(group, params=list(group["params"])) for group in items]
    return [{"params": items}]
