"""Teachers of a student: ``teacher(x, idx) -> logits (B, C)`` for a batch ``x`` of training rows ``idx``.

- :class:`EnsembleTeacher`: the routed ensemble on the same augmented batch the student sees
  (the generalist on every row, each specialist on its routed rows, then ``combine``);
  logits ``log(q)``, so the soft targets are ``softmax(log(q) / T)``.
- :class:`GeneralistTeacher`: the generalist's logits (the *born-again* control).
- :class:`ProbsTeacher`: a black-box table of probabilities, one row per training example;
  a table cannot follow augmentation, so its student trains on un-augmented batches.
- :class:`ApiTeacher`: the same for the answers of an HTTP endpoint
  (:mod:`specialists.engine.teacher_api`), one row per example the student trains on.
"""

from __future__ import annotations

import torch

from ..device import autocast


def ensemble_teacher_logits(ens, x: torch.Tensor) -> torch.Tensor:
    """The routed ensemble on a normalized batch: ``log(q)`` (B, C) float32."""
    return torch.log(ens.proba(x).float())


class Teacher:
    name = "?"
    augment = True  # whether the student's batches are augmented

    def logits(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = self.logits(x, idx)
        return z.clone()  # a normal tensor (inference tensors cannot enter autograd)


class EnsembleTeacher(Teacher):
    name = "ensemble"

    def __init__(self, ens):
        self.ens = ens  # a SpecialistEnsemble

    def logits(self, x, idx):
        return ensemble_teacher_logits(self.ens, x)


class GeneralistTeacher(Teacher):
    name = "generalist"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.eval()
        self.device = device

    def logits(self, x, idx):
        with autocast(self.device):
            return self.model(x).float()


class ProbsTeacher(Teacher):
    """A black-box table; ``rows[i]`` = the probabilities of training-split example i."""

    name = "probs"
    augment = False

    def __init__(self, rows: torch.Tensor):
        self.rows = rows  # (N_train, C) float32 on the device

    def logits(self, x, idx):
        return torch.log(self.rows[idx.to(self.rows.device)])


class ApiTeacher(ProbsTeacher):
    """A black-box HTTP teacher's answers; ``rows[i]`` = those of example i of the split the
    student trains on (the answered training examples, then the answered unlabelled texts)."""

    name = "api"
