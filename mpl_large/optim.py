"""The paper's optimizers and schedules (Appendix C.4), and a `Learner` built from an `OptimConfig`."""

from __future__ import annotations

import math

import torch
from timm.optim import Lars, RMSpropTF
from torch import nn

from mpl_large.config import OptimConfig
from mpl_large.learner import Learner


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: biases and normalization scales/shifts (all 1-D) get none,
    as in the paper's reference implementations."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "rmsprop":
        # EfficientNet's TF RMSProp: decay 0.9, epsilon 1e-3, momentum 0.9.
        return RMSpropTF(groups, lr=cfg.lr, alpha=0.9, eps=1e-3, momentum=cfg.momentum)
    # LARS with its default trust coefficient (C.4: "default parameters, momentum 0.9"), adapting every
    # layer as TF's LARSOptimizer does: timm's by default steps groups without weight decay (BN, biases)
    # with the raw lr, unscaled by the trust ratio.
    return Lars(groups, lr=cfg.lr, momentum=cfg.momentum, always_adapt=True)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of `cfg.lr` at a step: 0 for `wait_steps`, then linear warm-up, then constant, cosine or
    exponential decay."""
    if step < cfg.wait_steps:
        return 0.0
    step -= cfg.wait_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = step - cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.total_steps - cfg.wait_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
    if cfg.schedule == "exponential":
        return cfg.decay_rate ** (t // cfg.decay_steps)
    return 1.0


def build_learner(model: nn.Module, cfg: OptimConfig, device: torch.device | str | None = None,
                  autocast: torch.dtype | None = None) -> Learner:
    """A single-process `Learner`: the model (moved to `device` first, so the optimizer's state is created
    there), its optimizer and a step-based schedule; `autocast`: the forwards' autocast dtype (None: off)."""
    if device is not None:
        model = model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return Learner(model, optimizer, scheduler, autocast)
