"""The optimizer and learning-rate schedule every trained stage uses."""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


def make_optimizer(model: nn.Module, name: str, lr: float, *, momentum: float = 0.9, nesterov: bool = True,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD (Nesterov when asked and momentum > 0) or AdamW; no weight decay on biases and
    norm parameters (standard for CIFAR ResNets)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


def lr_factor(step: int, total: int, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` of ``total``.

    A linear warm-up over ``warmup_steps`` (``onecycle``: at least a quarter of training),
    then ``cosine`` decay to zero, a linear decay to zero (``onecycle``) or ``constant``.
    """
    warm = max(warmup_steps, int(0.25 * total)) if schedule == "onecycle" else warmup_steps
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant" or total <= warm:
        return 1.0
    t = (step - warm) / max(1, total - warm)
    if schedule == "onecycle":
        return max(0.0, 1.0 - t)
    return 0.5 * (1 + math.cos(math.pi * t))
