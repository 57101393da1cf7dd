"""The ablate stage: the ablation over the number of specialists, and the compute-matched control.

Three parts, one ``RUN_DIR/ablation/ablation.json``:

- **subset ablation**: the ensemble with only the first k trained specialists (k = 0, 1, 2,
  4, ..., all), in an order by confusion mass, subset size or a seeded shuffle. Every
  specialist runs once over the test split; each k only re-combines (cheap, no training). The
  k = 0 row is the generalist and the k = all row the full evaluation, exactly.
- **re-clustering ablation**: for each M in ``ablate.counts``, find-subsets, train-specialists
  and evaluate again with M specialists in the sub-run ``ablation/recluster/MNNN/`` (a run
  directory of its own that shares the generalist): the full cost of each M. Each sub-run is
  an independent job.
- **compute-matched control**: the generalist fine-tuned for as much extra training compute as
  all specialists consumed (their samples weighted by their FLOPs per sample, in generalist
  examples: a shared-trunk specialist's sample costs less), at the specialists' learning rate:
  do specialists beat simply training longer? Its ``metrics.json`` also holds its cost (inference FLOPs per example, its
  training compute in generalist-example equivalents) and its folder its test predictions.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import numpy as np
from omegaconf import OmegaConf

from ..core import metrics
from ..core.scoring import ablation_counts, score, specialist_order
from ..data import batcher_for
from ..engine.executors import Job, as_run, run_jobs
from ..engine.flops import generalist_train_flops, model_inference_flops, train_compute
from ..engine.trainers import split_probs, train_classifier, train_once
from ..inference import SpecialistEnsemble
from ..rundir import Run
from ..rundir.io import read_json, write_json, write_npy

log = logging.getLogger("specialists")

# (sub-run config, stage keys) -> the job that runs those stages in that sub-run; given by the pipeline
SubRun = Callable[[object, Sequence[str]], Job]
RECLUSTER_STAGES = ("subsets", "specialists", "evaluate")


def subset_ablation(run: Run) -> dict:
    ens = SpecialistEnsemble.from_run(run)
    by_id = {e["id"]: e for e in run.load_subsets()}
    entries = [by_id[i] for i in ens.ids]
    test = run.data.test
    p_g, p_specs, active = ens.components_over(x for x, _ in batcher_for(run.data, test, run.device).iterate(ens.batch_size))
    order = specialist_order(entries, run.cfg.ablate.order, run.cfg.ablate.seed)
    ev = run.cfg.evaluate
    samples = {i: int(read_json(run.specialist(i).metrics)["train_samples"]) for i in ens.ids}
    rows = []
    for k in ablation_counts(len(entries)):
        sel = sorted(order[:k])
        q = ens.combine_all(p_g, p_specs, active, sel)
        s = score(p_g.cpu(), q.cpu(), test.y, [ens.subsets[m].cpu() for m in sel], active[:, sel].cpu(),
                  bootstrap=ev.bootstrap, ece_bins=ev.ece_bins, seed=run.cfg.seed)
        rows.append({
            "k": k, "ids": [ens.ids[m] for m in sel],
            "top1": s["ensemble"]["top1"], "top5": s["ensemble"]["top5"],
            "generalist_top1": s["generalist"]["top1"],
            "conditional_count": s["conditional"]["count"],
            "conditional_generalist_top1": s["conditional"]["generalist_top1"],
            "conditional_ensemble_top1": s["conditional"]["ensemble_top1"],
            "ci95": s["significance"]["bootstrap"]["ci95"],
            "train_samples": sum(samples[ens.ids[m]] for m in sel),
        })
        log.info("ablation: %d specialists -> top-1 %.4f", k, rows[-1]["top1"])
    return {"order": run.cfg.ablate.order, "rows": rows}


def recluster_configs(run: Run) -> list:
    """The sub-run config of each M in ``ablate.counts`` (counts above the class count skipped;
    ``subsets.coverage`` lowered to M where it is above)."""
    C = run.data.num_classes
    out = []
    for m in run.cfg.ablate.counts:
        if m > C:
            log.warning("ablation: skipping %d specialists (the data set has only %d classes)", m, C)
            continue
        cfg = copy.deepcopy(run.cfg)
        cfg.run_dir = str(run.recluster_dir(m))
        cfg.subsets.num_specialists = m
        if cfg.subsets.mode == "nearest" and cfg.subsets.classes_per_specialist:
            cfg.subsets.classes_per_specialist = min(cfg.subsets.classes_per_specialist, C)
        if cfg.subsets.coverage is not None:  # a class joins each of the m clusters at most once
            cfg.subsets.coverage = min(cfg.subsets.coverage, m)
        out.append(cfg)
    return out


def recluster_row(run: Run, sub: Run) -> dict:
    """A re-clustering sub-run's row of the ablation (its stages done)."""
    ev = read_json(sub.evaluation_json)
    sm = read_json(sub.subsets_metrics)
    return {
        "num_specialists": sub.cfg.subsets.num_specialists, "num_subsets": sm["num_subsets"],
        "top1": ev["ensemble"]["top1"], "generalist_top1": ev["generalist"]["top1"],
        "conditional_count": ev["conditional"]["count"],
        "conditional_generalist_top1": ev["conditional"]["generalist_top1"],
        "conditional_ensemble_top1": ev["conditional"]["ensemble_top1"],
        "adjusted_rand_index": sm.get("adjusted_rand_index"),
        "train_samples": int(sum(read_json(p)["train_samples"] for p in sub.specialist_metrics_files)),
        "run_dir": run.rel(sub.dir),
    }


def control_job(run, extra_samples: int) -> dict:
    """:func:`compute_matched_control` as an independent job (here, or as a Ray task)."""
    return compute_matched_control(as_run(run), extra_samples)


def specialists_train_compute(run: Run) -> float:
    """The specialists' training compute in generalist-example equivalents: their training
    samples weighted by their FLOPs per sample over the generalist's (a shared-trunk specialist's
    sample costs its tail; a whole network's about one generalist example)."""
    unit = generalist_train_flops(run)
    total = 0.0
    for path in run.specialist_metrics_files:
        m = read_json(path)
        total += train_compute(m["train_samples"], m.get("train_flops_per_sample") or unit, unit)
    return total


def compute_matched_control(run: Run, extra_samples: float) -> dict:
    """Fine-tune the generalist for ``extra_samples`` training samples (the specialists' training
    compute in generalist examples, rounded to whole epochs, at least one) at the specialists'
    learning rate and schedule."""
    files = run.control
    files.dir.mkdir(parents=True, exist_ok=True)
    n = len(run.data.train)
    epochs = max(1, round(extra_samples / n))
    tcfg = OmegaConf.merge(run.cfg.specialists, {"epochs": epochs})
    model = run.load_generalist()
    history = train_once(files, model,
                         lambda: train_classifier(run, model, tcfg, files.state, seed=run.cfg.seed + 101,
                                                  desc="control (generalist trained longer)", eval_splits=(),
                                                  epoch_offset=run.cfg.generalist.epochs),
                         lambda: run.save_model(files.weights, model))
    p, y = split_probs(run, model, "test", run.cfg.generalist.eval_batch_size), run.data.test.y
    write_npy(files.predictions, p.argmax(1).numpy().astype(np.int64))
    unit = generalist_train_flops(run)  # the generalist's network: its FLOPs per training sample are the unit
    result = {"epochs": epochs, "train_samples": epochs * n, "specialist_samples": round(extra_samples),
              "lr": tcfg.lr, "test_top1": metrics.accuracy(p, y), "test_top5": metrics.accuracy(p, y, 5),
              "test_nll": metrics.nll(p, y), "inference_flops": model_inference_flops(run, model),
              "train_flops_per_sample": unit, "train_compute": train_compute(epochs * n, unit, unit),
              "history": history}
    write_json(files.metrics, result)
    return result


def ablate(run: Run, subrun: SubRun) -> dict:
    """`specialists ablate`: writes ``ablation/ablation.json``. The re-clustering sub-runs and
    the compute-matched control are independent jobs (``launch.executor``)."""
    gen = read_json(run.generalist.metrics)
    result = {"generalist": {"test_top1": gen["test_top1"]}, "subset_ablation": subset_ablation(run)}
    configs = recluster_configs(run)
    jobs = [subrun(cfg, RECLUSTER_STAGES) for cfg in configs]
    if run.cfg.ablate.control:
        extra = specialists_train_compute(run)
        jobs.append(Job("control (generalist trained longer)", control_job, (run, extra)))
    done = run_jobs(jobs, run.cfg.launch, "ablation", run.tracker)
    result["recluster"] = [recluster_row(run, Run(cfg, str(run.device))) for cfg in configs]
    if run.cfg.ablate.control:
        result["control"] = done[-1]
        log.info("ablation: control (generalist trained longer) test top-1 %.4f", result["control"]["test_top1"])
    write_json(run.ablation_json, result)
    return result
