"""Scoring the ensemble against the generalist on a labelled split, and the ablation's order.

:func:`score` compares two probability tables: top-1, top-5, NLL and ECE of both models, the
change, *conditional* accuracy (examples whose true class at least one specialist covers),
Hinton's Table 4 (every example in exactly one row by the number of specialists covering its
true class: 0, 1, ..., 9, 10+), and the paired significance of the difference (exact McNemar,
paired-bootstrap 95% interval). The evaluate stage calls it once; the ablation once per
specialist count.

Accuracies are unrounded fractions in [0, 1]; NLL is in nats per example. A quantity with no
examples behind it (conditional accuracy when no specialist covers any test class, an empty
Table-4 row) is ``None`` (JSON ``null``), never NaN.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import metrics

MAX_COVERAGE_ROW = 10  # Table 4's last row holds every example covered by 10 or more specialists
ABLATION_ORDERS = ("confusion", "size", "random")  # see specialist_order()


def _as_long(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().cpu().reshape(-1)


def _subset_list(subsets) -> list[torch.Tensor]:
    return [_as_long(s) for s in subsets]


def coverage_counts(y, subsets: Sequence) -> torch.Tensor:
    """How many specialists' subsets hold each example's true class.

    Args:
        y: (N,) int class ids (tensor, array or list).
        subsets: M class-id collections (tensors, arrays or lists; they may overlap).
    Returns:
        (N,) int64 CPU tensor with values in [0, M].
    """
    y = _as_long(y)
    subs = _subset_list(subsets)
    c = int(max([int(y.max()) + 1 if len(y) else 0] + [int(s.max()) + 1 for s in subs if len(s)]))
    per_class = torch.zeros(c, dtype=torch.long)
    for s in subs:
        per_class[torch.unique(s)] += 1  # unique: a class listed twice in one subset counts once
    return per_class[y]


def _frac(num: int, den: int) -> float | None:
    return num / den if den else None


def _change(new: float | None, old: float | None) -> tuple[float | None, float | None]:
    """(absolute, relative) change; relative is None when old is 0 or either is undefined."""
    if new is None or old is None or (isinstance(new, float) and math.isnan(new)) or (
            isinstance(old, float) and math.isnan(old)):
        return None, None
    return new - old, ((new - old) / old if old else None)


def _by_coverage(cov: torch.Tensor, g_ok: torch.Tensor, e_ok: torch.Tensor, num_subsets: int) -> list[dict]:
    """Table 4 rows 0, 1, ..., min(M, 10); the row ``covered=10`` (label "10+") holds every
    example covered by 10 or more. Rows beyond M cannot have examples and are left out."""
    last = min(num_subsets, MAX_COVERAGE_ROW)
    group = cov.clamp(max=MAX_COVERAGE_ROW)
    rows = []
    for k in range(last + 1):
        m = group == k
        n, g, e = int(m.sum()), int(g_ok[m].sum()), int(e_ok[m].sum())
        ga, ea = _frac(g, n), _frac(e, n)
        rows.append({
            "covered": k,
            "label": f"{k}+" if k == MAX_COVERAGE_ROW else str(k),
            "count": n,
            "generalist_correct": g,
            "ensemble_correct": e,
            "delta_correct": e - g,  # Hinton's Table 4: change in the number of correct examples
            "generalist_top1": ga,
            "ensemble_top1": ea,
            "change": (ea - ga) if n else None,  # accuracy change in the group (fraction)
            "relative_change": (e - g) / g if g else None,  # Table 4's "relative accuracy change"
        })
    return rows


def _routing_stats(active: torch.Tensor, y: torch.Tensor, g_ok: torch.Tensor, e_ok: torch.Tensor) -> tuple[dict, list[dict]]:
    """Active-set statistics and, per specialist position m, the examples routed to it."""
    a = active.bool().cpu()
    per = a.sum(1)
    stats = {
        "mean_active": float(per.float().mean()) if len(per) else None,
        "max_active": int(per.max()) if len(per) else 0,
        "no_active_fraction": float((per == 0).float().mean()) if len(per) else None,
        "active_histogram": [int(v) for v in torch.bincount(per, minlength=1).tolist()],  # [n with 0, n with 1, ...]
    }
    rows = []
    for m in range(a.shape[1]):
        r = a[:, m]
        n, g, e = int(r.sum()), int(g_ok[r].sum()), int(e_ok[r].sum())
        rows.append({"position": m, "routed": n, "generalist_correct": g, "ensemble_correct": e,
                     "generalist_top1": _frac(g, n), "ensemble_top1": _frac(e, n),
                     "change": (_frac(e, n) - _frac(g, n)) if n else None})
    return stats, rows


def score(p_general, p_ensemble, y, subsets: Sequence, active=None, *, bootstrap: int = 2000, ece_bins: int = 15,
          seed: int = 0) -> dict:
    """Compare the generalist with the ensemble on one labelled split.

    Args:
        p_general: (N, C) generalist probabilities (rows summing to 1; any device).
        p_ensemble: (N, C) ensemble probabilities q.
        y: (N,) int64 true classes.
        subsets: the M specialists' class ids (coverage and Table 4 use them).
        active: optional (N, M) bool active sets (routing statistics, per-specialist rows).
        bootstrap: paired-bootstrap resamples for the 95% interval of the top-1 difference
            (0: no interval).
        ece_bins: equal-width confidence bins of the ECE.
        seed: of the bootstrap.
    Returns:
        ``generalist`` / ``ensemble``: {top1, top5, nll, ece, n}; ``change``: {top1_abs,
        top1_rel, top5_abs, top5_rel}; ``conditional``: {count, generalist_top1, ensemble_top1,
        generalist_top5, ensemble_top5, change}; ``by_coverage``: Table-4 rows (integer counts);
        ``significance``: {mcnemar, bootstrap: {diff, ci95}}; with ``active`` also ``routing``
        and ``per_specialist`` (by position in ``subsets``).
    """
    pg = torch.as_tensor(p_general).detach().float().cpu()
    pe = torch.as_tensor(p_ensemble).detach().float().cpu()
    y = _as_long(y)
    if pg.shape != pe.shape or pg.ndim != 2 or len(y) != len(pg):
        raise ValueError(f"score: p_general {tuple(pg.shape)}, p_ensemble {tuple(pe.shape)} and y {tuple(y.shape)} "
                         "must be (N, C), (N, C) and (N,)")
    subs = _subset_list(subsets)
    g1, e1 = metrics.topk_correct(pg, y, 1), metrics.topk_correct(pe, y, 1)
    g5, e5 = metrics.topk_correct(pg, y, 5), metrics.topk_correct(pe, y, 5)
    out = {"n": int(len(y)), "num_classes": int(pg.shape[1]), "num_specialists": len(subs),
           "generalist": metrics.summary(pg, y, ece_bins), "ensemble": metrics.summary(pe, y, ece_bins)}
    t1a, t1r = _change(out["ensemble"]["top1"], out["generalist"]["top1"])
    t5a, t5r = _change(out["ensemble"]["top5"], out["generalist"]["top5"])
    out["change"] = {"top1_abs": t1a, "top1_rel": t1r, "top5_abs": t5a, "top5_rel": t5r,
                     "nll_abs": _change(out["ensemble"]["nll"], out["generalist"]["nll"])[0],
                     "ece_abs": _change(out["ensemble"]["ece"], out["generalist"]["ece"])[0]}

    cov = coverage_counts(y, subs) if len(y) else torch.zeros(0, dtype=torch.long)
    m = cov >= 1
    n = int(m.sum())
    cg, ce = _frac(int(g1[m].sum()), n), _frac(int(e1[m].sum()), n)
    ca, cr = _change(ce, cg)
    out["conditional"] = {"count": n, "fraction_of_test": _frac(n, len(y)),
                          "generalist_top1": cg, "ensemble_top1": ce,
                          "generalist_top5": _frac(int(g5[m].sum()), n), "ensemble_top5": _frac(int(e5[m].sum()), n),
                          "change_abs": ca, "change_rel": cr}
    out["by_coverage"] = _by_coverage(cov, g1, e1, len(subs))
    out["significance"] = {"metric": "top1",
                           "mcnemar": metrics.mcnemar(g1, e1),
                           "bootstrap": {**metrics.paired_bootstrap(g1, e1, bootstrap, seed), "samples": bootstrap}}
    if active is not None:
        a = torch.as_tensor(active).bool().cpu()
        if a.shape != (len(y), len(subs)):
            raise ValueError(f"score: active must be (N, M) = ({len(y)}, {len(subs)}), got {tuple(a.shape)}")
        out["routing"], out["per_specialist"] = _routing_stats(a, y, g1, e1)
    return out


# --- the ablation over the number of specialists ----------------------------------------------
def ablation_counts(m: int) -> list[int]:
    """0, 1, 2, 4, ... up to and including m."""
    ks = [0] + [2**i for i in range(int(math.log2(m)) + 1)] if m >= 1 else [0]
    return sorted(set(k for k in ks if k <= m) | {m})


def specialist_order(entries: list[dict], order: str, seed: int) -> list[int]:
    """Positions of the specialists in the order the ablation adds them: by confusion mass or
    subset size (largest first, ties by id), or a seeded shuffle. ``entries``: subsets.json's."""
    pos = list(range(len(entries)))
    if order == "size":
        return sorted(pos, key=lambda i: (-entries[i]["size"], entries[i]["id"]))
    if order == "confusion":
        return sorted(pos, key=lambda i: (-entries[i].get("confusion_mass", 0.0), entries[i]["id"]))
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.permutation(len(entries))]
