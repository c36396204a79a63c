"""Optimizers and the learning-rate schedule of BERT pretraining.

* Weight decay (decoupled) applies to weight matrices and embeddings, not to biases and LayerNorm
  parameters, as in BERT.
* LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning"): Adam's update plus weight
  decay, rescaled per tensor by the trust ratio ||w|| / ||update||; tensors without weight decay
  skip the rescaling, as in the reference implementation.
* Linear warmup to the peak learning rate, then linear decay to 0 at the last step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

BETAS = (0.9, 0.999)
EPS = 1e-6  # BERT's Adam epsilon


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (matrices, embeddings) and not decayed (biases, LayerNorm: all 1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith("bias") or "LayerNorm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "adapt": True},
            {"params": no_decay, "weight_decay": 0.0, "adapt": False}]


class Lamb(Optimizer):
    """LAMB with bias-corrected moments; ``adapt=False`` groups take plain AdamW steps."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = BETAS,
                 eps: float = EPS, weight_decay: float = 0.0, adapt: bool = True) -> None:
        if lr < 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid LAMB hyperparameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=adapt))

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
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1**step)) / (
                    (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                )
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    update.mul_(_trust_ratio(p, update))
                p.add_(update, alpha=-group["lr"])
        return loss


def _trust_ratio(p: Tensor, update: Tensor) -> Tensor:
    w_norm, u_norm = p.norm(), update.norm()
    # A zero norm (zero-initialised tensor, or no update) leaves the step unscaled; no host sync.
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "lamb":
        return Lamb(groups, lr=lr)
    if name == "adamw":
        for group in groups:
            del group["adapt"]
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)
    raise ValueError(f"unknown optimizer {name!r}; use adamw or lamb")


def linear_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Ramp the lr linearly up to the peak over warmup_steps, then down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def retarget_schedule(scheduler: LambdaLR, peak_lr: float) -> None:
    """Give a (loaded) schedule a new peak lr: every group's lr follows at the current step."""
    scheduler.base_lrs = [peak_lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = peak_lr
        group["lr"] = peak_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
