"""Confusable-class discovery: which classes does the generalist mix up?

The chain, each step a pure function:

1. :func:`~specialists.core.covariance.covariance` of the generalist's held-in probabilities
   ``P`` (N examples x C classes) -> ``Cov`` (C x C).
2. :func:`~specialists.core.covariance.normalize_columns`: correlation, diagonal removed, unit
   columns (raw columns make k-means degenerate).
3. :func:`~specialists.core.kmeans.kmeans` on those points (one point per class).
4. :func:`select_subsets`: each cluster is a subset (``partition``; with ``coverage=c`` each
   class joins its c nearest centroids, so subsets overlap and every class is in about c of
   them), or each centroid takes its K nearest classes (``nearest``, overlapping, fixed size
   as on JFT).
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
    coverage: int | None = None,
) -> list[np.ndarray]:
    """Class subsets, one per specialist.

    Args:
        points: (C, D) float32, rows = classes (the points given to :func:`kmeans`).
        labels: (C,) cluster of each class (its nearest centroid, as :func:`kmeans` returns
            it); centroids: (k, D).
        mode: ``"partition"``: each cluster is one subset, a class in at most one subset.
            Clusters with fewer than ``min_size`` classes are dropped; clusters with more
            than ``max_size`` keep the ``max_size`` classes nearest their centroid. The
            classes so removed are left to the generalist (in no subset) when
            ``leave_unwanted``; otherwise each goes to the nearest kept centroid that still
            has room under ``max_size`` (most confident class first; none -> left out).
            ``"nearest"``: each centroid takes the ``classes_per_specialist`` classes nearest
            it, so subsets overlap and all have exactly that size; identical subsets are
            kept once. ``min_size``/``max_size`` do not apply.
        coverage: partition mode only; ``None`` is 1. Each class joins the clusters of its
            ``coverage`` nearest centroids (:func:`nearest_centroids`: its own cluster, then
            the others by distance), so before the size rules every class is in exactly
            ``coverage`` clusters and the clusters overlap. The size rules then act on
            memberships, as above: a cluster below ``min_size`` members is dropped, one
            above ``max_size`` keeps the ``max_size`` members nearest its centroid (so
            ``max_size`` caps each specialist's size, which coverage c multiplies by about
            c); a class losing a membership keeps its others (its coverage drops by one),
            or with ``leave_unwanted=False`` the lost membership moves to the nearest kept
            centroid with room that does not hold the class yet. Identical subsets are kept
            once, which also lowers the coverage of their classes. ``coverage=1`` is the
            partition itself, bit for bit.

    Distances are euclidean to the centroid; on unit-length points (correlation
    normalization) that ranks classes exactly as cosine similarity does. Ranking centroids
    for one class (``coverage``) is not cosine: ``|c|^2`` differs between centroids, and
    where the groups are nearly orthogonal it decides a class's further choices, so one
    centroid of small norm can collect most second memberships (a hub; ``max_size`` caps it).

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
        if coverage is not None:
            raise ParameterError("coverage does not apply to mode='nearest' (there each centroid takes its "
                                 "classes_per_specialist nearest classes; coverage makes each class join its "
                                 "nearest centroids: two different ways to overlap)")
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
    coverage = 1 if coverage is None else check_int(coverage, "coverage", 1, k)

    # (C, k) bool: class i joins cluster j. With coverage 1 this is labels == j exactly (the
    # first choice of every class is its own cluster), so the partition is not a special case.
    joins = np.zeros((c, k), dtype=bool)
    if c:
        joins[np.arange(c)[:, None], nearest_centroids(dist, labels, coverage)] = True
    members: dict[int, list[int]] = {}
    # Lost memberships, one entry per (class, cluster) dropped or trimmed; a class appears as
    # many times as it lost memberships (at most once when coverage is 1).
    orphans: list[int] = []
    for j in range(k):
        cls = np.flatnonzero(joins[:, j])
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
        d = dist[np.ix_(orphans_arr, kept)]  # (n_orphans, n_kept), a copy
        held = {j: set(m) for j, m in members.items()}
        # A class is in a subset once: with coverage > 1 a kept cluster that already holds the
        # class is no candidate (inf), so a lost membership moves to the class's next nearest
        # kept centroid. With coverage 1 an orphan is in no kept cluster: nothing is masked.
        for col, j in enumerate(kept.tolist()):
            d[[i in held[j] for i in orphans_arr.tolist()], col] = np.inf
        # Most confident first: the orphan closest to some kept centroid picks first, so
        # when max_size leaves little room the best-fitting classes get it.
        for r in np.lexsort((orphans_arr, d.min(1))):
            i = int(orphans_arr[r])
            for col in np.argsort(d[r], kind="stable"):
                j = int(kept[col])
                if i not in held[j] and (max_size is None or len(members[j]) < max_size):
                    members[j].append(i)
                    held[j].add(i)
                    break
    return _dedupe_and_order([np.array(m, dtype=np.int64) for m in members.values()])


def nearest_centroids(dist: np.ndarray, labels: np.ndarray, coverage: int) -> np.ndarray:
    """The ``coverage`` clusters each class joins: (C, coverage) int64 centroid ids.

    Column 0 is the class's own cluster ``labels`` (its nearest centroid: :func:`kmeans`
    assigns by the same :func:`squared_distances`), then the other centroids by increasing
    squared distance ``dist`` (C, k), ties broken by the lower centroid id. Taking ``labels``
    as given, rather than re-deriving it from ``dist``, keeps coverage 1 the partition even
    where two centroids tie.
    """
    c, k = dist.shape
    coverage = check_int(coverage, "coverage", 1, k)
    d = np.array(dist, dtype=np.float32)
    d[np.arange(c), labels] = -1.0  # squared distances are >= 0: the own cluster sorts first
    return np.argsort(d, axis=1, kind="stable")[:, :coverage].astype(np.int64)


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


def class_coverage(subsets, num_classes: int) -> np.ndarray:
    """(C,) int64: how many of ``subsets`` hold each class (0 = left to the generalist)."""
    cov = np.zeros(int(num_classes), dtype=np.int64)
    for s in subsets:
        cov[np.unique(np.asarray(s, dtype=np.int64))] += 1  # unique: a repeated id counts once
    return cov


def coverage_summary(coverage) -> dict:
    """The realized coverage per class, JSON-ready: ``min``, ``mean``, ``max`` over the C
    classes and ``histogram`` {number of subsets: number of classes held by that many},
    every count from 0 to the maximum listed (zeros included)."""
    cov = np.asarray(coverage, dtype=np.int64)
    if cov.size == 0:
        return {"min": None, "mean": None, "max": None, "histogram": {}}
    return {"min": int(cov.min()), "mean": float(cov.mean()), "max": int(cov.max()),
            "histogram": {str(i): int(v) for i, v in enumerate(np.bincount(cov))}}


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
    coverage: int | None = None,
) -> SubsetResult:
    """Covariance -> normalization -> k-means (``num_specialists`` clusters) -> subsets ->
    statistics. See the step functions for the arguments (``niter``, ``nredo``: faiss;
    ``passes``: minibatch).

    Args:
        probs: (N, C) generalist probabilities on held-in data.
        labels_true: (N,) true classes, for the statistics (``None`` skips them).
        coverage: partition mode: each class joins its ``coverage`` nearest of the
            ``num_specialists`` centroids (:func:`select_subsets`); ``None``: the partition.
            Refused with ``mode='nearest'``.

    Raises:
        ValueError (:class:`ParameterError`) with one line naming the parameter.

    A degenerate clustering is not an error but gets a warning (in ``result.warnings`` and
    the log): one subset (with coverage > 1: one k-means cluster) holding more than half the
    classes (partition mode), or fewer subsets than asked (empty or too-small clusters, or
    identical subsets merged).
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
    if coverage is not None:
        if mode == "nearest":
            raise ParameterError("coverage does not apply to mode='nearest' (two different ways to overlap)")
        # At most one membership per cluster: a class cannot join more clusters than there are.
        coverage = check_int(coverage, "coverage", 1, num_specialists)
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
        min_size=min_size, max_size=max_size, leave_unwanted=leave_unwanted, coverage=coverage,
    )
    stats = subset_stats(probs, labels_true, subsets) if labels_true is not None else []

    cluster_sizes = np.bincount(labels, minlength=num_specialists).astype(np.int64)
    realized = class_coverage(subsets, c)
    sizes = [len(s) for s in subsets]
    size_histogram = dict(sorted(Counter(sizes).items()))
    overlap = coverage is not None and coverage > 1

    warnings: list[str] = []
    # Only partition sizes come from the clustering; nearest-mode sizes are the caller's. With
    # coverage c a subset is about c times its cluster, so the clustering is judged by the
    # k-means clusters themselves.
    biggest, what = (int(cluster_sizes.max()), "k-means cluster") if overlap else (max(sizes, default=0), "subset")
    if mode == "partition" and biggest > c / 2 and c > 2:
        warnings.append(
            f"degenerate clustering: one {what} holds {biggest} of {c} classes (more than half); "
            f"normalize={normalize!r}" + (" (try normalize='correlation')" if normalize == "raw" else "")
        )
    elif overlap and max(sizes, default=0) > c / 2 and c > 2:
        # A hub: when the groups are nearly orthogonal, every centroid but a class's own is at
        # about the same distance, and the one with the smallest norm is everyone's next choice.
        warnings.append(
            f"one subset holds {max(sizes)} of {c} classes (more than half): with coverage={coverage} many "
            "classes' next-nearest centroid is the same one (subsets.max_size caps a subset)"
        )
    if len(subsets) < num_specialists:
        if mode == "nearest":
            why = "identical subsets merged"
        else:
            # Members per cluster before the size rules: the k-means clusters, or with
            # coverage c the classes that joined each (recomputed only here, for the message).
            joined = cluster_sizes if not overlap else np.bincount(
                nearest_centroids(squared_distances(rows, centroids), labels, coverage).ravel(),
                minlength=num_specialists)
            empty = int((joined == 0).sum())
            small = int(((joined > 0) & (joined < min_size)).sum())
            # Kept clusters only grow (reassignment adds, never removes), so those not in the
            # result were identical to another: impossible for disjoint partition subsets.
            merged = num_specialists - empty - small - len(subsets)
            why = f"{empty} empty clusters, {small} below min_size={min_size}"
            if merged > 0:
                why += f", {merged} identical subsets merged"
        warnings.append(f"got {len(subsets)} subsets of {num_specialists} requested ({why})")
    for w in warnings:
        log.warning(w)

    return SubsetResult(
        subsets=subsets, cluster_labels=labels, centroids=centroids, covariance=cov,
        points=points, stats=stats, size_histogram=size_histogram, warnings=warnings,
        num_requested=num_specialists, coverage=realized, cluster_sizes=cluster_sizes,
    )
