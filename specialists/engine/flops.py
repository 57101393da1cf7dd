"""FLOPs of a run's models, counted on the run's own data (:mod:`specialists.core.cost`).

Two figures are what the reports compare models by:

- **inference FLOPs per example**: a model's (or an ensemble's) forward pass as it runs,
  divided by the examples (:func:`inference_flops`).
- **training compute in generalist-example equivalents**: a model's training FLOPs divided by
  the generalist's FLOPs for one training example (forward, loss and backward:
  :func:`generalist_train_flops`). A model trained for ``s`` samples at ``f`` FLOPs per
  sample costs ``s * f / f_generalist`` (:func:`train_compute`): the generalist's own training
  is its training samples, a whole-network model like it as many, a smaller student fewer.

Training FLOPs per sample are measured on one small un-augmented batch of the training split
(:data:`FLOPS_BATCH` examples), in eval mode and without an optimizer step, so measuring
changes nothing: the FLOPs of the convolutions and matrix products are the same in both modes,
and augmentation, BatchNorm's averages and the optimizer's update are element-wise (0 counted).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..core.cost import flops_per_example, training_flops_per_example
from ..core.losses import hard_loss
from ..data import batcher_for
from ..models import is_soft_tree
from ..rundir import Run
from ..rundir.io import read_json
from .timing import timing_rows

log = logging.getLogger("specialists")

FLOPS_BATCH = 8  # training examples one count runs on (FLOPs per example do not depend on it)


def _loss(model: torch.nn.Module, y: torch.Tensor) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """The loss a model trains with: a soft tree's own (on one-hot targets), else cross-entropy."""
    if is_soft_tree(model):
        targets = torch.nn.functional.one_hot(y, model.num_classes).float()
        return lambda m, x: m(x, targets)
    return lambda m, x: hard_loss(m(x), y)


def training_flops(run: Run, model: torch.nn.Module) -> float:
    """FLOPs of one training step of ``model`` per training example (forward, loss, backward),
    on the first :data:`FLOPS_BATCH` examples of the run's training split."""
    train = run.data.train
    x, y = batcher_for(run.data, train, run.device).batch(torch.arange(min(FLOPS_BATCH, len(train))))[:2]
    was_training = model.training
    model.eval()
    try:
        return training_flops_per_example(model, x, _loss(model, y))
    finally:
        model.train(was_training)


def generalist_train_flops(run: Run, model: torch.nn.Module | None = None) -> float:
    """The generalist's training FLOPs per example: the unit of ``train_compute``. From
    ``generalist/metrics.json`` (``train_flops_per_sample``), else measured now on ``model``
    (or the run's generalist, loaded): a run made before the figure was recorded."""
    if run.generalist.metrics.exists():
        recorded = read_json(run.generalist.metrics).get("train_flops_per_sample")
        if recorded:
            return float(recorded)
    return training_flops(run, model if model is not None else run.load_generalist())


def inference_flops(fn: Callable[[torch.Tensor], object], x: torch.Tensor, batch_size: int | None = None) -> float:
    """FLOPs per example of ``fn`` over the prepared batch ``x`` (in chunks of ``batch_size``),
    without autograd."""
    with torch.inference_mode():
        return flops_per_example(fn, x, batch_size)


def model_inference_flops(run: Run, model: torch.nn.Module) -> float:
    """FLOPs per example of one forward pass of ``model`` on the evaluate stage's timing sample
    of the test split, in its batches (the same rows and, for text, the same padded widths as
    the generalist's and the ensemble's counts, so every model of a run is costed alike)."""
    test = run.data.test
    bs = run.cfg.generalist.eval_batch_size
    x = batcher_for(run.data, test, run.device).batch(timing_rows(len(test), bs * run.cfg.evaluate.timing_batches))[0]
    was_training = model.training
    model.eval()
    try:
        return inference_flops(model, x, bs)
    finally:
        model.train(was_training)


def train_compute(samples: float, flops_per_sample: float | None, unit: float) -> float | None:
    """``samples * flops_per_sample / unit``: training compute in generalist-example
    equivalents (None when the FLOPs per sample are unknown or the unit is 0)."""
    if flops_per_sample is None or not unit:
        return None
    return float(samples) * float(flops_per_sample) / float(unit)


__all__ = ["FLOPS_BATCH", "generalist_train_flops", "inference_flops", "model_inference_flops", "train_compute",
           "training_flops"]
