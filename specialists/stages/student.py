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
from pathlib import Path

import numpy as np
import torch

from ..core import metrics
from ..core.cost import cascade_proba, count_flops, fit_cascade
from ..core.losses import UNLABELLED
from ..data import Split
from ..data.teacher_table import load_teacher_probs, source_train_size
from ..data.text import read_texts
from ..device import agree, prepare_model
from ..engine.executors import Job, as_run, run_jobs
from ..engine.flops import generalist_train_flops, inference_flops, train_compute, training_flops
from ..engine.teacher_api import TeacherAPI
from ..engine.teachers import ApiTeacher, EnsembleTeacher, GeneralistTeacher, ProbsTeacher
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
                    p_first: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The cascade of two generalists (``first``, ``second``: batch -> probabilities): the
    threshold fitted on the validation split to cost ``target_flops`` per example, then the
    cascade run on the test split, its FLOPs counted as it runs. ``p_first``: the first's test
    probabilities (its paired interval's reference). Returns its ``control`` entry and its
    test probabilities."""
    ds, cfg, bs = run.data, run.cfg, run.cfg.student.eval_batch_size
    val = ds.split("val")
    p_val = torch.cat([first(x).float().cpu() for x, _ in ds.batcher(val, run.device).iterate(bs)])
    fit = fit_cascade(p_val.max(1).values, first_flops, second_flops, target_flops)
    t, parts, flops = fit["threshold"], [], 0
    for x, _ in ds.batcher(ds.test, run.device).iterate(bs):
        flops += count_flops(lambda: parts.append(cascade_proba(first, second, x, t)))  # noqa: B023 (called now)
    q = torch.cat([p.float().cpu() for p, _ in parts])
    asked = torch.cat([a.cpu() for _, a in parts])
    y = ds.test.y
    boot = metrics.paired_bootstrap(metrics.topk_correct(p_first, y), metrics.topk_correct(q, y),
                                    cfg.evaluate.bootstrap, cfg.seed)
    top1 = metrics.accuracy(q, y)
    return {"threshold": t, "target_flops": target_flops, "target_fraction": fit["target_fraction"],
            "consulted_fraction": {"val": fit["val_fraction"], "test": float(asked.float().mean())},
            "val_flops": fit["val_flops"], "inference_flops": flops / len(y) if len(y) else None,
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


def _api_teacher(run: Run) -> tuple[ApiTeacher, Split]:
    """The API teacher and what its student trains on: the answered training examples (their
    labels kept), then the answered unlabelled texts (label ``UNLABELLED``: soft targets only)."""
    ds, asked = run.data, _api_answers(run, cache_only=True)  # distill asked (and warned of a spent budget) once
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


def _teacher(run: Run):
    """The student's teacher, and the split it trains on (None: the training split)."""
    st = run.cfg.student
    if st.teacher == "ensemble":
        return EnsembleTeacher(SpecialistEnsemble.from_run(run, batch_size=st.eval_batch_size)), None
    if st.teacher == "generalist":
        return GeneralistTeacher(run.load_generalist(), run.device), None
    if st.teacher == "api":
        return _api_teacher(run)
    return _probs_teacher(run)[0], None


@torch.inference_mode()
def _mixture_top1(run: Run, tree) -> float:
    """A soft tree's test top-1 when every leaf speaks (the mixture ``sum_l P_l Q_l``)."""
    batcher = run.data.batcher(run.data.test, run.device)
    p = torch.cat([tree.mixture_proba(x).float().cpu() for x, _ in batcher.iterate(run.cfg.student.eval_batch_size)])
    return metrics.accuracy(p, run.data.test.y)


def _tree_summary(run: Run, tree, hard, top1: dict, gain: dict | None, explained: int = 3) -> dict:
    """The soft tree's own figures: its size and settings, max-path (``top1``, already measured)
    and mixture top-1 of it and of its hard-label control, and the paths of the first
    ``explained`` test examples."""
    st = run.cfg.student
    x = run.data.batcher(run.data.test, run.device).batch(torch.arange(min(explained, len(run.data.test))))[0]
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
        files, (teacher, split) = run.student, _teacher(run)
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


def distill(run: Run) -> dict:
    """`specialists distill`: train the student and its controls (independent jobs, see
    ``launch.executor``), then compare them; writes ``student/metrics.json``."""
    cfg, ds, device = run.cfg, run.data, run.device
    st = cfg.student
    if st.model.pretrained:  # refuse weights that do not fit the student before any work
        new_student(run, cfg.seed)
    probs_info = asked = None
    if st.teacher == "probs":  # validate the table before anything is built or written
        probs_info = _probs_teacher(run)[1]
    if st.teacher == "api":  # ask before anything is trained (the student's job then reads the cache)
        asked = _api_answers(run)
    controls = st.controls and st.teacher == "ensemble"
    is_tree = student_model_config(cfg).name == TREE
    kinds = ["student"] + (["hard_labels"] if is_tree else []) + (["born_again", "second_generalist"] if controls else [])
    names = {"student": "student", "born_again": "born-again student", "second_generalist": "second generalist",
             "hard_labels": "soft tree on hard labels"}
    histories = dict(zip(kinds, run_jobs([Job(names[k], student_job, (run, k)) for k in kinds], cfg.launch)))
    history, ba_history, sg_history, hl_history = (histories.get(k) for k in
                                                   ("student", "born_again", "second_generalist", "hard_labels"))

    def trained(files, model_cfg=None):
        return prepare_model(run.load_model(files, ds.num_classes, model_cfg), device, ds.is_image).eval()

    model_cfg = to_dict(student_model_config(cfg))
    generalist = run.load_generalist()
    ens = SpecialistEnsemble.from_run(run, batch_size=st.eval_batch_size)
    student = trained(run.student, student_model_config(cfg))
    born_again = trained(run.born_again, student_model_config(cfg)) if controls else None
    second = trained(run.second_generalist) if controls else None
    hard = trained(run.hard_labels, student_model_config(cfg)) if is_tree else None
    teacher_name = st.teacher

    # --- test metrics --------------------------------------------------------------------
    y = ds.test.y
    pred = ens.predict_over(x for x, _ in ds.batcher(ds.test, device).iterate(ens.batch_size))
    p_gen, p_ens = pred["generalist"].float().cpu(), pred["ensemble"].float().cpu()
    p_student = _test_probs(run, student)
    final = split_metrics(run, student, ("val", "test"), st.eval_batch_size)
    ev = _evaluation_top1(run)
    top1 = {"generalist": ev.get("generalist", metrics.accuracy(p_gen, y)),
            "ensemble": ev.get("ensemble", metrics.accuracy(p_ens, y)),
            "student": final["test_top1"]}
    teacher_test = {"ensemble": p_ens, "generalist": p_gen}.get(teacher_name)
    control: dict = {}
    probs = {"student": p_student}

    def student_control(key: str, model, teacher: str, history) -> dict:
        """A control student's test figures (its probabilities kept in ``probs`` for the gains)."""
        probs[key] = _test_probs(run, model)
        top1[key] = metrics.accuracy(probs[key], y)
        return {"test_top1": top1[key], "test_top5": metrics.accuracy(probs[key], y, 5),
                "test_nll": metrics.nll(probs[key], y), "teacher": teacher,
                "train_seconds_per_epoch": _median_epoch_seconds(history), "history": history}

    if born_again is not None:
        control["born_again"] = {**student_control("born_again", born_again, "generalist", ba_history),
                                 "agreement_with_generalist": _agreement(probs["born_again"], p_gen)}
    if hard is not None:
        control["hard_labels"] = student_control("hard_labels", hard, "labels", hl_history)
    if second is not None:
        p_second = _test_probs(run, second)
        probs["two_generalists"] = (p_gen + p_second) / 2
        top1["two_generalists"] = metrics.accuracy(probs["two_generalists"], y)
        control["second_generalist"] = {
            "seed": cfg.seed + 1, "test_top1": metrics.accuracy(p_second, y), "test_top5": metrics.accuracy(p_second, y, 5),
            "test_nll": metrics.nll(p_second, y), "history": sg_history}
        control["two_generalist_average"] = {
            "test_top1": top1["two_generalists"], "test_top5": metrics.accuracy(probs["two_generalists"], y, 5),
            "test_nll": metrics.nll(probs["two_generalists"], y)}

    # --- inference time per example (one protocol for every row) ---------------------------
    info, bs = ens.info, st.eval_batch_size
    x_time = ds.batcher(ds.test, device).batch(timing_rows(len(y), bs * cfg.evaluate.timing_batches))[0]
    one = {k: SingleModel(m, info, device, bs).proba for k, m in
           (("generalist", generalist), ("student", student), ("born_again", born_again), ("second", second)) if m is not None}
    fns = {"generalist": one["generalist"], "ensemble": ens.proba, "student": one["student"]}
    if born_again is not None:
        fns["born_again"] = one["born_again"]
    if second is not None:
        fns["two_generalists"] = lambda x: (one["generalist"](x) + one["second"](x)) / 2

    # --- FLOPs per example on the same sample, and the cascade (timed with the rest) ---------
    flops = {k: inference_flops(fn, x_time, bs) for k, fn in fns.items()}
    if hard is not None:
        flops["hard_labels"] = inference_flops(SingleModel(hard, info, device, bs).proba, x_time, bs)
    if second is not None:
        flops["second"] = inference_flops(one["second"], x_time, bs)
    f_ens = _ensemble_flops(run) or flops["ensemble"]  # the evaluation's figure: the frontier's, the cascade's target
    if second is not None and cfg.ablate.cascade:
        if len(ds.split("val")):
            control["cascade"], probs["cascade"] = cascade_control(run, one["generalist"], one["second"],
                                                                   flops["generalist"], flops["second"], f_ens, p_gen)
            top1["cascade"], flops["cascade"] = control["cascade"]["test_top1"], control["cascade"]["inference_flops"]
            threshold = control["cascade"]["threshold"]
            fns["cascade"] = lambda x: cascade_proba(one["generalist"], one["second"], x, threshold)[0]
        else:
            log.warning("cascade control skipped: the data set has no validation split to fit its threshold on")
    secs = seconds_per_example(fns, x_time, bs, REPEATS)

    # --- training compute, in generalist-example equivalents ---------------------------------
    unit = generalist_train_flops(run, generalist)
    teacher_flops = {"ensemble": f_ens, "generalist": flops["generalist"]}  # a table or an API: nothing counted

    def train_cost(model, hist: list[dict], teacher: str | None) -> dict:
        """Samples (steps x batch size), FLOPs per sample (a training step's, plus the teacher's
        forward pass on it) and their product over the generalist's FLOPs per example."""
        samples = sum(h["steps"] for h in hist) * st.batch_size
        per_sample = training_flops(run, model) + teacher_flops.get(teacher, 0.0)
        return {"train_samples": samples, "train_flops_per_sample": per_sample,
                "train_compute": train_compute(samples, per_sample, unit)}

    for key, model, hist, teacher in (("born_again", born_again, ba_history, "generalist"),
                                      ("hard_labels", hard, hl_history, None)):
        if model is not None:
            control[key].update(train_cost(model, hist, teacher), inference_flops=flops[key])
    if second is not None:
        samples = cfg.generalist.epochs * len(ds.train)  # the generalist's network and recipe: its unit
        control["second_generalist"].update(train_samples=samples, train_flops_per_sample=unit,
                                            train_compute=train_compute(samples, unit, unit),
                                            inference_flops=flops["second"])
        control["two_generalist_average"]["inference_flops"] = flops["two_generalists"]

    names = {"generalist": "generalist", "ensemble": "routed ensemble (generalist + specialists)",
             "student": f"student of the {'ensemble' if teacher_name == 'ensemble' else teacher_name + ' teacher'}",
             "born_again": "born-again student (teacher: generalist)",
             "two_generalists": "two-generalist average (second seed)",
             "hard_labels": "the same tree on hard labels",
             "cascade": "cascade: the second generalist only where the first is unsure"}
    if is_tree:
        names["student"] = f"soft tree distilled from the {teacher_name}"
    flops["ensemble"] = f_ens
    comparisons = {k: {"name": names[k], "test_top1": top1[k], "seconds_per_example": secs.get(k),
                       "flops_per_example": flops.get(k)}
                   for k in ("generalist", "ensemble", "student", "hard_labels", "born_again", "two_generalists",
                             "cascade")
                   if k in top1}

    def gain_over(control_key: str) -> dict | None:
        """The student's test top-1 minus a control's, in points, with a paired-bootstrap interval."""
        if control_key not in probs:
            return None
        boot = metrics.paired_bootstrap(metrics.topk_correct(probs[control_key], y),
                                        metrics.topk_correct(p_student, y), cfg.evaluate.bootstrap, cfg.seed)
        return {"points": 100 * (top1["student"] - top1[control_key]),
                "ci95_points": [100 * c for c in boot["ci95"]] if boot.get("ci95") else None,
                "test_examples": int(len(y))}

    # the generalist's epoch time: from the second generalist when there is one (same config,
    # trained beside the student, so machine load and threads are alike), else the first's
    if sg_history:
        gen_epoch, gen_source = _median_epoch_seconds(sg_history), "the second generalist, trained by this stage"
    else:
        gen_epoch = _median_epoch_seconds(read_json(run.generalist.metrics).get("history", []))
        gen_source = "the generalist stage's metrics.json"
    st_epoch = _median_epoch_seconds(history)
    api = _api_summary(run, asked, p_student) if asked else None
    result = {
        **final,
        "teacher": teacher_name,
        "teacher_probs": probs_info,
        "teacher_api": api,
        "model": model_cfg,
        "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
        "loss": f"soft tree: {st.tree.loss}" if is_tree else cfg.distill.loss,
        "agreement_with_teacher": (_agreement(p_student, teacher_test) if teacher_test is not None else
                                   api["test_agreement"] if api else None),
        "agreement_with_ensemble": _agreement(p_student, p_ens),
        "agreement_with_generalist": _agreement(p_student, p_gen),
        "epochs": st.epochs,
        "steps": sum(h["steps"] for h in history),
        "train_seconds_per_epoch": st_epoch,
        "generalist_train_seconds_per_epoch": gen_epoch,
        "generalist_epoch_time_source": gen_source,
        "train_time_ratio_vs_generalist": st_epoch / gen_epoch if st_epoch and gen_epoch else None,
        "inference_seconds_per_example": secs["student"],
        "inference_flops": flops["student"],
        **train_cost(student, history, teacher_name),
        "generalist_train_flops_per_example": unit,
        "inference_ratio_vs_ensemble": secs["student"] / secs["ensemble"] if secs["ensemble"] else None,
        "timing_examples": int(len(x_time)),
        "timing_repeats": REPEATS,
        "top1_source": "evaluation.json" if ev else "computed",
        "control": control,
        "comparisons": comparisons,
        "gain_over_born_again": gain_over("born_again"),
        "tree": _tree_summary(run, student, hard, top1, gain_over("hard_labels")) if is_tree else None,
        "history": history,
    }
    for key, p in (("student", p_student), *((k, probs[k]) for k in ("born_again", "hard_labels", "two_generalists",
                                                                     "cascade") if k in probs)):
        _save_predictions(run, key, p)
    if second is not None:
        _save_predictions(run, "second_generalist", p_second)
    write_json(run.student.metrics, result)
    if "cascade" in control:
        c = control["cascade"]
        log.info("cascade: consults the second generalist on %.1f%% of test examples (threshold %.4f), "
                 "%.3g FLOPs per example (target %.3g), test top-1 %.4f", 100 * c["consulted_fraction"]["test"],
                 c["threshold"], c["inference_flops"], c["target_flops"], c["test_top1"])
    log.info("student (teacher %s): test top-1 %.4f (generalist %.4f, ensemble %.4f), agreement with teacher %s",
             teacher_name, top1["student"], top1["generalist"], top1["ensemble"],
             f"{result['agreement_with_teacher']:.4f}" if result["agreement_with_teacher"] is not None else "-")
    return result
