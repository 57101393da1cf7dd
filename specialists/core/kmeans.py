"""Step 3 of confusable-class discovery: k-means on the classes (one point per class).

Batch Lloyd k-means (faiss) from greedy k-means++ starts, or online mini-batch k-means
(scikit-learn ``partial_fit``); both seeded.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import ParameterError, check_choice, check_int, to_numpy_f32

METHODS = ("faiss", "minibatch")


def squared_distances(points: np.ndarray, centroids: np.ndarray, chunk_size: int = 2048) -> np.ndarray:
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
    x = np.ascontiguousarray(to_numpy_f32(points))
    if x.ndim != 2:
        raise ParameterError(f"points must be 2-D (C, D), got shape {x.shape}")
    c, d = x.shape
    k = check_int(k, "k", 1, c)
    method = check_choice(method, "method", METHODS)
    niter = check_int(niter, "niter", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    nredo = check_int(nredo, "nredo", 1)
    passes = check_int(passes, "passes", 1)
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

    labels = squared_distances(x, centroids).argmin(1).astype(np.int64)
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
            d, k, niter=step, seed=(seed + done) % 2**31, verbose=False,  # faiss's seed is a C int
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


