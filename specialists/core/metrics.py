"""Accuracy, likelihood, calibration and paired significance, on probability tensors.

``probs`` are (N, C) rows summing to 1, ``y`` (N,) int64 labels. Accuracies are unrounded
fractions in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch


def topk_correct(probs: torch.Tensor, y: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(N,) bool: the true class is among the k most probable."""
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == y[:, None]).any(1)


def accuracy(probs: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    return float(topk_correct(probs, y, k).float().mean()) if len(y) else float("nan")


def nll(probs: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood in nats (probabilities floored at ``eps``)."""
    if not len(y):
        return float("nan")
    p = probs.double().gather(1, y[:, None]).squeeze(1)
    return float(-torch.log(p.clamp_min(eps)).mean())


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins."""
    if not len(y):
        return float("nan")
    conf, pred = probs.double().max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += float(m.double().mean() * (conf[m].mean() - correct[m].mean()).abs())
    return total


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> dict:
    """Exact two-sided McNemar test on paired correctness (N,) bools.

    ``b01``: a wrong, b right; ``b10``: a right, b wrong. p-value from the binomial
    distribution of b01 given b01 + b10 (exact, so valid for small counts too).
    """
    a, b = correct_a.bool(), correct_b.bool()
    b01 = int((~a & b).sum())
    b10 = int((a & ~b).sum())
    n = b01 + b10
    if n == 0:
        return {"a_wrong_b_right": 0, "a_right_b_wrong": 0, "p_value": 1.0}
    k = min(b01, b10)
    # two-sided exact p = 2 * P(X <= k), X ~ Bin(n, 1/2), computed in log space
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    m = max(logs)
    p = min(1.0, 2 * math.exp(m) * sum(math.exp(v - m) for v in logs))
    return {"a_wrong_b_right": b01, "a_right_b_wrong": b10, "p_value": p}


def paired_bootstrap(correct_a: torch.Tensor, correct_b: torch.Tensor, samples: int = 2000, seed: int = 0) -> dict:
    """95% percentile interval of accuracy(b) - accuracy(a) by resampling examples (paired)."""
    a = correct_a.double().numpy()
    b = correct_b.double().numpy()
    diff = b - a
    if samples == 0 or len(diff) == 0:
        return {"diff": float(diff.mean()) if len(diff) else float("nan"), "ci95": None}
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for i in range(0, samples, 256):  # chunks keep memory at 256 x N
        n = min(256, samples - i)
        idx = rng.integers(0, len(diff), size=(n, len(diff)))
        means[i:i + n] = diff[idx].mean(1)
    return {"diff": float(diff.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def summary(probs: torch.Tensor, y: torch.Tensor, ece_bins: int = 15) -> dict:
    """top1, top5, nll, ece of one model on one split."""
    return {"top1": accuracy(probs, y, 1), "top5": accuracy(probs, y, 5), "nll": nll(probs, y),
            "ece": ece(probs, y, ece_bins), "n": int(len(y))}
