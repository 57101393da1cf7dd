"""Confusable-class discovery: which classes does the generalist mix up?

DESIGN.md section 2, "Class subsets". The chain, each step a pure function:

1. :func:`covariance` of the generalist's held-in probabilities ``P`` (N examples x C classes)
   -> ``Cov`` (C x C): two classes whose probabilities rise and fall together are confused.
2. :func:`normalize_columns`: raw covariance columns are dominated by each class's own
   variance (the diagonal), and k-means on them degenerates into one giant cluster (on real
   CIFAR-100: one cluster of 87 classes). Correlation with the diagonal removed and each
   column scaled to unit length makes every class a comparable point in R^C.
3. :func:`kmeans` on those points (one point per class): batch k-means (faiss) or online
   mini-batch k-means (scikit-learn ``partial_fit``), both seeded.
4. :func:`select_subsets`: each cluster is a subset (``partition``), or each centroid takes
   its K nearest classes (``nearest``, overlapping, fixed size as on JFT).
5. :func:`subset_stats`: how much of the generalist's probability stays inside each subset.

:func:`find_subsets` runs the chain and returns a :class:`SubsetResult`. Nothing here knows
about configs or the run directory; the pipeline stage does the I/O.

Memory: every C x C array is float32 (15,000 classes -> 0.9 GB each) and the chain keeps at
most two of them alive (the covariance and the normalized points).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from specialists.errors import SpecialistsError

log = logging.getLogger(__name__)

__all__ = [
    "SubsetParameterError",
    "SubsetResult",
    "adjusted_rand_index",
    "covariance",
    "find_subsets",
    "kmeans",
    "normalize_columns",
    "select_subsets",
    "subset_stats",
]

NORMALIZATIONS = ("correlation", "raw")
METHODS = ("faiss", "minibatch")
MODES = ("partition", "nearest")


class SubsetParameterError(SpecialistsError, ValueError):
    """An impossible clustering parameter. A ``ValueError`` for library callers, and a
    ``SpecialistsError`` so the CLI prints it as one line."""


# ----------------------------------------------------------------------------- helpers


def _as_2d_probs(probs, name: str = "probs"):
    """Accept a numpy array (memmaps included) or a torch tensor of shape (N, C)."""
    if isinstance(probs, torch.Tensor):
        if probs.ndim != 2:
            raise SubsetParameterError(f"{name} must be 2-D (N, C), got shape {tuple(probs.shape)}")
        return probs
    arr = np.asarray(probs)  # no copy for float32 arrays and memmaps
    if arr.ndim != 2:
        raise SubsetParameterError(f"{name} must be 2-D (N, C), got shape {arr.shape}")
    return arr


def _rows_as_tensor(probs, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) as a fresh float32 tensor we may modify in place.

    Always a copy (one chunk, never the whole matrix), so the caller's array is untouched
    and read-only memmaps work.
    """
    if isinstance(probs, torch.Tensor):
        return probs[start:stop].detach().to(dtype=torch.float32, copy=True)
    return torch.tensor(np.asarray(probs[start:stop], dtype=np.float32))


def _to_numpy_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SubsetParameterError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise SubsetParameterError(f"{name} must be {bound}, got {value}")
    return value


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise SubsetParameterError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _sq_distances(points: np.ndarray, centroids: np.ndarray, chunk_size: int = 2048) -> np.ndarray:
    """Squared euclidean distances (C, k) float32 between rows of ``points`` and ``centroids``.

    ``|x|^2 - 2 x.c + |c|^2`` with one matmul per chunk of rows (C x k is small; the C x D
    points are only read).
    """
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    c_sq = (c * c).sum(1)
    out = np.empty((points.shape[0], c.shape[0]), dtype=np.float32)
    for start in range(0, points.shape[0], chunk_size):
        x = torch.from_numpy(np.ascontiguousarray(points[start:start + chunk_size], dtype=np.float32))
        d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + c_sq
        out[start:start + x.shape[0]] = d.clamp_min_(0).numpy()
    return out


# ----------------------------------------------------------------------------- 1. covariance


def covariance(probs, chunk_size: int = 4096, ddof: int = 1) -> np.ndarray:
    """Covariance of the columns (classes) of ``probs``.

    Args:
        probs: (N, C) probabilities, numpy (a memmap works) or torch (a CUDA tensor is
            processed on its device). Any float dtype; each chunk is converted to float32.
        chunk_size: rows per chunk. Peak extra memory is about one chunk of float32 rows
            plus the (C, C) float32 result; never a float64 copy of P.
        ddof: the normalization is ``1 / (N - ddof)``; the default 1 matches
            ``np.cov(P, rowvar=False)`` (unbiased). ``ddof=0`` matches ``bias=True``.

    Returns:
        (C, C) float32 numpy array, exactly symmetric. Units: probability squared.

    Two passes, as the numerics require: first the column means (float32 chunk sums
    accumulated in float64), then ``sum_chunks (P_c - mean)^T (P_c - mean)`` accumulated in
    float32. The one-pass formula ``E[PP^T] - mean mean^T`` would cancel catastrophically in
    float32. Only the upper block triangle is multiplied (the matrix is symmetric), then
    mirrored: ~53% of the flops of a full product for large C.

    On the CPU the products go through numpy's OpenBLAS, not torch: torch's MKL runs well
    below peak on AMD CPUs (this machine's Zen 3: 60 against 113 GFLOPS per core for the
    same float32 product), which made this the slowest step at C = 15k.
    """
    probs = _as_2d_probs(probs)
    n, c = probs.shape
    chunk_size = _check_int(chunk_size, "chunk_size", 1)
    if n - ddof <= 0:
        raise SubsetParameterError(f"probs needs more than ddof={ddof} rows for a covariance, got {n}")
    on_gpu = isinstance(probs, torch.Tensor) and probs.device.type != "cpu"

    def chunks():
        for start in range(0, n, chunk_size):
            x = _rows_as_tensor(probs, start, min(start + chunk_size, n))  # fresh float32 copy
            yield x if on_gpu else x.numpy()

    # Pass 1: column means, accumulated in float64 (numpy casts through small buffers; torch
    # sums a chunk with cascaded float32 adds, accurate enough before the float64 total).
    total = np.zeros(c, dtype=np.float64)
    for x in chunks():
        total += x.sum(0).double().cpu().numpy() if on_gpu else x.sum(0, dtype=np.float64)
    mean = (total / n).astype(np.float32)

    # Pass 2: centered cross-products, upper block triangle only (blocks of ~1k columns
    # measured fastest for both BLAS libraries here).
    blocks = _column_blocks(c)
    if on_gpu:
        acc_t = torch.zeros((c, c), dtype=torch.float32, device=probs.device)
        mean_t = torch.from_numpy(mean).to(probs.device)
        for x in chunks():
            x -= mean_t
            for i, (a0, a1) in enumerate(blocks):
                for b0, b1 in blocks[i:]:
                    acc_t[a0:a1, b0:b1].addmm_(x[:, a0:a1].T, x[:, b0:b1])  # beta=1 gemm in place
        acc = acc_t.cpu().numpy()
        del acc_t
    else:
        acc = np.zeros((c, c), dtype=np.float32)
        for x in chunks():
            x -= mean
            for i, (a0, a1) in enumerate(blocks):
                xa_t = x[:, a0:a1].T
                for b0, b1 in blocks[i:]:
                    acc[a0:a1, b0:b1] += xa_t @ x[:, b0:b1]  # block temporary only (~4 MB)
    # Mirror the strict upper block triangle into the lower one; diagonal blocks are
    # symmetrized too so the result is exactly symmetric (gemm does not promise that).
    for i, (a0, a1) in enumerate(blocks):
        diag = acc[a0:a1, a0:a1]
        diag[...] = np.triu(diag) + np.triu(diag, 1).T
        for b0, b1 in blocks[i + 1:]:
            acc[b0:b1, a0:a1] = acc[a0:a1, b0:b1].T
    acc /= np.float32(n - ddof)
    return acc


def _column_blocks(c: int, target: int = 1024) -> list[tuple[int, int]]:
    """Split C columns into about-equal blocks of ~``target`` (one block when C is small)."""
    nblocks = max(1, math.ceil(c / target))
    edges = np.linspace(0, c, nblocks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


# ----------------------------------------------------------------------------- 2. normalization


def normalize_columns(cov, kind: str = "correlation") -> np.ndarray:
    """Turn a covariance into one point per class (one column per class).

    Args:
        cov: (C, C) symmetric covariance, numpy or torch.
        kind: ``"correlation"``: ``cov_ij / sqrt(d_i d_j)`` (a zero-variance class gets an
            all-zero column, no NaN), diagonal set to 0 (a class's self-correlation would
            dominate its own coordinate), each column scaled to unit L2 length (an all-zero
            column stays zero). ``"raw"``: the covariance columns as they are, kept for
            comparison; the diagonal dominates and k-means degenerates (DESIGN.md sec. 2).

    Returns:
        (C, C) float32, column j = class j. For ``correlation`` the result is returned as a
        Fortran-ordered view (``.T`` of a C-ordered array), so ``points.T`` is C-contiguous
        with one row per class, which is what :func:`kmeans` wants, without another C x C
        copy. For ``raw`` it is ``cov.T``, sharing memory with a float32 ``cov`` (a
        symmetric matrix's columns are its rows). Allocates at most one C x C float32 array.
    """
    kind = _check_choice(kind, "kind", NORMALIZATIONS)
    cov_np = _to_numpy_f32(cov)
    if cov_np.ndim != 2 or cov_np.shape[0] != cov_np.shape[1]:
        raise SubsetParameterError(f"cov must be square (C, C), got shape {cov_np.shape}")
    if kind == "raw":
        # cov is symmetric: cov.T has the same columns, and its .T (cov itself) is the
        # C-contiguous row-per-class layout kmeans wants, as for correlation below.
        return cov_np.T

    # Work on rows of a copy (row i of the symmetric correlation = column i), in place.
    out = np.array(cov_np, dtype=np.float32, order="C", copy=True)
    t = torch.from_numpy(out)
    var = torch.diagonal(t).clone()
    std = torch.sqrt(torch.clamp(var, min=0))
    # Zero variance (a class never predicted, or predicted constantly): no correlation.
    inv = torch.where(std > 0, 1.0 / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(std))
    t.mul_(inv[:, None])
    t.mul_(inv[None, :])
    t.fill_diagonal_(0.0)
    norms = torch.linalg.vector_norm(t, dim=1)
    t.div_(torch.where(norms > 0, norms, torch.ones_like(norms))[:, None])
    # Rows are unit length; the transpose view has unit columns (column j = class j).
    return out.T


# ----------------------------------------------------------------------------- 3. k-means


def kmeans(
    points,
    k: int,
    method: str = "faiss",
    seed: int = 0,
    niter: int = 50,
    batch_size: int = 256,
    nredo: int = 3,
    passes: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the rows of ``points`` (one row per class).

    Args:
        points: (C, D) float32, rows = classes (for :func:`normalize_columns` output pass
            ``points.T``, which is C-contiguous: no copy).
        k: number of clusters, 1 <= k <= C.
        method: ``"faiss"``: batch Lloyd k-means (``faiss.Kmeans``) from a k-means++ start,
            at most ``niter`` iterations (stops early once the objective stops falling),
            ``nredo`` restarts from different k-means++ starts, keeping the lowest
            objective. (faiss's own random start, and plain k-means++, fall into poor local
            minima on these points: on the 15k-class benchmark their ARI against the planted
            groups was 0.65-0.73 and 0.76-0.85, greedy k-means++ 0.98-1.0.) The starts are
            picked on a 256-d random projection of the points, which keeps seeding cheap at
            C = 15k.
            ``"minibatch"``: online k-means, scikit-learn ``MiniBatchKMeans.partial_fit``
            fed shuffled chunks of ``batch_size`` classes for ``passes`` passes over the
            classes; its first chunk (at least 3k classes) seeds k-means++.
        seed: both methods are deterministic for a given seed (on a given machine and
            thread count).

    Returns:
        labels (C,) int64 in [0, k) by nearest final centroid, and centroids (k, D) float32.
        Clusters may be empty; the caller reports them.
    """
    x = np.ascontiguousarray(_to_numpy_f32(points))
    if x.ndim != 2:
        raise SubsetParameterError(f"points must be 2-D (C, D), got shape {x.shape}")
    c, d = x.shape
    k = _check_int(k, "k", 1, c)
    method = _check_choice(method, "method", METHODS)
    niter = _check_int(niter, "niter", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    nredo = _check_int(nredo, "nredo", 1)
    passes = _check_int(passes, "passes", 1)
    seed = int(seed)

    if method == "faiss":
        # Seed on a random projection: k-means++ needs one pass over all points per center
        # (61 passes over 0.9 GB at 15k classes), cheap in 256 dimensions; distances there
        # approximate the real ones (Johnson-Lindenstrauss), good enough for picking starts.
        # Lloyd then runs on the full points.
        sketch = _random_projection(x, 256, seed)
        best = None
        for redo in range(nredo):
            chosen = _kmeans_plusplus(sketch, k, np.random.default_rng((seed, redo)))
            cents, obj = _faiss_lloyd(x, x[chosen], niter, seed + redo)
            if best is None or obj < best[1]:
                best = (cents, obj)
        centroids = best[0]
    else:
        from sklearn.cluster import MiniBatchKMeans
        from threadpoolctl import threadpool_limits

        rng = np.random.default_rng(seed)
        # compute_labels=False: partial_fit would otherwise label every chunk a second time
        # just to report an inertia we do not use (half the cost).
        mbk = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=1,
                              compute_labels=False)
        # partial_fit initializes (k-means++) on its first chunk, so that chunk must hold at
        # least k classes; 3k gives k-means++ some choice.
        first = rng.permutation(c)[: min(c, max(batch_size, 3 * k))]
        # One thread: each call's work (batch_size x D x k) is too small to pay for waking
        # OpenMP and BLAS thread pools hundreds of times; on the shared 2-core machine,
        # limiting them cut the CPU time of a 15k-class pass 4x (13.8 -> 3.5 s).
        with threadpool_limits(limits=1):
            mbk.partial_fit(x[np.sort(first)])
            for _ in range(passes):  # each pass visits every class once, in a fresh random order
                order = rng.permutation(c)
                for start in range(0, c, batch_size):
                    mbk.partial_fit(x[order[start:start + batch_size]])
        centroids = np.asarray(mbk.cluster_centers_, dtype=np.float32)

    labels = _sq_distances(x, centroids).argmin(1).astype(np.int64)
    return labels, centroids


def _random_projection(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(C, dim) Gaussian random projection of the rows of x (x itself when D <= 2 dim)."""
    if x.shape[1] <= 2 * dim:
        return x
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn((x.shape[1], dim), generator=g) / math.sqrt(dim)
    return (torch.from_numpy(x) @ r).numpy()


def _kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator, trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; scikit-learn's variant with
    ``2 + log k`` candidates per step), in torch: one (C, D) x (D, trials) product per
    center, so 61 centers over 15k x 15k points take seconds (scikit-learn's takes minutes).

    Returns the (k,) indices of the rows of x chosen as initial centroids.
    """
    xt = torch.from_numpy(x)
    sq = (xt * xt).sum(1)
    c = x.shape[0]
    trials = trials or 2 + int(np.log(k))
    first = int(rng.integers(c))
    chosen = [first]
    dmin = (sq - 2.0 * (xt @ xt[first]) + sq[first]).clamp_min_(0)  # (C,) distance^2 to nearest center
    for _ in range(1, k):
        w = dmin.double().numpy()
        total = w.sum()
        if total > 0:
            cand = rng.choice(c, size=trials, p=w / total)
        else:  # every point sits on a center already (e.g. identical points)
            cand = rng.choice(c, size=trials)
        dc = (sq[:, None] - 2.0 * (xt @ xt[cand].T) + sq[cand][None, :]).clamp_min_(0)  # (C, trials)
        dc = torch.minimum(dc, dmin[:, None])
        pick = int(dc.double().sum(0).argmin())  # the candidate that lowers the potential most
        dmin = dc[:, pick].contiguous()
        chosen.append(int(cand[pick]))
    return np.array(chosen, dtype=np.int64)


def _faiss_lloyd(x: np.ndarray, init: np.ndarray, niter: int, seed: int, rounds: int = 5):
    """faiss Lloyd iterations from ``init`` in rounds of ``rounds`` iterations, stopping
    when the objective stopped falling (faiss itself always runs all ``niter``).

    Returns (centroids (k, D) float32, final objective = sum of squared distances).
    """
    import faiss

    k, d = init.shape
    cents = np.ascontiguousarray(init, dtype=np.float32)
    done, obj = 0, np.inf
    while done < niter:
        step = min(rounds, niter - done)
        km = faiss.Kmeans(
            d, k, niter=step, seed=seed + done, verbose=False,
            # Use every class (no subsampling) and silence the "too few points" warning:
            # here the points are classes, and few points per centroid is the normal case.
            min_points_per_centroid=1, max_points_per_centroid=max(256, x.shape[0]),
        )
        km.train(x, init_centroids=cents)
        cents = np.asarray(km.centroids, dtype=np.float32).reshape(k, d).copy()
        done += step
        objs = list(km.obj)
        converged = len(objs) >= 2 and objs[-2] - objs[-1] <= 1e-6 * abs(objs[-1])
        obj = objs[-1] if objs else obj
        if converged:
            break
    # obj[i] is the objective of iteration i's assignment, before its centroid update; the
    # last update can only lower it, so comparing restarts on it is fair.
    return cents, float(obj)


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
    x = _to_numpy_f32(points)
    labels = np.asarray(labels, dtype=np.int64)
    cents = _to_numpy_f32(centroids)
    c = x.shape[0]
    k = cents.shape[0]
    mode = _check_choice(mode, "mode", MODES)
    if labels.shape != (c,):
        raise SubsetParameterError(f"labels must have shape ({c},), got {labels.shape}")
    if c and (labels.min() < 0 or labels.max() >= k):
        raise SubsetParameterError(f"labels must lie in [0, {k}) (one per centroid)")
    dist = _sq_distances(x, cents)  # (C, k): small, computed once

    if mode == "nearest":
        if classes_per_specialist is None:
            raise SubsetParameterError("classes_per_specialist is required when mode='nearest'")
        size = _check_int(classes_per_specialist, "classes_per_specialist", 1, c)
        subsets = []
        for j in range(k):
            # Stable sort: ties broken by class id, so the result is deterministic.
            subsets.append(np.sort(np.argsort(dist[:, j], kind="stable")[:size]))
        return _dedupe_and_order(subsets)

    min_size = _check_int(min_size, "min_size", 1)
    if max_size is not None:
        max_size = _check_int(max_size, "max_size", min_size)

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
    probs = _as_2d_probs(probs)
    n, c = probs.shape
    y = np.asarray(labels_true.cpu() if isinstance(labels_true, torch.Tensor) else labels_true).astype(np.int64)
    if y.shape != (n,):
        raise SubsetParameterError(f"labels_true must have shape ({n},), got {y.shape}")
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
        x = _rows_as_tensor(probs, start, stop).cpu()
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

        def mean(v):
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
        raise SubsetParameterError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
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
        ValueError (:class:`SubsetParameterError`) with one line naming the parameter.

    A degenerate clustering is not an error but gets a warning (in ``result.warnings`` and
    the log): one subset holding more than half the classes (partition mode), or fewer
    subsets than asked (empty or too-small clusters, or identical nearest-mode subsets).
    """
    probs = _as_2d_probs(probs)
    n, c = probs.shape
    if c < 1 or n < 2:
        raise SubsetParameterError(f"probs must have at least 2 rows and 1 class, got shape {(n, c)}")
    num_specialists = _check_int(num_specialists, "num_specialists", 1, c)
    mode = _check_choice(mode, "mode", MODES)
    normalize = _check_choice(normalize, "normalize", NORMALIZATIONS)
    method = _check_choice(method, "method", METHODS)
    if mode == "nearest":
        if classes_per_specialist is None:
            raise SubsetParameterError("classes_per_specialist is required when mode='nearest'")
        classes_per_specialist = _check_int(classes_per_specialist, "classes_per_specialist", 1, c)
    elif classes_per_specialist is not None:
        _check_int(classes_per_specialist, "classes_per_specialist", 1, c)
    min_size = _check_int(min_size, "min_size", 1, c)
    if max_size is not None:
        max_size = _check_int(max_size, "max_size", min_size)
    niter = _check_int(niter, "niter", 1)
    nredo = _check_int(nredo, "nredo", 1)
    passes = _check_int(passes, "passes", 1)
    if labels_true is not None:
        y = np.asarray(labels_true.cpu() if isinstance(labels_true, torch.Tensor) else labels_true)
        if y.shape != (n,):
            raise SubsetParameterError(f"labels_true must have shape ({n},), got {y.shape}")
        if n and (y.min() < 0 or y.max() >= c):
            raise SubsetParameterError(f"labels_true must be class ids in [0, {c})")

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
