"""The evaluation stage: generalist vs routed ensemble on the test split (DESIGN.md section 2).

``score`` is the pure, reusable core (the ablation calls it once per specialist count): top-1,
top-5, NLL and ECE of both models, the change, *conditional* accuracy (test examples whose
true class at least one specialist covers), Hinton's Table 4 (every example in exactly one row
by the number of specialists covering its true class: 0, 1, ..., 9, 10+), and the paired
significance of the difference (exact McNemar, paired-bootstrap 95% interval).

``evaluate_stage(run)`` runs the ensemble of a run over its test split and writes
``RUN_DIR/evaluation/``: ``evaluation.json`` (the contract of DESIGN.md section 5),
``evaluation.md`` (the same as tables), ``by_coverage.png`` and ``specialists.png``. It also
times the generalist alone, the routed ensemble and ``all`` routing on one fixed batch.

Accuracies are unrounded fractions in [0, 1]; NLL is in nats per example; times are seconds.
A quantity with no examples behind it (conditional accuracy when no specialist covers any test
class, an empty Table-4 row) is ``None`` (JSON ``null``), never NaN.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import metrics
from .controls import refresh_reports
from .ensemble import SingleModel, SpecialistEnsemble
from .io import read_json, write_json
from .run import Run

log = logging.getLogger("specialists")

MAX_COVERAGE_ROW = 10  # Table 4's last row holds every example covered by 10 or more specialists


# --- the pure core ----------------------------------------------------------------------------
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


# --- timing -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_example(predictors: dict, x: torch.Tensor, repeats: int) -> dict:
    """Median seconds per example of each ``predictor.predict_proba(x, normalized=True)`` over
    ``repeats`` timed passes on the same normalized batch ``x`` (B, ...), after one warm-up
    pass each. The predictors take turns within every repeat, so a change in the machine's
    load during the measurement hits all of them alike instead of skewing their ratio."""
    for p in predictors.values():  # warm-up: allocator, cuDNN autotuning, lazy init
        p.predict_proba(x, normalized=True)
        _sync(p.device)
    times: dict = {k: [] for k in predictors}
    for _ in range(max(1, repeats)):
        for k, p in predictors.items():
            t0 = time.perf_counter()
            p.predict_proba(x, normalized=True)
            _sync(p.device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) / len(x) for k, v in times.items()}


def timing(ens: SpecialistEnsemble, ens_all: SpecialistEnsemble, x_raw, repeats: int, batch: int = 512) -> dict:
    """Seconds per example of the generalist alone, the routed ensemble and ``all`` routing on
    ``batch`` examples drawn from ``x_raw`` (seeded; preprocessed once, so only the models and the
    combination are timed), and the ratios the paper's cost argument is about."""
    # a seeded random sample of the split, not its first rows: test sets are often stored
    # class by class, and the first rows would all route to one specialist
    idx = torch.randperm(len(x_raw), generator=torch.Generator().manual_seed(0))[:batch].sort().values
    x = ens._prepare(ens.preprocess(x_raw[idx]))
    gen = SingleModel(ens.generalist, ens.info, ens.device, batch_size=ens.batch_size)
    t = time_per_example({"generalist": gen, "routed": ens, "all": ens_all}, x, repeats)
    t_g, t_r, t_a = t["generalist"], t["routed"], t["all"]
    return {"device": str(ens.device), "threads": torch.get_num_threads() if ens.device.type == "cpu" else None,
            "batch": int(len(x)), "repeats": int(repeats),
            "generalist_s_per_example": t_g, "routed_s_per_example": t_r, "all_s_per_example": t_a,
            "routed_over_generalist": t_r / t_g if t_g else None,
            "all_over_generalist": t_a / t_g if t_g else None,
            "routed_over_all": t_r / t_a if t_a else None}


# --- the stage --------------------------------------------------------------------------------
def _specialist_rows(run_dir: Path, ens: SpecialistEnsemble, per_position: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for m, r in enumerate(per_position):
        sid = ens.ids[m]
        sm = read_json(Path(run_dir) / "specialists" / f"{sid:03d}" / "metrics.json")
        classes = ens.subsets[m].tolist()
        rows.append({"id": sid, "size": len(classes), "classes": classes,
                     "names": [names[c] for c in classes],
                     **{k: v for k, v in r.items() if k != "position"},
                     "subset_top1": sm.get("subset_top1"),
                     "generalist_subset_top1": sm.get("generalist_subset_top1"),
                     "test_examples_in_subset": sm.get("test_examples_in_subset")})
    return rows


def evaluate_stage(run: Run) -> dict:
    """Evaluate the run's ensemble on the test split; write ``RUN_DIR/evaluation/``. Returns
    the evaluation dict (what ``evaluation.json`` holds)."""
    from .plots import plot_by_coverage, plot_specialists

    cfg = run.cfg
    out = run.stage_dir("evaluation")
    ens = SpecialistEnsemble.from_run(run.dir, device=str(run.device), batch_size=cfg.generalist.eval_batch_size)
    test = run.data.test
    y = test.y
    # raw uint8 NCHW (or float vectors): the ensemble's own preprocessing normalizes them
    res = ens.predict_all(test.x)
    subsets = [s.cpu() for s in ens.subsets]
    ev_cfg = cfg.evaluate
    ev = score(res["generalist"], res["ensemble"], y, subsets, res["active"], bootstrap=ev_cfg.bootstrap,
               ece_bins=ev_cfg.ece_bins, seed=cfg.seed)
    ev = {"split": "test", **ev,
          "combine": {"solver": ens.solver, "top_n": ens.top_n, "routing": ens.routing,
                      "max_iter": ens.max_iter, "tol": ens.tol}}
    ev["per_specialist"] = _specialist_rows(run.dir, ens, ev.pop("per_specialist", []), ens.class_names)

    # `all` routing: every specialist on every example (same models, no reload)
    ens_all = SpecialistEnsemble(ens.generalist, ens.specialists, ens.subsets, ens.info, ens.device, top_n=ens.top_n,
                                 solver=ens.solver, routing="all", max_iter=ens.max_iter, tol=ens.tol,
                                 batch_size=ens.batch_size, ids=ens.ids)
    q_all = ens_all.predict_all(test.x)["ensemble"].cpu()
    all_top1 = metrics.accuracy(q_all, y, 1)
    ev["all_routing"] = {"top1": all_top1, "top5": metrics.accuracy(q_all, y, 5), "nll": metrics.nll(q_all, y),
                         "change_vs_generalist": all_top1 - ev["generalist"]["top1"],
                         "change_vs_routed": all_top1 - ev["ensemble"]["top1"]}
    ev["timing"] = timing(ens, ens_all, test.x, ev_cfg.timing_batches, batch=min(len(test), cfg.generalist.eval_batch_size))

    ev["plots"] = ["evaluation/by_coverage.png", "evaluation/specialists.png"]  # relative to the run directory
    plot_by_coverage(ev["by_coverage"], out / "by_coverage.png",
                     title=f"{ev['num_specialists']} specialists, test split (n={ev['n']})")
    plot_specialists(ev["per_specialist"], out / "specialists.png")
    write_json(out / "evaluation.json", ev)
    refresh_reports(run.dir)  # evaluation.md, with whatever controls are already trained
    log.info("evaluate: generalist top-1 %.4f -> ensemble %.4f (%+.4f, 95%% CI %s, McNemar p=%.3g)",
             ev["generalist"]["top1"], ev["ensemble"]["top1"], ev["change"]["top1_abs"],
             _ci(ev["significance"]["bootstrap"].get("ci95")), ev["significance"]["mcnemar"]["p_value"])
    return ev


# --- reports ----------------------------------------------------------------------------------
def _pct(v, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}%"


def _pts(v, unit: str = " pts", digits: int = 2) -> str:
    """A change of accuracy as signed percentage points (``unit`` after it; "-" if undefined)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.{digits}f}{unit}"


def _num(v, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _ci(ci) -> str:
    return f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] pts" if ci else "-"


def _headline(ev: dict) -> list[str]:
    g, e, ch = ev["generalist"], ev["ensemble"], ev["change"]
    rows = ["| metric | generalist | ensemble | change | relative |", "|---|---:|---:|---:|---:|",
            f"| top-1 | {_pct(g['top1'])} | {_pct(e['top1'])} | {_pts(ch['top1_abs'])} | {_pts(ch['top1_rel'], '%')} |",
            f"| top-5 | {_pct(g['top5'])} | {_pct(e['top5'])} | {_pts(ch['top5_abs'])} | {_pts(ch['top5_rel'], '%')} |",
            f"| NLL (nats) | {_num(g['nll'])} | {_num(e['nll'])} | {_num(e['nll'] - g['nll'], '+.4f')} | |",
            f"| ECE | {_num(g['ece'])} | {_num(e['ece'])} | {_num(e['ece'] - g['ece'], '+.4f')} | |"]
    return rows


def _significance_line(ev: dict) -> str:
    s = ev["significance"]
    mc, bs = s["mcnemar"], s["bootstrap"]
    return (f"Top-1 change {_pts(bs['diff'], ' points')}, paired-bootstrap 95% CI {_ci(bs.get('ci95'))} "
            f"({bs.get('samples', '?')} resamples); exact McNemar p = {mc['p_value']:.3g} "
            f"(ensemble right where the generalist was wrong: {mc['a_wrong_b_right']}, the reverse: {mc['a_right_b_wrong']}).")


def _conditional_lines(ev: dict) -> list[str]:
    c = ev["conditional"]
    return [f"On the {c['count']} of {ev['n']} test examples whose true class at least one specialist covers: "
            f"generalist {_pct(c['generalist_top1'])} -> ensemble {_pct(c['ensemble_top1'])} "
            f"({_pts(c.get('change_abs'))}; top-5 {_pct(c['generalist_top5'])} -> {_pct(c['ensemble_top5'])})."]


def _coverage_table(ev: dict) -> list[str]:
    rows = ["| specialists covering the true class | test examples | generalist correct | ensemble correct "
            "| change in # correct | generalist top-1 | ensemble top-1 | change | relative change |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ev["by_coverage"]:
        rows.append(f"| {r.get('label', r['covered'])} | {r['count']} | {r['generalist_correct']} | {r['ensemble_correct']} "
                    f"| {r['ensemble_correct'] - r['generalist_correct']:+d} | {_pct(r.get('generalist_top1'))} "
                    f"| {_pct(r.get('ensemble_top1'))} | {_pts(r.get('change'))} | {_pts(r.get('relative_change'), '%')} |")
    return rows


def _controls_table(ev: dict, controls: list[dict]) -> list[str]:
    g, e = ev["generalist"]["top1"], ev["ensemble"]["top1"]
    rows = ["| model | test top-1 | change vs generalist | note |", "|---|---:|---:|---|",
            f"| generalist | {_pct(g)} | {_pts(0.0)} | |",
            f"| generalist + specialists | {_pct(e)} | {_pts(e - g)} | this evaluation |"]
    for c in controls:
        t = c.get("test_top1")
        rows.append(f"| {c['name']} | {_pct(t)} | {_pts(None if t is None else t - g)} | {c.get('note', '')} |")
    return rows


def render_markdown(evaluation: dict, controls: list[dict] | None = None) -> str:
    """``evaluation.md``: the evaluation dict as tables a person reads.

    ``controls``: rows for the controls table, each ``{"name", "test_top1", "note"}``
    (``specialists.controls.control_rows``: what the same compute buys otherwise).
    """
    ev = evaluation
    cb = ev.get("combine", {})
    lines = ["# Evaluation: generalist vs generalist + specialists", "",
             f"Test split, {ev['n']} examples, {ev['num_classes']} classes, {ev['num_specialists']} specialists"
             + (f"; combination `{cb.get('solver')}`, routing `{cb.get('routing')}` with top_n={cb.get('top_n')}" if cb else "")
             + ".", "", "## Headline", ""]
    lines += _headline(ev) + ["", _significance_line(ev), "", "## Conditional accuracy", ""]
    lines += _conditional_lines(ev)
    lines += ["", "## By the number of specialists covering the true class (Hinton et al. 2015, Table 4)", "",
              "Every test example is in exactly one row.", ""]
    lines += _coverage_table(ev)

    if controls:
        lines += ["", "## Controls: what the same extra compute buys otherwise", ""] + _controls_table(ev, controls)

    if ev.get("routing"):
        r = ev["routing"]
        lines += ["", "## Routing", "",
                  f"Mean active specialists per example: {_num(r['mean_active'], '.3f')} (max {r['max_active']}); "
                  f"examples with none active (answered by the generalist alone): {_pct(r['no_active_fraction'], 1)}."]
    if ev.get("all_routing"):
        a = ev["all_routing"]
        lines.append(f"With `all` routing (every specialist on every example): top-1 {_pct(a['top1'])} "
                     f"({_pts(a['change_vs_generalist'])} vs the generalist, {_pts(a['change_vs_routed'])} vs routed).")
    if ev.get("per_specialist"):
        lines += ["", "## Per specialist", "",
                  "Routed: test examples that activated it; accuracy of the generalist and of the ensemble on them. "
                  "Subset top-1: on test examples of its classes, restricted to its classes (its `metrics.json`).", "",
                  "| id | classes | routed | generalist | ensemble | change | subset top-1 (specialist / generalist) |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        for s in ev["per_specialist"]:
            names = ", ".join(s.get("names", [])[:6]) + (", ..." if len(s.get("names", [])) > 6 else "")
            lines.append(f"| {s['id']} | {s['size']}: {names} | {s['routed']} | {_pct(s['generalist_top1'])} "
                         f"| {_pct(s['ensemble_top1'])} | {_pts(s['change'])} "
                         f"| {_pct(s.get('subset_top1'))} / {_pct(s.get('generalist_subset_top1'))} |")
    if ev.get("timing"):
        t = ev["timing"]
        lines += ["", "## Inference time", "",
                  f"Median of {t['repeats']} passes over one batch of {t['batch']} on `{t['device']}`"
                  + (f" ({t['threads']} threads)" if t.get("threads") else "")
                  + ", after a warm-up; the three take turns in every pass.", "",
                  "| model | ms per example | vs generalist |", "|---|---:|---:|",
                  f"| generalist alone | {1e3 * t['generalist_s_per_example']:.4f} | 1.00x |",
                  f"| routed ensemble | {1e3 * t['routed_s_per_example']:.4f} | {_num(t['routed_over_generalist'], '.2f')}x |",
                  f"| `all` routing | {1e3 * t['all_s_per_example']:.4f} | {_num(t['all_over_generalist'], '.2f')}x |"]
    if ev.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in ev["plots"]]
    return "\n".join(lines) + "\n"


def print_summary(evaluation: dict, run_dir=None, controls: list[dict] | None = None) -> str:
    """The quickstart's closing console text (returned; the caller prints it): the headline
    table, conditional accuracy, the Table-4 rows, the controls and where the plots are
    (joined to ``run_dir`` when given, else relative to the run directory)."""
    ev = evaluation
    lines = [f"Evaluation on the test split ({ev['n']} examples, {ev['num_specialists']} specialists)", ""]
    lines += _headline(ev) + ["", _significance_line(ev), ""] + _conditional_lines(ev) + ["", "Table 4:"]
    lines += _coverage_table(ev)
    if controls:
        lines += ["", "Controls (what the same extra compute buys otherwise):"] + _controls_table(ev, controls)
    plots = [str(Path(run_dir) / p) if run_dir is not None else p for p in ev.get("plots", [])]
    if plots:
        lines += ["", "Plots:"] + [f"  {p}" for p in plots]
    return "\n".join(lines)
