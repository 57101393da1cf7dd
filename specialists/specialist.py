"""Specialists: one per class subset S, initialized from the generalist, with a dustbin class.

A specialist is the generalist's architecture with a head of ``|S| + 1`` outputs: the rows of
S copied from the generalist's head and a last *dustbin* row standing for "any other class".
Training batches mix examples of S with examples of the other classes (label -> dustbin), and
alternate hard-label phases with soft phases toward the generalist's distribution collapsed
onto ``S + dustbin`` (collapse first, then temper: DESIGN.md section 2). After training the
dustbin logit is shifted to undo the oversampling of S.

Each specialist is an independent job: ``train_one`` needs only the generalist, the subset and
the data, writes only into ``RUN_DIR/specialists/NNN/``, and its ``metrics.json`` (written
last) is its completion marker, so many jobs can share a run directory.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from .data import Batcher, epoch_generator
from .errors import SpecialistsError
from .io import read_json, write_json
from .losses import distillation_loss, hard_loss
from .models import Classifier
from .run import Run
from .train import fit, predict_logits, prepare_model

log = logging.getLogger("specialists")


# --- the model ---------------------------------------------------------------------------
def collapse_logits(logits: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Generalist logits (B, C) -> logits over ``S + dustbin`` (B, |S| + 1).

    The dustbin logit is ``logsumexp`` of the other classes' logits, so ``softmax`` of the
    result gives S's probabilities unchanged and the dustbin the summed probability of all
    other classes (at T = 1). Temper *after* this, never before.
    """
    c = logits.shape[1]
    mask = torch.ones(c, dtype=torch.bool, device=logits.device)
    mask[subset] = False
    others = logits[:, mask]
    dust = torch.logsumexp(others, dim=1, keepdim=True) if others.shape[1] else torch.full_like(logits[:, :1], -torch.inf)
    return torch.cat([logits[:, subset], dust], dim=1)


def local_labels(y: torch.Tensor, subset: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Global labels (B,) -> specialist labels: position in S, or ``|S|`` (dustbin) outside S."""
    table = torch.full((num_classes,), len(subset), dtype=torch.long, device=y.device)
    table[subset.to(y.device)] = torch.arange(len(subset), device=y.device)
    return table[y]


def make_specialist(generalist: Classifier, subset: torch.Tensor, features: torch.Tensor | None = None) -> Classifier:
    """A copy of ``generalist`` whose head has ``|S| + 1`` outputs.

    Rows for S are the generalist's rows, so at step 0 the specialist ranks the classes of S
    exactly as the generalist does. The dustbin row should give ``logsumexp`` of the other
    classes' logits, which is not linear in the features; we use its best linear fit:
    least squares of ``logsumexp_{j not in S}(z_j)`` on ``features`` (N, F) of training
    examples (ridge-regularized). Without features, the Jensen bound
    ``mean_j z_j + log(#others)`` (exact when the other logits are equal; otherwise low by at
    most ``max - mean``).
    """
    spec = copy.deepcopy(generalist)
    head: nn.Linear = generalist.head
    c = head.out_features
    others = torch.ones(c, dtype=torch.bool)
    others[subset] = False
    w, b = head.weight.detach(), head.bias.detach()
    new = nn.Linear(head.in_features, len(subset) + 1).to(w.device, w.dtype)
    with torch.no_grad():
        new.weight[:-1] = w[subset]
        new.bias[:-1] = b[subset]
        n_o = int(others.sum())
        if n_o == 0:
            new.weight[-1].zero_()
            new.bias[-1] = -30.0
        elif features is None or len(features) < 2:
            new.weight[-1] = w[others].mean(0)
            new.bias[-1] = b[others].mean() + math.log(n_o)
        else:
            h = features.to(w.device, torch.float64)
            target = torch.logsumexp(h @ w[others].double().T + b[others].double(), dim=1)
            design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1)
            ridge = 1e-3 * torch.eye(design.shape[1], dtype=h.dtype, device=h.device)
            ridge[-1, -1] = 0  # do not shrink the intercept
            sol = torch.linalg.solve(design.T @ design + ridge * len(h), design.T @ target)
            new.weight[-1] = sol[:-1].to(w.dtype)
            new.bias[-1] = sol[-1].to(w.dtype)
    spec.head = new
    return spec


# --- the schedule ------------------------------------------------------------------------
def is_soft_phase(k: int, phases: str, soft_share: float) -> bool:
    """Whether phase ``k`` (0-based) is a soft one: ``alternate`` spreads the soft phases
    evenly with share ``soft_share`` and starts with a hard phase."""
    if phases == "hard":
        return False
    if phases == "soft":
        return True
    return math.floor((k + 1) * soft_share + 1e-9) > math.floor(k * soft_share + 1e-9)


class MixedBatches:
    """Batches with ``round(B * subset_fraction)`` examples of S and the rest from other classes.

    One epoch is one pass over the subset's training examples in shuffled order; the other
    examples are drawn as a shuffled stream that carries on across batches (reshuffled each
    pass), so over training the specialist sees as many "others" as the mix prescribes.
    """

    def __init__(self, y: torch.Tensor, subset: torch.Tensor, num_classes: int, batch_size: int, fraction: float):
        in_s = torch.zeros(num_classes, dtype=torch.bool)
        in_s[subset] = True
        mask = in_s[y]
        self.pos = torch.nonzero(mask).squeeze(1)
        self.neg = torch.nonzero(~mask).squeeze(1)
        if len(self.pos) == 0:
            raise SpecialistsError("a specialist's subset has no training examples")
        self.n_pos = max(1, min(batch_size - 1, round(batch_size * fraction))) if len(self.neg) else batch_size
        self.n_neg = batch_size - self.n_pos if len(self.neg) else 0
        self.steps = math.ceil(len(self.pos) / self.n_pos)
        # the last batch holds the remaining subset examples plus a full share of others
        self.samples_per_epoch = len(self.pos) + self.steps * self.n_neg

    def epoch(self, g: torch.Generator):
        """Yield index tensors (B,) for one epoch."""
        pos = self.pos[torch.randperm(len(self.pos), generator=g)]
        need = self.steps * self.n_neg
        reps = math.ceil(need / max(1, len(self.neg))) if self.n_neg else 0
        neg = torch.cat([self.neg[torch.randperm(len(self.neg), generator=g)] for _ in range(reps)]) if reps else self.neg[:0]
        for i in range(self.steps):
            p = pos[i * self.n_pos:(i + 1) * self.n_pos]
            n = neg[i * self.n_neg:(i + 1) * self.n_neg]
            yield torch.cat([p, n])


# --- dustbin correction ------------------------------------------------------------------
def analytic_shift(s: float, f: float) -> float:
    """Logit shift for the dustbin after training on a mix where S has share ``s`` but its
    natural share is ``f``: ``log(s / (1 - s)) + log((1 - f) / f)`` (Hinton sec. 5.2)."""
    return math.log(s / (1 - s)) + math.log((1 - f) / f)


def fit_dustbin_shift(logits: torch.Tensor, labels: torch.Tensor, iters: int = 50) -> float:
    """The scalar ``b`` added to the dustbin (last) logit that minimizes the mean NLL of
    ``labels`` (B,) under ``softmax(logits + b e_last)``; Newton's method on a convex 1-D
    problem, in float64."""
    z = logits.double()
    is_dust = (labels == z.shape[1] - 1).double()
    b = 0.0
    for _ in range(iters):
        zz = z.clone()
        zz[:, -1] += b
        p = torch.softmax(zz, 1)[:, -1]
        grad = float((p - is_dust).mean())
        hess = float((p * (1 - p)).mean())
        if hess < 1e-12:
            break
        step = grad / hess
        b -= max(-5.0, min(5.0, step))  # damped for flat regions
        if abs(step) < 1e-10:
            break
    return b


def add_dustbin_shift(model: Classifier, shift: float) -> None:
    with torch.no_grad():
        model.head.bias[-1] += shift


# --- training ----------------------------------------------------------------------------
def _features(model: Classifier, batcher: Batcher, n: int, device) -> torch.Tensor:
    """Generalist features (n, F) of the first ``n`` training examples (un-augmented)."""
    model.eval()
    idx = torch.arange(min(n, batcher.n))
    with torch.inference_mode():
        x, _ = batcher.batch(idx)
        return model.features(x).float()


def train_one(run: Run, sid: int, subset: list[int], generalist: Classifier) -> dict:
    """Train specialist ``sid`` on ``subset``; writes ``specialists/NNN/``. Resumable."""
    cfg, ds, device = run.cfg, run.data, run.device
    scfg = cfg.specialists
    out = run.specialist_dir(sid)
    out.mkdir(parents=True, exist_ok=True)
    S = torch.tensor(sorted(subset), dtype=torch.long)
    C = ds.num_classes
    train = Batcher(ds, ds.train, device)
    mix = MixedBatches(ds.train.y, S, C, scfg.batch_size, scfg.subset_fraction)
    spec = make_specialist(generalist, S.to(device), _features(generalist, train, 2048, device))
    spec = prepare_model(spec, device, ds.is_image)
    generalist.eval()
    S_dev = S.to(device)
    T, kind, alpha = cfg.distill.temperature, cfg.distill.loss, scfg.soft_alpha
    channels_last = device.type == "cuda" and ds.is_image
    seed = cfg.seed * 1000 + 17 + sid

    def batches(epoch):
        g = epoch_generator(seed, epoch)
        for idx in mix.epoch(g):
            x, y = train.batch(idx, augment=True, generator=g)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, local_labels(y, S_dev, C)

    def step(model, epoch, i, batch):
        x, y_local = batch
        k = epoch if scfg.phase_unit == "epoch" else (epoch * mix.steps + i) // scfg.phase_steps
        logits = model(x)
        if is_soft_phase(k, scfg.phases, scfg.soft_share):
            with torch.no_grad():
                teacher = collapse_logits(generalist(x).float(), S_dev)
            loss = distillation_loss(logits, teacher, y_local, T, alpha, kind, scfg.label_smoothing)
            return loss, {"soft_steps": 1}
        return hard_loss(logits, y_local, scfg.label_smoothing), {"hard_steps": 1}

    history = fit(spec, scfg, device=device, state_path=out / "state.pt", batches=batches,
                  steps_per_epoch=mix.steps, step_fn=step, seed=seed, desc=f"specialist {sid:03d} (|S|={len(S)})")

    # --- dustbin correction (undo the oversampling of S) --------------------------------
    f = len(mix.pos) / len(ds.train)
    s = mix.n_pos / (mix.n_pos + mix.n_neg) if mix.n_neg else f
    val_logits = predict_logits(spec, ds, ds.val, device, scfg.eval_batch_size)
    val_local = local_labels(ds.val.y, S, C)
    shift = {"analytic": analytic_shift(s, f) if mix.n_neg else 0.0,
             "calibrated": fit_dustbin_shift(val_logits, val_local) if len(val_local) else 0.0,
             "none": 0.0}[scfg.dustbin_correction]
    add_dustbin_shift(spec, shift)

    metrics = specialist_metrics(run, spec, generalist, S)
    hard = sum(h.get("hard_steps", 0) for h in history)
    soft = sum(h.get("soft_steps", 0) for h in history)
    steps = sum(h["steps"] for h in history)
    result = {
        "id": sid, "classes": S.tolist(), "size": len(S),
        "train_examples_in_subset": len(mix.pos), "natural_share": f, "training_share": s,
        "dustbin_correction": scfg.dustbin_correction, "dustbin_shift": shift,
        "phases": scfg.phases, "hard_steps": hard, "soft_steps": soft, "steps": steps,
        "train_samples": len(history) * mix.samples_per_epoch,  # consumed samples, for the compute-matched control
        "seconds": sum(h["seconds"] for h in history),
        **metrics, "history": history,
    }
    run.save_model(out / "model.safetensors", spec, classes=S.tolist())
    write_json(out / "metrics.json", result)  # written last: the completion marker
    log.info("specialist %03d: subset test top-1 %.4f (generalist %.4f), dustbin shift %+.3f",
             sid, metrics["subset_top1"], metrics["generalist_subset_top1"], shift)
    return result


@torch.inference_mode()
def specialist_metrics(run: Run, spec: Classifier, generalist: Classifier, S: torch.Tensor) -> dict:
    """On the test split: accuracy on S's examples restricted to S's classes (specialist vs
    generalist), and dustbin precision / recall."""
    ds, device = run.data, run.device
    bs = run.cfg.specialists.eval_batch_size
    z_s = predict_logits(spec, ds, ds.test, device, bs)
    z_g = predict_logits(generalist, ds, ds.test, device, bs)
    y = ds.test.y
    local = local_labels(y, S, ds.num_classes)
    in_s = local < len(S)
    n = int(in_s.sum())
    spec_acc = float((z_s[in_s, :-1].argmax(1) == local[in_s]).float().mean()) if n else float("nan")
    gen_acc = float((z_g[in_s][:, S].argmax(1) == local[in_s]).float().mean()) if n else float("nan")
    pred_dust = z_s.argmax(1) == len(S)
    tp = int((pred_dust & ~in_s).sum())
    return {
        "test_examples_in_subset": n,
        "subset_top1": spec_acc,
        "generalist_subset_top1": gen_acc,
        "dustbin_precision": tp / max(1, int(pred_dust.sum())),
        "dustbin_recall": tp / max(1, int((~in_s).sum())),
    }


def load_subsets(run: Run) -> list[dict]:
    path = run.dir / "subsets" / "subsets.json"
    if not path.exists():
        raise SpecialistsError(f"no subsets in {run.dir}: run `specialists find-subsets CONFIG` first")
    return read_json(path)["subsets"]


def train_specialists(run: Run, only: list[int] | None = None) -> dict:
    """The specialist stage: every subset's specialist (or those in ``only``), skipping
    finished ones. Complete when every subset has its ``metrics.json``."""
    subsets = load_subsets(run)
    ids = [s["id"] for s in subsets]
    if only is not None:
        unknown = sorted(set(only) - set(ids))
        if unknown:
            raise SpecialistsError(f"--only names specialist(s) {unknown} but the run has ids {ids[0]}..{ids[-1]}")
    todo = [s for s in subsets if only is None or s["id"] in only]
    generalist = run.load_generalist()
    for s in todo:
        if (run.specialist_dir(s["id"]) / "metrics.json").exists():
            log.info("specialist %03d: already trained, skipping", s["id"])
            continue
        train_one(run, s["id"], s["classes"], generalist)
    done = [i for i in ids if (run.specialist_dir(i) / "metrics.json").exists()]
    return {"complete": len(done) == len(ids), "trained": done}
