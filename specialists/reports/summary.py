"""``RUN_DIR/summary.csv``: one row per model the run has trained or composed so far.

Columns: ``model`` (its tracker namespace), ``scope`` (``test``: the whole test split; a
specialist's figures are on the test examples of its own subset), ``test_top1``,
``test_top5``, ``test_nll``, ``train_samples`` (training examples seen, augmented passes
counted), ``inference_flops`` (FLOPs per example) and ``seconds_per_example`` (the evaluate or
student stage's timing protocol). Every value is copied from the model's own ``metrics.json``
or the stage report that measured it; a figure a run does not have is left empty.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

COLUMNS = ("model", "scope", "test_top1", "test_top5", "test_nll", "train_samples", "inference_flops",
           "seconds_per_example")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rows(run_dir: Path) -> list[dict]:
    """The summary's rows, from the run directory's JSON files (those not written yet give none)."""
    d = Path(run_dir)
    out: list[dict] = []

    def add(model: str, m: dict | None, scope: str = "test", **extra) -> None:
        if m is not None:
            row = {"model": model, "scope": scope, **{k: m.get(k) for k in COLUMNS[2:]}, **extra}
            out.append({k: row.get(k) for k in COLUMNS})

    gen = _read(d / "generalist" / "metrics.json")
    ev = _read(d / "evaluation" / "evaluation.json") or {}
    cost, timing = ev.get("cost", {}), ev.get("timing", {})
    add("generalist", gen, inference_flops=cost.get("generalist_flops"),
        seconds_per_example=timing.get("generalist_s_per_example"))
    for path in sorted((d / "specialists").glob("[0-9][0-9][0-9]/metrics.json")):
        m = _read(path)
        if m is not None:
            add(f"specialist/{path.parent.name}", {**m, "test_top1": m.get("subset_top1")},
                scope=f"its subset ({m.get('size')} classes)")
    if "ensemble" in ev:
        e = ev["ensemble"]
        train = cost.get("train_compute", {})
        add("ensemble", {"test_top1": e.get("top1"), "test_top5": e.get("top5"), "test_nll": e.get("nll")},
            train_samples=train.get("ensemble"), inference_flops=cost.get("ensemble_flops"),
            seconds_per_example=timing.get("routed_s_per_example"))
    add("control", _read(d / "ablation" / "control" / "metrics.json"))
    st = _read(d / "student" / "metrics.json")
    if st is not None:
        secs = {k: c.get("seconds_per_example") for k, c in st.get("comparisons", {}).items()}
        add("student", st, seconds_per_example=secs.get("student"))
        for key, ns, timed in (("born_again", "student/born_again", "born_again"),
                               ("hard_labels", "student/hard_labels", "hard_labels"),
                               ("second_generalist", "student/second_generalist", None),
                               ("two_generalist_average", "student/two_generalists", "two_generalists"),
                               ("cascade", "student/cascade", "cascade")):
            if key in st.get("control", {}):
                add(ns, st["control"][key], seconds_per_example=secs.get(timed))
    return out


def render_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    return buf.getvalue()
