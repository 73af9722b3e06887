r"""Muon for hidden matrices, AdamW for everything else, as one optimizer (Jordan et al., 2024,
"Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/).

Muon orthogonalizes each 2-D hidden weight matrix's momentum with a Newton-Schulz iteration
before stepping; it is defined for matrices only, so the standard recipe trains embeddings,
the classification head, biases and normalization weights with AdamW. :class:`MuonWithAdamW`
is that split in one ``torch.optim.Optimizer`` (Lightning sees one optimizer, one state dict,
one LR schedule for both parts): parameter groups with ``use_muon=True`` step with
:func:`optim_callbacks.distributed_muon.muon_step` (the operations of ``torch.optim.Muon``: the
tests check the matrix part equals it bit for bit; under FSDP2 and DDP it orthogonalizes each
matrix on one rank), the others with ``torch.optim.AdamW``.

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

from optim_callbacks._compat import fused_kernel_devices
from optim_callbacks.distributed_muon import NS_COEFFICIENTS, NS_EPS, NS_STEPS, muon_step
from optim_callbacks.validation import check_lr, check_non_negative

__all__ = ["HEAD_NAMES", "MuonWithAdamW", "muon_groups"]

ADAMW_LR = 3e-4  # the AdamW part's default learning rate
ADAMW_WEIGHT_DECAY = 0.0  # and weight decay

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
    ``adamw_lr`` (from ``options``, else the class default), a Muon part's scales ``lr``. The
    registry gives a decay group Muon's ``weight_decay``; its AdamW part gets
    ``adamw_weight_decay`` instead (no-decay groups stay at 0)."""
    muon = {id(p) for name, p in model.named_parameters() if name in muon_parameter_names(model)}
    adamw_lr = options.get("adamw_lr", ADAMW_LR)
    adamw_weight_decay = options.get("adamw_weight_decay", ADAMW_WEIGHT_DECAY)
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
            if not flag and part.get("weight_decay"):
                part["weight_decay"] = adamw_weight_decay
            out.append(part)
    return out


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (:func:`~optim_callbacks.distributed_muon.muon_step`, the operations of
    ``torch.optim.Muon``) on groups with ``use_muon=True``, ``torch.optim.AdamW`` on the rest.

    Args:
        params: parameter groups with ``use_muon`` flags, or parameters or groups without
            flags (then their 2-D parameters go to Muon, the others to AdamW).
        lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn: the Muon part's options,
            as ``torch.optim.Muon`` (``lr`` 0.02 as Jordan et al.'s reference).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part's.
        foreach, fused: the AdamW part's kernels (``torch.optim.AdamW``'s options; ``None``:
            foreach unless ``fused``). With ``fused=True`` every parameter, the matrices too, must
            be a floating-point tensor on a device with fused kernels, as torch requires.
        split_across_ranks: with ``torch.distributed`` running several ranks and plain (DDP)
            parameters, each rank orthogonalizes its share of the matrices and gathers the rest
            (``False``: every rank orthogonalizes every matrix). FSDP2's sharded matrices are
            always gathered whole to one owner rank each (see
            :mod:`optim_callbacks.distributed_muon`).

    A group's ``lr`` and ``weight_decay`` win over these, so the registry's no-decay groups and
    ``lr_scale`` work for both parts; an LR schedule scales every group, so it scales both.
    :meth:`add_param_group` (an unfreezing callback's) routes a new group the same way: by its
    ``use_muon``, else its 2-D parameters to Muon and the others to AdamW (a mixed group
    becomes two groups), each filled with its part's options.
    State: ``momentum_buffer`` for Muon's matrices, AdamW's ``exp_avg``/``exp_avg_sq``/``step``.
    ``orthogonalized``: how many matrices this rank ran Newton-Schulz on in the last step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float = ADAMW_LR,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = ADAMW_WEIGHT_DECAY,
        foreach: bool | None = None,
        fused: bool | None = None,
        split_across_ranks: bool = True,
    ) -> None:
        check_lr(lr)
        check_lr(adamw_lr, "adamw_lr")
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("adamw_weight_decay", adamw_weight_decay)
        if fused and foreach:
            raise ValueError("fused: cannot be True together with foreach=True; allowed: one")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            foreach=foreach,
            fused=fused,
            split_across_ranks=split_across_ranks,
        )
        self.orthogonalized = 0
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        super().__init__(groups, defaults)

    def _part_defaults(self, use_muon: bool) -> dict[str, Any]:
        """The options a new Muon or AdamW group gets where it sets none."""
        d = self.defaults
        if use_muon:
            return {
                **{key: d[key] for key in ("lr", "weight_decay", "momentum", "nesterov")},
                "ns_coefficients": NS_COEFFICIENTS,
                "eps": NS_EPS,
                "ns_steps": d["ns_steps"],
                "adjust_lr_fn": d["adjust_lr_fn"],
            }
        fused = bool(d["fused"])
        return {
            # the AdamW part's lr, betas, eps and weight_decay are the adamw_* options
            **{key: d[f"adamw_{key}"] for key in ("lr", "betas", "eps", "weight_decay")},
            "fused": fused,
            "foreach": d["foreach"] if d["foreach"] is not None else not fused,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add ``param_group`` to the Muon part (``use_muon=True``), the AdamW part
        (``use_muon=False``) or, without the flag, split: 2-D parameters to Muon, the rest to
        AdamW. Each part is a group of this optimizer (in its state dict) that steps from now
        on, with this optimizer's options for that part where the group sets none."""
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "params: got a set; allowed: a sequence of tensors (a set's order changes "
                "between runs)"
            )
        params = list(params)
        names = param_group.get("param_names")
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params: got a {type(p).__name__}; allowed: tensors")
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("params: can't optimize a non-leaf Tensor")
            if id(p) in seen:
                raise ValueError("params: some parameters appear in more than one parameter group")
        if "use_muon" in param_group:
            parts = {bool(param_group["use_muon"]): list(range(len(params)))}
        else:  # no flag: its 2-D parameters to Muon, the others to AdamW (the empty part dropped)
            split = {
                f: [i for i, p in enumerate(params) if (p.ndim == 2) is f] for f in (True, False)
            }
            parts = {flag: chosen for flag, chosen in split.items() if chosen}
        for flag, chosen in parts.items():
            part = dict(param_group, params=[params[i] for i in chosen], use_muon=flag)
            if names is not None:
                part["param_names"] = [names[i] for i in chosen]
            if flag:
                for p in part["params"]:
                    if p.ndim != 2:
                        raise ValueError(
                            f"use_muon: got True for a parameter of shape {tuple(p.shape)}; "
                            "allowed: 2-D matrices only (use_muon=False for the others)"
                        )
            for key, value in self._part_defaults(flag).items():
                part.setdefault(key, value)
            self.param_groups.append(part)
        self._link()

    def _link(self) -> None:
        """The inner ``torch.optim.AdamW`` over this optimizer's own AdamW group dicts (which
        hold every option, so torch's constructor defaults fill nothing that matters) and
        state."""
        adamw = [g for g in self.param_groups if not g["use_muon"]]
        self._adamw: torch.optim.Optimizer | None = None
        if adamw:
            part = torch.optim.AdamW(adamw, foreach=adamw[0]["foreach"], fused=adamw[0]["fused"])
            part.param_groups, part.state = adamw, self.state
            self._adamw = part

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()  # torch replaced the group dicts and the state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("orthogonalized", 0)
        self._link()

    def _check_fused(self, groups: list[dict[str, Any]]) -> None:
        """``fused=True``: torch's own check (and wording) for the Muon part's matrices too."""
        devices = list(fused_kernel_devices())
        for group in groups:
            for p in group["params"]:
                if p.grad is not None and not (
                    p.device.type in devices and torch.is_floating_point(p)
                ):
                    raise RuntimeError(
                        "`fused=True` requires all the params to be floating point Tensors of "
                        f"supported devices: {devices} but {p.dtype} and {p.device.type}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of both parts; ``closure`` re-evaluates the loss (optional). Collective
        when ``torch.distributed`` runs several ranks (see ``split_across_ranks``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon = [g for g in self.param_groups if g["use_muon"]]
        if self.defaults.get("fused"):
            self._check_fused(muon)
        self.orthogonalized = muon_step(
            muon, self.state, split_across_ranks=self.defaults.get("split_across_ranks", True)
        )
        if self._adamw is not None:
            self._adamw.step()
        return loss
