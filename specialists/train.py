"""The one training loop every trained stage uses (generalist, specialists, students, controls).

``fit`` runs epochs of (batches -> loss -> step), evaluates after each epoch, and checkpoints
the whole training state atomically to ``state_path``. Rerunning resumes after the last
completed epoch; because every epoch's randomness comes from generators seeded by
``(seed, epoch)``, a resumed run on the CPU ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Batcher, Dataset, Split
from .io import load_state, save_state

log = logging.getLogger("specialists")


def make_optimizer(model: nn.Module, tcfg) -> torch.optim.Optimizer:
    # no weight decay on biases and norm parameters (standard for CIFAR ResNets)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tcfg.lr)
    return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum, nesterov=tcfg.nesterov and tcfg.momentum > 0)


def lr_factor(step: int, total: int, tcfg, steps_per_epoch: int) -> float:
    """Multiplier of ``tcfg.lr`` at optimizer step ``step`` of ``total``."""
    warm = int(tcfg.warmup_epochs * steps_per_epoch)
    if tcfg.schedule == "onecycle":
        warm = max(warm, int(0.25 * total))
    if step < warm:
        return (step + 1) / warm
    if tcfg.schedule == "constant" or total <= warm:
        return 1.0
    t = (step - warm) / max(1, total - warm)
    if tcfg.schedule == "onecycle":
        return max(0.0, 1.0 - t)  # linear decay to zero after the ramp
    return 0.5 * (1 + math.cos(math.pi * t))


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on the CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def prepare_model(model: nn.Module, device: torch.device, image: bool) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda" and image:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def predict_logits(model: nn.Module, ds: Dataset, split: Split | Batcher, device: torch.device,
                   batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, classes) float32 on the CPU for a whole split, in order, un-augmented."""
    batcher = split if isinstance(split, Batcher) else Batcher(ds, split, device)
    model.eval()
    out = []
    for x, _, _ in batcher.epoch(batch_size, shuffle=False, augment=False):
        if device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


StepFn = Callable[[nn.Module, int, int, tuple], tuple]  # (model, epoch, step, batch) -> (loss, info dict)


def fit(
    model: nn.Module,
    tcfg,
    *,
    device: torch.device,
    state_path,
    batches: Callable[[int], Iterable[tuple]],
    steps_per_epoch: int,
    step_fn: StepFn,
    evaluate: Optional[Callable[[nn.Module], dict]] = None,
    seed: int = 0,
    desc: str = "train",
    extra_state: Optional[dict] = None,
) -> list[dict]:
    """Train ``tcfg.epochs`` epochs, resuming from ``state_path`` when it exists.

    ``batches(epoch)`` yields the epoch's batches (already on ``device``); ``step_fn`` returns
    the loss tensor and a dict of per-step info (e.g. which phase ran) that is summed per epoch.
    Returns the per-epoch history (train loss, info counts, evaluation metrics, seconds).
    """
    opt = make_optimizer(model, tcfg)
    total = tcfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, tcfg, steps_per_epoch))
    history: list[dict] = []
    start = 0
    if state_path is not None and state_path.exists():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
        if start:
            log.info("%s: resuming after epoch %d/%d", desc, start, tcfg.epochs)
    for epoch in range(start, tcfg.epochs):
        torch.manual_seed(seed * 7919 + epoch)  # dropout etc.: same draws when resumed
        model.train()
        t0 = time.perf_counter()
        total_loss, n_steps, info_sum = 0.0, 0, {}
        bar = tqdm(batches(epoch), total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{tcfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=None)
        for step, batch in enumerate(bar):
            with autocast(device):
                loss, info = step_fn(model, epoch, step, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach())
            n_steps += 1
            for k, v in info.items():
                info_sum[k] = info_sum.get(k, 0) + v
        record = {"epoch": epoch + 1, "train_loss": total_loss / max(1, n_steps), "steps": n_steps, **info_sum}
        if evaluate is not None:
            record.update(evaluate(model))
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        shown = " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
        log.info("%s epoch %d/%d %s (%.1fs)", desc, epoch + 1, tcfg.epochs, shown, record["seconds"])
        if state_path is not None:
            save_state(state_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": history, "epoch": epoch + 1, **(extra_state or {}),
            })
    return history
