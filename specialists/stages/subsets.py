"""The find-subsets stage: generalist probabilities on a held-in split -> class subsets.

Writes ``RUN_DIR/subsets/``: ``probs.npy`` (N x C float32, the generalist on the held-in split,
reused by later stages), ``covariance.npy`` (C x C float32), ``subsets.json`` and
``metrics.json`` (sizes, the realized coverage per class, adjusted Rand index against coarse
labels where known, warnings).
Never the test split: clustering on it would leak into the evaluation.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..core.subsets import adjusted_rand_index, coverage_summary, find_subsets
from ..data import batcher_for
from ..engine.fit import predict_logits
from ..errors import SpecialistsError
from ..rundir import Run
from ..rundir.config import check_class_counts
from ..rundir.io import read_npy, write_json, write_npy

log = logging.getLogger("specialists")


def heldin_probs(run: Run) -> np.ndarray:
    """The generalist's probabilities (N, C) float32 on ``subsets.split``, cached on disk."""
    if run.probs_npy.exists():
        return read_npy(run.probs_npy)
    batcher = batcher_for(run.data, run.data.split(run.cfg.subsets.split), run.device)
    logits = predict_logits(run.load_generalist(), batcher, run.cfg.generalist.eval_batch_size)
    probs = torch.softmax(logits, 1).numpy().astype(np.float32)
    write_npy(run.probs_npy, probs)
    return probs


def find(run: Run) -> dict:
    """`specialists find-subsets`: cluster the classes, write ``subsets/``."""
    cfg, ds = run.cfg.subsets, run.data
    C = ds.num_classes
    check_class_counts(run.cfg, C)
    probs = heldin_probs(run)
    labels = ds.split(cfg.split).y.numpy()
    try:
        res = find_subsets(probs, labels, cfg.num_specialists, mode=cfg.mode,
                           classes_per_specialist=cfg.classes_per_specialist, normalize=cfg.normalize,
                           method=cfg.method, seed=run.cfg.seed, min_size=cfg.min_size, max_size=cfg.max_size,
                           leave_unwanted=cfg.leave_unwanted, niter=cfg.niter, coverage=cfg.coverage)
    except ValueError as exc:
        raise SpecialistsError(f"find-subsets: {exc}") from None
    if not res.subsets:
        raise SpecialistsError("find-subsets: no subset survived the size filters (lower subsets.min_size "
                               "or ask for fewer specialists)")
    write_npy(run.covariance_npy, res.covariance)
    names = ds.class_names
    entries = [{"id": i, "classes": [int(c) for c in s], "names": [names[c] for c in s], "size": len(s),
                **{k: v for k, v in st.items() if k != "size"}}
               for i, (s, st) in enumerate(zip(res.subsets, res.stats))]
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
        # asked for (None: the partition) and realized: how many subsets hold each class, after
        # the size rules and the merging of identical subsets
        "coverage": cfg.coverage,
        "class_coverage": coverage_summary(res.coverage),
        "warnings": res.warnings,
    }
    if ds.fine_to_coarse is not None:
        # agreement of the k-means partition (every class labelled) with the coarse grouping
        metrics["adjusted_rand_index"] = adjusted_rand_index(np.asarray(ds.fine_to_coarse), res.cluster_labels)
        if cfg.mode == "partition" and (cfg.coverage or 1) == 1:  # overlapping subsets are no labelling
            part = np.full(C, -1)
            for i, s in enumerate(res.subsets):
                part[s] = i
            metrics["adjusted_rand_index_subsets"] = adjusted_rand_index(np.asarray(ds.fine_to_coarse), part)
    write_json(run.subsets_json, {"subsets": entries})
    write_json(run.subsets_metrics, metrics)
    log.info("find-subsets: %d subsets of sizes %s%s", len(res.subsets), metrics["sizes"],
             f", ARI vs coarse labels {metrics['adjusted_rand_index']:.3f}" if "adjusted_rand_index" in metrics else "")
    for w in res.warnings:
        log.warning("find-subsets: %s", w)
    return metrics
