"""The accuracy-cost frontier: which models no other model beats on both accuracy and cost.

A model is on the Pareto front when no other model has top-1 ``>=`` and cost ``<=`` with at
least one of the two strict. Ties are kept: two models with the same top-1 and the same cost
are both on the front (neither dominates the other). A model whose top-1 or cost is undefined
(``None`` or NaN) is off the front and dominates nothing.

Costs are any non-negative unit (FLOPs per example here); accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

from .checks import ParameterError


def _defined(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def pareto_flags(top1: Sequence, cost: Sequence) -> list[bool]:
    """(N,) bools: point i is on the front (not dominated by any other point).

    One sweep in order of cost: a point is dominated by a cheaper point with top-1 at least
    its own, or by an equally cheap point with a higher top-1. O(N log N)."""
    if len(top1) != len(cost):
        raise ParameterError(f"top1 ({len(top1)}) and cost ({len(cost)}) must have one entry per model")
    points = [i for i in range(len(top1)) if _defined(top1[i]) and _defined(cost[i])]
    points.sort(key=lambda i: (cost[i], -top1[i]))
    flags = [False] * len(top1)
    best_cheaper = -math.inf  # the best top-1 among strictly cheaper points
    g = 0
    while g < len(points):
        h = g
        while h < len(points) and cost[points[h]] == cost[points[g]]:
            h += 1
        group = points[g:h]  # equal cost, best top-1 first
        top = top1[group[0]]
        for i in group:
            flags[i] = top1[i] == top and top > best_cheaper
        best_cheaper = max(best_cheaper, top)
        g = h
    return flags


def best_within(top1: Sequence, cost: Sequence, budget: float, candidates: Sequence[bool] | None = None) -> int | None:
    """The index of the most accurate model costing at most ``budget`` (of two equally
    accurate, the cheaper; then the first), among ``candidates`` (default all); None if none."""
    if len(top1) != len(cost):
        raise ParameterError(f"top1 ({len(top1)}) and cost ({len(cost)}) must have one entry per model")
    ok = [i for i in range(len(top1)) if (candidates is None or candidates[i])
          and _defined(top1[i]) and _defined(cost[i]) and cost[i] <= budget]
    return min(ok, key=lambda i: (-top1[i], cost[i], i)) if ok else None


__all__ = ["best_within", "pareto_flags"]
