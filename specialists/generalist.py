"""Training a classifier on hard labels: the generalist, and the controls built like it.

``train_classifier`` is the plain supervised loop (shuffled, augmented batches on the device,
cross-entropy with optional label smoothing) used by the generalist stage, the second
generalist of the ensembling control and the longer-training control.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import metrics
from .data import Batcher, epoch_generator, num_batches
from .config import to_dict
from .io import write_json
from .losses import hard_loss
from .run import Run
from .train import fit, predict_logits, prepare_model

log = logging.getLogger("specialists")


def split_metrics(run: Run, model, splits=("val", "test"), batch_size: int = 1024) -> dict:
    """``{split}_top1``, ``{split}_top5`` (and nll) of ``model`` on the named splits."""
    out = {}
    for name in splits:
        split = run.data.split(name)
        probs = torch.softmax(predict_logits(model, run.data, split, run.device, batch_size), 1)
        out[f"{name}_top1"] = metrics.accuracy(probs, split.y, 1)
        out[f"{name}_top5"] = metrics.accuracy(probs, split.y, 5)
        out[f"{name}_nll"] = metrics.nll(probs, split.y)
    return out


def train_classifier(run: Run, model: torch.nn.Module, tcfg, state_path: Path | None, *, seed: int,
                     desc: str, eval_splits=("val", "test"), epoch_offset: int = 0) -> list[dict]:
    """Train ``model`` on the run's training split with hard labels; resumable via ``state_path``.

    ``epoch_offset`` shifts the per-epoch random streams (a fine-tuning control continues the
    generalist's epochs rather than replaying them).
    """
    ds = run.data
    model = prepare_model(model, run.device, ds.is_image)
    batcher = Batcher(ds, ds.train, run.device)
    drop_last = len(ds.train) > tcfg.batch_size  # BatchNorm dislikes a final batch of one
    channels_last = run.device.type == "cuda" and ds.is_image

    def batches(epoch):
        g = epoch_generator(seed, epoch + epoch_offset)
        for x, y, _ in batcher.epoch(tcfg.batch_size, shuffle=True, augment=True, generator=g, drop_last=drop_last):
            yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y

    def step(model, epoch, i, batch):
        x, y = batch
        return hard_loss(model(x), y, tcfg.label_smoothing), {}

    evaluate = (lambda m: split_metrics(run, m, eval_splits, tcfg.eval_batch_size)) if eval_splits else None
    return fit(model, tcfg, device=run.device, state_path=state_path, batches=batches,
               steps_per_epoch=num_batches(len(ds.train), tcfg.batch_size, drop_last), step_fn=step,
               evaluate=evaluate, seed=seed, desc=desc)


def train_generalist(run: Run) -> dict:
    """The generalist stage: ``RUN_DIR/generalist/{model.safetensors, metrics.json, curves.png}``."""
    cfg = run.cfg
    out = run.stage_dir("generalist")
    torch.manual_seed(cfg.seed)  # the initial weights follow the run's seed, not the process's RNG state
    model = run.new_model()
    history = train_classifier(run, model, cfg.generalist, out / "state.pt", seed=cfg.seed, desc="generalist")
    final = split_metrics(run, model, ("val", "test"), cfg.generalist.eval_batch_size)
    n_train = len(run.data.train)
    result = {
        **final,
        "epochs": cfg.generalist.epochs,
        "train_examples": n_train,
        "train_samples": n_train * cfg.generalist.epochs,  # for compute-matched controls
        "steps": sum(h["steps"] for h in history),
        "seconds": sum(h["seconds"] for h in history),
        "history": history,
    }
    run.save_model(out / "model.safetensors", model, model=to_dict(run.cfg.model), num_classes=run.data.num_classes)
    write_json(out / "metrics.json", result)
    from .plots import plot_curves

    plot_curves(history, out / "curves.png", title=f"generalist ({cfg.model.name} on {cfg.data.name})")
    log.info("generalist: test top-1 %.4f, top-5 %.4f", final["test_top1"], final["test_top5"])
    return result
