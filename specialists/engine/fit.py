"""The one training loop every trained stage uses (generalist, specialists, students, controls).

``fit`` runs epochs of (batches -> step -> optimizer), evaluates after each epoch, and
checkpoints the whole training state atomically to ``state_path``. Rerunning resumes after the
last completed epoch; because every epoch's randomness comes from generators seeded by
``(seed, epoch)``, a resumed run on the CPU ends with the same weights as an uninterrupted one.

The loss is summed on the device and read once per epoch: ``float(loss)`` every step would
make the host wait for the GPU at every step.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.optim import lr_factor, make_optimizer
from ..data import Batcher
from ..device import autocast, mean_over_ranks, world
from ..errors import SpecialistsError, one_line
from ..rundir.io import load_state, rank0, save_state
from ..rundir.track import model_tracker, write_history_csv

log = logging.getLogger("specialists")

# (model, epoch, step, batch) -> (loss tensor, info dict of per-step counts summed per epoch)
Step = Callable[[nn.Module, int, int, tuple], tuple]


@torch.inference_mode()
def predict_logits(model: nn.Module, batcher: Batcher, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, classes) float32 on the CPU for ``batcher``'s whole split, in order, un-augmented."""
    model.eval()
    out = []
    for x, _ in batcher.iterate(batch_size):
        with autocast(batcher.device):
            out.append(model(x).float().cpu())
    logits = torch.cat(out) if out else torch.zeros(0, 0)
    bad = (~torch.isfinite(logits)).any(1)
    if bad.any():  # every metric and later stage would inherit the NaN
        raise SpecialistsError(f"a model's outputs are NaN or infinity on {int(bad.sum())} of {len(logits)} examples "
                               "(its weights or the inputs' scale overflow)")
    return logits


def _resume(model: nn.Module, opt, sched, state_path, desc: str) -> tuple[list[dict], int] | None:
    """Load ``state_path`` into the model, optimizer and schedule: (history, epochs done).

    A damaged state (checksum, truncation, wrong shapes, missing keys) is one warning line:
    it is deleted, the model is put back to exactly its initial weights and None returned, so
    the model trains from scratch rather than from corrupt state."""
    if state_path is None or not state_path.exists():
        return [], 0
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, epoch = list(state["history"]), int(state["epoch"])
    except (SpecialistsError, KeyError, RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc) if isinstance(exc, SpecialistsError) else f"{state_path}: {type(exc).__name__} {one_line(exc)}"
        log.warning("%s: %s; training from scratch", desc, reason)
        model.load_state_dict(initial)
        rank0(lambda: state_path.unlink(missing_ok=True))
        return None
    return history, epoch


def epoch_rows(history: list[dict], tcfg, steps_per_epoch: int) -> list[dict]:
    """``history.csv``'s rows: each epoch's record with its global step (steps done at its end),
    the schedule's learning rate there and the training samples per second."""
    total, warmup = tcfg.epochs * steps_per_epoch, int(tcfg.warmup_epochs * steps_per_epoch)
    rows = []
    for h in history:
        step = h["epoch"] * steps_per_epoch
        rate = h["steps"] * tcfg.batch_size / h["seconds"] if h.get("seconds") else None
        rows.append({"epoch": h["epoch"], "step": step, "lr": tcfg.lr * lr_factor(step, total, tcfg.schedule, warmup),
                     "samples_per_s": rate, **{k: v for k, v in h.items() if k != "epoch"}})
    return rows


def tracked(row: dict) -> dict:
    """A history row's scalars as tracker tags: ``val_top1`` -> ``val/top1``, ``lr`` -> ``train/lr``."""
    out = {}
    for k, v in row.items():
        if k in ("epoch", "step") or not isinstance(v, (int, float)):
            continue
        head, _, tail = k.partition("_")
        out[f"{head}/{tail}" if head in ("train", "val", "test") and tail else f"train/{k}"] = v
    return out


def _data_parallel(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """``model`` wrapped for data-parallel training when this is one rank of several."""
    if world()[1] == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (replaces the BatchNorm children in place)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fit(
    model: nn.Module,
    tcfg,
    *,
    device: torch.device,
    state_path,
    batches: Callable[[int], Iterable[tuple]],
    steps_per_epoch: int,
    step: Step,
    evaluate: Optional[Callable[[nn.Module], dict]] = None,
    seed: int = 0,
    desc: str = "train",
    sync_bn: bool = False,
) -> list[dict]:
    """Train ``tcfg.epochs`` epochs (a ``TrainConfig`` section), resuming from ``state_path``
    when it exists.

    ``batches(epoch)`` yields the epoch's batches (already on ``device``); ``step`` returns the
    loss tensor and a dict of per-step info (e.g. which phase ran) that is summed per epoch.
    Returns the per-epoch history (train loss, info counts, evaluation metrics, seconds).

    Under torchrun the model trains as ``DistributedDataParallel`` (each rank on its shard of
    every global batch, gradients averaged; ``sync_bn`` converts BatchNorm to SyncBatchNorm),
    every rank evaluates the whole split with the same weights, and rank 0 alone writes.
    """
    total = tcfg.epochs * steps_per_epoch
    warmup = int(tcfg.warmup_epochs * steps_per_epoch)

    def optimizer():
        opt = make_optimizer(model, tcfg.optimizer, tcfg.lr, momentum=tcfg.momentum, nesterov=tcfg.nesterov,
                             weight_decay=tcfg.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, tcfg.schedule, warmup))

    opt, sched = optimizer()
    resumed = _resume(model, opt, sched, state_path, desc)
    if resumed is None:  # damaged state: from scratch, with a fresh optimizer and schedule
        opt, sched = optimizer()
    history, start = resumed or ([], 0)
    if start:
        log.info("%s: resuming after epoch %d/%d", desc, start, tcfg.epochs)
    trained = _data_parallel(model, device, sync_bn)
    tracker, ns = model_tracker(state_path)
    per_step = tracker is not None and tracker.active
    if per_step:
        tracker.start_model(ns, start * steps_per_epoch + 1)
    for epoch in range(start, tcfg.epochs):
        torch.manual_seed(seed * 7919 + epoch)  # dropout etc.: same draws when resumed
        model.train()
        t0 = time.perf_counter()
        # float64 on the device: the same sums as adding the float32 losses on the host
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_steps, info_sum = 0, {}
        bar = tqdm(batches(epoch), total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{tcfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=None)
        for i, batch in enumerate(bar):
            with autocast(device):
                loss, info = step(trained, epoch, i, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            n_steps += 1
            if per_step and n_steps % tracker.cfg.log_every == 0:  # (reading the loss waits for the device)
                tracker.scalars(ns, {"train/step_loss": float(loss.detach()), "train/lr": sched.get_last_lr()[0]},
                                epoch * steps_per_epoch + n_steps)
            for k, v in info.items():
                info_sum[k] = info_sum.get(k, 0) + v
        loss_sum = mean_over_ranks(loss_sum)
        record = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, n_steps), "steps": n_steps, **info_sum}
        if not math.isfinite(record["train_loss"]):  # the weights are now NaN too: keep nothing of this epoch
            raise SpecialistsError(f"{desc}: the training loss became {record['train_loss']} in epoch {epoch + 1} "
                                   "(diverged: lower the learning rate, or check the inputs' scale)")
        if evaluate is not None:
            record.update(evaluate(model))
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        shown = " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
        log.info("%s epoch %d/%d %s (%.1fs)", desc, epoch + 1, tcfg.epochs, shown, record["seconds"])
        if tracker is not None:
            rows = epoch_rows(history, tcfg, steps_per_epoch)
            if tracker.csv:
                write_history_csv(state_path.parent / "history.csv", rows)
            tracker.scalars(ns, tracked(rows[-1]), rows[-1]["step"])
        if state_path is not None:
            save_state(state_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": history, "epoch": epoch + 1,
            })
    return history
