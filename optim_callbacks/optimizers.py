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
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from optim_callbacks._compat import fused_kernel_devices
from optim_callbacks.algorithms import (
    ADOPT,
    LAMB,
    AdaBelief,
    Adadelta,
    Lion,
    MuonWithAdamW,
    RMSprop,
    ScheduleFreeAdamW,
    ScheduleFreeSGD,
)
from optim_callbacks.algorithms.adafactor import adafactor
from optim_callbacks.algorithms.muon import muon_groups
from optim_callbacks.compiled_update import COMPILED_DEVICES
from optim_callbacks.param_groups import ParamsT, param_groups
from optim_callbacks.registry import Registry
from optim_callbacks.validation import (
    check_betas,
    check_choice,
    check_in_range,
    check_lr,
    check_non_negative,
    check_positive,
    check_unknown_options,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULE_FREE",
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
    second-moment estimate. ``identity`` names the options that tell this entry from other
    entries of the same class (``sgd``, ``momentum`` and ``nesterov`` are all
    ``torch.optim.SGD``): see :meth:`matches`. ``bias_corrected`` says the step is Adam's
    ``lr / (sqrt(v / (1 - beta2^t)) + eps)`` per element, so ``MomentStatistics`` can log step
    sizes (ADOPT's is not). ``reference`` names the paper and the implementation the entry
    matches. ``split_groups(model, groups)``, when set, splits the parameter groups
    :func:`build_optimizer` made from a model further (Muon's matrices from the rest), given
    the options.
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
    identity: tuple[str, ...] = ()
    bias_corrected: bool = True
    reference: str = ""
    split_groups: (
        Callable[[nn.Module, list[dict[str, Any]], dict[str, Any]], list[dict[str, Any]]] | None
    ) = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def adaptive(self) -> bool:
        return self.second_moment is not None

    def build(self, params: Any, **kwargs: Any) -> Optimizer:
        return (self.factory or self.optimizer_class)(params, **kwargs)

    @property
    def built_class(self) -> Callable[..., Optimizer]:
        """What :meth:`build` calls: ``factory`` (e.g. our compiled subclass of the torch
        class) or ``optimizer_class``."""
        return self.factory or self.optimizer_class

    def _parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword options of what :meth:`build` calls (besides ``params``)."""
        built = self.built_class
        signature = inspect.signature(built.__init__ if isinstance(built, type) else built)
        return {
            name: p
            for name, p in signature.parameters.items()
            if name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def options(self) -> list[str]:
        """Keyword options the optimizer accepts (besides ``params``)."""
        return list(self._parameters())

    def matches(self, optimizer: Optimizer) -> bool:
        """Whether ``optimizer`` is one of this entry's: an instance of its class whose
        ``identity`` options are each on (non-zero, true) or off exactly as in the entry's
        defaults (or the constructor's, for an option the entry leaves alone).

        The options are read from the parameter groups, which are what the step uses and what a
        state dict carries (on in any group counts as on), else from ``optimizer.defaults``. No
        attribute of the instance is involved, so the answer survives ``copy.deepcopy``,
        pickling, a state dict loaded into a fresh instance and an optimizer built directly
        with torch: ``torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)`` is
        ``nesterov``'s.
        """
        if not isinstance(optimizer, self.optimizer_class):
            return False
        constructor = self._parameters()
        for name in self.identity:
            default = self.defaults.get(name, getattr(constructor.get(name), "default", None))
            if _option_is_on(optimizer, name) != _is_on(default):
                return False
        return True

    def check_options(
        self,
        *,
        lr: float | None = None,
        weight_decay: float | None = None,
        layer_decay: float | None = None,
        impl: str = "auto",
        **options: Any,
    ) -> None:
        """Refuse, with one ``ValueError`` naming the parameter, what :func:`build_optimizer`
        would refuse for this entry before it sees any parameter: an unknown ``impl``, an option
        the torch class does not take (with the closest name), a non-finite or out-of-range
        ``lr``, ``weight_decay``, ``eps``, ``momentum``, ``betas``, ... (the entry's defaults
        filled in), a ``layer_decay`` outside ``(0, 1]``. ``None`` means the entry's default."""
        check_choice("impl", impl, IMPLEMENTATIONS)
        check_unknown_options(
            f"{self.name} options",
            options,
            [k for k in self.options() if k not in ("lr", "weight_decay")],
        )
        values: dict[str, Any] = {**self.defaults, **options}
        if lr is not None:
            values["lr"] = lr
        if weight_decay is not None:
            values["weight_decay"] = weight_decay
        _check_hyperparameters(values)
        if layer_decay is not None:
            check_in_range(
                "layer_decay", layer_decay, 0.0, 1.0, low_inclusive=False, high_inclusive=True
            )


def _is_on(value: Any) -> bool:
    return bool(value) if value is not None else False


def _option_is_on(optimizer: Optimizer, name: str) -> bool:
    values = [group[name] for group in optimizer.param_groups if name in group]
    if not values:
        values = [optimizer.defaults.get(name)]
    return any(_is_on(v) for v in values)


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
    identity: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    replace: bool = False,
) -> Callable[[type[Optimizer]], type[Optimizer]]:
    """Class decorator that adds a user optimizer to ``OPTIMIZERS``.

    Capability flags left as ``None`` are read from the constructor's keyword names;
    ``identity`` is needed only when several entries share the class (see
    :meth:`OptimizerSpec.matches`)::

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
            identity=identity,
        )
        OPTIMIZERS.register(name, spec, aliases=aliases, replace=replace)
        return cls

    return decorate


def _add(spec: OptimizerSpec, aliases: tuple[str, ...] = ()) -> None:
    OPTIMIZERS.register(spec.name, spec, aliases=aliases)


_SGD_STATE = ("momentum_buffer",)
_SGD_IDENTITY = ("momentum", "nesterov")  # sgd: neither; momentum: momentum only; nesterov: both
_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

_add(
    OptimizerSpec(
        "sgd",
        torch.optim.SGD,
        "plain stochastic gradient descent: simple, generalizes well, LR-sensitive",
        defaults={"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0},
        state_keys=_SGD_STATE,
        has_momentum=True,
        identity=_SGD_IDENTITY,
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
        identity=_SGD_IDENTITY,
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
        identity=_SGD_IDENTITY,
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
        factory=Adadelta,
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
        factory=RMSprop,
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


_add(
    OptimizerSpec(
        "lion",
        Lion,
        "sign of an interpolated momentum: one state tensor, every step exactly lr",
        defaults={"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
        state_keys=("exp_avg",),
        first_moment="exp_avg",
        has_betas=True,
        reference="Chen et al. 2023, 'Symbolic Discovery of Optimization Algorithms'; "
        "lion-pytorch 0.2.5 Lion",
    )
)
_add(
    OptimizerSpec(
        "adafactor",
        torch.optim.Adafactor,
        "factored second moment (row and column means), no first moment: little memory",
        defaults={"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "weight_decay": 0.0},
        state_keys=("row_var", "col_var", "variance"),
        second_moment="variance",
        has_eps=True,
        bias_corrected=False,
        reference="Shazeer & Stern 2018, 'Adafactor: Adaptive Learning Rates with Sublinear "
        "Memory Cost'; torch.optim.Adafactor",
        factory=adafactor,
    )
)
_add(
    OptimizerSpec(
        "lamb",
        LAMB,
        "Adam's direction scaled per layer by ||w|| / ||update||: stable very large batches",
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01},
        state_keys=("exp_avg", "exp_avg_sq"),
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        has_eps=True,
        has_betas=True,
        bias_corrected=False,
        reference="You et al. 2019, 'Large Batch Optimization for Deep Learning'; "
        "pytorch-optimizer 4.1.0 Lamb",
    )
)
_add(
    OptimizerSpec(
        "muon",
        MuonWithAdamW,
        "orthogonalized momentum for hidden matrices (Newton-Schulz), AdamW for the rest",
        defaults={"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95},
        state_keys=("momentum_buffer", "exp_avg", "exp_avg_sq"),
        first_moment="momentum_buffer",
        has_eps=True,  # the AdamW part's; AmpEpsilon leaves the Muon part's (Newton-Schulz) alone
        has_momentum=True,
        reference="Jordan et al. 2024, 'Muon: An optimizer for hidden layers in neural "
        "networks'; torch.optim.Muon for the matrices",
        split_groups=muon_groups,
    )
)
_add(
    OptimizerSpec(
        "adopt",
        ADOPT,
        "Adam normalized by the previous second moment: converges for any beta2",
        defaults={"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6, "weight_decay": 0.0},
        state_keys=("exp_avg", "exp_avg_sq"),
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        has_eps=True,
        has_betas=True,
        bias_corrected=False,
        reference="Taniguchi et al. 2024, 'ADOPT: Modified Adam Can Converge with Any beta2'; "
        "pytorch-optimizer 4.1.0 ADOPT",
    )
)
_add(
    OptimizerSpec(
        "schedule_free_adamw",
        ScheduleFreeAdamW,
        "AdamW without a schedule: evaluates an average of its iterates (train/eval modes)",
        defaults={"lr": 2.5e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        state_keys=("z", "exp_avg_sq"),
        second_moment="exp_avg_sq",
        has_eps=True,
        has_betas=True,
        reference="Defazio et al. 2024, 'The Road Less Scheduled'; schedulefree 1.4.1 "
        "AdamWScheduleFree",
    )
)
_add(
    OptimizerSpec(
        "schedule_free_sgd",
        ScheduleFreeSGD,
        "SGD without a schedule: evaluates an average of its iterates (train/eval modes)",
        defaults={"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0},
        state_keys=("z",),
        has_momentum=True,
        reference="Defazio et al. 2024, 'The Road Less Scheduled'; schedulefree 1.4.1 "
        "SGDScheduleFree",
    )
)

# Entries whose optimizer keeps x (evaluate) and y (train) and needs train()/eval() switching.
SCHEDULE_FREE = ("schedule_free_adamw", "schedule_free_sgd")


def spec_for(optimizer: Optimizer) -> OptimizerSpec | None:
    """The registry entry of an optimizer instance, told from its class and parameter groups
    (:meth:`OptimizerSpec.matches`): of the entries for the nearest class in the optimizer's
    MRO, the first that matches (the first of them when none does, for an option combination
    no entry declares); ``None`` for an optimizer the registry does not know."""
    entries = [spec for _, spec in OPTIMIZERS.items()]
    for cls in type(optimizer).__mro__:
        candidates = [spec for spec in entries if spec.optimizer_class is cls]
        if candidates:
            return next((spec for spec in candidates if spec.matches(optimizer)), candidates[0])
    return None


def _check_hyperparameters(values: Mapping[str, Any]) -> None:
    """The value checks of the torch options the registry's optimizers share."""
    if "lr" in values:
        check_lr(values["lr"])
    if "eps" in values:
        eps = values["eps"]
        if isinstance(eps, tuple | list):  # Adafactor's (eps1, eps2); None means automatic
            for k, value in enumerate(eps):
                if value is not None:
                    check_positive(f"eps[{k}]", value)
        else:
            check_positive("eps", eps)
    for key in ("momentum", "weight_decay", "dampening", "lr_decay", "initial_accumulator_value"):
        if key in values:
            check_non_negative(key, values[key])
    for key in ("rho", "alpha"):
        if key in values:
            check_in_range(key, values[key], 0.0, 1.0, high_inclusive=True)
    if "betas" in values:
        check_betas("betas", values["betas"])


def _all_tensors(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [p for group in groups for p in group["params"]]


# The fused kernels DTensor (FSDP2's sharded parameters) has sharding rules for, in torch 2.13:
# aten._fused_adam_ and aten._fused_adamw_. Other classes take foreach on sharded parameters.
FUSED_ON_SHARDED_PARAMETERS = (torch.optim.Adam, torch.optim.AdamW)


def _choose_implementation(
    spec: OptimizerSpec, kwargs: dict[str, Any], groups: list[dict[str, Any]], impl: str
) -> None:
    """Prefer fused kernels, then foreach, where the class and the device allow it.

    ``auto`` and ``fused`` pick, when every parameter is floating point:

    - torch's own fused kernels (SGD, Adam, AdamW, Adagrad) on a device torch has them for
      (and, for FSDP2's ``DTensor`` parameters, a class in :data:`FUSED_ON_SHARDED_PARAMETERS`);
    - for our classes with a ``fused`` option (AdaBelief, Adadelta, RMSprop, ...), the update
      compiled by :mod:`optim_callbacks.compiled_update` on a device in
      :data:`~optim_callbacks.compiled_update.COMPILED_DEVICES` (sharded parameters included:
      the update is element-wise and runs on local shards);

    else foreach (``auto``) or a ``ValueError`` (``fused``). ``for-loop`` turns both off.

    What each ``impl`` runs:

    - torch's classes (SGD, Adam, AdamW, Adagrad, Muon, ...) and the torch half of Adadelta,
      RMSprop and Adafactor: torch's own ``fused`` kernels, ``foreach`` kernels or single-tensor
      loop;
    - ``fused`` on our element-wise optimizers (Lion, LAMB, ADOPT, AdaBelief, schedule-free)
      and on Adadelta, RMSprop and Adafactor: the optimizer's one per-element rule compiled
      (:mod:`optim_callbacks.compiled_update`);
    - ``foreach`` on Lion, LAMB and ADOPT: that same rule run eagerly (plain torch ops,
      cache-sized slices, small tensors packed into one call); they have no hand-written
      ``torch._foreach_*`` kernels (the sliced eager rule was measured faster:
      ``bench/optimizer_step.py --bert-paths``). It is also what a ``fused`` instance of them
      falls back to when compiling fails. Schedule-free: schedulefree 1.4.1's own operations as
      foreach kernels (bit-identical to it); AdaBelief: its cache-blocked foreach kernels;
    - ``for-loop``: on Lion, LAMB and ADOPT the same rule, eagerly, one tensor at a time; on
      schedule-free and AdaBelief the reference's operations one tensor at a time.
    """
    accepted = set(spec.options())
    if "fused" in kwargs or "foreach" in kwargs or impl == "for-loop":
        if impl == "for-loop":
            for key in ("fused", "foreach"):
                if key in accepted:
                    kwargs.setdefault(key, False)
        return
    tensors = _all_tensors(groups)
    torch_kernels = spec.built_class.__module__.startswith("torch.")
    devices = fused_kernel_devices() if torch_kernels else COMPILED_DEVICES
    fused_ok = (
        "fused" in accepted
        and bool(tensors)
        and all(t.is_floating_point() for t in tensors)
        and all(t.device.type in devices for t in tensors)
        and not any(kwargs.get(flag, False) for flag in ("differentiable", "capturable"))
        and (
            not torch_kernels
            or not any(isinstance(t, DTensor) for t in tensors)
            or issubclass(spec.optimizer_class, FUSED_ON_SHARDED_PARAMETERS)
        )
    )
    if fused_ok and impl in ("fused", "auto"):
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
    class's keyword arguments. Everything is checked by :meth:`OptimizerSpec.check_options`
    first (an unknown key is an error naming the closest valid one).
    A group's ``lr_scale`` multiplies its learning rate. ``impl`` picks the implementation
    (``auto``: fused where supported, else foreach; what ``fused``, ``foreach`` and
    ``for-loop`` run for each kind of entry: see :func:`_choose_implementation`).
    """
    spec = OPTIMIZERS.get(name)
    spec.check_options(
        lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, impl=impl, **options
    )
    kwargs: dict[str, Any] = {**spec.defaults, **options}
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay

    if isinstance(model_or_params, nn.Module):
        groups = param_groups(
            model_or_params,
            weight_decay=kwargs.get("weight_decay", 0.0),
            no_decay=no_decay,
            layer_decay=layer_decay,
        )
        if spec.split_groups is not None:
            groups = spec.split_groups(model_or_params, groups, kwargs)
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
        _check_hyperparameters(
            {k: group[k] for k in ("lr", "weight_decay", "eps", "momentum") if k in group}
        )
    if not _all_tensors(groups):
        raise ValueError(
            f"model_or_params: got no parameters to optimize for optimizer {spec.name!r}"
        )
    _choose_implementation(spec, kwargs, groups, impl)
    return spec.build(groups, **kwargs)


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise ValueError(
            "model_or_params: got a single tensor; allowed: an nn.Module or an iterable of parameters"
        )
    items = list(params)
    if items and isinstance(items[0], dict):
        return [dict(group, params=list(group["params"])) for group in items]
    return [{"params": items}]
