"""The controls every report sets beside the ensemble (DESIGN.md "Controls").

Specialists cost training compute, so the evaluation and ablation reports show what the same
compute buys otherwise. The controls are trained by later stages (the ablation's
compute-matched generalist, the student stage's born-again student and second generalist),
so each of those stages calls :func:`refresh_reports` when it finishes: the markdown reports
are re-rendered from their JSON with every control found on disk at that moment.
"""

from __future__ import annotations

from pathlib import Path

from .io import read_json, write_text


def control_rows(run_dir) -> list[dict]:
    """Rows ``{"name", "test_top1", "note"}`` for every control trained in ``run_dir`` so far."""
    run_dir = Path(run_dir)
    rows = []
    path = run_dir / "ablation" / "control" / "metrics.json"
    if path.exists():
        c = read_json(path)
        rows.append({"name": "generalist trained longer (compute-matched)", "test_top1": c["test_top1"],
                     "note": f"{c['train_samples']} extra training samples vs the specialists' {c['specialist_samples']}"})
    path = run_dir / "student" / "metrics.json"
    if path.exists():
        from .student import control_rows as student_rows

        rows += student_rows(read_json(path))
    return rows


def refresh_reports(run_dir) -> None:
    """Re-render ``evaluation.md`` and ``ablation.md`` (where their JSON exists) with the controls."""
    from . import ablation, evaluation

    run_dir = Path(run_dir)
    rows = control_rows(run_dir)
    for module, name in ((evaluation, "evaluation"), (ablation, "ablation")):
        path = run_dir / name / f"{name}.json"
        if path.exists():
            write_text(path.with_suffix(".md"), module.render_markdown(read_json(path), rows))
