"""The generalist stage: the C-way classifier every later stage builds on.

It starts from the architecture's initialization, from a pretrained backbone
(``model.pretrained``: the head re-initialized when its shape differs), or from a classifier
the user already trained (``generalist.init``; with ``generalist.epochs=0`` it is only
evaluated). Writes ``RUN_DIR/generalist/``: ``model.safetensors``, ``state.pt`` (resume) and
``metrics.json`` (val/test top-1, top-5, NLL, per-epoch history, the training samples the
compute-matched control is sized by, what was loaded from which file, and the FLOPs of one
training example, ``train_flops_per_sample``: the unit every model's ``train_compute`` is
counted in, so the generalist's own ``train_compute`` is its training samples).
"""

from __future__ import annotations

import logging

import torch

from ..engine.flops import training_flops
from ..engine.trainers import initial_weights, split_metrics, train_classifier
from ..rundir import Run, to_dict
from ..rundir.io import write_json

log = logging.getLogger("specialists")


def train(run: Run) -> dict:
    """`specialists train-generalist`: train the generalist, write ``generalist/``."""
    cfg = run.cfg
    files = run.generalist
    files.dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the initial weights follow the run's seed, not the process's RNG state
    model = run.new_model()
    start = initial_weights(run, model, from_init=True)
    history = train_classifier(run, model, cfg.generalist, files.state, seed=cfg.seed, desc="generalist")
    final = split_metrics(run, model, ("val", "test"), cfg.generalist.eval_batch_size)
    n_train = len(run.data.train)
    result = {
        **final,
        "epochs": cfg.generalist.epochs,
        "train_examples": n_train,
        "train_samples": n_train * cfg.generalist.epochs,  # for compute-matched controls
        # FLOPs of one training example (forward, loss, backward): the unit of train_compute
        "train_flops_per_sample": training_flops(run, model),
        "train_compute": float(n_train * cfg.generalist.epochs),  # generalist-example equivalents
        "steps": sum(h["steps"] for h in history),
        "seconds": sum(h["seconds"] for h in history),
        "history": history,
        **start,
    }
    run.save_model(files.weights, model, model=to_dict(cfg.model), num_classes=run.data.num_classes)
    write_json(files.metrics, result)
    log.info("generalist: test top-1 %.4f, top-5 %.4f", final["test_top1"], final["test_top5"])
    return result
