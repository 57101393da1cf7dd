"""Combining a generalist's distribution with its specialists', and routing examples to specialists.

For one example, the generalist gives ``p_g`` over all C classes and each *active* specialist m
(the set A) gives ``p_m`` over its subset ``S_m`` plus a dustbin ("not in S_m"). The combined
distribution is

    q* = argmin_{q in simplex}  L(q) = KL(p_g || q) + sum_{m in A} KL(p_m || R_m q),
    R_m q = (q_{S_m}, sum_{i not in S_m} q_i),

(Hinton, Vinyals & Dean 2015, section 5). Minimizing L is maximum likelihood for a multinomial
``q`` given 1 + |A| "observations": the generalist's full distribution and, for each specialist,
a distribution in which every class outside ``S_m`` is censored to "not in S_m". Two solvers:

``em`` (default)
    The EM fixed point (E-step: share each dustbin mass among the classes outside its subset in
    proportion to q; M-step: normalize the expected counts)::

        fixed_i = p_g,i + sum_{m in A} [i in S_m] p_m,i
        q_i <- (fixed_i + q_i * sum_{m in A} [i not in S_m] p_m,dust / Q_m) / W,
        Q_m = sum_{j not in S_m} q_j,   W = 1 + |A|  (the total mass).

    L is convex and EM never raises it. It runs on a *reduced* problem: every class outside the
    union U of an example's active subsets is in every active complement, so EM only rescales
    those classes together; with a start proportional to p_g there they stay proportional to
    p_g, and one "rest" column carries their total. An example then costs O(|U| * |A|) per
    iteration instead of O(C * M) (15,000 classes, 3 active subsets of 300: ~900 columns).
    An example with exactly one active specialist gets EM's fixed point in closed form, no
    iterations: ``q_j = (p_g,j + p_m,j) / 2`` on S, ``q_i = p_g,i (P_g(not S) + p_m,dust) /
    (2 P_g(not S))`` off S.

``gradient``
    Hinton's reference: ``q = softmax(z)``, L-BFGS on z over all C classes, slow and simple
    (:mod:`specialists.core.combine_reference`). It is what EM is tested against.

Both solvers return ``p_general`` bit for bit for examples with no active specialist.

The torch-free twin :mod:`specialists.core.combine_numpy` (the ONNX runtime's) solves the same
problem with the same EM start, steps and stopping rule; the constants they share
(``ROUTINGS``, the start's floor, the growth test, the default cap and tolerance) are defined
there and imported here.

Degenerate inputs (exact zeros, confident one-hot predictions), and what the minimizer is:

* ``P_g(not S) = 0`` with one specialist (or ``P_g(not U) = 0`` in general): KL(p_g || q) has no
  term for the classes with ``p_g,i = 0``, and the specialists only see their *total* mass, so
  every split of that mass among them is a minimizer. We spread it **uniformly** over them,
  which is the limit of the minimizer for ``p_g + eps * uniform`` as eps -> 0.
* EM cannot move a class away from q_i = 0 (its update is multiplicative), so it starts from
  ``(1 - eta) p_g + eta * uniform`` (``eta = 1e-4`` over the reduced columns), never from the
  boundary: a class the generalist rules out can still receive dustbin mass if the minimizer
  gives it some. (Convergence is also checked on relative growth, so a tiny class that is
  still growing keeps the example iterating even when its absolute change is below ``tol``.)
* Out-of-subset masses are always sums over the complement (float32 would lose ``1 - sum(q_S)``
  to cancellation when q is confident inside S); divisions are guarded so no NaN appears: a
  dustbin whose complement holds no mass at all (a subset covering every class) is dropped
  and q is renormalized.

Inputs are expected to be probability rows (non-negative, summing to 1); every solver returns
rows that sum to 1 in any case (it divides by the actual total mass rather than by 1 + |A|).
Half-precision inputs are solved in float32 and cast back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import ParameterError
from .combine_numpy import _GROWTH_TOL, _INIT_FLOOR, DEFAULT_TOL, ROUTINGS
from .combine_numpy import DEFAULT_MAX_ITER as _EM_MAX_ITER
from .combine_reference import solve_gradient

__all__ = [
    "ROUTINGS",
    "SOLVERS",
    "CombineInputError",
    "SubsetTable",
    "combine",
    "membership",
    "objective",
    "prepare_subsets",
    "route",
]

SOLVERS = ("em", "gradient")

# EM and the closed form process rows in chunks of about this many elements of their largest
# temporaries ((rows, K, |U|) reduced-problem masks, (rows, C) expansions), bounding memory for
# batches of thousands of examples with many active specialists.
_CHUNK_ELEMENTS = 1 << 24

# Default iteration caps. EM converges in tens of iterations; L-BFGS on z needs hundreds.
DEFAULT_MAX_ITER = {"em": _EM_MAX_ITER, "gradient": 5000}

# EM's start (1 - _INIT_FLOOR) * p_g + _INIT_FLOOR * uniform is taken over the reduced columns,
# the rest column weighted by how many classes it stands for (_INIT_FLOOR and _GROWTH_TOL: see
# combine_numpy, which defines them for both solvers).


class CombineInputError(ParameterError):
    """Inputs to :func:`combine` / :func:`objective` with the wrong shape, type or values."""


# ============================================================================ subset table


@dataclass(frozen=True)
class SubsetTable:
    """The specialists' class subsets, validated and padded for batched gathers.

    Build it with :func:`prepare_subsets` once and pass it as ``subsets`` to :func:`combine`
    to skip re-validating the subsets on every batch.

    Attributes:
        num_classes: C.
        index: (M + 1, Smax) long, row m the class ids of subset m padded with C; row M is an
            empty dummy subset (all C) used to pad per-example lists of active specialists.
        sizes: python list of the M subset sizes |S_m|.
    """

    num_classes: int
    index: Tensor
    sizes: tuple[int, ...]

    @property
    def num_subsets(self) -> int:
        return len(self.sizes)

    @property
    def device(self) -> torch.device:
        return self.index.device

    def to(self, device: torch.device | str) -> SubsetTable:
        return SubsetTable(self.num_classes, self.index.to(device), self.sizes)

    def complement_mask(self) -> Tensor:
        """(M + 1, C) bool: True where class i is *outside* subset m (row M: all True)."""
        M, C = self.num_subsets, self.num_classes
        inside = torch.zeros(M + 1, C + 1, dtype=torch.bool, device=self.device)
        inside.scatter_(1, self.index, True)
        return ~inside[:, :C]


def prepare_subsets(
    subsets: Sequence[Tensor] | SubsetTable, num_classes: int, device: torch.device | str | None = None
) -> SubsetTable:
    """Validate the M class subsets (each a 1-D integer tensor or sequence of distinct ids in
    [0, num_classes)) and pad them into a :class:`SubsetTable` on ``device``."""
    if isinstance(subsets, SubsetTable):
        if subsets.num_classes != num_classes:
            raise CombineInputError(
                f"the subset table is for {subsets.num_classes} classes, "
                f"but p_general has {num_classes}"
            )
        return subsets if device is None else subsets.to(device)
    if isinstance(subsets, Tensor) or not isinstance(subsets, Sequence):
        raise CombineInputError(
            "subsets must be a list of M 1-D LongTensors of class ids (or a SubsetTable), "
            f"got {type(subsets).__name__}"
        )
    rows = []
    for m, s in enumerate(subsets):
        s = torch.as_tensor(s, device=device)
        if s.dim() != 1:
            raise CombineInputError(f"subsets[{m}] must be 1-D, got shape {tuple(s.shape)}")
        if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
            raise CombineInputError(f"subsets[{m}] must hold integer class ids, got {s.dtype}")
        s = s.long()
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= num_classes):
            raise CombineInputError(
                f"subsets[{m}] has class ids outside [0, {num_classes}): "
                f"min {int(s.min())}, max {int(s.max())}"
            )
        if torch.unique(s).numel() != s.numel():
            raise CombineInputError(f"subsets[{m}] repeats a class id")
        rows.append(s)
    sizes = tuple(int(s.numel()) for s in rows)
    smax = max(sizes, default=0)
    index = torch.full((len(rows) + 1, max(smax, 1)), num_classes, dtype=torch.long, device=device)
    for m, s in enumerate(rows):
        index[m, : s.numel()] = s
    return SubsetTable(num_classes, index, sizes)


# ============================================================================ routing


def membership(subsets: Sequence, num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """(M, C) bool: True where class i is in subset m."""
    out = torch.zeros(len(subsets), num_classes, dtype=torch.bool, device=device)
    for m, s in enumerate(subsets):
        out[m, torch.as_tensor(s, dtype=torch.long, device=device)] = True
    return out


def route(p_general: Tensor, member: Tensor, top_n: int = 1, routing: str = "routed",
          gate: float | None = None) -> Tensor:
    """The active set A of each example: (B, M) bool.

    ``routed``: the specialists whose subset holds any of the generalist's ``top_n`` most
    probable classes (``member``: (M, C) from :func:`membership`). ``all``: every specialist
    on every example (the cost the routing saves, for comparison). Exact ties are broken
    toward the lower class id, as :func:`specialists.core.combine_numpy.route` does (``topk``
    leaves them to the device's kernel), so the served ensemble routes as this one does.
    ``gate``: specialists only on the examples whose generalist top probability is below it
    (compared in float64, as both twins do); a sure generalist answers alone. None: every example.
    """
    if routing not in ROUTINGS:
        raise CombineInputError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
    B, M = p_general.shape[0], member.shape[0]
    if M == 0 or routing == "all":
        active = torch.full((B, M), M > 0, dtype=torch.bool, device=p_general.device)
    else:
        top = _top_classes(p_general, min(top_n, p_general.shape[1]))  # (B, n)
        active = member[:, top].any(-1).T  # (M, B, n) -> (B, M)
    if gate is not None and M:
        active &= (p_general.max(1).values.double() < gate)[:, None]
    return active


def _top_classes(p: Tensor, n: int) -> Tensor:
    """(B, n) ids of each row's n most probable classes, exact ties broken toward the lower id
    (numpy's stable argsort of -p). ``topk`` alone decides where the n-th value differs from
    the next (the set of the n largest is then unique); only rows where a tie crosses that
    boundary are redone: the classes above the n-th value, then the lowest ids equal to it. (A
    stable sort of every row costs 60x ``topk`` at 15,000 classes.)"""
    C = p.shape[1]
    if n >= C:
        return torch.arange(C, device=p.device).expand(p.shape[0], C)
    vals, top = p.topk(n + 1, dim=1)
    top = top[:, :n]
    # the n-th value tied with a class left out (NaN rows keep topk's pick: nothing compares)
    cross = (vals[:, n - 1] == vals[:, n]) & ~vals[:, :n].isnan().any(1)
    if bool(cross.any()):
        rows = torch.nonzero(cross).flatten()
        q, kth = p[rows], vals[rows, n - 1 : n]
        above, tied = q > kth, q == kth
        chosen = above | (tied & (tied.cumsum(1) <= n - above.sum(1, keepdim=True)))
        top[rows] = chosen.nonzero()[:, 1].view(-1, n)  # row-major: each row's n ids
    return top


# ============================================================================ validation


def _validate(p_general, subsets, p_specialists, active):
    """Check shapes and types; return (table, specialist tensors, active) on p_general's device
    and in the working dtype."""
    if not isinstance(p_general, Tensor) or p_general.dim() != 2:
        raise CombineInputError(
            "p_general must be a (B, C) tensor, got "
            + (f"shape {tuple(p_general.shape)}" if isinstance(p_general, Tensor) else type(p_general).__name__)
        )
    if not p_general.dtype.is_floating_point:
        raise CombineInputError(f"p_general must be a floating-point tensor, got {p_general.dtype}")
    B, C = p_general.shape
    if C < 1:
        raise CombineInputError("p_general has no classes (C = 0)")
    device = p_general.device
    table = prepare_subsets(subsets, C, device)
    M = table.num_subsets
    if isinstance(p_specialists, Tensor) or not isinstance(p_specialists, Sequence):
        raise CombineInputError("p_specialists must be a list of M tensors (B, |S_m| + 1)")
    if len(p_specialists) != M:
        raise CombineInputError(
            f"len(p_specialists) = {len(p_specialists)} but there are {M} subsets"
        )
    if not isinstance(active, Tensor):
        active = torch.as_tensor(active)
    if active.dim() != 2 or tuple(active.shape) != (B, M):
        raise CombineInputError(
            f"active must be a (B, M) = ({B}, {M}) bool tensor, got shape {tuple(active.shape)}"
        )
    if active.dtype != torch.bool:
        if active.dtype.is_floating_point or active.dtype.is_complex:
            raise CombineInputError(f"active must be a bool tensor, got {active.dtype}")
        active = active != 0
    active = active.to(device)
    work = _work_dtype(p_general.dtype)
    specs = []
    for m, p in enumerate(p_specialists):
        if not isinstance(p, Tensor):
            raise CombineInputError(f"p_specialists[{m}] must be a tensor, got {type(p).__name__}")
        want = (B, table.sizes[m] + 1)
        if tuple(p.shape) != want:
            raise CombineInputError(
                f"p_specialists[{m}] must have shape (B, |S_{m}| + 1) = {want} "
                f"(last column the dustbin), got {tuple(p.shape)}"
            )
        if not p.dtype.is_floating_point:
            raise CombineInputError(f"p_specialists[{m}] must be floating-point, got {p.dtype}")
        specs.append(p.to(device=device, dtype=work))
    return table, specs, active


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision has too few bits for a fixed point; solve in float32, cast back at the end.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _active_slots(act: Tensor, M: int) -> tuple[Tensor, Tensor]:
    """Per example, the ids of its active specialists, padded.

    act (R, M) bool -> spec (R, K) long (pad value M, the dummy empty subset) and
    slot_valid (R, K) bool, K = the largest number of active specialists in a row."""
    K = int(act.sum(1).max()) if act.numel() else 0
    # A stable sort of "inactive" flags puts each row's active ids first, in id order.
    order = torch.argsort((~act).to(torch.int8), dim=1, stable=True)[:, :K]
    slot_valid = act.gather(1, order)
    spec = torch.where(slot_valid, order, torch.full_like(order, M))
    return spec, slot_valid


# ============================================================================ objective


def objective(q: Tensor, p_general: Tensor, subsets, p_specialists, active: Tensor) -> Tensor:
    """The combination loss per example, for comparing solvers.

    ``L(q) = KL(p_g || q) + sum_{m active} KL(p_m || R_m q)`` in nats, with ``0 log 0 = 0``
    (and ``+inf`` where q puts no mass on something p does). Inactive specialists' rows of
    ``p_specialists`` are ignored whatever they hold.

    Args:
        q: (B, C) candidate distributions.
        p_general, subsets, p_specialists, active: as in :func:`combine`.

    Returns:
        (B,) tensor of L, in ``q``'s dtype.
    """
    table, specs, active = _validate(p_general, subsets, p_specialists, active)
    if not isinstance(q, Tensor) or q.shape != p_general.shape:
        raise CombineInputError(
            f"q must have p_general's shape {tuple(p_general.shape)}, got "
            + (f"{tuple(q.shape)}" if isinstance(q, Tensor) else type(q).__name__)
        )
    pg = p_general.to(q.dtype)
    total = _kl(pg, q)
    M = table.num_subsets
    # Out-of-subset masses as sums over the complement (never 1 - sum(q_S)): (B, M).
    q_out = q @ table.complement_mask()[:M].to(q.dtype).T
    for m in range(M):
        s = table.sizes[m]
        p = specs[m].to(q.dtype)
        q_in = q[:, table.index[m, :s]]
        kl = _kl(p[:, :s], q_in) + _kl(p[:, s:], q_out[:, m, None])
        # where, not multiplication: an inactive row may hold NaN/garbage.
        total = total + torch.where(active[:, m], kl, torch.zeros_like(kl))
    return total


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """sum_i p_i log(p_i / q_i) over the last dim, 0 log 0 = 0."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


# ============================================================================ combine


def combine(
    p_general: Tensor,
    subsets,
    p_specialists: Sequence[Tensor],
    active: Tensor,
    solver: str = "em",
    *,
    max_iter: int | None = None,
    tol: float = DEFAULT_TOL,
    return_info: bool = False,
    single_closed_form: bool = True,
):
    """Combine generalist and specialist distributions into one distribution over all classes.

    Args:
        p_general: (B, C) float tensor, the generalist's probabilities (rows sum to 1).
        subsets: list of M LongTensors (or int sequences) of distinct class ids in [0, C);
            sizes may differ and subsets may overlap. A :class:`SubsetTable` from
            :func:`prepare_subsets` is accepted too (skips re-validation).
        p_specialists: list of M tensors (B, |S_m| + 1): specialist m's probabilities over
            its subset, in the order of ``subsets[m]``, then its dustbin in the last column.
            Rows of examples for which m is inactive are ignored (they may hold anything).
        active: (B, M) bool, which specialists take part for each example (the set A).
        solver: ``"em"`` (default) or ``"gradient"`` (see the module doc).
        max_iter: iteration cap per example: EM iterations, or L-BFGS iterations for
            ``gradient``. ``None``: 200 for em, 5000 for gradient.
        tol: EM stops for an example when max_i |q_i^(t) - q_i^(t-1)| <= tol (and no class
            grows by more than 1% per iteration); ``gradient`` stops when
            max_i |dL/dz_i| <= tol (dL/dz_i = -(1 + |A|) times the EM step on q_i, so the
            two criteria have the same scale).
        return_info: also return a dict about the solve.
        single_closed_form: (em) use the exact closed form for examples with exactly one
            active specialist; ``False`` iterates EM on them too (for tests).

    Returns:
        q: (B, C), same dtype and device as ``p_general``, rows non-negative summing to 1;
        rows with no active specialist are ``p_general``'s rows bit for bit.
        With ``return_info=True``, ``(q, info)``; info holds ``solver``, ``iterations`` (int,
        the largest over the batch), ``iterations_per_example`` (B,) long (0 for examples
        solved without iterating), ``converged`` (B,) bool, ``num_active`` (B,) long.
    """
    if solver not in SOLVERS:
        raise CombineInputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER[solver]
    if int(max_iter) != max_iter or max_iter < 0:
        raise CombineInputError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    max_iter = int(max_iter)
    if not (tol >= 0 and math.isfinite(tol)):
        raise CombineInputError(f"tol must be a finite number >= 0, got {tol!r}")
    table, specs, active = _validate(p_general, subsets, p_specialists, active)

    B, C = p_general.shape
    device = p_general.device
    work = _work_dtype(p_general.dtype)
    pg = p_general.to(work)
    num_active = active.sum(1)
    iters = torch.zeros(B, dtype=torch.long, device=device)
    converged = torch.ones(B, dtype=torch.bool, device=device)
    q = None

    def put(rows: Tensor, values: Tensor) -> None:
        # Rows with no active specialist keep p_general, bit for bit. When one group holds every
        # row, its (fresh) result is the output: no (B, C) copy of p_general to overwrite.
        nonlocal q
        values = values.to(p_general.dtype)
        if q is None and rows.numel() == B:
            q = values
            return
        if q is None:
            q = p_general.clone()
        q[rows] = values

    if solver == "gradient":
        rows = torch.nonzero(num_active > 0).flatten()
        if rows.numel():
            q_r, it_r, ok_r = solve_gradient(pg, table, specs, active, rows, max_iter, tol)
            put(rows, q_r)
            iters[rows], converged[rows] = it_r, ok_r
    else:
        if single_closed_form:
            one = torch.nonzero(num_active == 1).flatten()
            many = torch.nonzero(num_active > 1).flatten()
        else:
            one = num_active.new_zeros(0)
            many = torch.nonzero(num_active > 0).flatten()
        if one.numel():
            q_r, _, _ = _solve_reduced(pg, table, specs, active, one, None, tol)
            put(one, q_r)
        if many.numel():
            q_r, it_r, ok_r = _solve_reduced(pg, table, specs, active, many, max_iter, tol)
            put(many, q_r)
            iters[many], converged[many] = it_r, ok_r
    if q is None:
        q = p_general.clone()

    if not return_info:
        return q
    info = {
        "solver": solver,
        "iterations": int(iters.max()) if B else 0,
        "iterations_per_example": iters,
        "converged": converged,
        "num_active": num_active,
    }
    return q, info


# ============================================================================ reduced problem


@dataclass
class _Reduced:
    """One batch of examples (R rows) reduced to the union U of their active subsets plus one
    "rest" column for all classes outside U. Columns 0..Umax-1 are union classes (``uid``,
    padded with C where ``valid`` is False); column Umax is the rest.

    fixed (R, Umax+1): p_g plus the specialists' in-subset masses (rest: P_g(not U)).
    pg_red (R, Umax+1): p_g on the columns (rest: P_g(not U)).
    count (R, Umax+1): how many real classes each column stands for (0 for padding).
    comp (R, K, Umax+1): 1.0 where the column is outside active slot k's subset.
    dust (R, K): the slots' dustbin masses (0 for padded slots).
    """

    pg: Tensor  # (R, C) p_g of these rows
    fixed: Tensor
    pg_red: Tensor
    count: Tensor
    comp: Tensor
    dust: Tensor
    uid: Tensor  # (R, Umax) long
    valid: Tensor  # (R, Umax) bool
    in_union: Tensor  # (R, C) bool
    p_rest: Tensor  # (R,) P_g(not U), a sum over the complement of U
    n_rest: Tensor  # (R,) long, C - |U|


def _reduce(pg_all: Tensor, table: SubsetTable, specs: list[Tensor], active: Tensor, rows: Tensor) -> _Reduced:
    """Build the reduced problem for the examples ``rows`` (each with >= 1 active specialist)."""
    everyone = rows.numel() == pg_all.shape[0]  # then rows = arange(B): skip the (B, C) copy
    pg = pg_all if everyone else pg_all[rows]
    act = active if everyone else active[rows]
    R, C = pg.shape
    M = table.num_subsets
    dtype, device = pg.dtype, pg.device
    spec, slot_valid = _active_slots(act, M)
    K = spec.shape[1]
    smax = table.index.shape[1]

    # Each slot's subset ids (pad: C) and its specialist's probabilities, gathered by a loop over
    # the specialists that are active somewhere in these rows (M is small; rows are not looped).
    ids = table.index[spec]  # (R, K, Smax)
    p_in = pg.new_zeros(R, K, smax)
    dust = pg.new_zeros(R, K)
    used = act.any(0).tolist()
    for m in range(M):
        if not used[m]:
            continue
        s = table.sizes[m]
        pm = specs[m] if everyone else specs[m][rows]  # (R, s + 1)
        hit = spec == m  # (R, K), at most one True per row
        # torch.where, not multiplication, so garbage in rows where m is inactive never leaks.
        p_in[..., :s] = torch.where(hit[..., None], pm[:, None, :s], p_in[..., :s])
        dust = torch.where(hit, pm[:, None, s], dust)

    # The union of each row's active subsets, deduplicated by sorting the concatenated ids.
    flat = ids.reshape(R, K * smax)
    srt, perm = flat.sort(dim=1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    upos_sorted = new.long().cumsum(1) - 1  # column of each sorted entry
    umax = int(upos_sorted[:, -1].max()) + 1
    pos = torch.empty_like(upos_sorted).scatter_(1, perm, upos_sorted)  # column of each entry
    uid = torch.full((R, umax), C, dtype=torch.long, device=device).scatter_(1, upos_sorted, srt)
    valid = uid < C

    pg_u = torch.where(valid, pg.gather(1, uid.clamp(max=C - 1)), pg.new_zeros(()))
    fixed_u = pg_u.scatter_add(1, pos, p_in.reshape(R, K * smax))  # overlaps add up
    in_s = torch.zeros(R, K, umax, dtype=torch.bool, device=device)
    in_s.scatter_(2, pos.view(R, K, smax), True)
    comp_u = valid[:, None, :] & ~in_s & slot_valid[:, :, None]
    # The rest column is outside every active subset.
    comp = torch.cat([comp_u, slot_valid[:, :, None]], 2).to(dtype)

    in_union = torch.zeros(R, C + 1, dtype=torch.bool, device=device)
    in_union.scatter_(1, flat, True)
    in_union = in_union[:, :C]
    p_rest = pg.masked_fill(in_union, 0).sum(1)  # a sum over the complement: no cancellation
    n_rest = C - valid.sum(1)

    fixed = torch.cat([fixed_u, p_rest[:, None]], 1)
    pg_red = torch.cat([pg_u, p_rest[:, None]], 1)
    count = torch.cat([valid.to(dtype), n_rest[:, None].to(dtype)], 1)
    return _Reduced(pg, fixed, pg_red, count, comp, dust, uid, valid, in_union, p_rest, n_rest)


def _solve_reduced(
    pg: Tensor,
    table: SubsetTable,
    specs: list[Tensor],
    active: Tensor,
    rows: Tensor,
    max_iter: int | None,
    tol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed form (``max_iter=None``: rows with one active specialist) or EM for ``rows``,
    in chunks of rows that bound the temporaries: (rows, K, |U|) for the reduced problem and
    (rows, C) for the expansion. Returns q (R, C), iterations (R,), converged (R,)."""
    K = int(active[rows].sum(1).max())
    smax = table.index.shape[1]
    per_row = max(K * K * smax, pg.shape[1], 1)
    chunk = max(1, _CHUNK_ELEMENTS // per_row)
    qs, its, oks = [], [], []
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        red = _reduce(pg, table, specs, active, r)
        if max_iter is None:
            q_red = _closed_form_reduced(red)
            it = torch.zeros(r.numel(), dtype=torch.long, device=pg.device)
            ok = torch.ones(r.numel(), dtype=torch.bool, device=pg.device)
        else:
            q_red, it, ok = _em_reduced(red, max_iter, tol)
        qs.append(_expand(q_red, red))
        its.append(it)
        oks.append(ok)
    if len(qs) == 1:
        return qs[0], its[0], oks[0]
    return torch.cat(qs), torch.cat(its), torch.cat(oks)


def _closed_form_reduced(red: _Reduced) -> Tensor:
    """Exact minimizer for rows with exactly one active specialist, on the reduced columns.

    With one specialist the union is S and the rest column is "not S": q_S = (p_g,S + p_m,S)/W
    and the rest gets (P_g(not S) + p_m,dust)/W, W the total mass (2 for normalized inputs);
    :func:`_expand` shares the rest out in proportion to p_g (uniformly if P_g(not S) = 0).
    If S holds every class there is no "not S" for the dustbin mass: it is dropped."""
    num = red.fixed.clone()
    d = red.dust[:, 0]
    num[:, -1] += torch.where(red.n_rest > 0, d, torch.zeros_like(d))
    return num / num.sum(1, keepdim=True).clamp_min(torch.finfo(num.dtype).tiny)


def _em_step(fixed: Tensor, comp: Tensor, dust: Tensor, q: Tensor) -> Tensor:
    """One EM step on reduced columns: q (r, U+1) -> q' (r, U+1)."""
    # Q_k: mass outside slot k's subset, a sum over the complement (bmm with its indicator).
    q_out = torch.bmm(comp, q.unsqueeze(2)).squeeze(2)  # (r, K)
    has = q_out > 0
    # Dustbin mass per unit of out-of-subset q; 0 where there is no such mass (empty complement
    # or padded slot), which drops that dustbin instead of dividing by zero.
    ratio = torch.where(has, dust / torch.where(has, q_out, torch.ones_like(q_out)), torch.zeros_like(q_out))
    share = torch.bmm(ratio.unsqueeze(1), comp).squeeze(1)  # (r, U+1): sum_k [i not in S_k] d_k/Q_k
    num = fixed + q * share
    # Divide by the actual total (= 1 + |A| for normalized inputs) so q stays on the simplex.
    return num / num.sum(1, keepdim=True).clamp_min(torch.finfo(num.dtype).tiny)


def _em_reduced(red: _Reduced, max_iter: int, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Run EM per example until converged or ``max_iter``; converged rows leave the batch.

    Returns q (R, U+1), iterations (R,) long, converged (R,) bool."""
    R = red.fixed.shape[0]
    dtype, device = red.fixed.dtype, red.fixed.device
    finfo = torch.finfo(dtype)
    # Start off the boundary: (1 - eta) p_g + eta * uniform over the classes the columns stand for.
    floor = red.count / red.count.sum(1, keepdim=True)
    q = (1 - _INIT_FLOOR) * red.pg_red + _INIT_FLOOR * floor
    q = q / q.sum(1, keepdim=True).clamp_min(finfo.tiny)

    out = q.clone()
    iters = torch.zeros(R, dtype=torch.long, device=device)
    converged = torch.zeros(R, dtype=torch.bool, device=device)
    run = torch.arange(R, device=device)  # rows still iterating
    fixed, comp, dust = red.fixed, red.comp, red.dust
    # Growth is only judged where q carries full relative precision (not a denormal).
    significant = finfo.tiny / finfo.eps
    for it in range(1, max_iter + 1):
        q_new = _em_step(fixed, comp, dust, q)
        change = (q_new - q).abs().amax(1)
        grows = (q_new > significant) & (q_new > q * (1 + _GROWTH_TOL))
        done = (change <= tol) & ~grows.any(1)
        q = q_new
        stop = done if it < max_iter else torch.ones_like(done)
        if bool(stop.any()):
            idx = run[stop]
            out[idx] = q[stop]
            iters[idx] = it
            converged[idx] = done[stop]
            keep = ~stop
            if not bool(keep.any()):
                break
            run, q, fixed, comp, dust = run[keep], q[keep], fixed[keep], comp[keep], dust[keep]
    return out, iters, converged


def _keep_support(q: Tensor, support: Tensor) -> Tensor:
    """Where the minimizer is positive (``support``) but q underflowed to 0 (float32: a
    p_g,i of 1e-45 divided by 1 + |A|), put the smallest normal number instead, so that
    L(q) stays finite; this moves the row sum by at most C * 1e-38."""
    return torch.where((q == 0) & support, torch.finfo(q.dtype).tiny, q)


def _expand(q_red: Tensor, red: _Reduced) -> Tensor:
    """Reduced columns -> (R, C): union classes take their column; the rest mass T is shared
    among the classes outside U in proportion to p_g (the minimizer given T), or uniformly when
    P_g(not U) = 0 (every split is a minimizer then; uniform is the eps -> 0 limit).

    Written for few full-width (R, C) passes: at C = 15,000 they cost more than the EM loop."""
    pg = red.pg
    R, C = pg.shape
    dtype = pg.dtype
    tiny = torch.finfo(dtype).tiny
    umax = red.uid.shape[1]
    rest = q_red[:, umax]
    p_rest = red.p_rest
    # Off U: p_g,i * (T / P). With P >= tiny (a normal number) and T <= 1 the scale cannot
    # overflow; rows with a subnormal or zero P are redone below.
    normal = p_rest >= tiny
    scale = torch.where(normal, rest / torch.where(normal, p_rest, torch.ones_like(p_rest)), torch.zeros_like(rest))
    out = pg * scale[:, None]
    # Keep the support: where p_g,i > 0 the product may underflow to 0 (float32), which would
    # make L infinite; max(out, min(p_g, tiny)) only touches values below the normal range.
    out = torch.maximum(out, pg.clamp_max(tiny))
    odd = ~normal & (rest > 0)
    if bool(odd.any()):
        idx = torch.nonzero(odd).flatten()
        pg_o, p_o, t_o = pg[idx], p_rest[idx], rest[idx]
        has = p_o > 0
        # (p_g,i / P) * T: the ratio is <= 1, so a subnormal P cannot overflow.
        by_pg = pg_o / torch.where(has, p_o, torch.ones_like(p_o))[:, None] * t_o[:, None]
        by_pg = torch.maximum(by_pg, pg_o.clamp_max(tiny))
        uniform = (t_o / red.n_rest[idx].clamp_min(1).to(dtype))[:, None].expand_as(pg_o)
        out[idx] = torch.where(has[:, None], by_pg, uniform)
    # Union classes: their reduced column (every union class is written, so whatever the line
    # above put there is overwritten). Padding columns are skipped.
    q_u = _keep_support(q_red[:, :umax], red.fixed[:, :umax] > 0)
    lin = (torch.arange(R, device=pg.device)[:, None] * C + red.uid)[red.valid]
    out.view(-1)[lin] = q_u[red.valid]
    return out
