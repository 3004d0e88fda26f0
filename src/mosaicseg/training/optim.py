"""Optimisers and learning-rate schedules of the Trainer.

SGD-Nesterov with poly decay (nnU-Net), AdamW, and LAMB with exponential decay (Hermes). LAMB is not in
PyTorch; it is Adam with a per-parameter trust ratio ``‖w‖ / ‖update‖`` (You et al., 2020), written here.
A schedule maps training *progress* in [0, 1] to a learning rate, so one code path serves iteration budgets
(progress = iteration / total) and wall-clock budgets (progress = elapsed / budget).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mosaicseg.config import TrainConfig


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments, decoupled weight decay, update scaled per tensor by ``‖w‖ / ‖update‖``."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # torch's Optimizer signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = cfg.resolved_lr, cfg.resolved_weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=wd)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return Lamb(params, lr=lr, weight_decay=wd)


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` ∈ [0, 1] of the budget."""
    progress = min(max(progress, 0.0), 1.0)
    lr = cfg.resolved_lr
    schedule = cfg.resolved_schedule
    if schedule == "poly":
        return lr * (1.0 - progress) ** 0.9
    if schedule == "exp":
        return lr * cfg.final_lr_ratio**progress
    return lr
