"""Training recipes on a run's data: a classifier on hard labels, a student from a teacher.

Both build their batches with :func:`~specialists.data.seeded_batches` (device-resident,
seeded by ``(seed, epoch, stream)``) and train through :func:`~specialists.engine.fit.fit`:
resumable from a state file, evaluated on the named splits after every epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..core import metrics
from ..data import EpochBatches, batcher_for, seeded_batches
from ..device import prepare_model
from ..models import is_soft_tree, load_classifier, load_pretrained
from ..rundir import ModelFiles, Run
from ..rundir.io import file_sha256, load_weights, read_json, write_json
from .fit import fit, predict_logits
from .steps import Distill, HardLabels, TreeTargets

log = logging.getLogger("specialists")

STUDENT_STREAM = 1  # epoch_generator stream of the students' batches (the generalist's: 0)


def initial_weights(run: Run, model, from_init: bool = False) -> dict:
    """Load what the config asks a new generalist to start from: ``model.pretrained`` (a
    backbone), then, with ``from_init``, ``generalist.init`` (a whole trained classifier).
    Returns what was loaded, for the generalist's metrics (with each file's sha256)."""
    out = {}
    if run.cfg.model.pretrained:
        out["pretrained"] = {**load_pretrained(model, run.cfg.model.pretrained),
                             "sha256": file_sha256(Path(run.cfg.model.pretrained).expanduser())}
    if from_init and run.cfg.generalist.init:
        out["init"] = {**load_classifier(model, run.cfg.generalist.init),
                       "sha256": file_sha256(Path(run.cfg.generalist.init).expanduser())}
        log.info("generalist.init: started from %s", run.cfg.generalist.init)
    return out


def split_probs(run: Run, model: torch.nn.Module, split: str, batch_size: int = 1024) -> torch.Tensor:
    """``model``'s probabilities (N, C) float32 on the CPU over one split of the run's data."""
    batcher = batcher_for(run.data, run.data.split(split), run.device)
    return torch.softmax(predict_logits(model, batcher, batch_size), 1)


def split_metrics(run: Run, model: torch.nn.Module, splits=("val", "test"), batch_size: int = 1024) -> dict:
    """``{split}_top1``, ``{split}_top5`` and ``{split}_nll`` of ``model`` on the named splits."""
    out = {}
    for name in splits:
        probs, y = split_probs(run, model, name, batch_size), run.data.split(name).y
        out[f"{name}_top1"] = metrics.accuracy(probs, y, 1)
        out[f"{name}_top5"] = metrics.accuracy(probs, y, 5)
        out[f"{name}_nll"] = metrics.nll(probs, y)
    return out


def _evaluator(run: Run, splits, batch_size: int):
    return (lambda m: split_metrics(run, m, splits, batch_size)) if splits else None


def train_classifier(run: Run, model: torch.nn.Module, tcfg, state_path: Path | None, *, seed: int,
                     desc: str, eval_splits=("val", "test"), epoch_offset: int = 0) -> list[dict]:
    """Train ``model`` on the run's training split with hard labels; resumable via ``state_path``.

    ``epoch_offset`` shifts the per-epoch random streams (a fine-tuning control continues the
    generalist's epochs rather than replaying them).
    """
    ds = run.data
    model = prepare_model(model, run.device, ds.is_image)
    sampler = EpochBatches(len(ds.train), tcfg.batch_size)
    batches = seeded_batches(batcher_for(ds, ds.train, run.device), sampler, seed=seed, epoch_offset=epoch_offset)
    return fit(model, tcfg, device=run.device, state_path=state_path, batches=batches,
               steps_per_epoch=sampler.steps, step=HardLabels(tcfg.label_smoothing),
               evaluate=_evaluator(run, eval_splits, tcfg.eval_batch_size), seed=seed, desc=desc,
               sync_bn=run.cfg.train.sync_bn)


def student_batches(run: Run, batch_size: int, seed: int, augment: bool, split=None):
    """``(batches(epoch), steps)``: the seeded, shuffled batches every student and control of a
    run shares (augmented unless ``augment`` is False), of the training split (or ``split``)."""
    split = split or run.data.train
    sampler = EpochBatches(len(split), batch_size)
    batcher = batcher_for(run.data, split, run.device)
    return seeded_batches(batcher, sampler, seed=seed, stream=STUDENT_STREAM, augment=augment), sampler.steps


def train_student(run: Run, model: torch.nn.Module, teacher, state_path: Path | None, *, seed: int, desc: str,
                  eval_splits=("val", "test"), augment: bool | None = None, split=None) -> list[dict]:
    """Distil ``teacher`` into ``model`` with the run's ``student`` and ``distill`` settings; resumable.

    A soft decision tree trains with its own loss (:class:`~specialists.engine.steps.TreeTargets`);
    ``teacher`` None trains a tree on the labels alone (its hard-label control). ``augment``:
    whether the batches are augmented (default: as the teacher needs; a table of
    probabilities cannot follow augmentation). ``split``: what it trains on, if not the
    training split (an API teacher's answered examples)."""
    tcfg, dcfg = run.cfg.student, run.cfg.distill
    model = prepare_model(model, run.device, run.data.is_image)
    augment = (teacher is None or teacher.augment) if augment is None else augment
    batches, steps = student_batches(run, tcfg.batch_size, seed, augment, split)
    if is_soft_tree(model):
        step = TreeTargets(teacher, dcfg.temperature, dcfg.alpha, tcfg.tree, tcfg.label_smoothing)
    else:
        step = Distill(teacher, dcfg.temperature, dcfg.alpha, dcfg.loss, tcfg.label_smoothing)
    return fit(model, tcfg, device=run.device, state_path=state_path, batches=batches, steps_per_epoch=steps,
               step=step, evaluate=_evaluator(run, eval_splits, tcfg.eval_batch_size), seed=seed, desc=desc,
               sync_bn=run.cfg.train.sync_bn)


def train_once(files: ModelFiles, model: torch.nn.Module, train: Callable[[], list[dict]],
               save: Callable[[], None], history: Path | None = None) -> list[dict]:
    """Train into ``files`` unless its model exists (then load it); returns the history.

    The history (``{"history": [...]}``, by default in ``files.history``) and then the weights
    (the completion marker) are written last, so a killed training resumes from its state file.
    """
    history = history or files.history
    if files.weights.exists() and history.exists():
        load_weights(files.weights, model)
        log.info("%s: already trained, skipping", files.dir.name)
        return read_json(history)["history"]
    hist = train()
    write_json(history, {"history": hist})
    save()
    return hist
