"""The evaluate stage: generalist vs routed ensemble on the test split.

Writes ``RUN_DIR/evaluation/evaluation.json``: :func:`~specialists.core.scoring.score`'s
comparison (top-1/top-5/NLL/ECE, conditional accuracy, Hinton's Table 4, McNemar and the
paired bootstrap, routing statistics), a row per specialist, the same ensemble with ``all``
routing (every specialist on every example; ``combine.gate`` applies to the routed one), and
inference time per example of the generalist, the routed and the ``all``-routed ensemble.
``validation`` holds the generalist's, the routed ensemble's and ``all`` routing's top-1 and
NLL on the validation split, and the ``gate`` table (each routing's top-1 and FLOPs at each
consulted share): where settings are chosen. Accuracies are unrounded fractions in [0, 1]; times are seconds.

``cost`` holds what the models cost, counted rather than timed (:mod:`specialists.core.cost`):
FLOPs per example of the generalist, the routed ensemble and ``all`` routing on the timing
sample, as they actually run (a routed specialist is charged only for its rows); the ratios
to the generalist of those FLOPs and of the measured times; and ``train_compute``, training
compute in generalist-example equivalents (FLOPs / the generalist's FLOPs for one training
example). Each ``per_specialist`` row adds its FLOPs per example it runs on
(``flops_per_example``), the fraction of test examples routed to it (``routed_fraction``) and
its ``train_compute``, so the ensemble with any subset of specialists can be costed
(:func:`~specialists.core.cost.routed_flops`). Also written: the test labels and the
generalist's and the ensemble's test predictions (argmax class ids, ``.npy``), so reports
compute paired intervals against any later model without the models.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..core import metrics
from ..core.cost import consulted, gate_table, routed_flops
from ..core.scoring import score
from ..data import batcher_for
from ..engine.flops import FLOPS_BATCH, generalist_train_flops, inference_flops, train_compute
from ..engine.timing import REPEATS, seconds_per_example, timing_rows
from ..inference import SingleModel, SpecialistEnsemble
from ..reports.format import ci
from ..rundir import Run
from ..rundir.io import read_json, write_json, write_npy

log = logging.getLogger("specialists")


def _specialist_rows(run: Run, ens: SpecialistEnsemble, per_position: list[dict], n: int, flops: list[float],
                     unit: float) -> list[dict]:
    """A row per specialist: its subset, its routed test examples and their accuracy, its
    subset accuracy (its ``metrics.json``), and its cost: FLOPs per example it runs on
    (``flops``), the share of test examples routed to it, its training samples and compute
    (its ``train_flops_per_sample`` when recorded, else the generalist's: a whole-network
    specialist costs what the generalist does per sample)."""
    rows = []
    for m, r in enumerate(per_position):
        sid = ens.ids[m]
        sm = read_json(run.specialist(sid).metrics)
        classes = ens.subsets[m].tolist()
        per_sample = sm.get("train_flops_per_sample") or unit
        rows.append({"id": sid, "size": len(classes), "classes": classes,
                     "names": [ens.class_names[c] for c in classes],
                     **{k: v for k, v in r.items() if k != "position"},
                     "subset_top1": sm.get("subset_top1"),
                     "generalist_subset_top1": sm.get("generalist_subset_top1"),
                     "test_examples_in_subset": sm.get("test_examples_in_subset"),
                     "flops_per_example": flops[m], "routed_fraction": r["routed"] / n if n else None,
                     "train_samples": sm.get("train_samples"), "train_flops_per_sample": per_sample,
                     "train_compute": train_compute(sm.get("train_samples") or 0, per_sample, unit)})
    return rows


def specialist_flops(ens: SpecialistEnsemble, x: torch.Tensor) -> list[float]:
    """Each specialist's FLOPs per example it runs on: the ensemble with it alone and every
    example routed to it, minus the ensemble with no specialist (so whatever it shares with
    the generalist is not counted twice), on the first rows of ``x``."""
    rows = x[:FLOPS_BATCH]
    base = inference_flops(ens.select([]).proba, rows)
    return [inference_flops(ens.select([m]).with_routing("all", gate=None).proba, rows) - base
            for m in range(len(ens.specialists))]


def cost(run: Run, ens: SpecialistEnsemble, ens_all: SpecialistEnsemble, x: torch.Tensor, timing: dict,
         rows: list[dict], unit: float) -> dict:
    """``evaluation.json``'s ``cost``: FLOPs per example on the timing sample ``x`` of the
    generalist, the routed ensemble and ``all`` routing (each in chunks of the batch size, as
    timed), their ratios, the ratio of the measured times, and the training compute of the
    generalist and of the ensemble in generalist-example equivalents (``rows``: the
    ``per_specialist`` rows)."""
    bs = ens.batch_size
    f_g = inference_flops(SingleModel(ens.generalist, ens.info, ens.device, batch_size=bs).proba, x, bs)
    f_r, f_a = inference_flops(ens.proba, x, bs), inference_flops(ens_all.proba, x, bs)
    gen = read_json(run.generalist.metrics)
    g_compute = float(gen.get("train_compute") or gen.get("train_samples") or 0)
    s_compute = [r["train_compute"] for r in rows]
    specialists = float(sum(s_compute)) if None not in s_compute else None
    return {
        "unit": "FLOPs per example (a multiply-add counts 2; torch.utils.flop_counter)",
        "examples": int(len(x)),
        "generalist_flops": f_g, "ensemble_flops": f_r, "all_flops": f_a,
        "flops_ratio": f_r / f_g if f_g else None, "all_flops_ratio": f_a / f_g if f_g else None,
        "time_ratio": timing.get("routed_over_generalist"), "all_time_ratio": timing.get("all_over_generalist"),
        # the same ensemble costed from its parts over the whole test split (the subset ablation's formula)
        "ensemble_flops_test": routed_flops(f_g, [r["flops_per_example"] for r in rows],
                                            [r["routed_fraction"] or 0.0 for r in rows]),
        "generalist_train_flops_per_example": unit,
        "train_compute": {"unit": "generalist training examples (training FLOPs / generalist_train_flops_per_example)",
                          "generalist": g_compute, "specialists": specialists,
                          "ensemble": g_compute + specialists if specialists is not None else None},
    }


def _timing_sample(run: Run, ens: SpecialistEnsemble) -> torch.Tensor:
    """A seeded sample of ``evaluate.timing_batches`` batches of the test split, prepared once."""
    test = run.data.test
    rows = timing_rows(len(test), ens.batch_size * run.cfg.evaluate.timing_batches)
    return batcher_for(run.data, test, run.device).batch(rows)[0]


def timing(run: Run, ens: SpecialistEnsemble, ens_all: SpecialistEnsemble, x: torch.Tensor | None = None) -> dict:
    """Seconds per example of the generalist alone, the routed ensemble and ``all`` routing on
    a seeded sample of ``evaluate.timing_batches`` batches of the test split (preprocessed
    once, so only the models and the combination are timed; ``x``: that sample, if already
    prepared), and the ratios the paper's cost argument is about."""
    bs = ens.batch_size
    x = _timing_sample(run, ens) if x is None else x
    gen = SingleModel(ens.generalist, ens.info, ens.device, batch_size=bs)
    t = seconds_per_example({"generalist": gen.proba, "routed": ens.proba, "all": ens_all.proba}, x, bs, REPEATS)
    t_g, t_r, t_a = t["generalist"], t["routed"], t["all"]
    return {"device": str(ens.device), "threads": torch.get_num_threads() if ens.device.type == "cpu" else None,
            "batch": int(len(x)), "repeats": REPEATS,
            "generalist_s_per_example": t_g, "routed_s_per_example": t_r, "all_s_per_example": t_a,
            "routed_over_generalist": t_r / t_g if t_g else None,
            "all_over_generalist": t_a / t_g if t_g else None,
            "routed_over_all": t_r / t_a if t_a else None}


def validation(run: Run, ens: SpecialistEnsemble, ens_all: SpecialistEnsemble, generalist_flops: float,
               spec_flops: list[float]) -> dict | None:
    """Top-1 and NLL of the generalist, the routed ensemble and ``all`` routing on the
    validation split (``None`` without one): what a choice of setting (specialists' lr, branch
    depth, coverage, routing, gate) is made on, so that the test split only reports. ``gate``:
    :func:`~specialists.core.cost.gate_table` of the ungated ensembles there (the FLOPs of the
    generalist and of each specialist per example it runs on, as counted on the test sample)."""
    val = run.data.val
    if len(val) == 0:
        return None
    batcher = batcher_for(run.data, val, run.device)
    ungated = ens if ens.gate is None else ens.with_routing(ens.routing, gate=None)
    res = ungated.predict_over(x for x, _ in batcher.iterate(ens.batch_size))
    q_all = ens_all.predict_over(x for x, _ in batcher.iterate(ens.batch_size))["ensemble"].cpu()
    p_g, q_routed, active = res["generalist"].cpu(), res["ensemble"].cpu(), res["active"].cpu()
    q = q_routed if ens.gate is None else torch.where(consulted(p_g.max(1).values, ens.gate)[:, None], q_routed, p_g)
    out = {"examples": len(val)}
    for key, p in (("generalist", p_g), ("ensemble", q), ("all_routing", q_all)):
        out[key] = {"top1": metrics.accuracy(p, val.y, 1), "nll": metrics.nll(p, val.y)}
    right = [p.argmax(1) == val.y for p in (p_g, q_routed, q_all)]
    out["gate"] = gate_table(p_g.max(1).values.double().numpy(), *right[:2], active.numpy(), right[2],
                             generalist_flops, spec_flops)
    return out


def evaluate(run: Run) -> dict:
    """`specialists evaluate`: the run's ensemble on the test split; writes
    ``evaluation/evaluation.json`` and returns what it holds."""
    cfg = run.cfg
    ens = SpecialistEnsemble.from_run(run, batch_size=cfg.generalist.eval_batch_size)
    test = run.data.test
    y = test.y
    batcher = batcher_for(run.data, test, run.device)  # normalized batches, in memory or streamed
    res = ens.predict_over(x for x, _ in batcher.iterate(ens.batch_size))
    ev = score(res["generalist"], res["ensemble"], y, [s.cpu() for s in ens.subsets], res["active"],
               bootstrap=cfg.evaluate.bootstrap, ece_bins=cfg.evaluate.ece_bins, seed=cfg.seed)
    ev = {"split": "test", **ev,
          "combine": {"solver": ens.solver, "top_n": ens.top_n, "routing": ens.routing, "gate": ens.gate,
                      "max_iter": ens.max_iter, "tol": ens.tol}}
    x_time = _timing_sample(run, ens)
    unit = generalist_train_flops(run, ens.generalist)
    spec_flops = specialist_flops(ens, x_time)
    ev["per_specialist"] = _specialist_rows(run, ens, ev.pop("per_specialist", []), len(y), spec_flops, unit)

    ens_all = ens.with_routing("all", gate=None)  # every specialist on every example
    q_all = ens_all.predict_over(x for x, _ in batcher.iterate(ens.batch_size))["ensemble"].cpu()
    all_top1 = metrics.accuracy(q_all, y, 1)
    ev["all_routing"] = {"top1": all_top1, "top5": metrics.accuracy(q_all, y, 5), "nll": metrics.nll(q_all, y),
                         "change_vs_generalist": all_top1 - ev["generalist"]["top1"],
                         "change_vs_routed": all_top1 - ev["ensemble"]["top1"]}
    ev["timing"] = timing(run, ens, ens_all, x_time)
    ev["cost"] = cost(run, ens, ens_all, x_time, ev["timing"], ev["per_specialist"], unit)
    ev["validation"] = validation(run, ens, ens_all, ev["cost"]["generalist_flops"], spec_flops)
    ev["plots"] = [run.rel(p) for p in run.evaluation_plots]
    # what later reports pair every other model's test predictions with
    write_npy(run.test_labels_npy, y.numpy().astype(np.int64))
    for key in ("generalist", "ensemble"):
        write_npy(run.predictions(key), res[key].argmax(1).cpu().numpy().astype(np.int64))
    write_json(run.evaluation_json, ev)
    log.info("evaluate: generalist top-1 %.4f -> ensemble %.4f (%+.4f, 95%% CI %s, McNemar p=%.3g)",
             ev["generalist"]["top1"], ev["ensemble"]["top1"], ev["change"]["top1_abs"],
             ci(ev["significance"]["bootstrap"].get("ci95")), ev["significance"]["mcnemar"]["p_value"])
    return ev
