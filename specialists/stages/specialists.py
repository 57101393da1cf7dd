"""The train-specialists stage: one specialist per class subset S, initialized from the generalist.

A specialist is the generalist's architecture with a head of ``|S| + 1`` outputs (the dustbin
last, :func:`~specialists.core.heads.make_specialist`), trained on half-subset batches
(:class:`~specialists.data.MixedBatches`) with hard-label and soft phases
(:class:`~specialists.engine.steps.SpecialistPhases`); afterwards its dustbin logit is
shifted to undo the oversampling of S (``specialists.dustbin_correction``).

Each specialist is an independent job: :func:`train_one` needs only the generalist, the subset
and the data, writes only into ``RUN_DIR/specialists/NNN/``, and its ``metrics.json`` (written
last) is its completion marker, so many jobs can share a run directory.
"""

from __future__ import annotations

import logging
import weakref

import torch

from ..core.cost import training_flops_per_example
from ..core.heads import add_dustbin_shift, analytic_shift, fit_dustbin_shift, local_labels, make_specialist
from ..core.losses import hard_loss
from ..data import MixedBatches, batcher_for, seeded_batches
from ..device import prepare_model
from ..engine.executors import Job, Progress, as_run, run_jobs
from ..engine.fit import fit, predict_logits
from ..engine.flops import FLOPS_BATCH, inference_flops
from ..engine.steps import SpecialistPhases
from ..engine.trunk import CHUNK, TrunkCache
from ..errors import SpecialistsError
from ..models import Classifier
from ..models.branch import Branched, tail_input
from ..rundir import Run
from ..rundir.io import write_json

log = logging.getLogger("specialists")

FEATURE_EXAMPLES = 2048  # training examples whose generalist features fit the dustbin row
STREAM_CHUNK = 256  # streamed images are read for them this many at a time

# One process trains many specialists on one generalist (this one, or a Ray worker across its
# jobs): what depends only on the generalist (its features for the dustbin row, its test
# logits) or only on the shared trunk (its outputs over the training split) is computed once
# per process, and forgotten with the model it was computed from.
_REUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WORKER_GENERALIST: dict = {}  # a Ray worker's generalist and its split, by file (see _generalist)


def _reused(model: torch.nn.Module, key: tuple, make):
    """``make()``, computed once per ``model`` object and ``key``."""
    per_model = _REUSED.setdefault(model, {})
    if key not in per_model:
        per_model[key] = make()
    return per_model[key]


def _generalist(run: Run) -> tuple[Classifier, tuple | None]:
    """The generalist and (with ``specialists.branch``) its (trunk, part), loaded once per
    process for every job that trains on it (a Ray worker runs many): keyed by the weights
    file's path, size and modification time, and the branch, so a retrained generalist is
    loaded again."""
    st = run.generalist.weights.stat()
    key = (str(run.generalist.weights.resolve()), st.st_size, st.st_mtime_ns, run.cfg.specialists.branch)
    if key not in _WORKER_GENERALIST:
        _WORKER_GENERALIST.clear()  # one generalist held at a time
        generalist = run.load_generalist()
        _WORKER_GENERALIST[key] = (generalist, run.split_generalist(generalist) if run.branch is not None else None)
    return _WORKER_GENERALIST[key]


def _features(model: Classifier, batcher, n: int, chunk: int | None = None) -> torch.Tensor:
    """Generalist features (n, F) of the first ``n`` training examples (un-augmented), in
    chunks of ``chunk`` rows (one batch when None)."""
    model.eval()
    n = min(n, batcher.n)
    chunk = chunk or n
    with torch.inference_mode():
        return torch.cat([model.features(batcher.batch(torch.arange(s, min(s + chunk, n)))[0]).float()
                          for s in range(0, n, chunk)])


def _cached(run: Run) -> bool:
    """Whether a shared-trunk specialist trains on the trunk's outputs computed once per example:
    ``specialists.cache_trunk``, by default when its batches are not augmented."""
    ds, want = run.data, run.cfg.specialists.cache_trunk
    return bool(want) if want is not None else not (ds.is_image and ds.augment != "none")


def _local_loss(subset: torch.Tensor, num_classes: int, y: torch.Tensor):
    y_local = local_labels(y, subset, num_classes)
    return lambda m, x: hard_loss(tail_input(m, x), y_local)


def train_one(run: Run, sid: int, subset: list[int], generalist: Classifier, shared=None) -> dict:
    """Train specialist ``sid`` on ``subset``; writes ``specialists/NNN/``. Resumable.

    With ``specialists.branch=k`` the specialist is the generalist's last k blocks and a new
    head on top of the generalist's frozen trunk (``shared``: ``(trunk, generalist part)`` from
    :meth:`Run.split_generalist`, made once per process); only its tail and head train and are
    saved, with the sha256 of the generalist they were branched from."""
    cfg, ds, device = run.cfg, run.data, run.device
    scfg = cfg.specialists
    files = run.specialist(sid)
    files.dir.mkdir(parents=True, exist_ok=True)
    S = torch.tensor(sorted(subset), dtype=torch.long)
    C = ds.num_classes
    train = batcher_for(ds, ds.train, device)
    mix = MixedBatches(ds.train.y, S, C, scfg.batch_size, scfg.subset_fraction)
    feats = _reused(generalist, ("features", str(run.dir)),
                    lambda: _features(generalist, train, FEATURE_EXAMPLES,
                                      STREAM_CHUNK if ds.storage == "stream" else None))
    seed = cfg.seed * 1000 + 17 + sid
    branch, cached = run.branch, False
    if branch is None:  # the whole network
        spec = prepare_model(make_specialist(generalist, S.to(device), feats), device, ds.is_image)
        model, teacher, source = spec, generalist, train
    else:  # the generalist's tail and a new head, on its frozen trunk
        trunk, part = shared if shared is not None else run.split_generalist(generalist)
        spec = make_specialist(part, S.to(device), feats).to(device)
        cached = _cached(run)
        if cached:  # the trunk once per example: an epoch costs the tail and head alone
            source = _reused(trunk, ("trunk", str(run.dir)),
                             lambda: TrunkCache(trunk, train, STREAM_CHUNK if ds.storage == "stream" else CHUNK))
            model, teacher = spec, part
        else:
            model, teacher, source = Branched(trunk, spec), generalist, train
    step = SpecialistPhases(teacher, S.to(device), C, scfg, mix.steps, cfg.distill.temperature, cfg.distill.loss)
    history = fit(model, scfg, device=device, state_path=files.state, batches=seeded_batches(source, mix, seed=seed),
                  steps_per_epoch=mix.steps, step=step, seed=seed, desc=f"specialist {sid:03d} (|S|={len(S)})",
                  sync_bn=cfg.train.sync_bn)
    samples = len(history) * mix.samples_per_epoch
    flops = _train_flops(run, model, source, S, samples, trunk if cached else None)
    if branch is not None:
        spec = Branched(trunk, spec)  # evaluated on inputs from here on
    # --- dustbin correction (undo the oversampling of S) --------------------------------
    f = len(mix.pos) / len(ds.train)
    s = mix.n_pos / (mix.n_pos + mix.n_neg) if mix.n_neg else f
    val_logits = predict_logits(spec, batcher_for(ds, ds.val, device), scfg.eval_batch_size)
    val_local = local_labels(ds.val.y, S, C)
    shift = {"analytic": analytic_shift(s, f) if mix.n_neg else 0.0,
             "calibrated": fit_dustbin_shift(val_logits, val_local) if len(val_local) else 0.0,
             "none": 0.0}[scfg.dustbin_correction]
    add_dustbin_shift(spec, shift)

    metrics = specialist_metrics(run, spec, generalist, S)
    result = {
        "id": sid, "classes": S.tolist(), "size": len(S),
        "train_examples_in_subset": len(mix.pos), "natural_share": f, "training_share": s,
        "dustbin_correction": scfg.dustbin_correction, "dustbin_shift": shift,
        "phases": scfg.phases,
        "hard_steps": sum(h.get("hard_steps", 0) for h in history),
        "soft_steps": sum(h.get("soft_steps", 0) for h in history),
        "steps": sum(h["steps"] for h in history),
        "train_samples": samples,  # consumed samples; times train_flops_per_sample: the compute-matched control
        "branch": scfg.branch, "cached_trunk": cached,
        # FLOPs of one training sample (forward, loss, backward; a cached trunk's one pass over
        # the split spread over the samples): with train_samples, this specialist's training compute
        "train_flops_per_sample": flops,
        "seconds": sum(h["seconds"] for h in history),
        **metrics, "history": history,
    }
    if branch is None:
        run.save_model(files.weights, spec, classes=S.tolist())
    else:  # its own tensors only: the tail and head
        run.save_model(files.weights, spec.part, classes=S.tolist(), branch=branch,
                       generalist_sha256=run.generalist_sha256())
    write_json(files.metrics, result)  # written last: the completion marker
    log.info("specialist %03d: subset test top-1 %.4f (generalist %.4f), dustbin shift %+.3f",
             sid, metrics["subset_top1"], metrics["generalist_subset_top1"], shift)
    return result


def _train_flops(run: Run, model, source, S: torch.Tensor, samples: int, trunk=None) -> float:
    """FLOPs per training sample of ``model`` on its batches (``source``: inputs, or the cache of
    ``trunk``'s outputs, whose one pass over the split is spread over the ``samples`` trained on)."""
    idx = torch.arange(min(FLOPS_BATCH, source.n))
    x, y = source.batch(idx)[:2]
    was = model.training
    model.eval()
    try:
        per = training_flops_per_example(model, x, _local_loss(S.to(y.device), run.data.num_classes, y))
    finally:
        model.train(was)
    if trunk is not None:
        x0 = batcher_for(run.data, run.data.train, run.device).batch(idx)[0]
        per += inference_flops(trunk, x0) * source.n / max(1, samples)
    return per


@torch.inference_mode()
def specialist_metrics(run: Run, spec: Classifier, generalist: Classifier, S: torch.Tensor) -> dict:
    """On the test split: accuracy on S's examples restricted to S's classes (specialist vs
    generalist), and dustbin precision / recall."""
    ds, device = run.data, run.device
    bs = run.cfg.specialists.eval_batch_size
    test = batcher_for(ds, ds.test, device)
    z_s = predict_logits(spec, test, bs)
    z_g = _reused(generalist, ("test_logits", str(run.dir)), lambda: predict_logits(generalist, test, bs))
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


def _trained(run: Run, sid: int) -> bool:
    files = run.specialist(sid)
    return files.metrics.exists() and files.weights.exists()


def specialist_job(run, sid: int, classes: list[int], blocking: bool = True, generalist=None, shared=None) -> bool:
    """One specialist as an independent job (here, or as a Ray task): trained under its own
    lock unless it is trained already. False when ``blocking`` is off and another process holds
    it."""
    run = as_run(run)
    lock = run.lock(f"specialist-{sid:03d}", f"specialist {sid:03d}")
    if not lock.acquire(blocking):
        log.info("specialist %03d: %s is training it; coming back to it", sid, lock.holder())
        return False
    try:
        if _trained(run, sid):
            log.info("specialist %03d: already trained, skipping", sid)
        else:
            if generalist is None:  # a Ray task: the worker's generalist, loaded by its first job
                generalist, shared = _generalist(run)
            train_one(run, sid, classes, generalist, shared)
        return True
    finally:
        lock.release()


def check_only(run: Run, only: list[int] | None = None) -> None:
    """Refuse ``--only`` ids that are not among the run's subsets."""
    ids = [s["id"] for s in run.load_subsets()]
    unknown = sorted(set(only or ()) - set(ids))
    if unknown:
        raise SpecialistsError(f"--only names specialist(s) {unknown} but the run has ids {ids[0]}..{ids[-1]}")


def train(run: Run, only: list[int] | None = None) -> dict:
    """`specialists train-specialists`: every subset's specialist (or those in ``only``),
    skipping finished ones. Complete (``"complete": True``) when every subset's specialist is.

    Each specialist is a job with its own lock: processes sharing the run directory split the
    jobs between them (a job another process holds is left for later, then waited for, and
    trained only if that process died without finishing it). With ``launch.executor=ray``
    every unfinished specialist is a Ray task.
    """
    check_only(run, only)
    subsets = run.load_subsets()
    ids = [s["id"] for s in subsets]
    todo = [s for s in subsets if (only is None or s["id"] in only) and not _trained(run, s["id"])]
    if run.cfg.launch.executor != "local":
        if todo and run.branch is not None:  # a model that cannot be split there: one line, before any job
            run.split_generalist(run.load_generalist())
        run_jobs([Job(f"specialist {s['id']:03d}", specialist_job, (run, s["id"], s["classes"])) for s in todo],
                 run.cfg.launch, "specialists", run.tracker)
    elif todo:
        generalist = run.load_generalist()  # loaded once for every job of this process
        shared = run.split_generalist(generalist) if run.branch is not None else None
        progress, held = Progress("specialists", len(todo), run.tracker), []
        for s in todo:  # a specialist another process holds is waited for after the others
            if specialist_job(run, s["id"], s["classes"], False, generalist, shared):
                progress.finished(f"specialist {s['id']:03d}")
            else:
                held.append(s)
        for s in held:
            specialist_job(run, s["id"], s["classes"], True, generalist, shared)
            progress.finished(f"specialist {s['id']:03d}")
    done = [i for i in ids if _trained(run, i)]
    return {"complete": len(done) == len(ids), "trained": done}
