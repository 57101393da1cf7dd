"""The evaluate stage: generalist vs routed ensemble on the test split.

Writes ``RUN_DIR/evaluation/evaluation.json``: :func:`~specialists.core.scoring.score`'s
comparison (top-1/top-5/NLL/ECE, conditional accuracy, Hinton's Table 4, McNemar and the
paired bootstrap, routing statistics), a row per specialist, the same ensemble with ``all``
routing, and inference time per example of the generalist, the routed and the ``all``-routed
ensemble. Accuracies are unrounded fractions in [0, 1]; times are seconds.
"""

from __future__ import annotations

import logging

import torch

from ..core import metrics
from ..core.scoring import score
from ..engine.timing import REPEATS, seconds_per_example, timing_rows
from ..inference import SingleModel, SpecialistEnsemble
from ..reports.format import ci
from ..rundir import Run
from ..rundir.io import read_json, write_json

log = logging.getLogger("specialists")


def _specialist_rows(run: Run, ens: SpecialistEnsemble, per_position: list[dict]) -> list[dict]:
    rows = []
    for m, r in enumerate(per_position):
        sid = ens.ids[m]
        sm = read_json(run.specialist(sid).metrics)
        classes = ens.subsets[m].tolist()
        rows.append({"id": sid, "size": len(classes), "classes": classes,
                     "names": [ens.class_names[c] for c in classes],
                     **{k: v for k, v in r.items() if k != "position"},
                     "subset_top1": sm.get("subset_top1"),
                     "generalist_subset_top1": sm.get("generalist_subset_top1"),
                     "test_examples_in_subset": sm.get("test_examples_in_subset")})
    return rows


def timing(run: Run, ens: SpecialistEnsemble, ens_all: SpecialistEnsemble) -> dict:
    """Seconds per example of the generalist alone, the routed ensemble and ``all`` routing on
    a seeded sample of ``evaluate.timing_batches`` batches of the test split (preprocessed
    once, so only the models and the combination are timed), and the ratios the paper's cost
    argument is about."""
    test, bs = run.data.test, ens.batch_size
    x = run.data.batcher(test, run.device).batch(timing_rows(len(test), bs * run.cfg.evaluate.timing_batches))[0]
    gen = SingleModel(ens.generalist, ens.info, ens.device, batch_size=bs)
    t = seconds_per_example({"generalist": gen.proba, "routed": ens.proba, "all": ens_all.proba}, x, bs, REPEATS)
    t_g, t_r, t_a = t["generalist"], t["routed"], t["all"]
    return {"device": str(ens.device), "threads": torch.get_num_threads() if ens.device.type == "cpu" else None,
            "batch": int(len(x)), "repeats": REPEATS,
            "generalist_s_per_example": t_g, "routed_s_per_example": t_r, "all_s_per_example": t_a,
            "routed_over_generalist": t_r / t_g if t_g else None,
            "all_over_generalist": t_a / t_g if t_g else None,
            "routed_over_all": t_r / t_a if t_a else None}


def evaluate(run: Run) -> dict:
    """`specialists evaluate`: the run's ensemble on the test split; writes
    ``evaluation/evaluation.json`` and returns what it holds."""
    cfg = run.cfg
    ens = SpecialistEnsemble.from_run(run, batch_size=cfg.generalist.eval_batch_size)
    test = run.data.test
    y = test.y
    batcher = run.data.batcher(test, run.device)  # normalized batches, in memory or streamed
    res = ens.predict_over(x for x, _ in batcher.iterate(ens.batch_size))
    ev = score(res["generalist"], res["ensemble"], y, [s.cpu() for s in ens.subsets], res["active"],
               bootstrap=cfg.evaluate.bootstrap, ece_bins=cfg.evaluate.ece_bins, seed=cfg.seed)
    ev = {"split": "test", **ev,
          "combine": {"solver": ens.solver, "top_n": ens.top_n, "routing": ens.routing,
                      "max_iter": ens.max_iter, "tol": ens.tol}}
    ev["per_specialist"] = _specialist_rows(run, ens, ev.pop("per_specialist", []))

    ens_all = ens.with_routing("all")  # every specialist on every example
    q_all = ens_all.predict_over(x for x, _ in batcher.iterate(ens.batch_size))["ensemble"].cpu()
    all_top1 = metrics.accuracy(q_all, y, 1)
    ev["all_routing"] = {"top1": all_top1, "top5": metrics.accuracy(q_all, y, 5), "nll": metrics.nll(q_all, y),
                         "change_vs_generalist": all_top1 - ev["generalist"]["top1"],
                         "change_vs_routed": all_top1 - ev["ensemble"]["top1"]}
    ev["timing"] = timing(run, ens, ens_all)
    ev["plots"] = [run.rel(p) for p in run.evaluation_plots]
    write_json(run.evaluation_json, ev)
    log.info("evaluate: generalist top-1 %.4f -> ensemble %.4f (%+.4f, 95%% CI %s, McNemar p=%.3g)",
             ev["generalist"]["top1"], ev["ensemble"]["top1"], ev["change"]["top1_abs"],
             ci(ev["significance"]["bootstrap"].get("ci95")), ev["significance"]["mcnemar"]["p_value"])
    return ev
