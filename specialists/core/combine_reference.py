"""The reference solver of the combination: Hinton's gradient descent on softmax logits.

The problem is :mod:`specialists.core.combine`'s (its module doc states it). This solver
parameterizes ``q = softmax(z)`` and runs L-BFGS on z over all C classes, one example at a
time, with autograd: slow and simple, and independent of EM's code (no reduced columns, no
fixed point, none of its helpers), which is what makes it a reference. ``combine(..., solver="gradient")`` calls
:func:`solve_gradient` (the config's ``combine.solver=gradient``); the tests compare EM with it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .combine import SubsetTable

__all__ = ["solve_gradient"]

# L-BFGS's history of curvature pairs (see _lbfgs_rows).
_LBFGS_HISTORY = 100


def solve_gradient(
    pg_all: Tensor,
    table: SubsetTable,
    specs: list[Tensor],
    active: Tensor,
    rows: Tensor,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinton's reference: q = softmax(z), L-BFGS on z over all C classes, example by example.

    Independent of the EM code: it minimizes the cross-entropy part of L (L minus terms that do
    not depend on q) with autograd, the out-of-subset masses as log-sum-exp over the complement.
    Returns q (R, C), iterations (R,), converged (R,).

    Callers often run under ``torch.inference_mode()`` (the ensemble's predictions do), where
    autograd records nothing and inference tensors cannot be saved for backward: the solve
    turns both back on and works on normal copies of its inputs."""
    with torch.inference_mode(False), torch.enable_grad():
        return _lbfgs_rows(pg_all[rows].clone(), table, [s[rows].clone() for s in specs], active[rows].clone(),
                           max_iter, tol)


def _lbfgs_rows(pg: Tensor, table: SubsetTable, specs: list[Tensor], act: Tensor, max_iter: int,
                tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`solve_gradient` on its rows: ``pg`` (R, C), ``specs[m]`` (R, |S_m| + 1),
    ``act`` (R, M) bool; autograd enabled."""
    R, C = pg.shape
    M = table.num_subsets
    dtype, device = pg.dtype, pg.device
    finfo = torch.finfo(dtype)

    # fixed_i = p_g,i + sum_{m active} [i in S_m] p_m,i, built in the full class space.
    fixed = pg.clone()
    dust_m = pg.new_zeros(R, M)
    for m in range(M):
        s = table.sizes[m]
        pm = specs[m]
        a = act[:, m]
        fixed.index_add_(1, table.index[m, :s], torch.where(a[:, None], pm[:, :s], pg.new_zeros(())))
        dust_m[:, m] = torch.where(a, pm[:, s], pg.new_zeros(()))
    comp_mask = table.complement_mask()[:M]  # (M, C)
    # A subset holding every class has no complement: its dustbin mass cannot be placed (L is
    # +inf if it is > 0, whatever q) and log(0) would poison the gradient, so it is left out.
    placeable = comp_mask.any(1)

    q = torch.empty_like(pg)
    iters = torch.zeros(R, dtype=torch.long, device=device)
    converged = torch.zeros(R, dtype=torch.bool, device=device)
    # One L-BFGS run per example: the examples are independent problems, and one run on their
    # sum shares a line search and curvature pairs between them, which made it ~10x slower to
    # converge than per-example runs in our tests. (A Python loop is fine for the reference.)
    for r in range(R):
        sp = torch.nonzero(act[r] & placeable).flatten()  # the row's specialists with a dustbin term
        d = dust_m[r, sp]
        # 0 outside each active subset, -inf inside: logsumexp(log q + neg) = log Q_k.
        neg = torch.zeros((sp.numel(), C), dtype=dtype, device=device)
        neg.masked_fill_(~comp_mask[sp], -math.inf)
        f = fixed[r]
        z = torch.log(pg[r] + finfo.tiny).requires_grad_(True)
        opt = torch.optim.LBFGS(
            [z],
            lr=1.0,
            max_iter=max(max_iter, 1),
            max_eval=max(max_iter, 1) * 3,
            tolerance_grad=tol,
            # Stop when an iteration changes L by less than ~100 ulps: converged to the
            # dtype's precision (float64: 2e-14 nats).
            tolerance_change=100 * finfo.eps,
            # The softmax parameterization is ill-conditioned (curvature ~ q_i, so 1e-5 classes
            # give condition numbers ~1e5); with a short history L-BFGS crawls for thousands of
            # iterations, with 100 pairs it converges in hundreds.
            history_size=_LBFGS_HISTORY,
            line_search_fn="strong_wolfe",
        )

        def closure(z=z, opt=opt, neg=neg, f=f, d=d):  # bound now: L-BFGS calls it within this iteration
            opt.zero_grad()
            logq = F.log_softmax(z, dim=0)
            log_out = torch.logsumexp(logq[None, :] + neg, dim=1)  # (K,)
            loss = -(f * logq).sum() - (d * log_out).sum()
            loss.backward()
            return loss

        if max_iter > 0:
            opt.step(closure)
            iters[r] = opt.state[z].get("n_iter", 0)
        closure()  # the gradient at the final z (line searches leave a trial point's behind)
        with torch.no_grad():
            # where the minimizer is positive (f > 0) but q underflowed to 0, the smallest
            # normal number, so that L(q) stays finite
            q_r = torch.softmax(z.detach(), dim=0)
            q[r] = torch.where((q_r == 0) & (f > 0), finfo.tiny, q_r)
            converged[r] = z.grad.abs().max() <= tol
    return q, iters, converged
