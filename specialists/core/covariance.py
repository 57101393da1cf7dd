"""Steps 1 and 2 of confusable-class discovery: the covariance of the generalist's
probabilities, and its normalization into one comparable point per class.

Two classes whose probabilities rise and fall together are confused. Raw covariance columns
are dominated by each class's own variance (the diagonal), and k-means on them degenerates
into one giant cluster (on real CIFAR-100: one cluster of 87 classes); correlation with the
diagonal removed and each column scaled to unit length makes every class a comparable point
in R^C. Every C x C array is float32 (15,000 classes -> 0.9 GB each).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import ParameterError, as_2d_probs, check_choice, check_int, rows_as_tensor, to_numpy_f32

NORMALIZATIONS = ("correlation", "raw")


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
    probs = as_2d_probs(probs)
    n, c = probs.shape
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    if n - ddof <= 0:
        raise ParameterError(f"probs needs more than ddof={ddof} rows for a covariance, got {n}")
    on_gpu = isinstance(probs, torch.Tensor) and probs.device.type != "cpu"

    def chunks():
        for start in range(0, n, chunk_size):
            x = rows_as_tensor(probs, start, min(start + chunk_size, n))  # fresh float32 copy
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
            comparison; the diagonal dominates and k-means degenerates.

    Returns:
        (C, C) float32, column j = class j. For ``correlation`` the result is returned as a
        Fortran-ordered view (``.T`` of a C-ordered array), so ``points.T`` is C-contiguous
        with one row per class, which is what :func:`kmeans` wants, without another C x C
        copy. For ``raw`` it is ``cov.T``, sharing memory with a float32 ``cov`` (a
        symmetric matrix's columns are its rows). Allocates at most one C x C float32 array.
    """
    kind = check_choice(kind, "kind", NORMALIZATIONS)
    cov_np = to_numpy_f32(cov)
    if cov_np.ndim != 2 or cov_np.shape[0] != cov_np.shape[1]:
        raise ParameterError(f"cov must be square (C, C), got shape {cov_np.shape}")
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


