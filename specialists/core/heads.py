"""A specialist's head and the arithmetic of its training: collapse, dustbin, phases.

A specialist is the generalist's architecture with a head of ``|S| + 1`` outputs: the rows of
S copied from the generalist's head and a last *dustbin* row standing for "any other class".
Its soft targets are the generalist's logits collapsed onto ``S + dustbin`` **before** they
are tempered (:func:`collapse_logits`): summing already-tempered probabilities over the other
classes would inflate the dustbin logit by up to ``(T - 1) * log(#others)``. Training phases
alternate hard labels and soft targets (:func:`is_soft_phase`); afterwards the dustbin logit
is shifted to undo the oversampling of S (:func:`analytic_shift`, :func:`fit_dustbin_shift`).

Models only need a ``head`` (an ``nn.Linear``) and ``features``; nothing here knows the
architecture.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

PHASES = ("alternate", "hard", "soft")  # specialists.phases
PHASE_UNITS = ("epoch", "steps")  # specialists.phase_unit: how long one phase lasts
DUSTBIN_CORRECTIONS = ("calibrated", "analytic", "none")  # specialists.dustbin_correction


def collapse_logits(logits: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Generalist logits (B, C) -> logits over ``S + dustbin`` (B, |S| + 1).

    The dustbin logit is ``logsumexp`` of the other classes' logits, so ``softmax`` of the
    result gives S's probabilities unchanged and the dustbin the summed probability of all
    other classes (at T = 1). Temper *after* this, never before.
    """
    c = logits.shape[1]
    mask = torch.ones(c, dtype=torch.bool, device=logits.device)
    mask[subset] = False
    others = logits[:, mask]
    dust = torch.logsumexp(others, dim=1, keepdim=True) if others.shape[1] else torch.full_like(logits[:, :1], -torch.inf)
    return torch.cat([logits[:, subset], dust], dim=1)


def local_labels(y: torch.Tensor, subset: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Global labels (B,) -> specialist labels: position in S, or ``|S|`` (dustbin) outside S."""
    table = torch.full((num_classes,), len(subset), dtype=torch.long, device=y.device)
    table[subset.to(y.device)] = torch.arange(len(subset), device=y.device)
    return table[y]


def make_specialist(generalist: nn.Module, subset: torch.Tensor, features: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``generalist`` whose head has ``|S| + 1`` outputs.

    Rows for S are the generalist's rows, so at step 0 the specialist ranks the classes of S
    exactly as the generalist does. The dustbin row should give ``logsumexp`` of the other
    classes' logits, which is not linear in the features; we use its best linear fit:
    least squares of ``logsumexp_{j not in S}(z_j)`` on ``features`` (N, F) of training
    examples (ridge-regularized). Without features, the Jensen bound
    ``mean_j z_j + log(#others)`` (exact when the other logits are equal; otherwise low by at
    most ``max - mean``).
    """
    spec = copy.deepcopy(generalist)
    head: nn.Linear = generalist.head
    c = head.out_features
    others = torch.ones(c, dtype=torch.bool)
    others[subset] = False
    w, b = head.weight.detach(), head.bias.detach()
    new = nn.Linear(head.in_features, len(subset) + 1).to(w.device, w.dtype)
    with torch.no_grad():
        new.weight[:-1] = w[subset]
        new.bias[:-1] = b[subset]
        n_o = int(others.sum())
        if n_o == 0:
            new.weight[-1].zero_()
            new.bias[-1] = -30.0
        elif features is None or len(features) < 2:
            new.weight[-1] = w[others].mean(0)
            new.bias[-1] = b[others].mean() + math.log(n_o)
        else:
            h = features.to(w.device, torch.float64)
            target = torch.logsumexp(h @ w[others].double().T + b[others].double(), dim=1)
            design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1)
            ridge = 1e-3 * torch.eye(design.shape[1], dtype=h.dtype, device=h.device)
            ridge[-1, -1] = 0  # do not shrink the intercept
            sol = torch.linalg.solve(design.T @ design + ridge * len(h), design.T @ target)
            new.weight[-1] = sol[:-1].to(w.dtype)
            new.bias[-1] = sol[-1].to(w.dtype)
    spec.head = new
    return spec


def is_soft_phase(k: int, phases: str, soft_share: float) -> bool:
    """Whether phase ``k`` (0-based) is a soft one: ``alternate`` spreads the soft phases
    evenly with share ``soft_share`` and starts with a hard phase."""
    if phases == "hard":
        return False
    if phases == "soft":
        return True
    return math.floor((k + 1) * soft_share + 1e-9) > math.floor(k * soft_share + 1e-9)


def analytic_shift(s: float, f: float) -> float:
    """Logit shift for the dustbin after training on a mix where S has share ``s`` but its
    natural share is ``f``: ``log(s / (1 - s)) + log((1 - f) / f)`` (Hinton sec. 5.2)."""
    return math.log(s / (1 - s)) + math.log((1 - f) / f)


def fit_dustbin_shift(logits: torch.Tensor, labels: torch.Tensor, iters: int = 50) -> float:
    """The scalar ``b`` added to the dustbin (last) logit that minimizes the mean NLL of
    ``labels`` (B,) under ``softmax(logits + b e_last)``; Newton's method on a convex 1-D
    problem, in float64."""
    z = logits.double()
    is_dust = (labels == z.shape[1] - 1).double()
    b = 0.0
    for _ in range(iters):
        zz = z.clone()
        zz[:, -1] += b
        p = torch.softmax(zz, 1)[:, -1]
        grad = float((p - is_dust).mean())
        hess = float((p * (1 - p)).mean())
        if hess < 1e-12:
            break
        step = grad / hess
        b -= max(-5.0, min(5.0, step))  # damped for flat regions
        if abs(step) < 1e-10:
            break
    return b


def add_dustbin_shift(model: nn.Module, shift: float) -> None:
    with torch.no_grad():
        model.head.bias[-1] += shift
