"""Distillation losses (Hinton et al. 2015, section 2).

Teachers are given as *logits* ``z_t`` (B, C). A black-box teacher that only gives
probabilities ``p`` is the same thing with ``z_t = log(p)`` (:func:`log_probs`), since
``softmax(log(p) / T)`` is exactly its soft target; ``log(0) = -inf`` is allowed and gives a
zero target without NaN. All losses are means over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("kl", "mse_logits", "mse_probs")
LOGIT_FLOOR = -30.0  # stands in for log(0) where a loss needs finite teacher logits
UNLABELLED = -100  # the label of an example that has none (a text only a black-box teacher answered)


def log_probs(p: torch.Tensor) -> torch.Tensor:
    """Black-box teacher probabilities (B, C) -> logits whose softmax is ``p`` (zeros -> -inf)."""
    return torch.log(p)


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(z / T)`` (B, C); for a probability teacher pass ``log_probs(p)``."""
    return torch.softmax(teacher_logits.float() / temperature, dim=-1)


def _centered(z: torch.Tensor) -> torch.Tensor:
    z = z.clamp_min(LOGIT_FLOOR)  # -inf from log(0) would poison the mean
    return z - z.mean(dim=-1, keepdim=True)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              kind: str = "kl") -> torch.Tensor:
    """The soft-target loss.

    - ``kl``: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``. The ``T^2`` keeps the gradient
      magnitude roughly constant across temperatures (exactly so only as T grows, where the
      gradient tends to ``(z_s - z_t) / C`` for zero-mean logits).
    - ``mse_logits``: mean squared difference of the zero-meaned logits (the high-temperature
      limit of ``kl``, Hinton sec. 2.1); T does not enter.
    - ``mse_probs``: ``T^2 *`` the summed squared difference of the tempered probabilities.
    """
    T = float(temperature)
    s = student_logits.float()
    t = teacher_logits.float()
    if kind == "kl":
        target = torch.softmax(t / T, dim=-1)
        log_q = F.log_softmax(s / T, dim=-1)
        kl = (torch.xlogy(target, target) - target * log_q).sum(-1)
        return T * T * kl.mean()
    if kind == "mse_logits":
        return (_centered(s) - _centered(t)).pow(2).mean()
    if kind == "mse_probs":
        diff = torch.softmax(s / T, dim=-1) - torch.softmax(t / T, dim=-1)
        return T * T * diff.pow(2).sum(-1).mean()
    raise ValueError(f"unknown distillation loss '{kind}' (known: {', '.join(LOSS_KINDS)})")


def hard_loss(student_logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with the true labels (B,), averaged over the labelled rows (those whose label
    is not ``UNLABELLED``; 0 for a batch without any: no host sync to ask)."""
    total = F.cross_entropy(student_logits.float(), y, ignore_index=UNLABELLED, label_smoothing=label_smoothing,
                            reduction="sum")
    return total / (y != UNLABELLED).sum().clamp_min(1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor | None,
                      temperature: float, alpha: float, kind: str = "kl",
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * soft + (1 - alpha) * CE(z_s, y)``; ``y`` may be None only when ``alpha == 1``."""
    loss = soft_loss(student_logits, teacher_logits, temperature, kind) if alpha > 0 else 0.0
    if alpha < 1:
        if y is None:
            raise ValueError("hard labels are needed when alpha < 1")
        loss = alpha * loss + (1 - alpha) * hard_loss(student_logits, y, label_smoothing)
    return loss
