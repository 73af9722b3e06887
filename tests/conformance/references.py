"""The oracles of the conformance matrix: every registry entry's reference implementation, the
shared model and data, and a plain training loop to run either through.

A reference is built from the parameter groups of *our* optimizer (so both see the same groups,
learning rates and weight decays), with each group's options renamed where the reference names
them differently and filtered to what the reference accepts:

- torch's own classes (SGD, Adagrad, Adam, ...): the same class on its for-loop path;
- AdaBelief: ``adabelief-pytorch`` 0.2.1; Lion: ``lion-pytorch`` 0.2.5; LAMB and ADOPT:
  ``pytorch-optimizer`` 4.1.0; schedule-free: ``schedulefree`` 1.4.1; Adafactor: torch's for-loop;
- Muon: ``torch.optim.Muon`` on the ``use_muon`` groups and ``torch.optim.AdamW`` on the rest;
- the user-registered entry (:data:`USER_ENTRY`, ``torch.optim.NAdam``): torch's for-loop.

Not collected by pytest (no ``test_`` prefix); the two-process script imports it too.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief
from lion_pytorch import Lion as ReferenceLion
from pytorch_optimizer import ADOPT as ReferenceADOPT
from pytorch_optimizer import Lamb as ReferenceLamb
from schedulefree import AdamWScheduleFree, SGDScheduleFree
from torch import nn
from torch.optim import Optimizer

from optim_callbacks import OPTIMIZERS, SCHEDULE_FREE, OptimizerSpec, register_optimizer
from tests.lib.tiny import TinyRegressor, regression_data

USER_ENTRY = "user_nadam"  # registered as a user would, to prove the matrix is generic


@contextlib.contextmanager
def user_entry_registered() -> Iterator[None]:
    """Register :data:`USER_ENTRY` (``torch.optim.NAdam``) with the public decorator for the
    duration of the block, then remove it: the registry is global, and other tests list it."""
    added = USER_ENTRY not in OPTIMIZERS
    if added:
        register_optimizer(
            USER_ENTRY,
            description="NAdam registered by a user (conformance matrix)",
            defaults={"lr": 2e-3},
            state_keys=("exp_avg", "exp_avg_sq"),
            first_moment="exp_avg",
            second_moment="exp_avg_sq",
        )(torch.optim.NAdam)
    try:
        yield
    finally:
        if added:
            OPTIMIZERS.unregister(USER_ENTRY)


FEATURES, HIDDEN = 16, 81  # the first layer has 1,296 elements (> 1,024); 81 rows shard unevenly
BATCH, STEPS = 16, 10
SAMPLES = BATCH * STEPS

# Options the matrix gives an entry besides its registry defaults: schedule-free warms up over
# the whole run, so the LR its step applies differs from the group's ``lr``.
OPTIONS: dict[str, dict[str, Any]] = {
    "schedule_free_adamw": {"warmup_steps": 20},
    "schedule_free_sgd": {"warmup_steps": 20},
}

# Our option names -> the reference's.
_RENAMES = {"decoupled_weight_decay": "weight_decouple"}
# Options each reference must get explicitly (its own default differs from ours).
_FIXED: dict[str, dict[str, Any]] = {
    "adabelief": {"print_change_log": False},
}


def entry_names() -> list[str]:
    """Every registry entry, the user's included: the matrix's rows."""
    return sorted({*OPTIMIZERS.names(), USER_ENTRY})


def spec(name: str) -> OptimizerSpec:
    return OPTIMIZERS.get(name)


def schedule_for(name: str) -> str:
    """Schedule-free entries run without a schedule; every other entry under cosine."""
    return "constant" if name in SCHEDULE_FREE else "cosine"


def model(
    name: str = "adam", seed: int = 0, cls: type[TinyRegressor] = TinyRegressor, **kwargs: Any
) -> TinyRegressor:
    """The matrix's model (``cls``, a ``TinyRegressor``) training with entry ``name`` (its
    defaults, :data:`OPTIONS`, and its schedule), with the given initial weights; ``kwargs``
    override ``TinyRegressor``'s."""
    torch.manual_seed(seed)
    shape = {"features": FEATURES, "hidden": HIDDEN, "samples": SAMPLES, "batch_size": BATCH}
    entry = {"optimizer": name, "lr": None, "optimizer_options": OPTIONS.get(name)}
    return cls(**{**shape, **entry, "scheduler": schedule_for(name), **kwargs})


def batches(samples: int = SAMPLES, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = regression_data(samples, FEATURES)
    return [data[i : i + batch] for i in range(0, samples, batch)]


def _class_of(name: str, group: dict[str, Any]) -> type[Optimizer]:
    if name == "muon":
        return torch.optim.Muon if group.get("use_muon") else torch.optim.AdamW
    return {
        "adabelief": ReferenceAdaBelief,
        "lion": ReferenceLion,
        "lamb": ReferenceLamb,
        "adopt": ReferenceADOPT,
        "schedule_free_adamw": AdamWScheduleFree,
        "schedule_free_sgd": SGDScheduleFree,
    }.get(name, spec(name).optimizer_class)


def _accepted(cls: type[Optimizer]) -> set[str]:
    return {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params")}


class Together(Optimizer):
    """Several reference optimizers stepped as one (Muon's matrices plus AdamW's rest)."""

    def __init__(self, parts: list[Optimizer]) -> None:
        params = [p for part in parts for g in part.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.parts = parts
        self.param_groups = [g for part in parts for g in part.param_groups]

    def step(self, closure=None):  # type: ignore[override]
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none)


def reference_group(name: str, group: dict[str, Any]) -> tuple[type[Optimizer], dict[str, Any]]:
    """The reference class for one of our groups, and that group in the reference's words."""
    cls = _class_of(name, group)
    accepted = _accepted(cls)
    options = {_RENAMES.get(k, k): v for k, v in group.items() if k != "params"}
    options = {k: v for k, v in options.items() if k in accepted}
    for flag in ("foreach", "fused"):
        if flag in accepted:
            options[flag] = False if flag == "foreach" else None
    options.update(_FIXED.get(name, {}))
    return cls, {"params": list(group["params"]), **options}


def reference_for(name: str, ours: Optimizer) -> Optimizer:
    """``name``'s reference implementation over the parameters and groups of ``ours``."""
    by_class: dict[type[Optimizer], list[dict[str, Any]]] = {}
    for group in ours.param_groups:
        cls, translated = reference_group(name, group)
        by_class.setdefault(cls, []).append(translated)
    parts = []
    for cls, groups in by_class.items():
        # options that some references keep per instance, not per group (AdaBelief's flags)
        constructor = {k: v for k, v in groups[0].items() if k not in ("params", "lr")}
        parts.append(cls(groups, **constructor))
    return parts[0] if len(parts) == 1 else Together(parts)


def add_groups_like(name: str, reference: Optimizer, groups: list[dict[str, Any]]) -> None:
    """Add our groups ``groups`` (added to our optimizer later) to ``reference``."""
    for group in groups:
        cls, translated = reference_group(name, group)
        if isinstance(reference, Together):
            part = next(p for p in reference.parts if type(p) is cls)
            part.add_param_group(translated)
            reference.param_groups.append(part.param_groups[-1])
        else:
            reference.add_param_group(translated)


def loss_of(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(module(x).float(), y.float())


def train(
    module: nn.Module,
    optimizer: Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_norm: float | None = None,
    autocast: torch.dtype | None = None,
    half: bool = False,
) -> None:
    """The plain loop: forward, backward, optional global-norm clipping, step, schedule."""
    if hasattr(optimizer, "train"):
        optimizer.train()
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        if half:
            batch = (batch[0].half(), batch[1])
        if autocast is not None:
            with torch.autocast("cpu", dtype=autocast):
                loss = loss_of(module, batch)
        else:
            loss = loss_of(module, batch)
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(module.parameters()), max_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    if hasattr(optimizer, "eval"):
        optimizer.eval()


def weights(module: nn.Module) -> torch.Tensor:
    """All parameters as one float64 vector (full tensors of sharded ones)."""
    tensors = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.parameters()]
    return torch.cat([t.detach().double().flatten() for t in tensors])


def fresh_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def iterate_cells(cells: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for name in entry_names():
        for cell in cells:
            yield name, cell
