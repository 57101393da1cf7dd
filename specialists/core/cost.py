"""Inference and training cost, counted rather than timed: FLOPs of code as it actually runs.

:func:`count_flops` runs a callable under ``torch.utils.flop_counter.FlopCounterMode`` and
returns the floating-point operations it executed (a multiply-add counts 2, as PyTorch
counts them). The count is deterministic and machine-independent: it follows the operators
dispatched, so a routed ensemble is charged only for the specialists' rows it actually ran.
Operators PyTorch has no formula for (element-wise ops, pooling, softmax) count 0; on the
models here they are a small share next to the matrix products and convolutions.

Also here, because they are cost arithmetic: a training step's FLOPs per example
(:func:`training_flops_per_example`, the unit of "generalist-example equivalents"), a routed
ensemble's mean FLOPs per example from its parts (:func:`routed_flops`), and the *cascade*
control (:func:`fit_cascade`, :func:`cascade_proba`): a second model consulted only where the
first is unsure, its threshold fitted so that it costs what the routed ensemble costs; and
what the same kind of threshold buys the ensemble itself (:func:`gate_table`, ``combine.gate``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs executed by ``fn(*args, **kwargs)`` (its result is discarded).

    Fused attention kernels are invisible to the counter: an eval-mode
    ``nn.TransformerEncoderLayer`` takes a fast path that counted 0 FLOPs, and CPU
    scaled-dot-product attention hides its two matmuls. While counting, both run their plain
    (math) form, which computes the same thing with counted operations."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def flops_per_example(fn: Callable[[torch.Tensor], object], x: torch.Tensor, batch_size: int | None = None) -> float:
    """FLOPs of ``fn(x)`` divided by the batch size ``len(x)`` (0.0 for an empty batch).

    ``batch_size``: call ``fn`` on chunks of at most this many rows (as inference runs), not
    on all of ``x`` at once; the count per example is the same for per-row models."""
    if not len(x):
        return 0.0
    step = batch_size or len(x)
    return count_flops(lambda: [fn(x[i:i + step]) for i in range(0, len(x), step)]) / len(x)


def training_flops_per_example(model: torch.nn.Module, x: torch.Tensor,
                               loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> float:
    """FLOPs of one training step's forward, loss and backward on the batch ``x``, per example.

    ``loss(model, x)`` returns the scalar loss. The gradients of the trainable parameters are
    computed with ``torch.autograd.grad`` and discarded: no ``.grad`` is touched, no optimizer
    steps, and the model keeps its mode (call it in eval mode so BatchNorm's running averages
    stay as they are: their update costs no counted FLOPs anyway). The optimizer's own update
    is element-wise and counts 0. Runs with gradients on even inside ``torch.inference_mode``.
    """
    n = len(x[0]) if isinstance(x, tuple) else len(x)  # a tuple: a shared trunk's outputs, rows on dim 0
    if not n:
        raise ValueError("x must hold at least one example")
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.inference_mode(False), torch.enable_grad():
            # an inference-mode tensor cannot be saved for backward
            xb = tuple(t.clone() for t in x) if isinstance(x, tuple) else x.clone()
            value = loss(model, xb)
            if params and value.requires_grad:
                torch.autograd.grad(value, params, allow_unused=True)

    return count_flops(step) / n


def routed_flops(generalist_flops: float, specialist_flops: Sequence[float], routed_fractions: Sequence[float]) -> float:
    """Mean FLOPs per example of a routed ensemble from its parts: the generalist on every
    example plus each specialist's FLOPs per example it runs on times the fraction of examples
    routed to it (the combination's element-wise work counts 0)."""
    if len(specialist_flops) != len(routed_fractions):
        raise ValueError(f"specialist_flops ({len(specialist_flops)}) and routed_fractions "
                         f"({len(routed_fractions)}) must have one entry per specialist")
    return float(generalist_flops) + float(sum(f * r for f, r in zip(specialist_flops, routed_fractions)))


# --- the cascade control --------------------------------------------------------------------
def cascade_threshold(max_prob, fraction: float) -> float:
    """The threshold ``t`` whose consulted share ``mean(max_prob < t)`` is closest to ``fraction``.

    ``max_prob``: (N,) the first model's top probability per example, in [0, 1]. Only the
    shares the data allow are reachable (ties move together); of two equally close ones the
    smaller wins, so the cascade never spends more than asked on a tie. ``t`` lies halfway
    between the last consulted value and the next, so it does not sit on a validation value;
    a share of 0 gives ``t = 0`` and a share of 1 a ``t`` above 1 (nothing / everything
    consulted on any split). Compare in float64, as :func:`cascade_proba` does.
    """
    s = np.asarray(max_prob.detach().cpu() if isinstance(max_prob, torch.Tensor) else max_prob, dtype=np.float64)
    if s.ndim != 1 or not len(s):
        raise ValueError(f"max_prob must be a non-empty 1-D array, got shape {s.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    values, counts = np.unique(s, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)])  # below[j]: consulted when the first j values are
    j = int(np.argmin(np.abs(below - fraction * len(s))))  # argmin: the first, smaller, of a tie
    if j == 0:
        return 0.0
    if j == len(values):
        return float(np.nextafter(max(1.0, values[-1]), np.inf))
    return float((values[j - 1] + values[j]) / 2)


def consulted(max_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) bool: the examples a cascade with ``threshold`` hands to its second model."""
    return max_prob.double() < threshold


def fit_cascade(max_prob, first_flops: float, second_flops: float, target_flops: float) -> dict:
    """Fit the cascade's threshold on validation so that its mean FLOPs per example,
    ``first_flops + consulted_fraction * second_flops``, equal ``target_flops``.

    ``max_prob``: (N,) the first model's top probability on the validation split. The wanted
    share is ``(target_flops - first_flops) / second_flops`` clipped to [0, 1] (the cascade
    cannot cost less than its first model nor more than both). Returns ``threshold``,
    ``target_fraction``, the share it consults on these examples (``val_fraction``) and what
    that costs per example (``val_flops``).
    """
    if not second_flops > 0:
        raise ValueError(f"second_flops must be > 0, got {second_flops}")
    target = float(np.clip((target_flops - first_flops) / second_flops, 0.0, 1.0))
    t = cascade_threshold(max_prob, target)
    mp = torch.as_tensor(np.asarray(max_prob.detach().cpu() if isinstance(max_prob, torch.Tensor) else max_prob))
    fraction = float(consulted(mp, t).double().mean())
    return {"threshold": t, "target_fraction": target, "val_fraction": fraction,
            "val_flops": float(first_flops + fraction * second_flops), "target_flops": float(target_flops)}


GATE_SHARES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # the gate table's consulted shares


def gate_table(max_prob, correct_generalist, correct_routed, active, correct_all, generalist_flops: float,
               specialist_flops: Sequence[float], shares: Sequence[float] = GATE_SHARES) -> list[dict]:
    """What a gate (``combine.gate``) buys at each consulted share, on one split (validation).

    ``max_prob`` (N,): the generalist's top probability; ``correct_*`` (N,) bool: the
    generalist, the ungated routed ensemble and the ungated ``all``-routed ensemble right on
    each example; ``active`` (N, M) bool: the ungated routed active sets; FLOPs per example of
    the generalist and of each specialist on a row it runs on. A gated ensemble is the
    ungated one on the consulted rows (``max_prob < threshold``) and the generalist elsewhere
    (the combination is per example). For each share: ``threshold`` (:func:`cascade_threshold`),
    the realized ``share``, and each routing's ``top1`` and ``flops_ratio`` (FLOPs over the
    generalist's: the specialists charged only on consulted rows they are routed to).
    """
    mp = np.asarray(max_prob, dtype=np.float64)
    g, r, a = (np.asarray(v, dtype=bool) for v in (correct_generalist, correct_routed, correct_all))
    act = np.asarray(active, dtype=bool).reshape(len(mp), -1)
    f = np.asarray(specialist_flops, dtype=np.float64)
    rows = []
    for want in shares:
        t = cascade_threshold(mp, want)
        ask = mp < t
        rows.append({"threshold": t, "share": float(ask.mean()),
                     "routed": {"top1": float(np.where(ask, r, g).mean()),
                                "flops_ratio": 1 + float((act & ask[:, None]).mean(0) @ f) / generalist_flops},
                     "all": {"top1": float(np.where(ask, a, g).mean()),
                             "flops_ratio": 1 + float(ask.mean() * f.sum()) / generalist_flops}})
    return rows


def cascade_proba(first: Callable[[torch.Tensor], torch.Tensor], second: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the cascade on a batch: ``first(x)`` (B, C) probabilities on every row; on the rows
    whose top probability is below ``threshold``, ``second`` runs too (on those rows only) and
    the two are averaged. Returns (q (B, C), consulted (B,) bool)."""
    p = first(x)
    ask = consulted(p.max(1).values, threshold)
    rows = torch.nonzero(ask).squeeze(1)
    if len(rows):
        p = p.clone()
        p[rows] = (p[rows] + second(x[rows]).to(p.dtype)) / 2
    return p, ask


__all__ = ["GATE_SHARES", "cascade_proba", "cascade_threshold", "consulted", "count_flops", "fit_cascade",
           "flops_per_example", "gate_table", "routed_flops", "training_flops_per_example"]
