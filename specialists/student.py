"""Distilling the ensemble into one student (Hinton et al. 2015, section 4), and its controls.

The routed ensemble serves at ``1 + |A|`` forward passes per example; a student trained to
match it serves at one. ``distill_stage(run)`` trains ``RUN_DIR/student/`` from scratch with
the KD loss ``alpha * T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) CE`` (or the
MSE variants of ``distill.loss``), through the shared resumable ``fit`` loop.

Teachers (``student.teacher``):

- ``ensemble`` (default): on every augmented training batch, in inference mode (bf16 autocast
  on CUDA), the run's generalist runs on the whole batch, each specialist only on the rows
  routed to it (``SpecialistEnsemble.components``), and ``combine`` gives q; the teacher
  logits are ``log(q)``, so the soft targets are ``softmax(log(q) / T)``. About ``1 + |A|``
  teacher forwards per example, on the very batch the student sees.
- ``generalist``: the generalist's logits on the same batch (the *born-again* student).
- ``probs``: a black-box table (N_source, C) of probabilities over the data set's training
  examples in its source order (``student.teacher_probs``, ``.npy``); targets
  ``softmax(log(p) / T)`` on un-augmented batches (a table cannot follow augmentation). The
  file is validated before anything is trained: a wrong shape, NaN/inf, negative entries or
  rows not summing to 1 (within 1e-3) stop the stage with one line naming the first bad row.

Controls (``student.controls`` with the ensemble teacher), each resumable and skipped when its
model exists: the born-again student (same student, same steps, same seed, same batches) in
``student/born_again/``, and a second generalist from seed ``seed + 1`` in
``student/second_generalist/`` whose test probabilities, averaged with the first generalist's,
are the two-generalist ensemble (DESIGN.md "Controls").

Outputs: ``student/model.safetensors`` (loadable by ``specialists.ensemble.Student``),
``student/metrics.json`` (test top-1/top-5/NLL, teacher, agreement with the teacher, train
seconds per epoch, inference seconds per example, ``control`` and ``comparisons``) and
``student/student.md``; the evaluation and ablation reports are re-rendered with the student
and control rows (``specialists.controls``).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import metrics
from .config import student_model_config, to_dict
from .controls import refresh_reports
from .data import Batcher, epoch_generator, num_batches
from .ensemble import SpecialistEnsemble
from .errors import SpecialistsError
from .generalist import split_metrics, train_classifier
from .io import load_weights, read_json, write_json, write_text
from .losses import distillation_loss
from .run import Run
from .train import autocast, fit, predict_logits, prepare_model

log = logging.getLogger("specialists")

PROB_TOLERANCE = 1e-3  # rows of a black-box table must sum to 1 within this
BATCH_STREAM = 1  # epoch_generator stream of the student's batches (the generalist uses 0)
TIMING_REPEATS = 5  # interleaved timing rounds per model (median)
_CHUNK = 65536  # rows of a black-box table checked at a time (the file may be memory-mapped)


# ============================================================================ black-box table
def source_train_size(ds) -> tuple[int, bool]:
    """Rows a black-box table must have: the size of the data set's source training set.

    Returns ``(n, exact)``: ``n = max index + 1`` over the train and val splits. It is exact
    (``exact=True``) unless ``data.max_train`` subsampled the source, in which case examples
    after the last kept one are unseen and ``n`` is only a lower bound.
    """
    idx = [s.index for s in (ds.train, ds.val) if s.index is not None and len(s.index)]
    if not idx:
        return len(ds.train) + len(ds.val), True
    n = int(max(int(i.max()) for i in idx)) + 1
    return n, n == len(ds.train) + len(ds.val)


def load_teacher_probs(path, num_rows: int, num_classes: int, exact_rows: bool = True) -> np.ndarray:
    """Open and validate a black-box teacher table; returns the (memory-mapped) array.

    Refused with one :class:`SpecialistsError` line naming the problem and the first bad row:
    not a 2-D numeric array, wrong shape (rows = ``num_rows``, the source training-set size;
    columns = ``num_classes``), a NaN or infinite entry, a negative entry, or a row whose sum is
    not 1 within ``PROB_TOLERANCE``.
    """
    where = f"student.teacher_probs {path}"
    try:
        table = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        raise SpecialistsError(f"{where}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise SpecialistsError(f"{where}: not a readable .npy array ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(table, np.ndarray):
        raise SpecialistsError(f"{where}: expected one .npy array, not an .npz archive")
    if table.dtype == bool or not np.issubdtype(table.dtype, np.number) or np.issubdtype(table.dtype, np.complexfloating):
        raise SpecialistsError(f"{where}: dtype {table.dtype} is not a real number type (first bad row 0)")
    expected = f"({num_rows}, {num_classes})" if exact_rows else f"(>= {num_rows}, {num_classes})"
    what = "one row per training example of the data set (train + val, in its training order), one column per class"
    if table.ndim != 2:
        raise SpecialistsError(f"{where}: wrong shape {tuple(table.shape)}, expected {expected}: {what}")
    rows, cols = table.shape
    if cols != num_classes:
        raise SpecialistsError(f"{where}: wrong shape {tuple(table.shape)}, expected {expected}: "
                               f"{cols} columns for {num_classes} classes (first bad row 0)")
    if rows < num_rows or (exact_rows and rows != num_rows):
        first = min(rows, num_rows)
        why = f"row {first} is missing" if rows < num_rows else f"row {first} is one too many"
        raise SpecialistsError(f"{where}: wrong shape {tuple(table.shape)}, expected {expected}: "
                               f"{what} (first bad row {first}: {why})")
    for start in range(0, rows, _CHUNK):
        chunk = np.asarray(table[start:start + _CHUNK], dtype=np.float64)
        nonfinite = ~np.isfinite(chunk).all(1)
        negative = (chunk < 0).any(1) & ~nonfinite
        sums = chunk.sum(1)
        off = (np.abs(sums - 1.0) > PROB_TOLERANCE) & ~nonfinite & ~negative
        bad = nonfinite | negative | off
        if bad.any():
            r = int(np.argmax(bad))
            row = start + r
            if nonfinite[r]:
                col = int(np.argmax(~np.isfinite(chunk[r])))
                problem = f"a NaN or infinite entry ({chunk[r, col]} in column {col})"
            elif negative[r]:
                col = int(np.argmax(chunk[r] < 0))
                problem = f"a negative entry ({chunk[r, col]:.6g} in column {col})"
            else:
                problem = f"a sum of {sums[r]:.6g}, not 1 within {PROB_TOLERANCE:g}"
            raise SpecialistsError(f"{where}: row {row} has {problem} (first bad row {row})")
    return table


def file_sha256(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ============================================================================ teachers
def ensemble_teacher_logits(ens: SpecialistEnsemble, x: torch.Tensor) -> torch.Tensor:
    """The routed ensemble on a normalized batch: ``log(q)`` (B, C) float32.

    The generalist runs on all rows, each specialist only on its routed rows
    (``ens.components``), ``combine`` gives q. Call in inference mode.
    """
    p_g, p_specs, active = ens.components(x)
    return torch.log(ens._combine(p_g, p_specs, active).float())


class Teacher:
    """``teacher(x, idx) -> logits (B, C)`` for a batch ``x`` of training rows ``idx``."""

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

    def __init__(self, ens: SpecialistEnsemble):
        self.ens = ens

    def logits(self, x, idx):
        # module-level lookup, so tests can spy on exactly what the student is taught
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


# ============================================================================ training
def student_batches(run: Run, batch_size: int, seed: int, augment: bool):
    """``batches(epoch)`` yielding (x, y, idx) on the device: the seeded, shuffled batches every
    student and control of a run shares (augmented unless ``augment`` is False)."""
    ds = run.data
    batcher = Batcher(ds, ds.train, run.device)
    drop_last = len(ds.train) > batch_size  # BatchNorm dislikes a final batch of one
    channels_last = run.device.type == "cuda" and ds.is_image

    def batches(epoch):
        g = epoch_generator(seed, epoch, BATCH_STREAM)
        for x, y, idx in batcher.epoch(batch_size, shuffle=True, augment=augment, generator=g, drop_last=drop_last):
            yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y, idx

    return batches, num_batches(len(ds.train), batch_size, drop_last)


def new_student(run: Run, seed: int) -> torch.nn.Module:
    """A freshly initialized student (seeded: the student and its born-again twin start equal)."""
    torch.manual_seed(seed)
    return run.new_model(run.data.num_classes, student_model_config(run.cfg))


def train_student(run: Run, model: torch.nn.Module, teacher: Teacher, state_path: Optional[Path], *,
                  seed: int, desc: str, eval_splits=("val", "test")) -> list[dict]:
    """Distil ``teacher`` into ``model`` with the run's student settings; resumable."""
    cfg = run.cfg
    tcfg, dcfg = cfg.student, cfg.distill
    model = prepare_model(model, run.device, run.data.is_image)
    batches, steps = student_batches(run, tcfg.batch_size, seed, teacher.augment)
    T, alpha, kind, ls = dcfg.temperature, dcfg.alpha, dcfg.loss, tcfg.label_smoothing

    def step(model, epoch, i, batch):
        x, y, idx = batch
        z_t = teacher(x, idx)
        return distillation_loss(model(x), z_t, y, T, alpha, kind, ls), {}

    evaluate = (lambda m: split_metrics(run, m, eval_splits, tcfg.eval_batch_size)) if eval_splits else None
    return fit(model, tcfg, device=run.device, state_path=state_path, batches=batches, steps_per_epoch=steps,
               step_fn=step, evaluate=evaluate, seed=seed, desc=desc)


def _trained(out: Path, model: torch.nn.Module, train: Callable[[], list[dict]], save: Callable[[], None]) -> list[dict]:
    """Train into ``out`` unless its model exists (then load it); returns the history.
    ``history.json`` then ``model.safetensors`` (the completion marker) are written last."""
    done = out / "model.safetensors"
    if done.exists() and (out / "history.json").exists():
        load_weights(done, model)
        log.info("%s: already trained, skipping", out.name)
        return read_json(out / "history.json")["history"]
    history = train()
    write_json(out / "history.json", {"history": history})
    save()
    return history


def _median_epoch_seconds(history: list[dict]) -> float | None:
    secs = [h["seconds"] for h in history if "seconds" in h]
    return float(statistics.median(secs)) if secs else None


# ============================================================================ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def seconds_per_example(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
                        repeats: int = 3, warmup: bool = True) -> float:
    """Median over ``repeats`` of the wall time of ``fn`` over ``x`` in chunks, per example
    (after one warm-up chunk unless ``warmup`` is False)."""
    if not len(x):
        return float("nan")
    device = x.device
    if warmup:
        fn(x[:batch_size])
        _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            fn(x[i:i + batch_size])
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times)) / len(x)


def time_predictors(fns: dict, x: torch.Tensor, batch_size: int, repeats: int = 3) -> dict:
    """Seconds per example of each ``fns[name](x_chunk)``: one warm-up each, then ``repeats``
    interleaved rounds (so a burst of load on a shared machine hits every row alike); medians."""
    for fn in fns.values():
        seconds_per_example(fn, x, batch_size, 1)
    rounds: dict = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            rounds[k].append(seconds_per_example(fn, x, batch_size, 1, warmup=False))
    return {k: float(statistics.median(v)) for k, v in rounds.items()}


def timing_inputs(run: Run, n: int) -> torch.Tensor:
    """The first ``n`` test examples, normalized, on the device (channels-last on CUDA)."""
    ds = run.data
    x, _ = Batcher(ds, ds.test, run.device).batch(torch.arange(min(n, len(ds.test))))
    if run.device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def model_proba_fn(model: torch.nn.Module, device: torch.device):
    model.eval()

    def fn(x):
        with autocast(device):
            return torch.softmax(model(x).float(), 1)

    return fn


def ensemble_proba_fn(ens: SpecialistEnsemble):
    return lambda x: ens._combine(*ens.components(x))


def average_proba_fn(models: list[torch.nn.Module], device: torch.device):
    fns = [model_proba_fn(m, device) for m in models]
    return lambda x: sum(f(x) for f in fns) / len(fns)


# ============================================================================ the stage
def _test_probs(run: Run, model) -> torch.Tensor:
    z = predict_logits(model, run.data, run.data.test, run.device, run.cfg.student.eval_batch_size)
    return torch.softmax(z, 1)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _evaluation_top1(run: Run) -> dict:
    """``generalist.top1`` / ``ensemble.top1`` from the evaluate stage's report, if there is one."""
    path = run.dir / "evaluation" / "evaluation.json"
    if not path.exists():
        return {}
    try:
        ev = read_json(path)
        return {"generalist": float(ev["generalist"]["top1"]), "ensemble": float(ev["ensemble"]["top1"])}
    except (SpecialistsError, KeyError, TypeError, ValueError):
        return {}


def _probs_teacher(run: Run) -> tuple[ProbsTeacher, dict]:
    ds, st = run.data, run.cfg.student
    n, exact = source_train_size(ds)
    table = load_teacher_probs(st.teacher_probs, n, ds.num_classes, exact)
    rows = np.asarray(table[ds.train.index.numpy()], dtype=np.float32)
    rows = torch.from_numpy(rows / rows.sum(1, keepdims=True)).to(run.device)  # exact simplex after the 1e-3 check
    info = {"path": str(st.teacher_probs), "shape": list(table.shape), "sha256": file_sha256(st.teacher_probs)}
    return ProbsTeacher(rows), info


def distill_stage(run: Run) -> dict:
    """The student stage: ``RUN_DIR/student/{model.safetensors, metrics.json, student.md}``."""
    cfg, ds, device = run.cfg, run.data, run.device
    st = cfg.student
    probs_info = None
    if st.teacher == "probs":  # validate the table before anything is built or written
        if st.teacher_probs is None:
            raise SpecialistsError("student.teacher=probs needs student.teacher_probs (a .npy file)")
        probs_teacher, probs_info = _probs_teacher(run)
    out = run.stage_dir("student")
    generalist = run.load_generalist()
    ens = SpecialistEnsemble.from_run(run.dir, device=str(device), batch_size=st.eval_batch_size)
    teacher = {"ensemble": lambda: EnsembleTeacher(ens), "generalist": lambda: GeneralistTeacher(generalist, device),
               "probs": lambda: probs_teacher}[st.teacher]()
    seed = cfg.seed
    model_cfg = to_dict(student_model_config(cfg))

    # --- the student -------------------------------------------------------------------
    student = new_student(run, seed)
    history = _trained(out, student,
                       lambda: train_student(run, student, teacher, out / "state.pt", seed=seed,
                                             desc=f"student (teacher: {teacher.name})"),
                       lambda: run.save_model(out / "model.safetensors", student, model=model_cfg,
                                              num_classes=ds.num_classes, teacher=teacher.name))
    student = prepare_model(student, device, ds.is_image).eval()

    # --- the controls ------------------------------------------------------------------
    born_again = second = None
    ba_history = sg_history = None
    if st.controls and st.teacher == "ensemble":
        ba_dir = run.stage_dir("student/born_again")
        born_again = new_student(run, seed)
        ba_teacher = GeneralistTeacher(generalist, device)
        ba_history = _trained(ba_dir, born_again,
                              lambda: train_student(run, born_again, ba_teacher, ba_dir / "state.pt", seed=seed,
                                                    desc="born-again student (teacher: generalist)"),
                              lambda: run.save_model(ba_dir / "model.safetensors", born_again, model=model_cfg,
                                                     num_classes=ds.num_classes, teacher="generalist"))
        born_again = prepare_model(born_again, device, ds.is_image).eval()
        sg_dir = run.stage_dir("student/second_generalist")
        torch.manual_seed(seed + 1)
        second = run.new_model()
        sg_history = _trained(sg_dir, second,
                              lambda: train_classifier(run, second, cfg.generalist, sg_dir / "state.pt", seed=seed + 1,
                                                       desc="second generalist (seed + 1)"),
                              lambda: run.save_model(sg_dir / "model.safetensors", second, model=to_dict(cfg.model),
                                                     num_classes=ds.num_classes, seed=seed + 1))
        second = prepare_model(second, device, ds.is_image).eval()

    # --- test metrics --------------------------------------------------------------------
    y = ds.test.y
    pred = ens.predict_all(ds.test.x)
    p_gen, p_ens = pred["generalist"].float().cpu(), pred["ensemble"].float().cpu()
    p_student = _test_probs(run, student)
    final = split_metrics(run, student, ("val", "test"), st.eval_batch_size)
    ev = _evaluation_top1(run)
    top1 = {"generalist": ev.get("generalist", metrics.accuracy(p_gen, y)),
            "ensemble": ev.get("ensemble", metrics.accuracy(p_ens, y)),
            "student": final["test_top1"]}
    teacher_test = {"ensemble": p_ens, "generalist": p_gen}.get(teacher.name)
    control: dict = {}
    probs = {"student": p_student}
    if born_again is not None:
        probs["born_again"] = _test_probs(run, born_again)
        top1["born_again"] = metrics.accuracy(probs["born_again"], y)
        control["born_again"] = {
            "test_top1": top1["born_again"], "test_top5": metrics.accuracy(probs["born_again"], y, 5),
            "test_nll": metrics.nll(probs["born_again"], y), "teacher": "generalist",
            "agreement_with_generalist": _agreement(probs["born_again"], p_gen),
            "train_seconds_per_epoch": _median_epoch_seconds(ba_history), "history": ba_history}
    if second is not None:
        p_second = _test_probs(run, second)
        probs["two_generalists"] = (p_gen + p_second) / 2
        top1["two_generalists"] = metrics.accuracy(probs["two_generalists"], y)
        control["second_generalist"] = {
            "seed": seed + 1, "test_top1": metrics.accuracy(p_second, y), "test_top5": metrics.accuracy(p_second, y, 5),
            "test_nll": metrics.nll(p_second, y), "history": sg_history}
        control["two_generalist_average"] = {
            "test_top1": top1["two_generalists"], "test_top5": metrics.accuracy(probs["two_generalists"], y, 5),
            "test_nll": metrics.nll(probs["two_generalists"], y)}

    # --- inference time per example (one protocol for every row) ---------------------------
    n_time = max(1, min(len(y), st.eval_batch_size * cfg.evaluate.timing_batches))
    x_time = timing_inputs(run, n_time)
    fns = {"generalist": model_proba_fn(generalist, device), "ensemble": ensemble_proba_fn(ens),
           "student": model_proba_fn(student, device)}
    if born_again is not None:
        fns["born_again"] = model_proba_fn(born_again, device)
    if second is not None:
        fns["two_generalists"] = average_proba_fn([generalist, second], device)
    secs = time_predictors(fns, x_time, st.eval_batch_size, TIMING_REPEATS)

    names = {"generalist": "generalist", "ensemble": "routed ensemble (generalist + specialists)",
             "student": f"student of the {'ensemble' if teacher.name == 'ensemble' else teacher.name + ' teacher'}",
             "born_again": "born-again student (teacher: generalist)",
             "two_generalists": "two-generalist average (second seed)"}
    comparisons = {k: {"name": names[k], "test_top1": top1[k], "seconds_per_example": secs.get(k)}
                   for k in ("generalist", "ensemble", "student", "born_again", "two_generalists") if k in top1}

    gain = None
    if "born_again" in probs:
        boot = metrics.paired_bootstrap(metrics.topk_correct(probs["born_again"], y),
                                        metrics.topk_correct(p_student, y), cfg.evaluate.bootstrap, cfg.seed)
        gain = {"points": 100 * (top1["student"] - top1["born_again"]),
                "ci95_points": [100 * c for c in boot["ci95"]] if boot.get("ci95") else None,
                "test_examples": int(len(y))}

    # the generalist's epoch time: from the second generalist when there is one (same config,
    # trained beside the student, so machine load and threads are alike), else the first's
    if sg_history:
        gen_epoch, gen_source = _median_epoch_seconds(sg_history), "the second generalist, trained by this stage"
    else:
        gen_epoch = _median_epoch_seconds(read_json(run.dir / "generalist" / "metrics.json").get("history", []))
        gen_source = "the generalist stage's metrics.json"
    st_epoch = _median_epoch_seconds(history)
    result = {
        **final,
        "teacher": teacher.name,
        "teacher_probs": probs_info,
        "model": model_cfg,
        "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha, "loss": cfg.distill.loss,
        "agreement_with_teacher": _agreement(p_student, teacher_test) if teacher_test is not None else None,
        "agreement_with_ensemble": _agreement(p_student, p_ens),
        "agreement_with_generalist": _agreement(p_student, p_gen),
        "epochs": st.epochs,
        "steps": sum(h["steps"] for h in history),
        "train_seconds_per_epoch": st_epoch,
        "generalist_train_seconds_per_epoch": gen_epoch,
        "generalist_epoch_time_source": gen_source,
        "train_time_ratio_vs_generalist": st_epoch / gen_epoch if st_epoch and gen_epoch else None,
        "inference_seconds_per_example": secs["student"],
        "inference_ratio_vs_ensemble": secs["student"] / secs["ensemble"] if secs["ensemble"] else None,
        "timing_examples": int(len(x_time)),
        "timing_repeats": TIMING_REPEATS,
        "top1_source": "evaluation.json" if ev else "computed",
        "control": control,
        "comparisons": comparisons,
        "gain_over_born_again": gain,
        "history": history,
    }
    write_json(out / "metrics.json", result)
    write_text(out / "student.md", render_markdown(result))
    refresh_reports(run.dir)  # evaluation.md and ablation.md get the student and control rows
    log.info("student (teacher %s): test top-1 %.4f (generalist %.4f, ensemble %.4f), agreement with teacher %s",
             teacher.name, top1["student"], top1["generalist"], top1["ensemble"],
             f"{result['agreement_with_teacher']:.4f}" if result["agreement_with_teacher"] is not None else "-")
    return result


# ============================================================================ reports
def _fmt_time(s: float | None) -> str:
    if s is None or s != s:
        return "-"
    return f"{s * 1e3:.4f} ms" if s >= 1e-5 else f"{s * 1e6:.3f} µs"


def gain_sentence(result: dict) -> str:
    """One honest sentence on what the specialists added beyond the born-again student."""
    c = result["comparisons"]
    gain = result.get("gain_over_born_again")
    if gain is None:
        if result["teacher"] != "ensemble":
            return (f"This student was distilled from the {result['teacher']} teacher, so it does not measure what the "
                    f"specialists add; run with student.teacher=ensemble and student.controls=true for that.")
        return ("The born-again control was not trained (student.controls=false), so what the specialists add "
                "beyond distillation alone is not measured here.")
    pts = gain["points"]
    ci = gain.get("ci95_points")
    ci_txt = f" (95% paired-bootstrap interval [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " ("
    ci_txt += f"{', ' if ci else ''}{gain['test_examples']} test examples)"
    if ci and ci[0] <= 0 <= ci[1]:
        verdict = "a difference this test set cannot tell from zero"
    elif pts > 0:
        verdict = "a gain the specialists bring beyond distillation alone"
    else:
        verdict = "so the specialists added nothing beyond distillation alone; the born-again student did better"
    ens_gain = 100 * (c["ensemble"]["test_top1"] - c["generalist"]["test_top1"])
    return (f"Distilling the routed ensemble instead of the generalist alone changed the student's test top-1 by "
            f"{pts:+.2f} points{ci_txt}, {verdict}; the routed ensemble itself is {ens_gain:+.2f} points over the "
            f"generalist" + (f" and the two-generalist average {100 * (c['two_generalists']['test_top1'] - c['generalist']['test_top1']):+.2f}."
                             if "two_generalists" in c else "."))


def render_markdown(result: dict) -> str:
    c = result["comparisons"]
    g = c["generalist"]["test_top1"]
    g_t = c["generalist"].get("seconds_per_example")
    lines = ["# Student: the ensemble distilled into one model", "",
             f"Teacher: **{result['teacher']}**; T = {result['temperature']}, alpha = {result['alpha']}, "
             f"loss {result['loss']}; student model `{result['model'].get('name')}`, {result['epochs']} epochs. "
             f"Inference time per example: median of {result.get('timing_repeats', TIMING_REPEATS)} interleaved passes over {result['timing_examples']} test examples.", "",
             "| model | test top-1 | change vs generalist | inference time / example | x generalist |",
             "|---|---:|---:|---:|---:|"]
    for key in ("generalist", "ensemble", "student", "born_again", "two_generalists"):
        if key not in c:
            continue
        r = c[key]
        t = r.get("seconds_per_example")
        rel = f"{t / g_t:.2f}x" if t and g_t else "-"
        lines.append(f"| {r['name']} | {r['test_top1']:.4f} | {r['test_top1'] - g:+.4f} | {_fmt_time(t)} | {rel} |")
    agree = result.get("agreement_with_teacher")
    lines += ["", gain_sentence(result), ""]
    if agree is not None:
        lines += [f"The student agrees with its teacher's top-1 on {agree:.1%} of the test examples "
                  f"(with the routed ensemble on {result['agreement_with_ensemble']:.1%}).", ""]
    if result.get("train_time_ratio_vs_generalist"):
        lines += [f"Training: {result['train_seconds_per_epoch']:.2f} s per student epoch, "
                  f"{result['train_time_ratio_vs_generalist']:.2f}x the generalist's "
                  f"({result['generalist_train_seconds_per_epoch']:.2f} s, {result.get('generalist_epoch_time_source')}; "
                  f"both including the per-epoch evaluation). `benchmarks/student_cost.py` measures this ratio "
                  f"without evaluation, on one machine in one process.", ""]
    return "\n".join(lines)


def control_rows(result: dict) -> list[dict]:
    """Rows ``{"name", "test_top1", "note"}`` for the evaluation and ablation reports."""
    c = result["comparisons"]
    rows = []
    t = _fmt_time(c["student"].get("seconds_per_example"))
    for key, note in (("student", f"one model distilled from the {result['teacher']} teacher ({t} per example)"),
                      ("born_again", "same student, same steps, taught by the generalist alone"),
                      ("two_generalists", "a second generalist (seed + 1) averaged with the first")):
        if key in c:
            rows.append({"name": c[key]["name"], "test_top1": c[key]["test_top1"], "note": note})
    return rows
