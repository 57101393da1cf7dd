"""The find-subsets stage: generalist probabilities on a held-in split -> class subsets.

Writes ``RUN_DIR/subsets/``: ``probs.npy`` (N x C float32, the generalist on the held-in split,
reused by later stages), ``covariance.npy`` (C x C float32), ``subsets.json``, ``metrics.json``
(sizes, adjusted Rand index against coarse labels where known, warnings) and
``covariance.png``. Never the test split: clustering on it would leak into the evaluation.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import SpecialistsError
from .io import read_npy, write_json, write_npy
from .plots import plot_covariance
from .run import Run
from .subsets import adjusted_rand_index, find_subsets
from .train import predict_logits

log = logging.getLogger("specialists")


def heldin_probs(run: Run) -> np.ndarray:
    """The generalist's probabilities (N, C) float32 on ``subsets.split``, cached on disk."""
    path = run.dir / "subsets" / "probs.npy"
    if path.exists():
        return read_npy(path)
    split = run.data.split(run.cfg.subsets.split)
    model = run.load_generalist()
    probs = torch.softmax(predict_logits(model, run.data, split, run.device, run.cfg.generalist.eval_batch_size), 1)
    probs = probs.numpy().astype(np.float32)
    write_npy(path, probs)
    return probs


def find_subsets_stage(run: Run) -> dict:
    cfg, ds = run.cfg.subsets, run.data
    C = ds.num_classes
    if cfg.num_specialists > C:
        raise SpecialistsError(f"config key 'subsets.num_specialists': {cfg.num_specialists} specialists but "
                               f"the data set has only {C} classes")
    if cfg.classes_per_specialist is not None and cfg.classes_per_specialist > C:
        raise SpecialistsError(f"config key 'subsets.classes_per_specialist': {cfg.classes_per_specialist} is "
                               f"larger than the {C} classes of the data set")
    out = run.stage_dir("subsets")
    probs = heldin_probs(run)
    labels = run.data.split(cfg.split).y.numpy()
    try:
        res = find_subsets(probs, labels, cfg.num_specialists, mode=cfg.mode,
                           classes_per_specialist=cfg.classes_per_specialist, normalize=cfg.normalize,
                           method=cfg.method, seed=run.cfg.seed, min_size=cfg.min_size, max_size=cfg.max_size,
                           leave_unwanted=cfg.leave_unwanted, niter=cfg.niter)
    except ValueError as exc:
        raise SpecialistsError(f"find-subsets: {exc}") from None
    if not res.subsets:
        raise SpecialistsError("find-subsets: no subset survived the size filters (lower subsets.min_size "
                               "or ask for fewer specialists)")
    write_npy(out / "covariance.npy", res.covariance)
    names = ds.class_names
    entries = []
    for i, (s, st) in enumerate(zip(res.subsets, res.stats)):
        entries.append({"id": i, "classes": [int(c) for c in s], "names": [names[c] for c in s], "size": len(s),
                        **{k: v for k, v in st.items() if k != "size"}})
    covered = np.zeros(C, bool)
    for s in res.subsets:
        covered[s] = True
    metrics = {
        "num_requested": cfg.num_specialists,
        "num_subsets": len(res.subsets),
        "mode": cfg.mode, "normalize": cfg.normalize, "method": cfg.method, "split": cfg.split,
        "sizes": [len(s) for s in res.subsets],
        "size_histogram": res.size_histogram,
        "classes_covered": int(covered.sum()),
        "classes_left_to_generalist": int(C - covered.sum()),
        "warnings": res.warnings,
    }
    if ds.fine_to_coarse is not None:
        # agreement of the k-means partition (every class labelled) with the coarse grouping
        metrics["adjusted_rand_index"] = adjusted_rand_index(np.asarray(ds.fine_to_coarse), res.cluster_labels)
        part = np.full(C, -1)
        for i, s in enumerate(res.subsets):
            part[s] = i
        if cfg.mode == "partition":
            metrics["adjusted_rand_index_subsets"] = adjusted_rand_index(np.asarray(ds.fine_to_coarse), part)
    write_json(out / "subsets.json", {"subsets": entries})
    write_json(out / "metrics.json", metrics)
    plot_covariance(res.points, res.subsets, out / "covariance.png",
                    class_names=names if C <= 60 else None,
                    title=f"{cfg.normalize} of the generalist's probabilities, {len(res.subsets)} subsets")
    log.info("find-subsets: %d subsets of sizes %s%s", len(res.subsets), metrics["sizes"],
             f", ARI vs coarse labels {metrics['adjusted_rand_index']:.3f}" if "adjusted_rand_index" in metrics else "")
    for w in res.warnings:
        log.warning("find-subsets: %s", w)
    return metrics
