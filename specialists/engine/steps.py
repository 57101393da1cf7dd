"""Training steps: what one batch's loss is, for each kind of model the pipeline trains.

A step is called by :func:`~specialists.engine.fit.fit` as ``step(model, epoch, i, batch)``
with ``batch = (x, y, idx)`` from :func:`~specialists.data.seeded_batches`, and returns the
loss tensor and a dict of per-step counts (summed per epoch into the history).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.heads import collapse_logits, is_soft_phase, local_labels
from ..core.losses import distillation_loss, hard_loss, soft_targets


class HardLabels:
    """Cross-entropy with the true labels: the generalist and its controls."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, epoch: int, i: int, batch: tuple):
        x, y, _ = batch
        return hard_loss(model(x), y, self.label_smoothing), {}


class Distill:
    """``alpha * soft + (1 - alpha) * CE`` toward a teacher's logits on the very batch the
    student sees (``teacher(x, idx)``, see :mod:`specialists.engine.teachers`)."""

    def __init__(self, teacher, temperature: float, alpha: float, kind: str = "kl", label_smoothing: float = 0.0):
        self.teacher = teacher
        self.temperature, self.alpha, self.kind, self.label_smoothing = temperature, alpha, kind, label_smoothing

    def __call__(self, model: nn.Module, epoch: int, i: int, batch: tuple):
        x, y, idx = batch
        z_t = self.teacher(x, idx)
        return distillation_loss(model(x), z_t, y, self.temperature, self.alpha, self.kind, self.label_smoothing), {}


class TreeTargets:
    """A soft decision tree's step: target distributions ``alpha * softmax(z_t / T) + (1 - alpha)
    * onehot(y)`` (labels smoothed by ``label_smoothing``), given to the tree's own loss
    (``model(x, targets, ...)``, see :mod:`specialists.models.soft_tree`). ``teacher`` None:
    labels only (the tree's hard-label control)."""

    def __init__(self, teacher, temperature: float, alpha: float, tree_cfg, label_smoothing: float = 0.0):
        self.teacher, self.temperature = teacher, temperature
        self.alpha = alpha if teacher is not None else 0.0
        self.tree_cfg, self.label_smoothing = tree_cfg, label_smoothing

    def targets(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(B, C) float32 rows on the simplex."""
        s = self.label_smoothing
        t = torch.nn.functional.one_hot(y, num_classes).float() * (1 - s) + s / num_classes
        if self.alpha > 0:
            t = self.alpha * soft_targets(self.teacher(x, idx), self.temperature) + (1 - self.alpha) * t
        return t

    def __call__(self, model: nn.Module, epoch: int, i: int, batch: tuple):
        x, y, idx = batch
        c = self.tree_cfg
        tree = getattr(model, "module", model)  # a DDP wrapper's model
        t = self.targets(x, y, idx, tree.num_classes)
        return model(x, t, loss=c.loss, penalty=c.penalty, window=c.window), {}


class SpecialistPhases:
    """A specialist's step: labels mapped to ``S + dustbin``; hard-label phases, and soft
    phases toward the generalist's logits collapsed onto ``S + dustbin`` (collapse, then
    temper) that keep ``1 - alpha`` of the hard loss.

    ``scfg``: the ``specialists`` config section (phases, soft_share, phase_unit,
    phase_steps, soft_alpha, label_smoothing); ``subset``: S on the device.
    """

    def __init__(self, generalist: nn.Module, subset: torch.Tensor, num_classes: int, scfg, steps_per_epoch: int,
                 temperature: float, kind: str = "kl"):
        self.generalist = generalist.eval()
        self.subset, self.num_classes = subset, num_classes
        self.scfg, self.steps_per_epoch = scfg, steps_per_epoch
        self.temperature, self.kind = temperature, kind

    def phase(self, epoch: int, i: int) -> int:
        """The 0-based phase of step ``i`` of ``epoch``."""
        if self.scfg.phase_unit == "epoch":
            return epoch
        return (epoch * self.steps_per_epoch + i) // self.scfg.phase_steps

    def __call__(self, model: nn.Module, epoch: int, i: int, batch: tuple):
        x, y, _ = batch
        s = self.scfg
        y_local = local_labels(y, self.subset, self.num_classes)
        logits = model(x)
        if is_soft_phase(self.phase(epoch, i), s.phases, s.soft_share):
            with torch.no_grad():
                teacher = collapse_logits(self.generalist(x).float(), self.subset)
            loss = distillation_loss(logits, teacher, y_local, self.temperature, s.soft_alpha, self.kind,
                                     s.label_smoothing)
            return loss, {"soft_steps": 1}
        return hard_loss(logits, y_local, s.label_smoothing), {"hard_steps": 1}
