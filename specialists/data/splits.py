"""The seeded, stratified split of labelled examples: how a loader without a test split carves
one, and how :func:`specialists.data.build.build_dataset` carves the validation split."""

from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``round(fraction * n_c)`` examples of each class c go to val
    (at least one where the class has two or more), never its last one: a class's only
    example stays in train. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        val.append(idx[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx
