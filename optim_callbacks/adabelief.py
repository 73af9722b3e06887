"""AdaBelief (Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients", https://arxiv.org/abs/2010.07468).

Provisional single-tensor version; the fast foreach / fused paths replace it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["AdaBelief"]


class AdaBelief(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = True,
        rectify: bool = False,
        amsgrad: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            rectify=rectify,
            amsgrad=amsgrad,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_var"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_var"] = torch.zeros_like(p)
                if group["decoupled_weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                elif group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state["step"] += 1
                step = state["step"].item()
                bc1 = 1 - beta1**step
                bc2 = 1 - beta2**step
                exp_avg, exp_avg_var = state["exp_avg"], state["exp_avg_var"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                residual = grad - exp_avg
                exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(group["eps"])
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_var"], exp_avg_var, out=state["max_exp_avg_var"])
                    var = state["max_exp_avg_var"]
                else:
                    var = exp_avg_var
                denom = (var.sqrt() / math.sqrt(bc2)).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-group["lr"] / bc1)
        return loss
