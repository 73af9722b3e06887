r"""Muon for hidden matrices, AdamW for everything else, as one optimizer (Jordan et al., 2024,
"Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/).

Muon orthogonalizes each 2-D hidden weight matrix's momentum with a Newton-Schulz iteration
before stepping; it is defined for matrices only, so the standard recipe trains embeddings,
the classification head, biases and normalization weights with AdamW. :class:`MuonWithAdamW`
is that split in one ``torch.optim.Optimizer`` (Lightning sees one optimizer, one state dict,
one LR schedule for both parts): parameter groups with ``use_muon=True`` step with
``torch.optim.Muon`` (torch's own implementation: the tests check the matrix part equals it
bit for bit), the others with ``torch.optim.AdamW``.

The split (:func:`muon_groups`, what ``build_optimizer("muon", model)`` uses): a parameter goes
to Muon when it is the 2-D ``weight`` of an ``nn.Linear`` whose name has no component in
:data:`HEAD_NAMES` (``classifier``, ``head``, ``lm_head``, ``fc``, ``score``); embeddings,
convolutions, the head, biases and norms go to AdamW. Override it by passing parameter groups
with your own ``use_muon`` flags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from optim_callbacks.validation import check_lr, check_non_negative

__all__ = ["HEAD_NAMES", "MuonWithAdamW", "muon_groups"]

ADAMW_LR = 3e-4  # the AdamW part's default learning rate

# Name components of output layers, which the standard split trains with AdamW.
HEAD_NAMES = frozenset({"classifier", "head", "lm_head", "fc", "score"})


def muon_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters the standard split gives to Muon (see the module docstring)."""
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.ndim != 2:
            continue
        if HEAD_NAMES & set(module_name.split(".")):
            continue
        names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def muon_groups(
    model: nn.Module, groups: list[dict[str, Any]], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """``groups`` (the registry's decay / no-decay / layer-decay groups of ``model``) split in
    two by the standard Muon split, each part flagged ``use_muon``; a group that already has
    ``use_muon`` is kept as it is. An AdamW part's ``lr_scale`` (layer decay) scales
    ``adamw_lr`` (from ``options``, else the class default), a Muon part's scales ``lr``."""
    muon = {id(p) for name, p in model.named_parameters() if name in muon_parameter_names(model)}
    adamw_lr = options.get("adamw_lr", ADAMW_LR)
    out = []
    for group in groups:
        if "use_muon" in group:
            out.append(group)
            continue
        for flag in (True, False):
            params = [p for p in group["params"] if (id(p) in muon) is flag]
            if not params:
                continue
            part = {**group, "params": params, "use_muon": flag}
            if not flag and "lr_scale" in part and "lr" not in part:
                part["lr"] = adamw_lr * part["lr_scale"]
            out.append(part)
    return out


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on groups with ``use_muon=True``, ``torch.optim.AdamW`` on the rest.

    Args:
        params: parameter groups with ``use_muon`` flags, or parameters or groups without
            flags (then their 2-D parameters go to Muon, the others to AdamW).
        lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn: the Muon part's options,
            as ``torch.optim.Muon`` (``lr`` 0.02 as Jordan et al.'s reference).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part's.

    A group's ``lr`` and ``weight_decay`` win over these, so the registry's no-decay groups and
    ``lr_scale`` work for both parts; an LR schedule scales every group, so it scales both.
    State: ``momentum_buffer`` for Muon's matrices, AdamW's ``exp_avg``/``exp_avg_sq``/``step``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float = ADAMW_LR,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        check_lr(lr)
        check_lr(adamw_lr, "adamw_lr")
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("adamw_weight_decay", adamw_weight_decay)
        muon_defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        adamw_defaults = dict(
            lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay
        )
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        split = []
        for group in groups:
            if "use_muon" in group:
                parts = [dict(group, params=list(group["params"]))]
            else:  # no flag: its 2-D parameters to Muon, the others to AdamW
                members = list(group["params"])
                parts = [
                    dict(group, params=chosen, use_muon=flag)
                    for flag in (True, False)
                    if (chosen := [p for p in members if (p.ndim == 2) is flag])
                ]
            for part in parts:
                for key, value in (muon_defaults if part["use_muon"] else adamw_defaults).items():
                    part.setdefault(key, value)
                split.append(part)
        super().__init__(split, {"lr": lr, "use_muon": True})
        self._link()

    def _link(self) -> None:
        """Inner torch optimizers over this optimizer's own group dicts (which hold every
        option, so torch's constructor defaults fill nothing that matters) and state."""
        muon = [g for g in self.param_groups if g["use_muon"]]
        adamw = [g for g in self.param_groups if not g["use_muon"]]
        self._parts: list[torch.optim.Optimizer] = []
        if muon:
            part = torch.optim.Muon(muon)
            part.param_groups, part.state = muon, self.state
            self._parts.append(part)
        if adamw:
            part = torch.optim.AdamW(adamw, foreach=True)
            part.param_groups, part.state = adamw, self.state
            self._parts.append(part)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()  # torch replaced the group dicts and the state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of both parts; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self._parts:
            part.step()
        return loss
