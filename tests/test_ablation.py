"""The ablation stage on the tiny run: the subset ablation's end rows against the generalist and
the evaluation, the re-clustering ablation (a count above the class count is skipped), the
compute-matched control, and the report with its controls."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from conftest import tiny_config

from specialists.core.scoring import ablation_counts, specialist_order
from specialists.rundir import Run


def test_ablation_counts_are_powers_of_two_and_all():
    assert ablation_counts(0) == [0]
    assert ablation_counts(1) == [0, 1]
    assert ablation_counts(5) == [0, 1, 2, 4, 5]
    assert ablation_counts(8) == [0, 1, 2, 4, 8]
    assert ablation_counts(61) == [0, 1, 2, 4, 8, 16, 32, 61]


def test_specialist_order_by_size_confusion_and_seeded_random():
    entries = [{"id": 0, "size": 2, "confusion_mass": 0.1}, {"id": 1, "size": 5, "confusion_mass": 0.3},
               {"id": 2, "size": 3, "confusion_mass": 0.2}]
    assert specialist_order(entries, "size", 0) == [1, 2, 0]
    assert specialist_order(entries, "confusion", 0) == [1, 2, 0]
    shuffled = specialist_order(entries, "random", 7)
    assert sorted(shuffled) == [0, 1, 2] and shuffled == specialist_order(entries, "random", 7)


@pytest.fixture(scope="module")
def ablated(tiny_run, tmp_path_factory):
    from specialists.stages.pipeline import run_stage

    d = tmp_path_factory.mktemp("ablate") / "run"
    shutil.copytree(tiny_run.run_dir, d)
    # 99 > the tiny run's 9 classes: skipped with a warning; 2 is re-clustered and trained
    cfg = tiny_config(d, "ablate.counts=[2,99]", "ablate.control=true", "ablate.order=size")
    run_stage(cfg, "evaluate")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("specialists").addHandler(handler)
    try:
        result = run_stage(cfg, "ablate")
    finally:
        logging.getLogger("specialists").removeHandler(handler)
    return cfg, d, result, [r.getMessage() for r in records]


def test_k0_is_the_generalist_and_k_all_is_the_evaluation_exactly(ablated):
    _, d, result, _ = ablated
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    gen = json.loads((d / "generalist" / "metrics.json").read_text())
    rows = result["subset_ablation"]["rows"]
    assert [r["k"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["top1"] == ev["generalist"]["top1"]
    # the generalist stage measured it through the training batcher: the same count of hits
    assert rows[0]["top1"] == pytest.approx(gen["test_top1"], abs=1e-9)
    assert rows[0]["conditional_count"] == 0 and rows[0]["train_samples"] == 0
    assert rows[-1]["top1"] == ev["ensemble"]["top1"]
    assert rows[-1]["conditional_ensemble_top1"] == ev["conditional"]["ensemble_top1"]
    assert rows[-1]["conditional_count"] == ev["conditional"]["count"]
    # order=size: the first specialist added is the largest subset
    subsets = json.loads((d / "subsets" / "subsets.json").read_text())["subsets"]
    assert rows[1]["ids"] == [max(subsets, key=lambda s: (s["size"], -s["id"]))["id"]]
    # each row's training cost is the sum of its specialists' recorded samples
    samples = {s["id"]: json.loads((d / "specialists" / f"{s['id']:03d}" / "metrics.json").read_text())["train_samples"]
               for s in subsets}
    assert all(r["train_samples"] == sum(samples[i] for i in r["ids"]) for r in rows)


def test_recluster_skips_counts_above_the_class_count_and_trains_the_rest(ablated):
    _, d, result, messages = ablated
    assert [r["num_specialists"] for r in result["recluster"]] == [2]
    assert any("skipping 99 specialists" in m for m in messages)
    sub = d / "ablation" / "recluster" / "M002"
    subsets = json.loads((sub / "subsets" / "subsets.json").read_text())["subsets"]
    assert len(subsets) == result["recluster"][0]["num_subsets"] <= 2
    assert all((sub / "specialists" / f"{s['id']:03d}" / "metrics.json").exists() for s in subsets)
    # the sub-run reuses the parent's generalist: same weights, same accuracy
    ev = json.loads((sub / "evaluation" / "evaluation.json").read_text())
    assert ev["generalist"]["top1"] == result["subset_ablation"]["rows"][0]["top1"]


def test_compute_matched_control_and_report(ablated):
    cfg, d, result, _ = ablated
    c = result["control"]
    n_train = len(Run(cfg).data.train)
    # the specialists' training compute in generalist examples: samples x FLOPs per sample / the generalist's
    unit = json.loads((d / "generalist" / "metrics.json").read_text())["train_flops_per_sample"]
    specs = [json.loads(p.read_text()) for p in sorted((d / "specialists").glob("*/metrics.json"))]
    extra = sum(m["train_samples"] * m["train_flops_per_sample"] / unit for m in specs)
    assert 0.8 * result["subset_ablation"]["rows"][-1]["train_samples"] < extra  # whole networks: about their samples
    assert c["specialist_samples"] == round(extra)
    assert c["epochs"] == max(1, round(extra / n_train)) and c["train_samples"] == c["epochs"] * n_train
    assert 0 < c["test_top1"] <= 1
    md = (d / "ablation" / "ablation.md").read_text()
    assert "| 0 | " in md and "generalist trained longer (compute-matched)" in md and "Re-clustering" in md
    assert (d / "ablation" / "ablation.png").stat().st_size > 0
    # the evaluation report, written before the control existed, now shows it too
    assert "generalist trained longer (compute-matched)" in (d / "evaluation" / "evaluation.md").read_text()



def test_control_cost_and_the_frontier_after_the_ablation(ablated):
    """The longer generalist records its cost and test predictions; the frontier, re-rendered
    after the ablation, costs each first-k ensemble from the evaluation's per-specialist rows."""
    import numpy as np

    from specialists.core.cost import routed_flops

    _, d, result, _ = ablated
    ev = json.loads((d / "evaluation" / "evaluation.json").read_text())
    c = result["control"]
    assert c["inference_flops"] == ev["cost"]["generalist_flops"]  # the generalist's network
    assert c["train_compute"] == c["train_samples"]  # ... and its FLOPs per training sample
    y = np.load(d / "evaluation" / "test_labels.npy")
    pred = np.load(d / "ablation" / "control" / "test_predictions.npy")
    assert float((pred == y).mean()) == pytest.approx(c["test_top1"], abs=1e-6)
    fr = json.loads((d / "evaluation" / "frontier.json").read_text())
    by = {m["key"]: m for m in fr["models"]}
    g_train = ev["cost"]["train_compute"]["generalist"]
    assert by["longer_generalist"]["train_compute"] == g_train + c["train_compute"]
    spec = {s["id"]: s for s in ev["per_specialist"]}
    rows = result["subset_ablation"]["rows"]
    assert {k for k in by if k.startswith("ensemble_k")} == {f"ensemble_k{r['k']}" for r in rows[1:-1]}
    for r in rows[1:-1]:
        e = by[f"ensemble_k{r['k']}"]
        assert e["top1"] == r["top1"] and e["ci95_vs_generalist"] == r["ci95"]
        assert e["inference_flops"] == routed_flops(ev["cost"]["generalist_flops"],
                                                    [spec[i]["flops_per_example"] for i in r["ids"]],
                                                    [spec[i]["routed_fraction"] for i in r["ids"]])
        assert e["train_compute"] == pytest.approx(g_train + sum(spec[i]["train_compute"] for i in r["ids"]))
