"""Parameter groups: no weight decay where decay does harm, layer-wise LR decay, LR scaling.

Weight decay on biases and normalization gains only pulls them towards zero without
regularizing anything (Loshchilov & Hutter 2019; BERT's and timm's recipes exclude them).
Layer-wise LR decay (Clark et al. 2020, ELECTRA; Bao et al. 2022, BEiT) gives layer ``i`` of an
``L``-layer encoder the scale ``layer_decay ** (L + 1 - i)``: embeddings (layer 0) move least,
the head (layer ``L + 1``) at the full rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, TypeAlias

import torch
from torch import nn

from optim_callbacks._compat import norm_base_classes
from optim_callbacks.validation import check_at_least, check_choice, check_positive

__all__ = [
    "ParamsT",
    "global_batch_size",
    "layer_ids",
    "no_decay_parameter_names",
    "param_groups",
    "scale_lr",
]

ParamsT: TypeAlias = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    *norm_base_classes(),  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers?|blocks?|h|stages?)\.(\d+)(?:\.|$)")
_EMBEDDING_HINT = re.compile(
    r"(?:^|\.)(?:embeddings?|embed\w*|patch_embed|pos_embed|cls_token|wte|wpe)(?:\.|$)"
)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def no_decay_parameter_names(model: nn.Module, extra: Iterable[str] = ()) -> set[str]:
    """Names of parameters that should get no weight decay.

    Biases, every parameter of a normalization module, every parameter with fewer than two
    dimensions, the names returned by ``model.no_weight_decay()`` (the timm convention; a name
    also matches everything under it as a prefix) and ``extra``.
    """
    named = dict(model.named_parameters())
    skip: set[str] = set(extra)
    hook = getattr(model, "no_weight_decay", None)
    if callable(hook):
        skip |= set(hook())
    result = {name for name, p in named.items() if p.ndim < 2 or name.endswith(".bias")}
    for module_name, module in model.named_modules():
        if _is_norm(module):
            prefix = f"{module_name}." if module_name else ""
            result |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
    for name in named:
        if any(name == s or name.startswith(s.rstrip(".") + ".") for s in skip):
            result.add(name)
    return result


def layer_ids(model: nn.Module, num_layers: int | None = None) -> tuple[dict[str, int], int]:
    """Map each parameter name to its depth in a transformer encoder.

    Embeddings are layer 0, ``...layer.<i>...`` (also ``layers``, ``blocks``, ``h``) is ``i + 1``,
    everything after the encoder (pooler, head) is ``num_layers + 1``. Returns the map and the
    number of encoder layers found (or given).
    """
    names = [name for name, _ in model.named_parameters()]
    indices = {name: int(m.group(1)) for name in names if (m := _LAYER_INDEX.search(name))}
    found = max(indices.values()) + 1 if indices else 0
    total = found if num_layers is None else num_layers
    ids = {}
    for name in names:
        if name in indices:
            ids[name] = indices[name] + 1
        elif _EMBEDDING_HINT.search(name):
            ids[name] = 0
        else:
            ids[name] = total + 1
    return ids, total


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: bool = True,
    extra_no_decay: Iterable[str] = (),
    layer_decay: float | None = None,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into optimizer groups.

    Each group carries ``params``, ``weight_decay``, ``lr_scale`` (1.0 without layer decay) and
    a readable ``name`` (``decay``, ``no_decay``, ``layer_03.decay``...) that
    ``LearningRateMonitor`` uses as its key suffix. Frozen parameters are left out.
    """
    skip = no_decay_parameter_names(model, extra_no_decay) if no_decay else set()
    depth: dict[str, int] = {}
    total = 0
    if layer_decay is not None:
        depth, total = layer_ids(model, num_layers)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = name not in skip and weight_decay > 0
        layer = depth.get(name, -1)
        key = (layer, decays)
        if key not in groups:
            label = "decay" if decays else "no_decay"
            scale = 1.0
            if layer_decay is not None:
                label = f"layer_{layer:02d}.{label}"
                scale = layer_decay ** (total + 1 - layer)
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": scale,
                "name": label,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def global_batch_size(
    batch_size: int,
    *,
    devices: int = 1,
    num_nodes: int = 1,
    accumulate_grad_batches: int = 1,
) -> int:
    """Samples that contribute to one optimizer step: per-device batch x devices x nodes x
    accumulation steps."""
    for param, value in (
        ("batch_size", batch_size),
        ("devices", devices),
        ("num_nodes", num_nodes),
        ("accumulate_grad_batches", accumulate_grad_batches),
    ):
        check_at_least(param, value, 1)
    return batch_size * devices * num_nodes * accumulate_grad_batches


def scale_lr(
    base_lr: float, global_batch: int, base_batch: int = 256, rule: str = "linear"
) -> float:
    """The LR scaling rule ``lr = base_lr * scale(global_batch / base_batch)``.

    ``linear`` (Goyal et al. 2017, for SGD), ``sqrt`` (Krizhevsky 2014; Hoffer et al. 2017, often
    better for Adam) or ``none``.
    """
    check_positive("base_lr", base_lr)
    check_at_least("global_batch", global_batch, 1)
    check_at_least("base_batch", base_batch, 1)
    check_choice("rule", rule, ("linear", "sqrt", "none"))
    ratio = global_batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr
