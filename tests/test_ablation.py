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
    extra = result["subset_ablation"]["rows"][-1]["train_samples"]
    assert c["specialist_samples"] == extra
    assert c["epochs"] == max(1, round(extra / n_train)) and c["train_samples"] == c["epochs"] * n_train
    assert 0 < c["test_top1"] <= 1
    md = (d / "ablation" / "ablation.md").read_text()
    assert "| 0 | " in md and "generalist trained longer (compute-matched)" in md and "Re-clustering" in md
    assert (d / "ablation" / "ablation.png").stat().st_size > 0
    # the evaluation report, written before the control existed, now shows it too
    assert "generalist trained longer (compute-matched)" in (d / "evaluation" / "evaluation.md").read_text()

