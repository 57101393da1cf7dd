"""The student stage (`specialists distill`): the ensemble distilled into one model, and its controls.

The routed ensemble serves at ``1 + |A|`` forward passes per example; a student trained to
match it serves at one. The student trains from scratch with the KD loss
``alpha * T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) CE`` (or the MSE variants of
``distill.loss``) toward one of three teachers (``student.teacher``,
:mod:`specialists.engine.teachers`): the routed ``ensemble`` on the very augmented batch the
student sees (default), the ``generalist`` alone, a black-box table of ``probs``
(``student.teacher_probs``, validated before anything is trained), or a black-box ``api``
(``student.teacher_url``, :mod:`specialists.engine.teacher_api`): asked once about every
training input, every ``student.unlabelled`` text and every test input (for the agreement), its
answers cached in ``RUN_DIR/teacher_api.jsonl``; the student trains on the answered training
examples (with their labels) and the answered unlabelled texts (soft targets only).

A ``soft_tree`` student (:mod:`specialists.models.soft_tree`) trains with the tree's own loss
toward the same targets, and always beside the same tree trained on the labels alone
(``student/hard_labels/``, same seed and batches): its ``metrics.json`` adds a ``tree``
section (max-path and mixture top-1 of both, the gain over the hard-label tree, the paths of a
few test examples).

Controls (``student.controls`` with the ensemble teacher), each resumable and skipped when its
model exists: the born-again student (same student, same steps, same seed, same batches) in
``student/born_again/``, and a second generalist from seed ``seed + 1`` in
``student/second_generalist/`` whose test probabilities, averaged with the first generalist's,
are the two-generalist ensemble.

The **cascade** control (``ablate.cascade``, with the second generalist): the second generalist
is consulted, and averaged with the first, only on the examples where the first generalist's
top probability is below a threshold fitted on the validation split so that the cascade's
mean FLOPs per example equal the routed ensemble's (:func:`~specialists.core.cost.fit_cascade`):
what the ensemble's inference budget buys without specialists.

Writes ``student/model.safetensors`` (loadable by :class:`~specialists.inference.Student`) and
``student/metrics.json`` (test top-1/top-5/NLL, teacher, agreement with the teacher, train
seconds per epoch, inference seconds per example, ``control`` and ``comparisons``). Every model's
cost is there too: ``inference_flops`` (FLOPs per example on the timing sample) and
``train_samples``, ``train_flops_per_sample`` (a training step's FLOPs per sample, the
teacher's forward pass included) and ``train_compute`` (their product in generalist-example
equivalents, :mod:`specialists.engine.flops`); each comparison row has its
``flops_per_example``. Each model's test predictions (argmax class ids) are saved beside it
(``Run.predictions``), so reports pair any two models without them.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from weakref import WeakKeyDictionary

import numpy as np
import torch

from ..core import metrics
from ..core.cost import cascade_proba, fit_cascade
from ..core.losses import UNLABELLED
from ..data import Split, batcher_for
from ..data.teacher_table import load_teacher_probs, source_train_size
from ..data.text import read_texts
from ..device import agree, prepare_model
from ..engine.executors import Job, as_run, run_jobs
from ..engine.flops import generalist_train_flops, inference_flops, train_compute, training_flops
from ..engine.teacher_api import TeacherAPI
from ..engine.teachers import ApiTeacher, EnsembleTeacher, GeneralistTeacher, ProbsTeacher, Teacher
from ..engine.timing import REPEATS, seconds_per_example, timing_rows
from ..engine.trainers import (
    initial_weights,
    split_metrics,
    split_probs,
    train_classifier,
    train_once,
    train_student,
)
from ..errors import SpecialistsError
from ..inference import SingleModel, SpecialistEnsemble, Student
from ..models import load_student
from ..reports import student as report
from ..rundir import Run, to_dict
from ..rundir.config import TREE, student_model_config
from ..rundir.io import file_sha256, rank0, read_json, write_json, write_npy

log = logging.getLogger("specialists")


def new_student(run: Run, seed: int) -> torch.nn.Module:
    """A new student: seeded initialization, then ``student.model.pretrained`` when set (the
    student and its born-again twin start equal)."""
    torch.manual_seed(seed)
    model = run.new_model(run.data.num_classes, student_model_config(run.cfg))
    if run.cfg.student.model.pretrained:
        load_student(model, Path(run.cfg.student.model.pretrained).expanduser())
    return model


def _median_epoch_seconds(history: list[dict]) -> float | None:
    secs = [h["seconds"] for h in history if "seconds" in h]
    return float(statistics.median(secs)) if secs else None


def _test_probs(run: Run, model) -> torch.Tensor:
    return split_probs(run, model, "test", run.cfg.student.eval_batch_size)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _ensemble_flops(run: Run) -> float | None:
    """The routed ensemble's FLOPs per example from the evaluate stage's ``cost``, if recorded."""
    try:
        return float(read_json(run.evaluation_json)["cost"]["ensemble_flops"])
    except (SpecialistsError, KeyError, TypeError, ValueError):
        return None


def _save_predictions(run: Run, key: str, p: torch.Tensor) -> None:
    write_npy(run.predictions(key), p.argmax(1).cpu().numpy().astype(np.int64))


@torch.inference_mode()
def cascade_control(run: Run, first, second, first_flops: float, second_flops: float, target_flops: float,
                    p_first: torch.Tensor, x_time: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The cascade of two generalists (``first``, ``second``: batch -> probabilities): the
    threshold fitted on the validation split to cost ``target_flops`` per example, then the
    cascade run on the test split. Its FLOPs are counted as it runs on the timing sample
    ``x_time``, as every other model's are: a text batch's width is its longest row, so FLOPs
    counted over other batches would not compare. ``p_first``: the first's test probabilities
    (its paired interval's reference). Returns its ``control`` entry and its test probabilities."""
    ds, cfg, bs = run.data, run.cfg, run.cfg.student.eval_batch_size
    val = ds.split("val")
    p_val = torch.cat([first(x).float().cpu() for x, _ in batcher_for(ds, val, run.device).iterate(bs)])
    fit = fit_cascade(p_val.max(1).values, first_flops, second_flops, target_flops)
    t = fit["threshold"]
    parts = [cascade_proba(first, second, x, t) for x, _ in batcher_for(ds, ds.test, run.device).iterate(bs)]
    flops = inference_flops(lambda x: cascade_proba(first, second, x, t)[0], x_time, bs)
    q = torch.cat([p.float().cpu() for p, _ in parts])
    asked = torch.cat([a.cpu() for _, a in parts])
    y = ds.test.y
    boot = metrics.paired_bootstrap(metrics.topk_correct(p_first, y), metrics.topk_correct(q, y),
                                    cfg.evaluate.bootstrap, cfg.seed)
    top1 = metrics.accuracy(q, y)
    return {"threshold": t, "target_flops": target_flops, "target_fraction": fit["target_fraction"],
            "consulted_fraction": {"val": fit["val_fraction"], "test": float(asked.float().mean())},
            "val_flops": fit["val_flops"], "inference_flops": flops,
            "test_top1": top1, "test_top5": metrics.accuracy(q, y, 5), "test_nll": metrics.nll(q, y),
            "change_vs_generalist": top1 - metrics.accuracy(p_first, y), "ci95_vs_generalist": boot["ci95"]}, q


def _evaluation_top1(run: Run) -> dict:
    """``generalist.top1`` / ``ensemble.top1`` from the evaluate stage's report, if there is one."""
    if not run.evaluation_json.exists():
        return {}
    try:
        ev = read_json(run.evaluation_json)
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


def _raw_inputs(split) -> list:
    """What an API teacher is sent for each example of a split: the text, or the raw array."""
    if split.text is not None:
        return split.text
    if split.x is None:
        raise SpecialistsError("student.teacher=api sends the raw inputs, and a streamed data set keeps none in "
                               "memory: use data.storage=memory")
    return split.x.tolist()


def _api_answers(run: Run, cache_only: bool = False) -> dict:
    """Ask the API teacher about every training input, unlabelled text and test input it has not
    answered yet (rank 0 alone writes the cache; every rank gets the answers); ``cache_only``:
    only read what the cache holds (the student's job, after :func:`distill` asked). Returns the
    inputs and answers of each part: ``{"train"|"unlabelled"|"test": (inputs, probs (n, C),
    answered (n,))}`` and ``"answers"``."""
    st, ds = run.cfg.student, run.data
    parts = {"train": _raw_inputs(ds.train),
             "unlabelled": read_texts(st.unlabelled, run.cfg.data.text_field) if st.unlabelled else [],
             "test": _raw_inputs(ds.test)}
    inputs = [x for part in parts.values() for x in part]

    def ask():
        api = TeacherAPI(st.teacher_url, run.teacher_api_cache, ds.num_classes, batch_size=st.query_batch_size,
                         budget=st.query_budget, retries=st.query_retries)
        return api.query(inputs, ask=not cache_only)

    answers = agree(rank0(ask))
    out, start = {"answers": answers}, 0
    for name, part in parts.items():
        rows = slice(start, start + len(part))
        out[name] = (part, answers.probs[rows], answers.answered[rows])
        start += len(part)
    return out


def _api_teacher(run: Run, asked: dict) -> tuple[ApiTeacher, Split]:
    """The API teacher and what its student trains on: the answered training examples (their
    labels kept), then the answered unlabelled texts (label ``UNLABELLED``: soft targets only)."""
    ds = run.data
    _, p_train, ok_train = asked["train"]
    texts, p_unl, ok_unl = asked["unlabelled"]
    rows = torch.from_numpy(np.flatnonzero(ok_train))
    x, y = [ds.train.x[rows]], [ds.train.y[rows]]
    if ok_unl.any():
        extra = [t for t, ok in zip(texts, ok_unl.tolist()) if ok]
        x.append(torch.from_numpy(ds.encoder.encode(extra, pad_to=ds.train.x.shape[1])))
        y.append(torch.full((len(extra),), UNLABELLED, dtype=torch.long))
    probs = np.concatenate([p_train[ok_train], p_unl[ok_unl]])
    if not len(probs):
        raise SpecialistsError(f"student.teacher_url {run.cfg.student.teacher_url}: no training input is answered "
                               "(raise student.query_budget)")
    split = Split(x=torch.cat(x), y=torch.cat(y))
    return ApiTeacher(torch.from_numpy(probs / probs.sum(1, keepdims=True)).float().to(run.device)), split


def _api_summary(run: Run, asked: dict, p_student: torch.Tensor) -> dict:
    """The API teacher's part of ``metrics.json``: requests, answers per part, agreement on test."""
    answers, st = asked["answers"], run.cfg.student
    _, p_test, ok_test = asked["test"]
    ok = torch.from_numpy(ok_test)
    agreement = _agreement(p_student[ok], torch.from_numpy(p_test[ok_test])) if ok.any() else None
    return {
        "url": st.teacher_url, "cache": run.rel(run.teacher_api_cache), "budget": st.query_budget,
        "requests_this_run": answers.requests, "requests_total": answers.requests_total,
        "answered_from_cache": answers.from_cache,
        "inputs": {k: int(len(asked[k][0])) for k in ("train", "unlabelled", "test")},
        "answered": {k: int(asked[k][2].sum()) for k in ("train", "unlabelled", "test")},
        "test_agreement": agreement,
    }


@dataclass
class Taught:
    """The student's teacher, the split it trains on (None: the training split), and what the
    report says of it: a table's path, shape and sha256 (``probs_info``), an API's answers (``asked``)."""

    teacher: Teacher
    split: Split | None = None
    probs_info: dict | None = None
    asked: dict | None = None


_TAUGHT: WeakKeyDictionary = WeakKeyDictionary()  # Run -> Taught: one teacher per run and process


def teacher_of(run: Run, ask: bool = False) -> Taught:
    """The student's teacher (``student.teacher``), built once per run and process. The stage
    builds it before anything is trained (a table is validated, an API is asked: ``ask``); the
    student's job reuses it when it runs in the same process, and a Ray worker builds its own
    from disk (an API's answers from the cache the stage filled)."""
    if run in _TAUGHT:
        return _TAUGHT[run]
    st = run.cfg.student
    if st.teacher == "ensemble":
        taught = Taught(EnsembleTeacher(SpecialistEnsemble.from_run(run, batch_size=st.eval_batch_size)))
    elif st.teacher == "generalist":
        taught = Taught(GeneralistTeacher(run.load_generalist(), run.device))
    elif st.teacher == "api":
        asked = _api_answers(run, cache_only=not ask)
        taught = Taught(*_api_teacher(run, asked), asked=asked)
    else:
        teacher, info = _probs_teacher(run)
        taught = Taught(teacher, probs_info=info)
    _TAUGHT[run] = taught
    return taught


@torch.inference_mode()
def _mixture_top1(run: Run, tree) -> float:
    """A soft tree's test top-1 when every leaf speaks (the mixture ``sum_l P_l Q_l``)."""
    batcher = batcher_for(run.data, run.data.test, run.device)
    p = torch.cat([tree.mixture_proba(x).float().cpu() for x, _ in batcher.iterate(run.cfg.student.eval_batch_size)])
    return metrics.accuracy(p, run.data.test.y)


def _tree_summary(run: Run, tree, hard, top1: dict, gain: dict | None, explained: int = 3) -> dict:
    """The soft tree's own figures: its size and settings, max-path (``top1``, already measured)
    and mixture top-1 of it and of its hard-label control, and the paths of the first
    ``explained`` test examples."""
    st = run.cfg.student
    x = batcher_for(run.data, run.data.test, run.device).batch(torch.arange(min(explained, len(run.data.test))))[0]
    examples = Student(tree, run.data_info(), run.device).explain(x, normalized=True, k=3)
    return {
        "depth": tree.depth, "inner_nodes": int(tree.inner.out_features), "leaves": int(tree.leaves.shape[0]),
        "beta": float(tree.beta.detach()), "loss": st.tree.loss, "penalty": st.tree.penalty, "window": st.tree.window,
        "test_top1": {"distilled": {"max_path": top1["student"], "mixture": _mixture_top1(run, tree)},
                      "hard_labels": {"max_path": top1["hard_labels"], "mixture": _mixture_top1(run, hard)}},
        "gain_over_hard_labels": gain,
        "examples": [{"test_index": i, **e} for i, e in enumerate(examples)],
    }


def student_job(run, which: str) -> list[dict]:
    """One model of the student stage as an independent job (here, or as a Ray task):
    ``student`` (from ``student.teacher``), ``born_again`` (the same student taught by the
    generalist) or ``second_generalist`` (seed + 1). Resumable; returns its history."""
    run = as_run(run)
    cfg, C = run.cfg, run.data.num_classes
    if which == "second_generalist":
        files = run.second_generalist
        files.dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + 1)
        model = run.new_model()
        initial_weights(run, model)  # built like the first generalist (a pretrained backbone, not its init)
        return train_once(files, model,
                          lambda: train_classifier(run, model, cfg.generalist, files.state, seed=cfg.seed + 1,
                                                   desc="second generalist (seed + 1)"),
                          lambda: run.save_model(files.weights, model, model=to_dict(cfg.model), num_classes=C,
                                                 seed=cfg.seed + 1))
    split = None
    if which == "student":
        taught = teacher_of(run)
        files, teacher, split = run.student, taught.teacher, taught.split
        desc = f"student (teacher: {teacher.name})"
    elif which == "born_again":
        files, teacher = run.born_again, GeneralistTeacher(run.load_generalist(), run.device)
        desc = "born-again student (teacher: generalist)"
    else:  # hard_labels: a soft tree's control, on the very batches its distilled twin sees
        files, teacher, desc = run.hard_labels, None, "the same tree on hard labels"
    files.dir.mkdir(parents=True, exist_ok=True)
    model = new_student(run, cfg.seed)
    augment = None if teacher is not None else cfg.student.teacher != "probs"
    return train_once(files, model,
                      lambda: train_student(run, model, teacher, files.state, seed=cfg.seed, desc=desc, augment=augment,
                                            split=split),
                      lambda: run.save_model(files.weights, model, model=to_dict(student_model_config(cfg)),
                                             num_classes=C, teacher=teacher.name if teacher is not None else "labels"))


@dataclass
class Models:
    """The stage's trained models, loaded for evaluation (a control absent when not trained)."""

    generalist: torch.nn.Module
    ens: SpecialistEnsemble
    student: torch.nn.Module
    born_again: torch.nn.Module | None = None
    second: torch.nn.Module | None = None
    hard: torch.nn.Module | None = None


@dataclass
class Figures:
    """Test figures of every model: ``top1`` and ``probs`` (N, C) per key, each control's entry."""

    y: torch.Tensor
    p_gen: torch.Tensor
    p_ens: torch.Tensor
    final: dict  # the student's val/test figures (split_metrics)
    from_evaluation: bool  # the generalist's and the ensemble's top-1 read from evaluation.json
    top1: dict = field(default_factory=dict)
    probs: dict = field(default_factory=dict)
    control: dict = field(default_factory=dict)


def _kinds(run: Run) -> list[str]:
    """The stage's models: the student, a tree's hard-label twin, the ensemble teacher's controls."""
    st = run.cfg.student
    controls = st.controls and st.teacher == "ensemble"
    return (["student"] + (["hard_labels"] if student_model_config(run.cfg).name == TREE else [])
            + (["born_again", "second_generalist"] if controls else []))


def _load(run: Run, taught: Taught, kinds: list[str]) -> Models:
    ds, st = run.data, run.cfg.student

    def trained(files, model_cfg=None):
        return prepare_model(run.load_model(files, ds.num_classes, model_cfg), run.device, ds.is_image).eval()

    student_cfg = student_model_config(run.cfg)
    ens = (taught.teacher.ens if isinstance(taught.teacher, EnsembleTeacher)
           else SpecialistEnsemble.from_run(run, batch_size=st.eval_batch_size))
    return Models(run.load_generalist(), ens, trained(run.student, student_cfg),
                  born_again=trained(run.born_again, student_cfg) if "born_again" in kinds else None,
                  second=trained(run.second_generalist) if "second_generalist" in kinds else None,
                  hard=trained(run.hard_labels, student_cfg) if "hard_labels" in kinds else None)


def _test_figures(run: Run, m: Models, histories: dict) -> Figures:
    """Every model's test probabilities and figures, and the controls' entries."""
    cfg, ds, st = run.cfg, run.data, run.cfg.student
    y = ds.test.y
    pred = m.ens.predict_over(x for x, _ in batcher_for(ds, ds.test, run.device).iterate(m.ens.batch_size))
    p_gen, p_ens = pred["generalist"].float().cpu(), pred["ensemble"].float().cpu()
    ev = _evaluation_top1(run)
    p_student = _test_probs(run, m.student)  # (the test figures from these, not a second pass)
    final = {**split_metrics(run, m.student, ("val",), st.eval_batch_size), "test_top1": metrics.accuracy(p_student, y),
             "test_top5": metrics.accuracy(p_student, y, 5), "test_nll": metrics.nll(p_student, y)}
    fig = Figures(y, p_gen, p_ens, final, bool(ev))
    fig.probs["student"] = p_student
    fig.top1 = {"generalist": ev.get("generalist", metrics.accuracy(p_gen, y)),
                "ensemble": ev.get("ensemble", metrics.accuracy(p_ens, y)),
                "student": fig.final["test_top1"]}

    def figures(p: torch.Tensor) -> dict:
        return {"test_top1": metrics.accuracy(p, y), "test_top5": metrics.accuracy(p, y, 5),
                "test_nll": metrics.nll(p, y)}

    def student_control(key: str, model, teacher: str) -> dict:
        """A control student's test figures (its probabilities kept for the gains)."""
        fig.probs[key] = _test_probs(run, model)
        fig.top1[key] = metrics.accuracy(fig.probs[key], y)
        return {**figures(fig.probs[key]), "teacher": teacher,
                "train_seconds_per_epoch": _median_epoch_seconds(histories[key]), "history": histories[key]}

    if m.born_again is not None:
        fig.control["born_again"] = {**student_control("born_again", m.born_again, "generalist"),
                                     "agreement_with_generalist": _agreement(fig.probs["born_again"], p_gen)}
    if m.hard is not None:
        fig.control["hard_labels"] = student_control("hard_labels", m.hard, "labels")
    if m.second is not None:
        p_second = fig.probs["second_generalist"] = _test_probs(run, m.second)
        fig.probs["two_generalists"] = (p_gen + p_second) / 2
        fig.top1["two_generalists"] = metrics.accuracy(fig.probs["two_generalists"], y)
        fig.control["second_generalist"] = {"seed": cfg.seed + 1, **figures(p_second),
                                            "history": histories["second_generalist"]}
        fig.control["two_generalist_average"] = figures(fig.probs["two_generalists"])
    return fig


def _inference_cost(run: Run, m: Models, fig: Figures) -> tuple[dict, dict, int]:
    """FLOPs and seconds per example of every model on one timing sample of the test split (one
    protocol for every row), and the cascade control (fitted, run and timed with the rest).
    Returns ``(flops, seconds, timing examples)``; ``flops["ensemble"]`` is the evaluation's figure."""
    cfg, ds, bs = run.cfg, run.data, run.cfg.student.eval_batch_size
    x_time = batcher_for(ds, ds.test, run.device).batch(timing_rows(len(fig.y), bs * cfg.evaluate.timing_batches))[0]
    one = {k: SingleModel(model, m.ens.info, run.device, bs).proba
           for k, model in (("generalist", m.generalist), ("student", m.student), ("born_again", m.born_again),
                            ("second", m.second), ("hard_labels", m.hard)) if model is not None}
    fns = {"generalist": one["generalist"], "ensemble": m.ens.proba, "student": one["student"]}
    if m.born_again is not None:
        fns["born_again"] = one["born_again"]
    if m.second is not None:
        fns["two_generalists"] = lambda x: (one["generalist"](x) + one["second"](x)) / 2
    flops = {k: inference_flops(fn, x_time, bs) for k, fn in fns.items()}
    for k in ("hard_labels", "second"):
        if k in one:
            flops[k] = inference_flops(one[k], x_time, bs)
    flops["ensemble"] = _ensemble_flops(run) or flops["ensemble"]  # the frontier's figure, the cascade's target
    if m.second is not None and cfg.ablate.cascade:
        if len(ds.split("val")):
            c, fig.probs["cascade"] = cascade_control(run, one["generalist"], one["second"], flops["generalist"],
                                                      flops["second"], flops["ensemble"], fig.p_gen, x_time)
            fig.control["cascade"], fig.top1["cascade"], flops["cascade"] = c, c["test_top1"], c["inference_flops"]
            fns["cascade"] = lambda x: cascade_proba(one["generalist"], one["second"], x, c["threshold"])[0]
        else:
            log.warning("cascade control skipped: the data set has no validation split to fit its threshold on")
    return flops, seconds_per_example(fns, x_time, bs, REPEATS), int(len(x_time))


def _train_costs(run: Run, m: Models, fig: Figures, flops: dict, histories: dict) -> dict:
    """Training compute in generalist-example equivalents: the student's entry (returned) and each
    control's (added to ``fig.control``)."""
    cfg, st = run.cfg, run.cfg.student
    unit = generalist_train_flops(run, m.generalist)
    teacher_flops = {"ensemble": flops["ensemble"], "generalist": flops["generalist"]}  # a table, an API: none

    def train_cost(model, hist: list[dict], teacher: str | None) -> dict:
        """Samples (steps x batch size), FLOPs per sample (a training step's, plus the teacher's
        forward pass on it) and their product over the generalist's FLOPs per example."""
        samples = sum(h["steps"] for h in hist) * st.batch_size
        per_sample = training_flops(run, model) + teacher_flops.get(teacher, 0.0)
        return {"train_samples": samples, "train_flops_per_sample": per_sample,
                "train_compute": train_compute(samples, per_sample, unit)}

    for key, model, teacher in (("born_again", m.born_again, "generalist"), ("hard_labels", m.hard, None)):
        if model is not None:
            fig.control[key].update(train_cost(model, histories[key], teacher), inference_flops=flops[key])
    if m.second is not None:
        samples = cfg.generalist.epochs * len(run.data.train)  # the generalist's network and recipe: its unit
        fig.control["second_generalist"].update(train_samples=samples, train_flops_per_sample=unit,
                                                train_compute=train_compute(samples, unit, unit),
                                                inference_flops=flops["second"])
        fig.control["two_generalist_average"]["inference_flops"] = flops["two_generalists"]
    return {**train_cost(m.student, histories["student"], st.teacher), "generalist_train_flops_per_example": unit}


def _epoch_times(run: Run, histories: dict) -> dict:
    """The student's and the generalist's median epoch seconds. The generalist's comes from the
    second generalist when there is one (same config, trained beside the student, so machine load
    and threads are alike), else from the generalist stage's own history."""
    if histories.get("second_generalist"):
        gen, source = _median_epoch_seconds(histories["second_generalist"]), "the second generalist, trained by this stage"
    else:
        gen = _median_epoch_seconds(read_json(run.generalist.metrics).get("history", []))
        source = "the generalist stage's metrics.json"
    st = _median_epoch_seconds(histories["student"])
    return {"train_seconds_per_epoch": st, "generalist_train_seconds_per_epoch": gen,
            "generalist_epoch_time_source": source,
            "train_time_ratio_vs_generalist": st / gen if st and gen else None}


def distill(run: Run) -> dict:
    """`specialists distill`: train the student and its controls (independent jobs, see
    ``launch.executor``), then compare them; writes ``student/metrics.json``."""
    cfg, st = run.cfg, run.cfg.student
    if st.model.pretrained:  # refuse weights that do not fit the student before any work
        new_student(run, cfg.seed)
    taught = teacher_of(run, ask=True)  # a table validated, an API asked, before anything is trained
    kinds = _kinds(run)
    names = {"student": "student", "born_again": "born-again student", "second_generalist": "second generalist",
             "hard_labels": "soft tree on hard labels"}
    # the second generalist (the generalist's whole schedule) is the longest job: started first,
    # a pool of workers is not left waiting on it at the end
    order = sorted(kinds, key=lambda k: k != "second_generalist")
    histories = dict(zip(order, run_jobs([Job(names[k], student_job, (run, k)) for k in order], cfg.launch, "student",
                                                  run.tracker)))

    m = _load(run, taught, kinds)
    fig = _test_figures(run, m, histories)
    flops, secs, timing_examples = _inference_cost(run, m, fig)
    train = _train_costs(run, m, fig, flops, histories)
    p_student, y = fig.probs["student"], fig.y
    teacher_test = {"ensemble": fig.p_ens, "generalist": fig.p_gen}.get(st.teacher)
    api = _api_summary(run, taught.asked, p_student) if taught.asked else None
    is_tree = student_model_config(cfg).name == TREE

    def gain_over(key: str) -> dict | None:
        return (report.gain(fig.probs[key], p_student, y, cfg.evaluate.bootstrap, cfg.seed)
                if key in fig.probs else None)

    result = {
        **fig.final,
        "teacher": st.teacher,
        "teacher_probs": taught.probs_info,
        "teacher_api": api,
        "model": to_dict(student_model_config(cfg)),
        "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
        "loss": f"soft tree: {st.tree.loss}" if is_tree else cfg.distill.loss,
        "agreement_with_teacher": (_agreement(p_student, teacher_test) if teacher_test is not None else
                                   api["test_agreement"] if api else None),
        "agreement_with_ensemble": _agreement(p_student, fig.p_ens),
        "agreement_with_generalist": _agreement(p_student, fig.p_gen),
        "epochs": st.epochs,
        "steps": sum(h["steps"] for h in histories["student"]),
        **_epoch_times(run, histories),
        "inference_seconds_per_example": secs["student"],
        "inference_flops": flops["student"],
        **train,
        "inference_ratio_vs_ensemble": secs["student"] / secs["ensemble"] if secs["ensemble"] else None,
        "timing_examples": timing_examples,
        "timing_repeats": REPEATS,
        "top1_source": "evaluation.json" if fig.from_evaluation else "computed",
        "control": fig.control,
        "comparisons": report.comparisons(fig.top1, secs, flops, st.teacher, is_tree),
        "gain_over_born_again": gain_over("born_again"),
        "tree": _tree_summary(run, m.student, m.hard, fig.top1, gain_over("hard_labels")) if is_tree else None,
        "history": histories["student"],
    }
    for key in ("student", "born_again", "hard_labels", "two_generalists", "cascade", "second_generalist"):
        if key in fig.probs:
            _save_predictions(run, key, fig.probs[key])
    write_json(run.student.metrics, result)
    if "cascade" in fig.control:
        c = fig.control["cascade"]
        log.info("cascade: consults the second generalist on %.1f%% of test examples (threshold %.4f), "
                 "%.3g FLOPs per example (target %.3g), test top-1 %.4f", 100 * c["consulted_fraction"]["test"],
                 c["threshold"], c["inference_flops"], c["target_flops"], c["test_top1"])
    log.info("student (teacher %s): test top-1 %.4f (generalist %.4f, ensemble %.4f), agreement with teacher %s",
             st.teacher, fig.top1["student"], fig.top1["generalist"], fig.top1["ensemble"],
             f"{result['agreement_with_teacher']:.4f}" if result["agreement_with_teacher"] is not None else "-")
    return result
