"""Confusable-class discovery: which classes does the generalist mix up?

The chain, each step a pure function:

1. :func:`~specialists.core.covariance.covariance` of the generalist's held-in probabilities
   ``P`` (N examples x C classes) -> ``Cov`` (C x C).
2. :func:`~specialists.core.covariance.normalize_columns`: correlation, diagonal removed, unit
   columns (raw columns make k-means degenerate).
3. :func:`~specialists.core.kmeans.kmeans` on those points (one point per class).
4. :func:`select_subsets`: each cluster is a subset (``partition``), or each centroid takes
   its K nearest classes (``nearest``, overlapping, fixed size as on JFT).
5. :func:`subset_stats`: how much of the generalist's probability stays inside each subset.

:func:`find_subsets` runs the chain and returns a :class:`SubsetResult`. Nothing here knows
about configs or the run directory; the find-subsets stage does the I/O.

Memory: every C x C array is float32 (15,000 classes -> 0.9 GB each) and the chain keeps at
most two of them alive (the covariance and the normalized points).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import ParameterError, as_2d_probs, check_choice, check_int, rows_as_tensor, to_numpy_f32
from .covariance import NORMALIZATIONS, covariance, normalize_columns
from .kmeans import METHODS, kmeans, squared_distances

log = logging.getLogger(__name__)

MODES = ("partition", "nearest")


# ----------------------------------------------------------------------------- 4. subsets


def select_subsets(
    points,
    labels,
    centroids,
    mode: str = "partition",
    classes_per_specialist: int | None = None,
    min_size: int = 2,
    max_size: int | None = None,
    leave_unwanted: bool = True,
) -> list[np.ndarray]:
    """Class subsets, one per specialist.

    Args:
        points: (C, D) float32, rows = classes (the points given to :func:`kmeans`).
        labels: (C,) cluster of each class; centroids: (k, D).
        mode: ``"partition"``: each cluster is one subset, a class in at most one subset.
            Clusters with fewer than ``min_size`` classes are dropped; clusters with more
            than ``max_size`` keep the ``max_size`` classes nearest their centroid. The
            classes so removed are left to the generalist (in no subset) when
            ``leave_unwanted``; otherwise each goes to the nearest kept centroid that still
            has room under ``max_size`` (most confident class first; none -> left out).
            ``"nearest"``: each centroid takes the ``classes_per_specialist`` classes nearest
            it, so subsets overlap and all have exactly that size; identical subsets are
            kept once. ``min_size``/``max_size`` do not apply.

    Distances are euclidean to the centroid; on unit-length points (correlation
    normalization) that ranks classes exactly as cosine similarity does.

    Returns:
        Sorted int64 arrays of class ids, ordered by size (descending), then smallest id.
    """
    x = to_numpy_f32(points)
    labels = np.asarray(labels, dtype=np.int64)
    cents = to_numpy_f32(centroids)
    c = x.shape[0]
    k = cents.shape[0]
    mode = check_choice(mode, "mode", MODES)
    if labels.shape != (c,):
        raise ParameterError(f"labels must have shape ({c},), got {labels.shape}")
    if c and (labels.min() < 0 or labels.max() >= k):
        raise ParameterError(f"labels must lie in [0, {k}) (one per centroid)")
    dist = squared_distances(x, cents)  # (C, k): small, computed once

    if mode == "nearest":
        if classes_per_specialist is None:
            raise ParameterError("classes_per_specialist is required when mode='nearest'")
        size = check_int(classes_per_specialist, "classes_per_specialist", 1, c)
        subsets = []
        for j in range(k):
            # Stable sort: ties broken by class id, so the result is deterministic.
            subsets.append(np.sort(np.argsort(dist[:, j], kind="stable")[:size]))
        return _dedupe_and_order(subsets)

    min_size = check_int(min_size, "min_size", 1)
    if max_size is not None:
        max_size = check_int(max_size, "max_size", min_size)

    members: dict[int, list[int]] = {}
    orphans: list[int] = []
    for j in range(k):
        cls = np.flatnonzero(labels == j)
        if len(cls) == 0:
            continue
        if len(cls) < min_size:
            orphans.extend(cls.tolist())
            continue
        if max_size is not None and len(cls) > max_size:
            order = cls[np.argsort(dist[cls, j], kind="stable")]
            cls, extra = order[:max_size], order[max_size:]
            orphans.extend(extra.tolist())
        members[j] = list(cls)

    if not leave_unwanted and orphans and members:
        kept = np.array(sorted(members), dtype=np.int64)
        orphans_arr = np.array(sorted(orphans), dtype=np.int64)
        d = dist[np.ix_(orphans_arr, kept)]  # (n_orphans, n_kept)
        # Most confident first: the orphan closest to some kept centroid picks first, so
        # when max_size leaves little room the best-fitting classes get it.
        for r in np.lexsort((orphans_arr, d.min(1))):
            for col in np.argsort(d[r], kind="stable"):
                j = int(kept[col])
                if max_size is None or len(members[j]) < max_size:
                    members[j].append(int(orphans_arr[r]))
                    break
    return _dedupe_and_order([np.array(m, dtype=np.int64) for m in members.values()])


def _dedupe_and_order(subsets: list[np.ndarray]) -> list[np.ndarray]:
    unique = {tuple(np.sort(s).tolist()) for s in subsets if len(s)}
    ordered = sorted(unique, key=lambda s: (-len(s), s))
    return [np.array(s, dtype=np.int64) for s in ordered]


# ----------------------------------------------------------------------------- 5. statistics


def subset_stats(probs, labels_true, subsets, chunk_size: int = 2048) -> list[dict]:
    """How the generalist's probability falls with respect to each subset.

    Args:
        probs: (N, C) generalist probabilities (held-in / validation), numpy or torch.
        labels_true: (N,) true class ids.
        subsets: list of M arrays of class ids.

    Returns, per subset (JSON-ready Python numbers; means are ``None`` when no example's
    true class is in S), with ``E`` = the examples whose true class y is in S:
        size: |S|; class_fraction: |S| / C.
        n_examples: |E|; example_fraction: |E| / N (the share of data the specialist covers).
        confusion_mass: mean over E of sum_{j in S, j != y} p_j (probability on the *other*
            classes of S: the confusion a specialist is meant to resolve).
        outside_mass: mean over E of sum_{j not in S} p_j (row total minus the in-subset
            sum, both accumulated in float64, so float32 rounding cannot cancel; rows that do
            not sum to exactly 1 are handled).
        subset_top1: generalist top-1 accuracy on E.
        routed: fraction of E whose generalist top-1 class is in S (where a top-1 router
            would call this specialist).

    Vectorized: one (N, C) x (C, M) membership matmul in float64 chunks; no C x C work.
    """
    probs = as_2d_probs(probs)
    n, c = probs.shape
    y = np.asarray(labels_true.cpu() if isinstance(labels_true, torch.Tensor) else labels_true).astype(np.int64)
    if y.shape != (n,):
        raise ParameterError(f"labels_true must have shape ({n},), got {y.shape}")
    m = len(subsets)
    if m == 0:
        return []
    member = np.zeros((c, m), dtype=bool)
    for j, s in enumerate(subsets):
        member[np.asarray(s, dtype=np.int64), j] = True
    member_t = torch.from_numpy(member.astype(np.float64))

    mass_in = np.empty((n, m), dtype=np.float64)   # sum_{j in S} p_j
    mass_all = np.empty(n, dtype=np.float64)       # sum_j p_j (1 up to rounding)
    p_true = np.empty(n, dtype=np.float64)
    top1 = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        x = rows_as_tensor(probs, start, stop).cpu()
        top1[start:stop] = x.argmax(1).numpy()
        x64 = x.double()  # one chunk in float64: exact enough sums, never all of P
        del x
        mass_in[start:stop] = (x64 @ member_t).numpy()
        mass_all[start:stop] = x64.sum(1).numpy()
        p_true[start:stop] = x64[torch.arange(stop - start), torch.from_numpy(y[start:stop])].numpy()

    in_s = member[y]                         # (N, M): true class in S
    top_in_s = member[top1]                  # (N, M): generalist's top-1 in S
    correct = top1 == y
    count = in_s.sum(0)
    confusion = np.where(in_s, mass_in - p_true[:, None], 0.0).sum(0)
    outside = np.where(in_s, mass_all[:, None] - mass_in, 0.0).sum(0)
    acc = (in_s & correct[:, None]).sum(0)
    routed = (in_s & top_in_s).sum(0)

    stats = []
    for j, s in enumerate(subsets):
        cnt = int(count[j])

        def mean(v, cnt=cnt):
            return float(v / cnt) if cnt else None

        stats.append({
            "size": int(len(s)),
            "class_fraction": float(len(s) / c),
            "n_examples": cnt,
            "example_fraction": float(cnt / n) if n else 0.0,
            "confusion_mass": mean(confusion[j]),
            "outside_mass": mean(outside[j]),
            "subset_top1": mean(acc[j]),
            "routed": mean(routed[j]),
        })
    return stats


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index between two labelings of the same items (scikit-learn's): 1 for
    identical partitions up to renaming, about 0 for chance agreement."""
    from sklearn.metrics import adjusted_rand_score

    a = np.asarray(labels_a).ravel()
    b = np.asarray(labels_b).ravel()
    if a.shape != b.shape:
        raise ParameterError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
    return float(adjusted_rand_score(a, b))


# ----------------------------------------------------------------------------- the chain


@dataclass
class SubsetResult:
    """Everything :func:`find_subsets` found, for the pipeline to save and report.

    subsets: M sorted int64 arrays of class ids (see :func:`select_subsets` for the order).
    cluster_labels: (C,) int64 k-means cluster of each class.
    centroids: (k, C) float32. covariance: (C, C) float32.
    points: (C, C) float32 normalized columns (column j = class j).
    stats: one dict per subset (:func:`subset_stats`); empty without true labels.
    size_histogram: {subset size: number of subsets}.
    warnings: human-readable lines about a degenerate clustering (also logged).
    num_requested: the number of specialists asked for.
    coverage: (C,) int64, how many subsets hold each class (0 = left to the generalist).
    cluster_sizes: (k,) int64 classes per k-means cluster (0 = empty cluster).
    """

    subsets: list[np.ndarray]
    cluster_labels: np.ndarray
    centroids: np.ndarray
    covariance: np.ndarray
    points: np.ndarray
    stats: list[dict]
    size_histogram: dict[int, int]
    warnings: list[str]
    num_requested: int
    coverage: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cluster_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def summary(self) -> dict:
        """JSON-ready summary (no C x C arrays)."""
        cov_hist = np.bincount(self.coverage) if len(self.coverage) else np.zeros(0, dtype=np.int64)
        return {
            "num_requested": int(self.num_requested),
            "num_subsets": len(self.subsets),
            "size_histogram": {str(k): int(v) for k, v in self.size_histogram.items()},
            "empty_clusters": int((self.cluster_sizes == 0).sum()),
            "classes_covered": int((self.coverage > 0).sum()),
            "coverage_histogram": {str(i): int(v) for i, v in enumerate(cov_hist)},
            "warnings": list(self.warnings),
        }


def find_subsets(
    probs,
    labels_true,
    num_specialists: int,
    mode: str = "partition",
    classes_per_specialist: int | None = None,
    normalize: str = "correlation",
    method: str = "faiss",
    seed: int = 0,
    min_size: int = 2,
    max_size: int | None = None,
    leave_unwanted: bool = True,
    niter: int = 50,
    nredo: int = 3,
    passes: int = 5,
) -> SubsetResult:
    """Covariance -> normalization -> k-means (``num_specialists`` clusters) -> subsets ->
    statistics. See the step functions for the arguments (``niter``, ``nredo``: faiss;
    ``passes``: minibatch).

    Args:
        probs: (N, C) generalist probabilities on held-in data.
        labels_true: (N,) true classes, for the statistics (``None`` skips them).

    Raises:
        ValueError (:class:`ParameterError`) with one line naming the parameter.

    A degenerate clustering is not an error but gets a warning (in ``result.warnings`` and
    the log): one subset holding more than half the classes (partition mode), or fewer
    subsets than asked (empty or too-small clusters, or identical nearest-mode subsets).
    """
    probs = as_2d_probs(probs)
    n, c = probs.shape
    if c < 1 or n < 2:
        raise ParameterError(f"probs must have at least 2 rows and 1 class, got shape {(n, c)}")
    num_specialists = check_int(num_specialists, "num_specialists", 1, c)
    mode = check_choice(mode, "mode", MODES)
    normalize = check_choice(normalize, "normalize", NORMALIZATIONS)
    method = check_choice(method, "method", METHODS)
    if mode == "nearest":
        if classes_per_specialist is None:
            raise ParameterError("classes_per_specialist is required when mode='nearest'")
        classes_per_specialist = check_int(classes_per_specialist, "classes_per_specialist", 1, c)
    elif classes_per_specialist is not None:
        check_int(classes_per_specialist, "classes_per_specialist", 1, c)
    min_size = check_int(min_size, "min_size", 1, c)
    if max_size is not None:
        max_size = check_int(max_size, "max_size", min_size)
    niter = check_int(niter, "niter", 1)
    nredo = check_int(nredo, "nredo", 1)
    passes = check_int(passes, "passes", 1)
    if labels_true is not None:
        y = np.asarray(labels_true.cpu() if isinstance(labels_true, torch.Tensor) else labels_true)
        if y.shape != (n,):
            raise ParameterError(f"labels_true must have shape ({n},), got {y.shape}")
        if n and (y.min() < 0 or y.max() >= c):
            raise ParameterError(f"labels_true must be class ids in [0, {c})")

    cov = covariance(probs)
    points = normalize_columns(cov, normalize)
    rows = points.T  # one row per class, C-contiguous (see normalize_columns): no copy
    labels, centroids = kmeans(rows, num_specialists, method=method, seed=seed, niter=niter,
                               nredo=nredo, passes=passes)
    subsets = select_subsets(
        rows, labels, centroids, mode=mode, classes_per_specialist=classes_per_specialist,
        min_size=min_size, max_size=max_size, leave_unwanted=leave_unwanted,
    )
    stats = subset_stats(probs, labels_true, subsets) if labels_true is not None else []

    cluster_sizes = np.bincount(labels, minlength=num_specialists).astype(np.int64)
    coverage = np.zeros(c, dtype=np.int64)
    for s in subsets:
        coverage[s] += 1
    sizes = [len(s) for s in subsets]
    size_histogram = dict(sorted(Counter(sizes).items()))

    warnings: list[str] = []
    # Only partition sizes come from the clustering; nearest-mode sizes are the caller's.
    if mode == "partition" and sizes and max(sizes) > c / 2 and c > 2:
        warnings.append(
            f"degenerate clustering: one subset holds {max(sizes)} of {c} classes (more than half); "
            f"normalize={normalize!r}" + (" (try normalize='correlation')" if normalize == "raw" else "")
        )
    if len(subsets) < num_specialists:
        if mode == "nearest":
            why = "identical subsets merged"
        else:
            empty = int((cluster_sizes == 0).sum())
            small = int(((cluster_sizes > 0) & (cluster_sizes < min_size)).sum())
            why = f"{empty} empty clusters, {small} below min_size={min_size}"
        warnings.append(f"got {len(subsets)} subsets of {num_specialists} requested ({why})")
    for w in warnings:
        log.warning(w)

    return SubsetResult(
        subsets=subsets, cluster_labels=labels, centroids=centroids, covariance=cov,
        points=points, stats=stats, size_histogram=size_histogram, warnings=warnings,
        num_requested=num_specialists, coverage=coverage, cluster_sizes=cluster_sizes,
    )
