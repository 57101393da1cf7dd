"""Tests for specialists.student: the KD loss against hand-computed values, the ensemble
teacher's targets against an independent recomputation on the very augmented batch, the
black-box ``.npy`` teacher and its refusals, resuming a killed student run, and the stage's
outputs and controls on the tiny run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from specialists.combine import combine
from specialists.core.losses import distillation_loss, log_probs
from specialists.data import Batcher, teacher_table
from specialists.engine import steps as steps_mod
from specialists.engine import teachers as teachers_mod
from specialists.engine import trainers
from specialists.engine.fit import predict_logits
from specialists.errors import SpecialistsError
from specialists.inference import SpecialistEnsemble, Student
from specialists.models import count_parameters
from specialists.rundir import Run
from specialists.stages import BY_KEY
from specialists.stages import student as student_mod

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread


def _copy(tiny_run, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(tiny_run.run_dir, dst, ignore=shutil.ignore_patterns("manifest.lock"))
    return dst


def _distill(cfg):
    """The student stage as the pipeline runs it, without its upstream check (the copied tiny
    run has no evaluation): the stage, then the reports its row names."""
    run = Run(cfg)
    run.save_config()  # as run_stage does: Student.from_run reads the student model from it
    result = student_mod.distill(run)
    for report in BY_KEY["student"].reports:
        report(run)
    return result


# ----------------------------------------------------------------------------- the loss
def _np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _hand_kd(z_s, p_t, y, T, alpha):
    """alpha * T^2 * mean KL(p_t || softmax(z_s/T)) + (1 - alpha) * CE, and its gradient in z_s."""
    B, C = z_s.shape
    q_T = _np_softmax(z_s / T)
    p = _np_softmax(z_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p_t > 0, p_t * (np.log(p_t) - np.log(q_T)), 0.0).sum(1)
    ce = -np.log(p[np.arange(B), y])
    loss = alpha * T * T * kl.mean() + (1 - alpha) * ce.mean()
    onehot = np.eye(C)[y]
    grad = alpha * T * (q_T - p_t) / B + (1 - alpha) * (p - onehot) / B
    return loss, grad


@pytest.mark.parametrize("teacher", ["logits", "probabilities"])
def test_kd_loss_and_gradient_match_hand_computation(teacher):
    T, alpha = 2.0, 0.7
    z_s = np.array([[1.0, -0.5, 0.25], [0.3, 2.0, -1.0]])
    y = np.array([0, 2])
    if teacher == "logits":
        z_t = np.array([[2.0, 0.0, -1.0], [-0.5, 1.5, 0.5]])
        p_t = _np_softmax(z_t / T)
        teacher_logits = torch.tensor(z_t, dtype=torch.float64)
    else:  # a black-box teacher with an exact zero: targets softmax(log(p) / T)
        p = np.array([[0.7, 0.3, 0.0], [0.1, 0.6, 0.3]])
        p_t = p ** (1 / T) / (p ** (1 / T)).sum(1, keepdims=True)
        teacher_logits = log_probs(torch.tensor(p, dtype=torch.float64))
    want_loss, want_grad = _hand_kd(z_s, p_t, y, T, alpha)
    # by hand for the first case: T^2 KL and CE summed with weights 0.7 / 0.3
    zs = torch.tensor(z_s, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(zs, teacher_logits, torch.tensor(y), T, alpha, "kl")
    loss.backward()
    assert torch.isfinite(loss)
    # the library computes the loss in float32 (bf16-safe); compare at float32 precision
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(zs.grad.numpy(), want_grad, rtol=1e-5, atol=1e-7)


def test_kd_loss_fixed_numbers():
    """One value fixed by hand, so a change of convention (T^2, mean, alpha side) shows."""
    z_s = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    z_t = torch.tensor([[np.log(4.0) * 2, 0.0, 0.0]], dtype=torch.float64)  # T=2: targets (4,1,1)/6
    loss = distillation_loss(z_s, z_t, torch.tensor([1]), 2.0, 0.7, "kl")
    p = np.array([4, 1, 1]) / 6
    kl = float((p * np.log(p * 3)).sum())
    assert float(loss) == pytest.approx(0.7 * 4 * kl + 0.3 * np.log(3), rel=1e-6)


# ----------------------------------------------------------------------------- ensemble targets
def test_ensemble_targets_are_combine_on_the_same_augmented_batch(tiny_run, tmp_path, monkeypatch):
    d = _copy(tiny_run, tmp_path)
    cfg = tiny_config(d, "student.epochs=1", "student.controls=false")
    run = Run(cfg)
    ens = SpecialistEnsemble.from_run(d, device="cpu")
    seen_x, used = [], []
    real_targets, real_loss = teachers_mod.ensemble_teacher_logits, steps_mod.distillation_loss

    def spy_targets(e, x):
        seen_x.append(x.clone())
        return real_targets(e, x)

    def spy_loss(z_s, z_t, y, *args, **kw):
        used.append((z_t.detach().clone(), y.clone()))
        return real_loss(z_s, z_t, y, *args, **kw)

    routed_rows = [0] * len(ens.specialists)

    def counter(m):
        def hook(module, inputs, output):
            routed_rows[m] += len(inputs[0])
        return hook

    hooks = [s.register_forward_hook(counter(m)) for m, s in enumerate(ens.specialists)]
    monkeypatch.setattr(teachers_mod, "ensemble_teacher_logits", spy_targets)
    monkeypatch.setattr(steps_mod, "distillation_loss", spy_loss)
    model = student_mod.new_student(run, cfg.seed)
    trainers.train_student(run, model, teachers_mod.EnsembleTeacher(ens), None, seed=cfg.seed, desc="t",
                           eval_splits=())
    for h in hooks:
        h.remove()
    assert len(seen_x) == len(used) >= 2

    # the batches are the student's own seeded, augmented batches
    batches, _ = trainers.student_batches(run, cfg.student.batch_size, cfg.seed, augment=True)
    first = list(batches(0))
    total_active = 0
    for b, (x, y, idx) in enumerate(first):
        assert torch.equal(seen_x[b], x) and torch.equal(used[b][1], y)
        plain, _ = Batcher(run.data, run.data.train, "cpu").batch(idx)
        if b == 0:
            assert not torch.equal(x, plain), "the teacher must see the augmented batch"
        # independent recomputation: every model on the full batch, routing by hand, combine
        with torch.no_grad():
            p_g = torch.softmax(ens.generalist(x), 1)
            p_all = [torch.softmax(s(x), 1) for s in ens.specialists]
        top = p_g.argmax(1)
        active = torch.stack([torch.isin(top, s) for s in ens.subsets], 1)
        q = combine(p_g, list(ens.subsets), p_all, active, solver=cfg.combine.solver)
        assert active.any()
        total_active += int(active.sum())
        torch.testing.assert_close(torch.exp(used[b][0]), q, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(used[b][0], torch.log(q), atol=1e-4, rtol=1e-4)  # teacher logits = log(q)
    # each specialist ran only on its routed rows (1 + |A| forwards per example, not 1 + M)
    assert sum(routed_rows) == total_active < len(ens.specialists) * sum(len(x) for x, _, _ in first)


# ----------------------------------------------------------------------------- black-box teacher
def _source_labels(ds):
    n, exact = teacher_table.source_train_size(ds)
    assert exact and n == len(ds.train) + len(ds.val)
    y = np.full(n, -1)
    y[ds.train.index.numpy()] = ds.train.y.numpy()
    y[ds.val.index.numpy()] = ds.val.y.numpy()
    assert (y >= 0).all()
    return y


def test_probs_teacher_trains_a_smaller_student(tiny_run, tmp_path):
    d = _copy(tiny_run, tmp_path)
    run = Run(tiny_config(d))
    ds = run.data
    # a black-box teacher: the generalist's probabilities, in the source training order
    n, _ = teacher_table.source_train_size(ds)
    table = np.zeros((n, ds.num_classes), np.float32)
    for split in (ds.train, ds.val):
        z = predict_logits(run.load_generalist(), Batcher(ds, split, run.device))
        table[split.index.numpy()] = torch.softmax(z, 1).numpy()
    path = tmp_path / "teacher.npy"
    np.save(path, table)
    cfg = tiny_config(d, "student.teacher=probs", f"student.teacher_probs={path}", "student.epochs=2",
                      "student.model.name=mlp", "student.model.width=16", "student.model.depth=1")
    teacher, info = student_mod._probs_teacher(Run(cfg))
    i = torch.arange(0, len(ds.train), 7)
    torch.testing.assert_close(teacher.rows[i], torch.from_numpy(table[ds.train.index[i].numpy()]), atol=1e-6, rtol=1e-5)
    assert not teacher.augment

    result = _distill(cfg)
    assert result["teacher"] == "probs" and result["teacher_probs"]["shape"] == [n, ds.num_classes]
    assert len(result["teacher_probs"]["sha256"]) == 64
    assert "born_again" not in result["control"]  # controls only with the ensemble teacher
    st = Student.from_run(d, device="cpu")
    assert count_parameters(st.model) < count_parameters(run.load_generalist())
    probs = st.predict_proba(ds.test.x)
    assert probs.shape == (len(ds.test), ds.num_classes)
    assert float((probs.argmax(1) == ds.test.y).float().mean()) == pytest.approx(result["test_top1"], abs=1e-6)
    assert "student" in (d / "student" / "student.md").read_text()


def _bad_tables(n, c):
    good = np.full((n, c), 1.0 / c)
    nan = good.copy()
    nan[5, 1] = np.nan
    inf = good.copy()
    inf[6, 0] = np.inf
    neg = good.copy()
    neg[7, 0], neg[7, 1] = -0.1, neg[7, 1] + 0.1
    off = good.copy()
    off[3, 2] += 0.01
    off[9, 0] += 0.5
    within = good.copy()
    within[4, 0] += 5e-4  # within 1e-3: accepted
    return {
        "rows_missing": (good[:-1], ["wrong shape", f"first bad row {n - 1}"]),
        "rows_extra": (np.vstack([good, good[:1]]), ["wrong shape", f"first bad row {n}"]),
        "columns": (np.full((n, c + 1), 1.0 / (c + 1)), ["wrong shape", f"{c + 1} columns", "first bad row 0"]),
        "one_dimensional": (good[:, 0].copy(), ["wrong shape"]),
        "nan": (nan, ["row 5", "NaN"]),
        "inf": (inf, ["row 6", "infinite"]),
        "negative": (neg, ["row 7", "negative"]),
        "not_summing_to_one": (off, ["row 3", "sum"]),
        "ok_within_tolerance": (within, None),
    }


def test_bad_probs_files_are_refused_with_one_line_and_train_nothing(tiny_run, tmp_path):
    d = _copy(tiny_run, tmp_path)
    ds = Run(tiny_config(d)).data
    n, c = len(ds.train) + len(ds.val), ds.num_classes
    for name, (array, words) in _bad_tables(n, c).items():
        path = tmp_path / f"{name}.npy"
        np.save(path, array.astype(np.float32))
        if words is None:
            assert teacher_table.load_teacher_probs(path, n, c).shape == (n, c)
            continue
        cfg = tiny_config(d, "student.teacher=probs", f"student.teacher_probs={path}")
        with pytest.raises(SpecialistsError) as err:
            _distill(cfg)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg, (name, msg)
        for w in words:
            assert w in msg, (name, msg)
        assert not (d / "student").exists(), name  # nothing trained, nothing written


# ----------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


def test_killed_student_resumes_to_the_same_result(tiny_run, tmp_path, monkeypatch):
    import specialists.engine.fit as train_mod

    extra = ("student.epochs=2", "student.controls=false", "student.batch_size=32")
    a = _copy(tiny_run, tmp_path, "a")
    whole = _distill(tiny_config(a, *extra))

    b = _copy(tiny_run, tmp_path, "b")
    real_save = train_mod.save_state

    def save_then_die(path, state):
        real_save(path, state)
        raise _Killed  # the process dies right after epoch 1's checkpoint

    monkeypatch.setattr(train_mod, "save_state", save_then_die)
    with pytest.raises(_Killed):
        _distill(tiny_config(b, *extra))
    monkeypatch.setattr(train_mod, "save_state", real_save)
    assert (b / "student" / "state.pt").exists() and not (b / "student" / "model.safetensors").exists()
    resumed = _distill(tiny_config(b, *extra))

    wa, wb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for key in ("test_top1", "test_top5", "test_nll", "val_top1", "agreement_with_teacher"):
        assert resumed[key] == whole[key], key
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])


# ----------------------------------------------------------------------------- the stage
def _check_cost_and_cascade(d, m, n_val: int):
    """The student stage's costs, its cascade and the frontier it re-renders."""
    import numpy as np

    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    f_g, f_ens = ev["cost"]["generalist_flops"], ev["cost"]["ensemble_flops"]
    unit = ev["cost"]["generalist_train_flops_per_example"]
    c, ctrl = m["comparisons"], m["control"]
    # the student and the born-again student are the generalist's network: its FLOPs, and per
    # training sample its training step plus the teacher's forward pass
    assert m["inference_flops"] == ctrl["born_again"]["inference_flops"] == f_g
    assert m["train_flops_per_sample"] == pytest.approx(unit + f_ens)
    assert ctrl["born_again"]["train_flops_per_sample"] == pytest.approx(unit + f_g)
    assert m["train_compute"] == pytest.approx(m["train_samples"] * (unit + f_ens) / unit)
    assert ctrl["second_generalist"]["train_compute"] == ev["cost"]["train_compute"]["generalist"]
    assert ctrl["two_generalist_average"]["inference_flops"] == pytest.approx(2 * f_g, rel=1e-3)
    # the cascade: its threshold fitted to cost what the ensemble does, then measured on test
    cas = ctrl["cascade"]
    assert cas["target_flops"] == f_ens
    assert cas["target_fraction"] == pytest.approx(min(1.0, (f_ens - f_g) / f_g), rel=1e-3)
    # on validation it consults the share asked, to within one example
    assert abs(cas["consulted_fraction"]["val"] - cas["target_fraction"]) <= 1 / n_val + 1e-9
    assert cas["val_flops"] == pytest.approx(f_g + cas["consulted_fraction"]["val"] * f_g, rel=1e-3)
    assert cas["inference_flops"] == pytest.approx(f_g + cas["consulted_fraction"]["test"] * f_g, rel=1e-3)
    y = np.load(d / "evaluation" / "test_labels.npy")
    pred = np.load(d / "student" / "cascade_predictions.npy")
    assert float((pred == y).mean()) == pytest.approx(cas["test_top1"], abs=1e-6) == c["cascade"]["test_top1"]
    assert cas["ci95_vs_generalist"][0] <= cas["change_vs_generalist"] <= cas["ci95_vs_generalist"][1]
    for key in ("student", "born_again", "second_generalist"):
        assert np.load(d / "student" / ("" if key == "student" else key) / "test_predictions.npy").shape == y.shape
    # the frontier, re-rendered after this stage, has every model and names the best control
    fr = json.loads((d / "evaluation" / "frontier.json").read_text())
    assert {e["key"] for e in fr["models"]} >= {"generalist", "ensemble", "student", "born_again", "two_generalists",
                                                "cascade"}
    assert fr["best_control"] is not None and fr["best_control"]["inference_flops"] <= 1.05 * f_ens
    assert "Best control at no more than the ensemble's inference cost" in (d / "student" / "student.md").read_text()
    assert "Best control" in (d / "evaluation" / "evaluation.md").read_text()


def test_stage_student_of_ensemble_with_controls(tiny_run, tmp_path, monkeypatch):
    from specialists.stages.pipeline import run_stage

    d = _copy(tiny_run, tmp_path)
    cfg = tiny_config(d, "student.epochs=8", "student.batch_size=32")
    run_stage(cfg, "evaluate")
    result = run_stage(cfg, "student")

    out = d / "student"
    m = json.loads((out / "metrics.json").read_text())
    assert m["teacher"] == "ensemble" and 0 <= m["test_top1"] <= 1
    for key in ("test_top5", "test_nll", "agreement_with_teacher", "train_seconds_per_epoch",
                "inference_seconds_per_example"):
        assert m[key] is not None and m[key] > 0, key
    assert set(m["control"]) == {"born_again", "second_generalist", "two_generalist_average", "cascade"}
    comps = m["comparisons"]
    assert set(comps) == {"generalist", "ensemble", "student", "born_again", "two_generalists", "cascade"}
    assert all(0 <= r["test_top1"] <= 1 and r["seconds_per_example"] > 0 for r in comps.values())
    assert m["gain_over_born_again"]["points"] == pytest.approx(
        100 * (comps["student"]["test_top1"] - comps["born_again"]["test_top1"]))
    for sub in ("born_again", "second_generalist"):
        assert (out / sub / "model.safetensors").exists()
    _check_cost_and_cascade(d, m, len(Run(cfg).data.split("val")))

    # the student agrees with the ensemble on a clear majority of test examples: on this tiny
    # run (a 44%-accurate teacher, 8x8 images) we measured 0.68 after 8 epochs
    assert m["agreement_with_teacher"] >= 0.55, m["agreement_with_teacher"]
    st = Student.from_run(d, device="cpu")
    ds = Run(cfg).data
    assert float((st.predict(ds.test.x) == ds.test.y).float().mean()) == pytest.approx(m["test_top1"], abs=1e-6)

    md = (out / "student.md").read_text()
    for row in ("| generalist |", "routed ensemble", "student of the ensemble", "born-again student",
                "two-generalist average"):
        assert row in md, row
    assert "points" in md and "specialists" in md
    ev_md = (d / "evaluation" / "evaluation.md").read_text()
    assert "born-again student" in ev_md and "two-generalist average" in ev_md
    assert result["test_top1"] == m["test_top1"]

    # rerunning trains nothing: the student and both controls are on disk
    def no_training(*a, **k):
        raise AssertionError("retrained a finished model")

    monkeypatch.setattr(student_mod, "train_student", no_training)
    monkeypatch.setattr(student_mod, "train_classifier", no_training)
    again = _distill(cfg)
    assert again["comparisons"]["born_again"]["test_top1"] == comps["born_again"]["test_top1"]
    assert again["comparisons"]["two_generalists"]["test_top1"] == comps["two_generalists"]["test_top1"]
