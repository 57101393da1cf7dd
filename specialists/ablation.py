"""The ablation over the number of specialists, and the compute-matched control.

Three parts, one report (``RUN_DIR/ablation/ablation.{json,md,png}``):

- **subset ablation**: the ensemble with only the first k trained specialists (k = 0, 1, 2,
  4, ..., all), in an order by confusion mass, subset size or a seeded shuffle. Every
  specialist runs once over the test split; each k only re-combines (cheap, no training). The
  k = 0 row is the generalist and the k = all row the full evaluation, exactly.
- **re-clustering ablation**: for each M in ``ablate.counts``, find-subsets and
  train-specialists again with M specialists in ``ablation/recluster/MNNN/`` (a run directory
  of its own that reuses the generalist), then evaluate: the full cost of each M.
- **compute-matched control**: the generalist fine-tuned for as many extra training samples as
  all specialists consumed, at the specialists' learning rate: do specialists beat simply
  training longer?
"""

from __future__ import annotations

import copy
import logging
import math
import shutil

import numpy as np
from omegaconf import OmegaConf

from .controls import refresh_reports
from .ensemble import SpecialistEnsemble
from .evaluation import _controls_table, _num, score
from .generalist import split_metrics, train_classifier
from .io import read_json, write_json
from .manifest import Manifest
from .plots import plot_ablation
from .run import Run

log = logging.getLogger("specialists")


def ablation_counts(m: int) -> list[int]:
    """0, 1, 2, 4, ... up to and including m."""
    ks = [0] + [2**i for i in range(int(math.log2(m)) + 1)] if m >= 1 else [0]
    return sorted(set(k for k in ks if k <= m) | {m})


def specialist_order(entries: list[dict], order: str, seed: int) -> list[int]:
    """Positions of the specialists in the order they are added."""
    pos = list(range(len(entries)))
    if order == "size":
        return sorted(pos, key=lambda i: (-entries[i]["size"], entries[i]["id"]))
    if order == "confusion":
        return sorted(pos, key=lambda i: (-entries[i].get("confusion_mass", 0.0), entries[i]["id"]))
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.permutation(len(entries))]


def subset_ablation(run: Run) -> dict:
    ens = SpecialistEnsemble.from_run(run.dir, device=run.device)
    entries = read_json(run.dir / "subsets" / "subsets.json")["subsets"]
    by_id = {e["id"]: e for e in entries}
    entries = [by_id[i] for i in ens.ids]
    test = run.data.test
    y = test.y
    p_g, p_specs, active = ens.components_all(test.x)
    order = specialist_order(entries, run.cfg.ablate.order, run.cfg.ablate.seed)
    ev = run.cfg.evaluate
    rows = []
    for k in ablation_counts(len(entries)):
        sel = sorted(order[:k])
        q = ens.combine_all(p_g, p_specs, active, sel)
        subsets = [ens.subsets[m].cpu() for m in sel]
        s = score(p_g.cpu(), q.cpu(), y, subsets, active[:, sel].cpu(), bootstrap=ev.bootstrap,
                  ece_bins=ev.ece_bins, seed=run.cfg.seed)
        rows.append({
            "k": k, "ids": [ens.ids[m] for m in sel],
            "top1": s["ensemble"]["top1"], "top5": s["ensemble"]["top5"],
            "generalist_top1": s["generalist"]["top1"],
            "conditional_count": s["conditional"]["count"],
            "conditional_generalist_top1": s["conditional"]["generalist_top1"],
            "conditional_ensemble_top1": s["conditional"]["ensemble_top1"],
            "ci95": s["significance"]["bootstrap"]["ci95"],
            "train_samples": int(sum(_specialist_samples(run, ens.ids[m]) for m in sel)),
        })
        log.info("ablation: %d specialists -> top-1 %.4f", k, rows[-1]["top1"])
    return {"order": run.cfg.ablate.order, "rows": rows}


def _specialist_samples(run: Run, sid: int) -> int:
    return int(read_json(run.specialist_dir(sid) / "metrics.json")["train_samples"])


def recluster_ablation(run: Run) -> list[dict]:
    """Re-run find-subsets + train-specialists + evaluate for each M in ``ablate.counts``."""
    from .pipeline import run_stage

    C = run.data.num_classes
    results = []
    for m in run.cfg.ablate.counts:
        if m > C:
            log.warning("ablation: skipping %d specialists (the data set has only %d classes)", m, C)
            continue
        sub_dir = run.dir / "ablation" / "recluster" / f"M{m:03d}"
        cfg = copy.deepcopy(run.cfg)
        cfg.run_dir = str(sub_dir)
        cfg.subsets.num_specialists = m
        if cfg.subsets.mode == "nearest" and cfg.subsets.classes_per_specialist:
            cfg.subsets.classes_per_specialist = min(cfg.subsets.classes_per_specialist, C)
        _share_generalist(run, cfg)
        for stage in ("subsets", "specialists", "evaluate"):
            run_stage(cfg, stage)
        ev = read_json(sub_dir / "evaluation" / "evaluation.json")
        sm = read_json(sub_dir / "subsets" / "metrics.json")
        samples = sum(read_json(p)["train_samples"] for p in sorted((sub_dir / "specialists").glob("*/metrics.json")))
        results.append({
            "num_specialists": m, "num_subsets": sm["num_subsets"],
            "top1": ev["ensemble"]["top1"], "generalist_top1": ev["generalist"]["top1"],
            "conditional_count": ev["conditional"]["count"],
            "conditional_generalist_top1": ev["conditional"]["generalist_top1"],
            "conditional_ensemble_top1": ev["conditional"]["ensemble_top1"],
            "adjusted_rand_index": sm.get("adjusted_rand_index"),
            "train_samples": int(samples), "run_dir": str(sub_dir.relative_to(run.dir)),
        })
    return results


def _share_generalist(run: Run, cfg) -> None:
    """Give the sub-run the parent's generalist (copied: the sub-run stays self-contained)."""
    sub = Run(cfg, device=str(run.device))
    manifest = Manifest(sub.dir)
    if manifest.is_done("generalist"):
        return
    dst = sub.dir / "generalist"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "metrics.json"):
        shutil.copy2(run.dir / "generalist" / name, dst / name)
    shutil.copy2(run.dir / "data.json", sub.dir / "data.json")
    sub.save_config()
    manifest.start("generalist", cfg)
    manifest.finish("generalist", ["generalist/model.safetensors", "generalist/metrics.json"], shared_from="../../..")


def compute_matched_control(run: Run, extra_samples: int) -> dict:
    """Fine-tune the generalist for ``extra_samples`` training samples (rounded to whole
    epochs, at least one) at the specialists' learning rate and schedule."""
    out = run.dir / "ablation" / "control"
    out.mkdir(parents=True, exist_ok=True)
    n = len(run.data.train)
    epochs = max(1, round(extra_samples / n))
    tcfg = OmegaConf.merge(run.cfg.specialists, {"epochs": epochs})
    model = run.load_generalist()
    done = out / "model.safetensors"
    if done.exists():
        from .io import load_weights

        load_weights(done, model)
        history = read_json(out / "metrics.json")["history"]
    else:
        history = train_classifier(run, model, tcfg, out / "state.pt", seed=run.cfg.seed + 101,
                                   desc="control (generalist trained longer)", eval_splits=(),
                                   epoch_offset=run.cfg.generalist.epochs)
        run.save_model(done, model)
    m = split_metrics(run, model, ("test",), run.cfg.generalist.eval_batch_size)
    result = {"epochs": epochs, "train_samples": epochs * n, "specialist_samples": int(extra_samples),
              "lr": tcfg.lr, "test_top1": m["test_top1"], "test_top5": m["test_top5"], "test_nll": m["test_nll"],
              "history": history}
    write_json(out / "metrics.json", result)
    return result


def render_markdown(a: dict, controls: list[dict] | None = None) -> str:
    g = a["generalist"]["test_top1"]
    lines = ["# Ablation over the number of specialists", "",
             f"Generalist test top-1: **{g:.4f}**.", ""]
    sub = a["subset_ablation"]
    lines += [f"## Subset ablation (first k specialists, ordered by {sub['order']})", "",
              "| k | top-1 | change | 95% CI of change | conditional n | cond. generalist | cond. ensemble | specialist samples |",
              "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in sub["rows"]:
        ci = f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if r.get("ci95") else "-"
        lines.append(f"| {r['k']} | {r['top1']:.4f} | {r['top1'] - g:+.4f} | {ci} | {r['conditional_count']} | "
                     f"{_num(r['conditional_generalist_top1'])} | {_num(r['conditional_ensemble_top1'])} | {r['train_samples']} |")
    if a.get("recluster"):
        lines += ["", "## Re-clustering ablation (find-subsets + train-specialists for each M)", "",
                  "| M asked | subsets | top-1 | change | cond. generalist | cond. ensemble | ARI | specialist samples |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in a["recluster"]:
            ari = f"{r['adjusted_rand_index']:.3f}" if r.get("adjusted_rand_index") is not None else "-"
            lines.append(f"| {r['num_specialists']} | {r['num_subsets']} | {r['top1']:.4f} | {r['top1'] - g:+.4f} | "
                         f"{_num(r['conditional_generalist_top1'])} | {_num(r['conditional_ensemble_top1'])} | {ari} | {r['train_samples']} |")
    if controls:  # the same table as the evaluation's: generalist, all specialists, then each control
        ends = {"generalist": {"top1": g}, "ensemble": {"top1": sub["rows"][-1]["top1"]}}
        lines += ["", "## Controls: what the same extra compute buys otherwise", ""] + _controls_table(ends, controls)
    return "\n".join(lines) + "\n"


def ablate_stage(run: Run) -> dict:
    out = run.stage_dir("ablation")
    gen = read_json(run.dir / "generalist" / "metrics.json")
    result = {"generalist": {"test_top1": gen["test_top1"]}, "subset_ablation": subset_ablation(run)}
    result["recluster"] = recluster_ablation(run)
    if run.cfg.ablate.control:
        extra = result["subset_ablation"]["rows"][-1]["train_samples"]
        result["control"] = compute_matched_control(run, extra)
        log.info("ablation: control (generalist trained longer) test top-1 %.4f", result["control"]["test_top1"])
    write_json(out / "ablation.json", result)
    refresh_reports(run.dir)  # ablation.md and evaluation.md, now with the compute-matched control
    plot_ablation(result, out / "ablation.png")
    return result
