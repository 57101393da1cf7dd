"""Evaluation: ``score`` on a hand-made example, significance sanity, and the stage on the tiny run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_config

from specialists.core.metrics import mcnemar, paired_bootstrap
from specialists.core.scoring import coverage_counts, score
from specialists.data import batcher_for
from specialists.reports.evaluation import print_summary, render_markdown

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny problems, one thread


def _probs(pred, c=4, hi=0.7):
    """Rows with ``hi`` on the predicted class and the rest spread evenly."""
    p = torch.full((len(pred), c), (1 - hi) / (c - 1))
    p[torch.arange(len(pred)), torch.tensor(pred)] = hi
    return p


# 4 classes; subsets {0, 1} and {1, 2}: class 0 and 2 covered once, class 1 twice, class 3 never.
SUBSETS = [[0, 1], [1, 2]]
Y = torch.tensor([0, 1, 2, 3, 1, 0])
G_PRED = [0, 2, 2, 0, 1, 3]  # right, wrong, right, wrong, right, wrong -> 3/6
E_PRED = [0, 1, 1, 0, 1, 0]  # right, right, wrong, wrong, right, right -> 4/6


def test_coverage_counts():
    assert coverage_counts(Y, SUBSETS).tolist() == [1, 2, 1, 0, 2, 1]
    assert coverage_counts([0, 1], [[0, 0], [0]]).tolist() == [2, 0]  # a repeated id counts once


def test_score_hand_computed():
    s = score(_probs(G_PRED), _probs(E_PRED), Y, SUBSETS, bootstrap=0)
    assert s["generalist"]["top1"] == pytest.approx(3 / 6)
    assert s["ensemble"]["top1"] == pytest.approx(4 / 6)
    assert s["generalist"]["top5"] == s["ensemble"]["top5"] == 1.0  # 4 classes: the top 5 hold them all
    assert s["change"]["top1_abs"] == pytest.approx(1 / 6)
    assert s["change"]["top1_rel"] == pytest.approx((4 / 6 - 3 / 6) / (3 / 6))
    assert s["change"]["top5_abs"] == 0
    # true p is 0.7 when right and 0.1 when wrong; every confidence is 0.7
    assert s["generalist"]["nll"] == pytest.approx(-(3 * math.log(0.7) + 3 * math.log(0.1)) / 6, rel=1e-5)
    assert s["generalist"]["ece"] == pytest.approx(0.7 - 3 / 6, abs=1e-6)
    assert s["ensemble"]["ece"] == pytest.approx(0.7 - 4 / 6, abs=1e-6)
    c = s["conditional"]  # examples 0, 1, 2, 4, 5 (class 3 is uncovered)
    assert c["count"] == 5
    assert c["generalist_top1"] == pytest.approx(3 / 5)
    assert c["ensemble_top1"] == pytest.approx(4 / 5)
    rows = s["by_coverage"]
    assert [r["covered"] for r in rows] == [0, 1, 2]
    assert [(r["count"], r["generalist_correct"], r["ensemble_correct"]) for r in rows] == [(1, 0, 0), (3, 2, 2), (2, 1, 2)]
    assert all(isinstance(r[k], int) for r in rows for k in ("covered", "count", "generalist_correct", "ensemble_correct"))
    assert sum(r["count"] for r in rows) == len(Y)
    assert rows[2]["change"] == pytest.approx(2 / 2 - 1 / 2)
    assert rows[0]["generalist_top1"] == 0.0 and rows[0]["relative_change"] is None  # 0 right: no relative change
    mc = s["significance"]["mcnemar"]
    assert (mc["a_wrong_b_right"], mc["a_right_b_wrong"]) == (2, 1)  # ex 1, 5 fixed; ex 2 broken
    assert mc["p_value"] == pytest.approx(1.0)  # 2 * P(Bin(3, 1/2) <= 1) = 1
    assert s["significance"]["bootstrap"]["diff"] == pytest.approx(1 / 6)
    json.dumps(s, allow_nan=False)  # JSON-clean: no NaN anywhere


def test_score_ten_plus_row_and_every_example_in_one_row():
    # 12 subsets hold class 0, one holds class 1, none holds class 2
    subsets = [[0, 3]] * 12 + [[1]]
    y = torch.tensor([0, 1, 2, 0, 3])
    p = _probs([0, 1, 2, 1, 3])
    s = score(p, p, y, subsets, bootstrap=0)
    rows = s["by_coverage"]
    assert [r["covered"] for r in rows] == list(range(11))
    assert rows[-1]["label"] == "10+" and isinstance(rows[-1]["covered"], int)
    assert rows[-1]["count"] == 3  # classes 0 and 3 are covered 12 times
    assert rows[1]["count"] == 1 and rows[0]["count"] == 1
    assert sum(r["count"] for r in rows) == len(y)
    assert all(r["count"] == 0 for r in rows[2:10])
    assert rows[-1]["generalist_correct"] == 2


def test_score_with_active_sets():
    active = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0], [1, 0]], dtype=torch.bool)
    s = score(_probs(G_PRED), _probs(E_PRED), Y, SUBSETS, active, bootstrap=0)
    assert s["routing"]["mean_active"] == pytest.approx(6 / 6)
    assert s["routing"]["no_active_fraction"] == pytest.approx(1 / 6)
    first = s["per_specialist"][0]  # rows 0, 1, 4, 5: generalist right on 0, 4; ensemble on all four
    assert (first["routed"], first["generalist_correct"], first["ensemble_correct"]) == (4, 2, 4)


def test_identical_predictions_are_not_significant():
    ok = torch.tensor([True, False, True, True, False] * 20)
    assert mcnemar(ok, ok)["p_value"] == 1.0
    b = paired_bootstrap(ok, ok, samples=200, seed=0)
    assert b["diff"] == 0 and b["ci95"] == [0.0, 0.0]
    p = _probs(G_PRED)
    s = score(p, p, Y, SUBSETS, bootstrap=100)
    assert s["significance"]["mcnemar"]["p_value"] == 1.0
    assert s["significance"]["bootstrap"]["ci95"] == [0.0, 0.0]


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """A copy of the tiny run with the evaluate stage run."""
    from specialists.stages.pipeline import run_stage

    d = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(tiny_run.run_dir, d)
    cfg = tiny_config(d)
    result = run_stage(cfg, "evaluate")
    return cfg, d, result


def test_evaluate_stage_writes_the_contract(evaluated):
    cfg, d, result = evaluated
    out = d / "evaluation"
    for name in ("evaluation.json", "evaluation.md", "by_coverage.png", "specialists.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    ev = json.loads((out / "evaluation.json").read_text())  # strict JSON (would fail on NaN)
    for a, b in (("generalist", "top1"), ("ensemble", "top1"), ("conditional", "generalist_top1"),
                 ("conditional", "ensemble_top1")):
        assert 0.0 <= ev[a][b] <= 1.0
    n = ev["n"]
    assert n == 9 * 30  # the tiny run's test split
    rows = ev["by_coverage"]
    assert sum(r["count"] for r in rows) == n
    assert all(isinstance(r[k], int) for r in rows for k in ("covered", "count", "generalist_correct", "ensemble_correct"))
    assert [r["covered"] for r in rows] == list(range(len(rows)))
    assert {"mcnemar", "bootstrap"} <= set(ev["significance"])
    assert len(ev["per_specialist"]) == 3 and all("subset_top1" in s for s in ev["per_specialist"])
    assert sum(s["routed"] for s in ev["per_specialist"]) == pytest.approx(ev["routing"]["mean_active"] * n)
    t = ev["timing"]
    assert t["generalist_s_per_example"] > 0 and t["routed_s_per_example"] > 0 and t["all_s_per_example"] > 0
    assert 0.0 <= ev["all_routing"]["top1"] <= 1.0
    from specialists.rundir import Manifest

    assert Manifest(d / "manifest.json").is_done("evaluate")
    md = (out / "evaluation.md").read_text()
    assert "Table 4" in md and "| top-1 |" in md and "McNemar" in md
    assert result["ensemble"]["top1"] == ev["ensemble"]["top1"]


def test_evaluation_matches_an_independent_recomputation(evaluated):
    """The recorded accuracies and saved predictions, recomputed without the ensemble class, the
    torch solver or ``score``: each saved model's softmax on the test split, the torch-free
    routing and combination (:mod:`specialists.core.combine_numpy`, float64), numpy argmax."""
    import numpy as np

    from specialists.core import combine_numpy
    from specialists.rundir import Run

    cfg, d, _ = evaluated
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    run = Run(cfg)
    test = run.data.test
    x = batcher_for(run.data, test, "cpu").batch(torch.arange(len(test)))[0]
    y = test.y.numpy()
    entries = run.load_subsets()
    assert cfg.specialists.branch == "all"  # whole networks: each model takes the inputs
    with torch.inference_mode():
        p_g = torch.softmax(run.load_generalist().eval()(x).double(), 1).numpy()
        p_s = [torch.softmax(run.load_specialist(e["id"], len(e["classes"]) + 1).eval()(x).double(), 1).numpy()
               for e in entries]
    subsets = [np.asarray(e["classes"], dtype=np.int64) for e in entries]
    active = combine_numpy.route(p_g, combine_numpy.membership(subsets, p_g.shape[1]), cfg.combine.top_n,
                                 cfg.combine.routing)
    assert active.any(1).mean() > 0.5  # most examples go to a specialist: the combination is exercised
    q = combine_numpy.combine(p_g, subsets, p_s, active, max_iter=cfg.combine.max_iter, tol=cfg.combine.tol)
    n = len(y)
    for key, p in (("generalist", p_g), ("ensemble", q)):
        pred = p.argmax(1)
        saved = np.load(run.predictions(key))
        # float32 torch vs float64 numpy may swap a near-tie; nowhere else may they differ
        top2 = np.sort(p, 1)[:, -2:]
        close = top2[:, 1] - top2[:, 0] < 1e-4
        assert close.sum() <= 2, key
        assert (saved[~close] == pred[~close]).all(), key
        # (the stage averages in float32: the 8th digit differs from float64's)
        assert ev[key]["top1"] == pytest.approx(float((pred == y).mean()), abs=close.sum() / n + 1e-6), key
    assert ev["ensemble"]["top1"] != ev["generalist"]["top1"]  # the specialists changed some answers
    # the generalist stage measured the same model through the training batcher
    gen = json.loads((d / "generalist" / "metrics.json").read_text())
    assert ev["generalist"]["top1"] == pytest.approx(gen["test_top1"], abs=1.01 / n)


def test_render_markdown_with_controls_and_summary(evaluated):
    _, d, _ = evaluated
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    md = render_markdown(ev, [{"name": "born-again student", "test_top1": 0.5, "note": "same steps"}])
    assert "## Controls" in md and "| born-again student | 50.00% |" in md
    text = print_summary(ev, run_dir=d)
    assert "Table 4" in text and str(d / "evaluation" / "by_coverage.png") in text
    assert all(f"| {r['label']} | {r['count']} |" in text for r in ev["by_coverage"])


def test_evaluation_records_cost_predictions_and_the_frontier(evaluated):
    """``cost`` is consistent with itself and with the per-specialist rows, the saved test
    predictions give the recorded accuracies, and ``frontier.json`` holds the generalist and the
    ensemble (the only models an evaluation alone has)."""
    import numpy as np

    from specialists.core.cost import flops_per_example
    from specialists.rundir import Manifest, Run

    cfg, d, _ = evaluated
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    c, rows = ev["cost"], ev["per_specialist"]
    assert c["examples"] == ev["n"]  # the tiny test split fits in one timing batch
    assert c["generalist_flops"] > 0 and c["flops_ratio"] == pytest.approx(c["ensemble_flops"] / c["generalist_flops"])
    assert c["all_flops_ratio"] == pytest.approx(c["all_flops"] / c["generalist_flops"])
    assert c["time_ratio"] == ev["timing"]["routed_over_generalist"]
    # the generalist's count is its forward pass, per example
    run = Run(cfg)
    x = batcher_for(run.data, run.data.test, run.device).batch(torch.arange(4))[0]
    gen = run.load_generalist()
    with torch.inference_mode():
        assert c["generalist_flops"] == flops_per_example(gen, x)
    # routed: the generalist plus each specialist on its share (the timing sample is the whole split)
    assert all(r["routed_fraction"] == r["routed"] / ev["n"] and r["flops_per_example"] > 0 for r in rows)
    assert c["ensemble_flops"] == pytest.approx(
        c["generalist_flops"] + sum(r["flops_per_example"] * r["routed_fraction"] for r in rows), rel=1e-3)
    assert c["ensemble_flops_test"] == pytest.approx(c["ensemble_flops"], rel=1e-3)
    assert c["generalist_flops"] < c["ensemble_flops"] < c["all_flops"]
    # training compute in generalist examples: the generalist's is its samples; whole-network specialists likewise
    gm = json.loads((d / "generalist" / "metrics.json").read_text())
    assert c["generalist_train_flops_per_example"] == gm["train_flops_per_sample"] > 2 * c["generalist_flops"]
    tc = c["train_compute"]
    assert tc["generalist"] == gm["train_samples"]
    assert tc["ensemble"] == pytest.approx(tc["generalist"] + sum(r["train_compute"] for r in rows))
    # the saved predictions are the evaluated models'
    y = np.load(d / "evaluation" / "test_labels.npy")
    for key in ("generalist", "ensemble"):
        pred = np.load(d / "evaluation" / f"{key}_predictions.npy")
        assert pred.dtype == np.int64 and float((pred == y).mean()) == pytest.approx(ev[key]["top1"], abs=1e-6)
    fr = json.loads((d / "evaluation" / "frontier.json").read_text())
    by = {m["key"]: m for m in fr["models"]}
    assert set(by) == {"generalist", "ensemble"}
    assert by["ensemble"]["inference_flops"] == c["ensemble_flops"] and by["ensemble"]["top1"] == ev["ensemble"]["top1"]
    assert by["generalist"]["train_compute"] == tc["generalist"]
    assert (d / "evaluation" / "frontier.png").stat().st_size > 0
    assert "## Accuracy and cost" in (d / "evaluation" / "evaluation.md").read_text()
    # frontier.json is a report (re-rendered by later stages), the predictions are verified artifacts
    rec = Manifest(d / "manifest.json").record("evaluate")
    assert "evaluation/frontier.json" in rec["reports"] and "evaluation/frontier.json" not in rec["artifacts"]
    assert "evaluation/ensemble_predictions.npy" in rec["artifacts"]


def test_the_gate_table_is_what_gated_ensembles_score_and_cost_on_validation(evaluated):
    """Each row of the validation ``gate`` table (computed from the ungated ensembles' answers)
    equals an ensemble built with that ``combine.gate``: its top-1 on the validation split, the
    share of examples whose specialists ran, and the FLOPs the counter sees it execute."""
    from specialists.core.cost import flops_per_example
    from specialists.inference import SingleModel, SpecialistEnsemble
    from specialists.rundir import Run

    cfg, d, _ = evaluated
    table = json.loads((d / "evaluation" / "evaluation.json").read_text())["validation"]["gate"]
    assert [r["share"] for r in table][-1] == 1.0 and len({r["threshold"] for r in table}) > 3
    run = Run(tiny_config(d, "combine.gate=0.5"))
    ens = SpecialistEnsemble.from_run(run, device="cpu")
    assert ens.gate == 0.5 and ens.with_routing("all", gate=None).gate is None
    assert SpecialistEnsemble.from_run(run, device="cpu", gate=None).gate is None
    val = run.data.val
    x = batcher_for(run.data, val, "cpu").batch(torch.arange(len(val)))[0]
    with torch.inference_mode():
        f_g = flops_per_example(SingleModel(ens.generalist, ens.info, ens.device).proba, x)
    for row in (table[1], table[4], table[-1]):
        for routing in ("routed", "all"):
            gated = ens.with_routing(cfg.combine.routing if routing == "routed" else "all", gate=row["threshold"])
            with torch.inference_mode():
                res = gated.predict_all(x, normalized=True)
                flops = flops_per_example(gated.proba, x)
            asked = res["generalist"].max(1).values.double() < row["threshold"]
            assert float(asked.double().mean()) == pytest.approx(row["share"])
            assert not res["active"][~asked].any()
            top1 = float((res["ensemble"].argmax(1) == val.y).double().mean())
            assert top1 == pytest.approx(row[routing]["top1"], abs=1.01 / len(val)), (row, routing)
            assert flops / f_g == pytest.approx(row[routing]["flops_ratio"], rel=1e-3), (row, routing)
