"""The controls every report sets beside the ensemble: what the same compute buys otherwise.

Specialists cost training compute, so the evaluation and ablation reports show, in one table,
every control trained so far: the ablation's compute-matched generalist (trained longer) and
the student stage's student, born-again student and two-generalist average. Those are trained
by later stages, so those stages' rows in the stage table re-render the earlier reports.
"""

from __future__ import annotations

from ..rundir import Run
from ..rundir.io import read_json
from .format import pct, pts
from .student import control_rows as student_rows


def control_rows(run: Run) -> list[dict]:
    """Rows ``{"name", "test_top1", "note"}`` for every control trained in ``run`` so far."""
    rows = []
    if run.control.metrics.exists():
        c = read_json(run.control.metrics)
        rows.append({"name": "generalist trained longer (compute-matched)", "test_top1": c["test_top1"],
                     "note": f"{c['train_samples']} extra training samples vs the specialists' {c['specialist_samples']} "
                             "(their training compute, in generalist examples)"})
    if run.student.metrics.exists():
        rows += student_rows(read_json(run.student.metrics))
    return rows


def controls_table(generalist_top1: float, ensemble_top1: float, controls: list[dict]) -> list[str]:
    """Markdown rows: the generalist, the ensemble, then each control with its change."""
    g, e = generalist_top1, ensemble_top1
    rows = ["| model | test top-1 | change vs generalist | note |", "|---|---:|---:|---|",
            f"| generalist | {pct(g)} | {pts(0.0)} | |",
            f"| generalist + specialists | {pct(e)} | {pts(e - g)} | this evaluation |"]
    for c in controls:
        t = c.get("test_top1")
        rows.append(f"| {c['name']} | {pct(t)} | {pts(None if t is None else t - g)} | {c.get('note', '')} |")
    return rows
