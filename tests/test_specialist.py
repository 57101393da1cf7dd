"""Tests for specialists.specialist: the specialist model, its training mix and schedule, and
the dustbin correction, each against an independent reference (hand numbers, float64
re-derivations, planted parameters), plus what a trained specialist records.

Heavy work reuses the session's ``tiny_run`` (conftest.py); tests that train copy what they
need into their own run directory first. One intra-op thread (``one_thread``): nothing here is
compared bit for bit with a model trained elsewhere (the tiny run is built with the session's
threads whatever this module sets), and the dedicated problem's gains below are the same with
one thread or two.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from specialists.core.heads import (
    analytic_shift,
    collapse_logits,
    fit_dustbin_shift,
    is_soft_phase,
    local_labels,
    make_specialist,
)
from specialists.data import Batcher, MixedBatches
from specialists.engine.fit import predict_logits
from specialists.models import Classifier
from specialists.rundir import Run
from specialists.rundir.io import load_weights, read_json
from specialists.stages.specialists import train_one

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def _complement(subset, num_classes):
    mask = torch.ones(num_classes, dtype=torch.bool)
    mask[torch.as_tensor(subset)] = False
    return mask


def _whole_split(ds, split):
    """Every example of ``split`` as one un-augmented batch (x, y)."""
    return Batcher(ds, split, "cpu").batch(torch.arange(len(split)))


def _fresh_run_dir(tiny_run, tmp_path: Path) -> Path:
    """A copy of the tiny run's generalist and subsets (no specialists) to train into."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, dst, ignore=shutil.ignore_patterns("specialists", "manifest.lock"))
    manifest = read_json(dst / "manifest.json")
    manifest["stages"].pop("specialists", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _linear_classifier(weight: torch.Tensor, bias: torch.Tensor) -> Classifier:
    """A Classifier whose features are the raw inputs: logits = x @ weight.T + bias."""
    model = Classifier(nn.Identity(), weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    return model.eval()


# ----------------------------------------------------------------------------- step 0


def test_step0_specialist_ranks_subset_exactly_like_the_generalist(tiny_run):
    run = Run(tiny_run)
    ds, gen = run.data, run.load_generalist()
    x_train, _ = _whole_split(ds, ds.train)
    x_test, _ = _whole_split(ds, ds.test)
    head_before = gen.head.weight.detach().clone()
    with torch.no_grad():
        feats = gen.features(x_train)
        z_g = gen(x_test)
        for s in run.load_subsets():
            S = torch.tensor(s["classes"])
            spec = make_specialist(gen, S, feats).eval()
            assert spec.head.out_features == len(S) + 1
            z_s = spec(x_test)
            # the S logits are the generalist's S logits (up to matmul rounding) ...
            torch.testing.assert_close(z_s[:, :-1], z_g[:, S], rtol=0, atol=1e-5)
            # ... so the ranking inside S is identical on every real test input
            assert torch.equal(z_s[:, :-1].argsort(1), z_g[:, S].argsort(1))
            assert torch.equal(z_s[:, :-1].argmax(1), z_g[:, S].argmax(1))
    # the generalist itself is untouched (the specialist is a copy)
    assert torch.equal(gen.head.weight.detach(), head_before)
    assert gen.head.out_features == ds.num_classes


def test_dustbin_init_approximates_logsumexp_of_the_other_classes(tiny_run):
    """Least-squares fit from training features, judged on held-out test inputs, against the
    Jensen fallback on the same inputs. Measured on the tiny run (seed 0): mean |error| 0.04-0.05
    for the fit vs 0.9-1.9 for the fallback, with the target's std about 1.7-2.0."""
    run = Run(tiny_run)
    ds, gen = run.data, run.load_generalist()
    x_train, _ = _whole_split(ds, ds.train)
    x_test, _ = _whole_split(ds, ds.test)
    with torch.no_grad():
        feats = gen.features(x_train)
        z_g = gen(x_test).double()
        for s in run.load_subsets():
            S = torch.tensor(s["classes"])
            others = _complement(S, ds.num_classes)
            target = torch.logsumexp(z_g[:, others], 1)  # independent reference, float64
            fitted = make_specialist(gen, S, feats).eval()(x_test)[:, -1].double()
            jensen = make_specialist(gen, S).eval()(x_test)[:, -1].double()
            err_fit = (fitted - target).abs().mean().item()
            err_jensen = (jensen - target).abs().mean().item()
            assert err_fit < 0.15, (S.tolist(), err_fit)
            assert err_fit < 0.25 * err_jensen, (S.tolist(), err_fit, err_jensen)
            # the fallback is mean + log(n): a lower bound of logsumexp (Jensen)
            n_o = int(others.sum())
            torch.testing.assert_close(jensen, z_g[:, others].mean(1) + math.log(n_o), rtol=0, atol=1e-4)
            assert bool((jensen <= target + 1e-4).all())


def test_dustbin_fallback_is_exact_when_other_logits_are_equal():
    g = torch.Generator().manual_seed(0)
    C, F_, N = 7, 5, 64
    w = torch.randn(C, F_, generator=g, dtype=F64)
    b = torch.randn(C, generator=g, dtype=F64)
    S = torch.tensor([1, 4])
    others = _complement(S, C)
    w[others] = w[others][0]  # every other class has the same row -> equal logits
    b[others] = b[others][0]
    gen = _linear_classifier(w, b)
    x = torch.randn(N, F_, generator=g, dtype=F64)
    with torch.no_grad():
        z = gen(x)
        target = torch.logsumexp(z[:, others], 1)
        jensen = make_specialist(gen, S).eval()(x)[:, -1]
        # here logsumexp is linear in the features, so the least-squares fit is (nearly) exact too
        fitted = make_specialist(gen, S, torch.randn(256, F_, generator=g, dtype=F64)).eval()(x)[:, -1]
    n_o = int(others.sum())
    torch.testing.assert_close(target, z[:, others][:, 0] + math.log(n_o))  # hand formula
    torch.testing.assert_close(jensen, target, rtol=0, atol=1e-10)
    torch.testing.assert_close(fitted, target, rtol=0, atol=1e-2)


def test_local_labels_map_subset_to_positions_and_the_rest_to_the_dustbin():
    S = torch.tensor([2, 5, 7])
    y = torch.tensor([0, 2, 5, 7, 9, 5, 1])
    assert local_labels(y, S, 10).tolist() == [3, 0, 1, 2, 3, 1, 3]


# ----------------------------------------------------------------------------- collapse, then temper


def test_collapse_logits_softmax_is_subset_probs_plus_summed_rest():
    g = torch.Generator().manual_seed(1)
    C = 50
    z = 3 * torch.randn(16, C, generator=g, dtype=F64)
    S = torch.tensor([3, 17, 22, 40])
    others = _complement(S, C)
    p = torch.softmax(z, 1)
    want = torch.cat([p[:, S], p[:, others].sum(1, keepdim=True)], 1)
    got = torch.softmax(collapse_logits(z, S), 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    # a subset holding every class: the dustbin gets probability zero
    full = torch.softmax(collapse_logits(z, torch.arange(C)), 1)
    assert bool((full[:, -1] == 0).all())
    torch.testing.assert_close(full[:, :-1], p, rtol=0, atol=1e-13)


def test_soft_target_collapses_first_then_tempers():
    """The right soft target is softmax([z_S, logsumexp(z_others)] / T); summing the already
    tempered softmax(z / T) over the others inflates the dustbin (docs/method.md, specialist training)."""
    g = torch.Generator().manual_seed(2)
    T, C = 4.0, 100
    z = 2 * torch.randn(32, C, generator=g, dtype=F64)
    S = torch.arange(10)
    others = _complement(S, C)
    right = torch.softmax(collapse_logits(z, S) / T, 1)
    pt = torch.softmax(z / T, 1)
    wrong = torch.cat([pt[:, S], pt[:, others].sum(1, keepdim=True)], 1)
    assert not torch.allclose(right, wrong, atol=1e-3)
    assert bool((right[:, -1] < wrong[:, -1]).all())
    assert float((wrong[:, -1] - right[:, -1]).mean()) > 0.05
    # the inflation of the dustbin logit (in units of z) is at most (T - 1) * log(#others), and
    # reaches it when the other logits are equal
    n_o = int(others.sum())

    def dust_logit_gap(zz):
        pr = torch.softmax(collapse_logits(zz, S) / T, 1)
        pw = torch.softmax(zz / T, 1)
        lw = torch.log(pw[:, others].sum(1)) - torch.log(pw[:, 0])
        lr = torch.log(pr[:, -1]) - torch.log(pr[:, 0])
        return T * (lw - lr)

    gap = dust_logit_gap(z)
    assert bool((gap > 0).all()) and bool((gap <= (T - 1) * math.log(n_o) + 1e-9).all())
    z_eq = z.clone()
    z_eq[:, others] = z_eq[:, others][:, :1]
    torch.testing.assert_close(dust_logit_gap(z_eq), torch.full((32,), (T - 1) * math.log(n_o), dtype=F64))


# ----------------------------------------------------------------------------- dustbin correction


def test_analytic_shift_matches_hand_numbers():
    assert analytic_shift(0.5, 0.1) == pytest.approx(math.log(9))
    assert analytic_shift(0.3, 0.2) == pytest.approx(math.log(3 / 7) + math.log(4))  # log(12/7)
    assert analytic_shift(0.3, 0.2) == pytest.approx(0.5389965007326869)
    assert analytic_shift(0.25, 0.25) == pytest.approx(0.0, abs=1e-12)  # no oversampling, no shift
    assert analytic_shift(0.5, 0.5) == pytest.approx(0.0, abs=1e-12)
    assert analytic_shift(0.5, 0.9) == pytest.approx(-math.log(9))  # undersampled subset


def test_analytic_shift_undoes_prior_shift_for_a_calibrated_model():
    """A model calibrated on a mix where S has share s, shifted by analytic_shift(s, f), gives
    the natural-prior posterior: Bayes with priors f vs s, computed by hand."""
    s, f = 0.5, 0.08
    p_s_mix, p_dust_mix = torch.tensor([0.3, 0.2], dtype=F64), torch.tensor(0.5, dtype=F64)
    z = torch.log(torch.cat([p_s_mix, p_dust_mix.view(1)]))
    z[-1] += analytic_shift(s, f)
    got = torch.softmax(z, 0)
    # reweight by natural / training priors and renormalize
    w = torch.cat([p_s_mix * f / s, (p_dust_mix * (1 - f) / (1 - s)).view(1)])
    torch.testing.assert_close(got, w / w.sum())


@pytest.mark.parametrize("b0", [1.7, -0.8])
def test_fit_dustbin_shift_recovers_a_planted_bias(b0):
    g = torch.Generator().manual_seed(3)
    N, K = 20000, 4  # 4 subset classes + dustbin
    true = 1.5 * torch.randn(N, K + 1, generator=g, dtype=F64)
    true[:, -1] += 1.0  # the dustbin is common, as in practice
    labels = torch.multinomial(torch.softmax(true, 1), 1, generator=g).squeeze(1)  # from the TRUE model
    given = true.clone()
    given[:, -1] -= b0  # a model whose dustbin logit is off by -b0
    b = fit_dustbin_shift(given.float(), labels)
    # standard error of the 1-D maximum-likelihood estimate: 1 / sqrt(N * mean p(1 - p))
    p = torch.softmax(true, 1)[:, -1]
    se = 1 / math.sqrt(N * float((p * (1 - p)).mean()))
    assert abs(b - b0) < 4 * se, (b, b0, se)
    # and it is the minimum of the NLL: a brute-force grid around it is no better
    def nll(shift):
        zz = given.clone()
        zz[:, -1] += shift
        return float(torch.nn.functional.cross_entropy(zz, labels))

    grid = torch.linspace(b - 0.5, b + 0.5, 41).tolist()
    assert nll(b) <= min(nll(t) for t in grid) + 1e-9


def test_fit_dustbin_shift_is_zero_for_a_calibrated_model():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(20000, 3, generator=g, dtype=F64)
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    p = torch.softmax(z, 1)[:, -1]
    se = 1 / math.sqrt(len(y) * float((p * (1 - p)).mean()))
    assert abs(fit_dustbin_shift(z, y)) < 4 * se


# ----------------------------------------------------------------------------- batch mix


@pytest.mark.parametrize("batch_size,fraction", [(32, 0.5), (30, 0.25), (20, 0.75), (7, 0.5)])
def test_mixed_batches_proportions_and_epoch_coverage(batch_size, fraction):
    g = torch.Generator().manual_seed(5)
    C = 10
    counts = torch.tensor([40, 55, 13, 70, 25, 61, 9, 33, 48, 20])  # unequal classes
    y = torch.repeat_interleave(torch.arange(C), counts)[torch.randperm(int(counts.sum()), generator=g)]
    S = torch.tensor([1, 4, 7])
    in_s = torch.isin(y, S)
    n_s = int(in_s.sum())
    mix = MixedBatches(y, S, C, batch_size, fraction)
    n_pos = round(batch_size * fraction)
    assert (mix.n_pos, mix.n_neg) == (n_pos, batch_size - n_pos)
    assert mix.steps == math.ceil(n_s / n_pos)
    batches = list(mix.epoch(torch.Generator().manual_seed(6)))
    assert len(batches) == mix.steps
    seen_pos = []
    for i, idx in enumerate(batches):
        pos = idx[in_s[idx]]
        neg = idx[~in_s[idx]]
        last = i == len(batches) - 1
        assert len(pos) == (n_s - (mix.steps - 1) * n_pos if last else n_pos)
        assert len(neg) == batch_size - n_pos  # every batch is filled up with others
        seen_pos.append(pos)
    assert sum(len(idx) for idx in batches) == mix.samples_per_epoch == n_s + mix.steps * (batch_size - n_pos)
    # one epoch covers every subset example exactly once
    assert sorted(torch.cat(seen_pos).tolist()) == torch.nonzero(in_s).squeeze(1).tolist()
    # the others of one epoch are distinct while there are enough of them
    negs = torch.cat([idx[~in_s[idx]] for idx in batches])
    if len(negs) <= int((~in_s).sum()):
        assert len(set(negs.tolist())) == len(negs)
    # seeded: the same generator seed draws the same epoch, another seed another one
    again = list(mix.epoch(torch.Generator().manual_seed(6)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = list(mix.epoch(torch.Generator().manual_seed(7)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_mixed_batches_recycle_others_when_there_are_few():
    y = torch.tensor([0] * 50 + [1] * 3)  # 50 subset examples, only 3 others
    mix = MixedBatches(y, torch.tensor([0]), 2, 10, 0.5)
    batches = list(mix.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == 10
    assert all(int((y[idx] == 1).sum()) == 5 for idx in batches)


# ----------------------------------------------------------------------------- schedule


def _pattern(phases, share, n):
    return [is_soft_phase(k, phases, share) for k in range(n)]


def test_is_soft_phase_patterns():
    H, S_ = False, True
    assert _pattern("alternate", 0.5, 6) == [H, S_, H, S_, H, S_]
    assert _pattern("alternate", 0.25, 8) == [H, H, H, S_, H, H, H, S_]
    assert _pattern("alternate", 1 / 3, 6) == [H, H, S_, H, H, S_]
    assert _pattern("alternate", 0.0, 8) == [H] * 8
    assert _pattern("alternate", 1.0, 8) == [S_] * 8
    assert _pattern("hard", 0.5, 8) == [H] * 8  # the paper's schedule
    assert _pattern("soft", 0.5, 8) == [S_] * 8
    for share in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9):  # the stated proportion, to within one phase
        for n in (10, 37, 100):
            assert sum(_pattern("alternate", share, n)) == math.floor(n * share + 1e-9)


def _subset_train_count(ds, classes):
    return int(torch.isin(ds.train.y, torch.tensor(classes)).sum())


def test_tiny_run_specialists_ran_one_hard_and_one_soft_epoch(tiny_run):
    """The fixture: phase_unit=epoch, 2 epochs, alternate with soft_share 0.5 -> hard, soft."""
    run = Run(tiny_run)
    scfg = tiny_run.specialists
    assert (scfg.phases, scfg.phase_unit, scfg.epochs, scfg.soft_share) == ("alternate", "epoch", 2, 0.5)
    n_pos = round(scfg.batch_size * scfg.subset_fraction)
    for s in run.load_subsets():
        m = read_json(run.specialist(s["id"]).metrics)
        steps = math.ceil(_subset_train_count(run.data, s["classes"]) / n_pos)
        assert m["steps"] == 2 * steps
        assert (m["hard_steps"], m["soft_steps"]) == (steps, steps)
        h1, h2 = m["history"]
        assert (h1.get("hard_steps", 0), h1.get("soft_steps", 0)) == (steps, 0)
        assert (h2.get("hard_steps", 0), h2.get("soft_steps", 0)) == (0, steps)


@pytest.fixture(scope="module")
def step_phase_specialist(tiny_run, tmp_path_factory):
    """Specialist 0 trained with phases in blocks of 4 steps over 2 epochs."""
    dst = _fresh_run_dir(tiny_run, tmp_path_factory.mktemp("steps"))
    cfg = tiny_config(dst, "specialists.phase_unit=steps", "specialists.phase_steps=4", "specialists.epochs=2")
    run = Run(cfg)
    s = run.load_subsets()[0]
    result = train_one(run, s["id"], s["classes"], run.load_generalist())
    return run, s, result


def test_step_blocks_alternate_across_epoch_boundaries(step_phase_specialist):
    run, s, result = step_phase_specialist
    steps = math.ceil(_subset_train_count(run.data, s["classes"]) / 16)
    # hand schedule: global step t is soft when its block t // 4 is odd (share 0.5 alternation)
    soft = [(t // 4) % 2 == 1 for t in range(2 * steps)]
    per_epoch = [soft[:steps], soft[steps:]]
    for h, flags in zip(result["history"], per_epoch):
        assert h.get("soft_steps", 0) == sum(flags)
        assert h.get("hard_steps", 0) == len(flags) - sum(flags)
    assert result["soft_steps"] == sum(soft) and result["hard_steps"] == 2 * steps - sum(soft)
    assert result["soft_steps"] > 0 and result["hard_steps"] > 0
    on_disk = read_json(run.specialist(s["id"]).metrics)
    assert (on_disk["hard_steps"], on_disk["soft_steps"]) == (result["hard_steps"], result["soft_steps"])


def test_calibrated_shift_leaves_the_saved_specialist_calibrated_on_val(step_phase_specialist):
    """The default correction is fitted on val and applied to the saved weights: refitting on
    the saved model's val logits finds nothing more to shift."""
    run, s, result = step_phase_specialist
    assert result["dustbin_correction"] == "calibrated"
    S = torch.tensor(s["classes"])
    model = load_weights(run.specialist(s["id"]).weights, run.new_model(len(S) + 1))
    ds = run.data
    z = predict_logits(model, Batcher(ds, ds.val, run.device))
    assert abs(fit_dustbin_shift(z, local_labels(ds.val.y, S, ds.num_classes))) < 1e-3
    assert read_json(run.specialist(s["id"]).metrics)["dustbin_shift"] == pytest.approx(
        result["dustbin_shift"])


def test_hard_only_schedule_with_analytic_shift(tiny_run, tmp_path):
    """phases=hard reproduces the paper: no soft step at all; the analytic correction is the
    hand formula with the batch's share s = 16/32 and the subset's natural share f."""
    dst = _fresh_run_dir(tiny_run, tmp_path)
    cfg = tiny_config(dst, "specialists.phases=hard", "specialists.epochs=1", "specialists.dustbin_correction=analytic")
    run = Run(cfg)
    s = run.load_subsets()[1]
    result = train_one(run, s["id"], s["classes"], run.load_generalist())
    n_s = _subset_train_count(run.data, s["classes"])
    steps = math.ceil(n_s / 16)
    assert result["soft_steps"] == 0 and result["hard_steps"] == steps == result["steps"]
    f = n_s / len(run.data.train)
    assert result["natural_share"] == pytest.approx(f)
    assert result["training_share"] == pytest.approx(0.5)
    assert result["dustbin_shift"] == pytest.approx(math.log((1 - f) / f))
    # consumed samples: every subset example once plus a full share of others in every batch
    assert result["train_samples"] == n_s + steps * 16


# ----------------------------------------------------------------------------- does it help?


# (A test that the tiny fixture's specialists beat the generalist was removed: on 90 test
# examples per subset the gain held at seed 0 only (seeds 1-3: -2.2, +2.2, +3.7 points on
# average). The dedicated problem below shows the gain across seeds.)


def test_generalist_subset_accuracy_is_the_restricted_argmax(tiny_run):
    """An independent recomputation of ``generalist_subset_top1`` from the generalist's logits."""
    run = Run(tiny_run)
    ds, gen = run.data, run.load_generalist()
    z = predict_logits(gen, Batcher(ds, ds.test, run.device))
    for s in run.load_subsets():
        S = torch.tensor(s["classes"])
        in_s = torch.isin(ds.test.y, S)
        want = float((S[z[in_s][:, S].argmax(1)] == ds.test.y[in_s]).float().mean())
        m = read_json(run.specialist(s["id"]).metrics)
        assert m["generalist_subset_top1"] == pytest.approx(want, abs=1e-6)


# A dedicated, slightly bigger problem: 4 superclasses x 4 classes of 64-d vectors, 100 test
# examples per class (400 per subset), an MLP generalist trained 3 epochs and the default
# (alternating) specialist schedule for 4 epochs. Measured mean gain over the generalist on the
# subsets (seeds 0, 1, 2, 3): +4.8, +3.9, +3.8, +5.3 points, every single specialist positive
# (smallest +1.2); with phases=hard and 3 epochs: +4.1, +3.7, +2.9, +5.2.
# Honest caveat: the gain is mostly extra focused training of a short-trained generalist. With
# the generalist trained 10 epochs (near the Bayes rate on this Gaussian data) the same
# specialists gain only +0.2 to +1.0 (hard) and -0.6 to +0.9 (alternate): that is what the
# compute-matched controls of the evaluation are for.
VECTOR = [
    "device=cpu", "seed=0", "data.name=synthetic", "data.variant=vector", "data.num_super=4",
    "data.classes_per_super=4", "data.train_per_class=100", "data.test_per_class=100", "data.difficulty=5",
    "model.name=mlp", "model.width=32", "model.depth=1",
    "generalist.epochs=3", "generalist.batch_size=64", "generalist.lr=0.05",
    "subsets.num_specialists=4", "specialists.batch_size=32", "specialists.epochs=4",
]


def test_specialists_beat_the_generalist_on_their_subsets_on_average(tmp_path):
    from specialists.rundir.config import load_config
    from specialists.stages.pipeline import run_stage

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *VECTOR])
    assert cfg.specialists.phases == "alternate"  # the default schedule
    for stage in ("generalist", "subsets", "specialists"):
        run_stage(cfg, stage)
    run = Run(cfg)
    rows = [read_json(run.specialist(s["id"]).metrics) for s in run.load_subsets()]
    assert len(rows) == 4 and sum(m["size"] for m in rows) == 16
    assert all(m["test_examples_in_subset"] == 100 * m["size"] for m in rows)
    assert all(m["hard_steps"] > 0 and m["soft_steps"] > 0 for m in rows)
    gains = [m["subset_top1"] - m["generalist_subset_top1"] for m in rows]
    assert sum(gains) / len(gains) > 0.02, gains  # measured +0.038 .. +0.053 over seeds 0-3
    assert min(gains) > -0.02, gains  # measured >= +0.012
