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

Writes ``student/model.safetensors`` (loadable by :class:`~specialists.inference.Student`) and
``student/metrics.json`` (test top-1/top-5/NLL, teacher, agreement with the teacher, train
seconds per epoch, inference seconds per example, ``control`` and ``comparisons``).
"""

from __future__ import annotations

import logging
import statistics

import numpy as np
import torch

from ..core import metrics
from ..core.losses import UNLABELLED
from ..data import Split
from ..data.teacher_table import load_teacher_probs, source_train_size
from ..data.text import read_texts
from ..device import agree, prepare_model
from ..engine.executors import Job, as_run, run_jobs
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
from ..rundir import Run, to_dict
from ..rundir.config import TREE, student_model_config
from ..rundir.io import file_sha256, rank0, read_json, write_json

log = logging.getLogger("specialists")


def new_student(run: Run, seed: int) -> torch.nn.Module:
    """A freshly initialized student (seeded: the student and its born-again twin start equal)."""
    torch.manual_seed(seed)
    return run.new_model(run.data.num_classes, student_model_config(run.cfg))


def _median_epoch_seconds(history: list[dict]) -> float | None:
    secs = [h["seconds"] for h in history if "seconds" in h]
    return float(statistics.median(secs)) if secs else None


def _test_probs(run: Run, model) -> torch.Tensor:
    return split_probs(run, model, "test", run.cfg.student.eval_batch_size)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


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


def _api_answers(run: Run) -> dict:
    """Ask the API teacher about every training input, unlabelled text and test input it has not
    answered yet (rank 0 alone writes the cache; every rank gets the answers). Returns the
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
        return api.query(inputs)

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
    ds, asked = run.data, _api_answers(run)
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
    secs = seconds_per_example(fns, x_time, bs, REPEATS)

    names = {"generalist": "generalist", "ensemble": "routed ensemble (generalist + specialists)",
             "student": f"student of the {'ensemble' if teacher_name == 'ensemble' else teacher_name + ' teacher'}",
             "born_again": "born-again student (teacher: generalist)",
             "two_generalists": "two-generalist average (second seed)",
             "hard_labels": "the same tree on hard labels"}
    if is_tree:
        names["student"] = f"soft tree distilled from the {teacher_name}"
    comparisons = {k: {"name": names[k], "test_top1": top1[k], "seconds_per_example": secs.get(k)}
                   for k in ("generalist", "ensemble", "student", "hard_labels", "born_again", "two_generalists")
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
    write_json(run.student.metrics, result)
    log.info("student (teacher %s): test top-1 %.4f (generalist %.4f, ensemble %.4f), agreement with teacher %s",
             teacher_name, top1["student"], top1["generalist"], top1["ensemble"],
             f"{result['agreement_with_teacher']:.4f}" if result["agreement_with_teacher"] is not None else "-")
    return result
