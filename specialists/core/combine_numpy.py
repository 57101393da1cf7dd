"""Routing and the KL-minimizing combination in numpy: the ensemble served without torch.

The same problem as :mod:`specialists.core.combine` (whose docstring states it), solved in
float64 over all C classes::

    q* = argmin_{q in simplex}  KL(p_g || q) + sum_{m in A} KL(p_m || R_m q)

L is convex with a unique minimizer, so any solver that converges gives the same q; this one
takes the simple route, which suits serving (small batches, C in the hundreds or thousands):

* no active specialist: ``p_g`` itself, bit for bit (in the caller's dtype);
* exactly one: the closed form ``q_S = (p_g,S + p_m,S) / W``, the rest
  ``P_g(not S) + p_m,dust`` shared among the classes outside S in proportion to p_g
  (uniformly when ``P_g(not S) = 0``), W the total mass (2 for probability rows);
* two or more: EM over all C classes from the torch solver's start
  ``(1 - eta) p_g + eta * uniform`` (``eta = 1e-4``), with its degenerate-case rules: out-of-
  subset masses are sums over the complement, a dustbin whose complement holds no mass is
  dropped, every step divides by the actual total mass. It stops when no class moves by more
  than ``tol`` and no (non-negligible) class still grows by more than 1% per step.

It does not copy the torch solver's reduced-column trick (classes outside the union of the
active subsets kept proportional to p_g in one column): over all C columns the EM trajectory
of the union classes and of the rest's total is the same, and the rest's split converges to
the same p_g-proportional one. Cost per EM step: O(rows x M x C).

Imports numpy only (no torch): :mod:`specialists.inference.onnx_runtime` serves with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_MAX_ITER", "DEFAULT_TOL", "ROUTINGS", "combine", "membership", "route"]

# The constants both solvers share live here, in the torch-free module, and
# specialists.core.combine imports them: one copy, so the two cannot drift apart.

ROUTINGS = ("routed", "all")  # see route()

# EM starts at (1 - _INIT_FLOOR) * p_g + _INIT_FLOOR * uniform (over the classes), so that no
# class that could receive mass starts on the boundary q_i = 0, where a multiplicative update
# cannot move it.
_INIT_FLOOR = 1e-4

# An example counts as converged only when no (non-negligible) class still grows by more than
# this factor per iteration, on top of max |dq| <= tol: a class of mass 1e-9 growing by 30% per
# iteration changes by less than any sensible tol but is far from its optimum.
_GROWTH_TOL = 1e-2

# EM's defaults (the config's combine.max_iter, combine.tol). Where EM converges slowly (a
# minimizer on the simplex's boundary makes it sublinear) the iterate it stops at can lie 1e-2
# from q*; the same start, steps, stopping rule and caps stop both solvers at the same iterate.
DEFAULT_MAX_ITER = 200
DEFAULT_TOL = 1e-6


def membership(subsets: Sequence, num_classes: int) -> np.ndarray:
    """(M, C) bool: True where class i is in subset m (``subsets``: M sequences of class ids)."""
    out = np.zeros((len(subsets), num_classes), dtype=bool)
    for m, s in enumerate(subsets):
        out[m, np.asarray(s, dtype=np.int64)] = True
    return out


def route(p_general: np.ndarray, member: np.ndarray, top_n: int = 1, routing: str = "routed",
          gate: float | None = None) -> np.ndarray:
    """The active set of each example, (B, M) bool, as :func:`specialists.core.combine.route`.

    ``routed``: the specialists whose subset holds any of the generalist's ``top_n`` most
    probable classes (``p_general`` (B, C), ``member`` (M, C) from :func:`membership`);
    ``all``: every specialist on every example. Exact ties are broken toward the lower class
    id (a stable sort of -p), as the torch ``route`` does, so both pick the same specialists.
    ``gate``: only the examples whose generalist top probability (float64) is below it.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
    p_general = np.asarray(p_general)
    B, M = p_general.shape[0], member.shape[0]
    if M == 0 or routing == "all":
        active = np.full((B, M), M > 0, dtype=bool)
    else:
        n = min(top_n, p_general.shape[1])
        top = np.argsort(-p_general, axis=1, kind="stable")[:, :n]  # (B, n)
        active = member[:, top].any(-1).T  # (M, B, n) -> (B, M)
    if gate is not None and M:
        active &= (p_general.max(1).astype(np.float64) < gate)[:, None]
    return active


def _check(p_general, subsets, p_specialists, active):
    """Validate as :func:`specialists.core.combine.combine` does (a ``ValueError`` naming the
    argument); return (p_general as given, subsets int64, specialists float64, active bool)."""
    pg = np.asarray(p_general)
    if pg.ndim != 2 or not np.issubdtype(pg.dtype, np.floating):
        raise ValueError(f"p_general must be a (B, C) float array, got shape {pg.shape} dtype {pg.dtype}")
    B, C = pg.shape
    if C < 1:
        raise ValueError("p_general has no classes (C = 0)")
    subs = []
    for m, s in enumerate(subsets):
        s = np.asarray(s)
        if s.size == 0:  # [] is a float array to numpy; an empty subset is still a subset
            s = s.reshape(0).astype(np.int64)
        if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"subsets[{m}] must be a 1-D array of integer class ids")
        if s.size and (s.min() < 0 or s.max() >= C):
            raise ValueError(f"subsets[{m}] has class ids outside [0, {C})")
        if np.unique(s).size != s.size:
            raise ValueError(f"subsets[{m}] repeats a class id")
        subs.append(s.astype(np.int64))
    M = len(subs)
    if len(p_specialists) != M:
        raise ValueError(f"len(p_specialists) = {len(p_specialists)} but there are {M} subsets")
    specs = []
    for m, p in enumerate(p_specialists):
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (B, subs[m].size + 1):
            raise ValueError(f"p_specialists[{m}] must have shape (B, |S_{m}| + 1) = {(B, subs[m].size + 1)} "
                             f"(last column the dustbin), got {p.shape}")
        specs.append(p)
    act = np.asarray(active)
    if act.shape != (B, M):
        raise ValueError(f"active must be a (B, M) = ({B}, {M}) bool array, got shape {act.shape}")
    if not (act.dtype == bool or np.issubdtype(act.dtype, np.integer)):
        raise ValueError(f"active must be a bool array, got {act.dtype}")
    return pg, subs, specs, act.astype(bool)


def combine(p_general, subsets: Sequence, p_specialists: Sequence, active, *, max_iter: int = DEFAULT_MAX_ITER,
            tol: float = DEFAULT_TOL) -> np.ndarray:
    """Combine the generalist with its active specialists: q (B, C), the minimizer of L.

    Args:
        p_general: (B, C) float array, the generalist's probabilities (rows sum to 1).
        subsets: M integer arrays of distinct class ids in [0, C) (they may overlap).
        p_specialists: M arrays (B, |S_m| + 1): specialist m's probabilities over its subset
            (in ``subsets[m]``'s order), the dustbin last; rows where m is inactive are ignored.
        active: (B, M) bool, the specialists taking part for each example.
        max_iter, tol: EM's cap and its stopping threshold on max_i |q_i' - q_i|.

    Returns:
        q (B, C) in ``p_general``'s dtype (solved in float64), rows on the simplex; rows with
        no active specialist are ``p_general``'s rows bit for bit.
    """
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if not (tol >= 0 and np.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    pg_in, subs, specs, active = _check(p_general, subsets, p_specialists, active)
    B, C = pg_in.shape
    out = pg_in.copy()
    if not subs or not B:
        return out
    pg = pg_in.astype(np.float64)
    outside = ~membership(subs, C)  # (M, C)
    k = active.sum(1)
    for m in range(len(subs)):
        rows = np.flatnonzero((k == 1) & active[:, m])
        if rows.size:
            out[rows] = _closed_form(pg[rows], subs[m], outside[m], specs[m][rows])
    many = np.flatnonzero(k > 1)
    if many.size:
        out[many] = _em(pg[many], subs, outside, [p[many] for p in specs], active[many], int(max_iter), tol)
    return out


def _normalized(num: np.ndarray) -> np.ndarray:
    """Rows divided by their actual total (guarded: an all-zero row stays zero, not NaN)."""
    return num / np.maximum(num.sum(1, keepdims=True), np.finfo(num.dtype).tiny)


def _closed_form(pg: np.ndarray, subset: np.ndarray, comp: np.ndarray, pm: np.ndarray) -> np.ndarray:
    """Rows with exactly this one specialist active: pg (R, C), pm (R, |S| + 1) -> q (R, C)."""
    s = subset.size
    q = np.zeros_like(pg)
    q[:, subset] = pg[:, subset] + pm[:, :s]
    if comp.any():  # a subset of every class has no "not S" for the dustbin: its mass is dropped
        off = pg[:, comp]
        p_rest = off.sum(1)  # a sum over the complement, never 1 - sum(p_S)
        has = p_rest > 0
        share = np.where(has[:, None], off / np.where(has, p_rest, 1.0)[:, None], 1.0 / comp.sum())
        q[:, comp] = (p_rest + pm[:, s])[:, None] * share
    return _normalized(q)


def _em(pg, subs, outside, specs, active, max_iter: int, tol: float) -> np.ndarray:
    """EM over all classes for rows with 2+ active specialists: pg (R, C) -> q (R, C).

    The classes outside the union U of a row's active subsets start, and so stay, in
    proportion to p_g (uniform when P_g(not U) = 0), which makes each step the torch solver's
    reduced step: the union classes and the rest's total T follow the same trajectory, and the
    stopping rule is judged on those same numbers (U's classes and T). Converged rows leave
    the batch."""
    R, C = pg.shape
    fixed = pg.copy()  # p_g plus every active specialist's in-subset probabilities
    dust = np.zeros((R, len(subs)))  # active specialists' dustbin masses (0 where inactive)
    for m, (s, p) in enumerate(zip(subs, specs)):
        a = active[:, m]
        fixed[:, s] += np.where(a[:, None], p[:, :s.size], 0.0)
        dust[:, m] = np.where(a, p[:, s.size], 0.0)
    comp = outside.astype(np.float64)  # (M, C) 1.0 where class i is outside subset m
    rest = (active.astype(np.float64) @ (1.0 - comp)) == 0  # (R, C) outside every active subset
    p_rest = np.where(rest, pg, 0.0).sum(1)  # P_g(not U), a sum over the complement
    n_rest = rest.sum(1)
    # Within the rest, the p_g-proportional split (uniform where P_g(not U) = 0): the minimizer's
    # split given T, kept by every EM step since those classes' updates share one factor.
    has = p_rest > 0
    split = np.where(rest, np.where(has[:, None], pg / np.where(has, p_rest, 1.0)[:, None],
                                    1.0 / np.maximum(n_rest, 1)[:, None]), 0.0)
    # The torch solver's start over its reduced columns: (1 - eta) p_g + eta * uniform.
    t0 = (1 - _INIT_FLOOR) * p_rest + _INIT_FLOOR * n_rest / C
    q = _normalized(np.where(rest, t0[:, None] * split, (1 - _INIT_FLOOR) * pg + _INIT_FLOOR / C))
    out = q.copy()
    rest_all = rest
    run = np.arange(R)  # rows still iterating
    finfo = np.finfo(np.float64)
    significant = finfo.tiny / finfo.eps  # growth is judged only where q has full precision
    t = np.where(rest, q, 0.0).sum(1)
    for it in range(1, max_iter + 1):
        q_out = q @ comp.T  # (r, M): the mass outside each subset, a sum over its complement
        ok = q_out > 0
        ratio = np.where(ok, dust / np.where(ok, q_out, 1.0), 0.0)  # no mass outside: dustbin dropped
        q_new = _normalized(fixed + q * (ratio @ comp))
        t_new = np.where(rest, q_new, 0.0).sum(1)
        change = np.maximum(np.where(rest, 0.0, np.abs(q_new - q)).max(1), np.abs(t_new - t))
        grows = (~rest & (q_new > significant) & (q_new > q * (1 + _GROWTH_TOL))).any(1)
        grows |= (t_new > significant) & (t_new > t * (1 + _GROWTH_TOL))
        stop = (change <= tol) & ~grows if it < max_iter else np.ones(len(q), dtype=bool)
        q, t = q_new, t_new
        if stop.any():
            out[run[stop]] = q[stop]
            keep = ~stop
            if not keep.any():
                break
            run, q, t, fixed, dust, rest = run[keep], q[keep], t[keep], fixed[keep], dust[keep], rest[keep]
    # Re-split T exactly by p_g (float rounding drifts the proportions by ulps over many steps).
    return np.where(rest_all, np.where(rest_all, out, 0.0).sum(1, keepdims=True) * split, out)
