"""``frontier.json``: every model of a run by accuracy and cost, the Pareto front, and the best
control the ensemble's inference budget buys. Built from the stages' JSON and the test
predictions they saved (no model is loaded), so it is re-rendered whenever a stage adds a model.

One entry per model of the run (those trained so far; the rest are absent)::

    {"key", "model", "kind", "top1", "ci95_vs_generalist", "inference_flops", "inference_ms",
     "train_compute", "pareto"}

- ``kind``: ``generalist``, ``ensemble`` (the routed ensemble; ``ensemble_kN``: the generalist
  with the first N specialists of the subset ablation, ``0 < N < all``) or ``control``
  (the generalist trained longer, the students, the born-again student, the two-generalist
  average, the cascade).
- ``top1``: test top-1 (a fraction); ``ci95_vs_generalist``: the paired-bootstrap 95% interval
  of ``top1`` minus the generalist's (fractions; recorded by the stage, else computed from the
  saved predictions; None when neither is there).
- ``inference_flops``: FLOPs per example as the model runs (the routed ensemble on the timing
  sample; the subset ablation's ensembles from their parts: the generalist plus each
  specialist's FLOPs per routed example times its routed share of the test split).
- ``inference_ms``: milliseconds per example, from one interleaved timing protocol: the
  student stage's when it ran, else the evaluate stage's; None where not timed (the subset
  ablation's ensembles). The generalist trained longer is the generalist's network: its time.
- ``train_compute``: all the training it took to obtain the model, in generalist-example
  equivalents (training FLOPs / the generalist's FLOPs per training example): the generalist's
  own training, plus the specialists' for an ensemble and a student of the ensemble, plus the
  model's own (a longer generalist's extra epochs, a second generalist, a student's steps with
  its teacher's forward passes). A soft tree on hard labels needs no generalist.
- ``pareto``: on the front of top-1 against inference FLOPs
  (:func:`~specialists.core.frontier.pareto_flags`).

``best_control``: the most accurate control costing at most the routed ensemble's inference
FLOPs (with :data:`COST_SLACK` of slack: the cascade's threshold is fitted on the validation
split to cost exactly that, so on test it lands near it, on either side), and the ensemble's
top-1 minus that control's with its paired-bootstrap 95% interval (fractions).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core import metrics
from ..core.cost import routed_flops
from ..core.frontier import best_within, pareto_flags
from .format import flops as fmt_flops
from .format import pct, pts

COST_SLACK = 0.05  # a control within 5% above the ensemble's inference FLOPs counts as "no more"
PREDICTION_KEYS = ("generalist", "ensemble", "longer_generalist", "student", "born_again", "hard_labels",
                   "two_generalists", "cascade")  # the models whose test predictions the frontier pairs


def _get(d, *keys):
    """``d[k1][k2]...``, or None where any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _plus(*parts):
    """The sum of training-compute parts, None if any part is unknown."""
    return None if any(p is None for p in parts) else float(sum(parts))


def _ms(seconds):
    return None if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)) else 1e3 * seconds


def _paired(predictions: dict, labels, a: str, b: str, bootstrap: int, seed: int):
    """The paired-bootstrap 95% interval of top-1(b) - top-1(a) from saved predictions."""
    if labels is None or a not in predictions or b not in predictions:
        return None
    y = np.asarray(labels)
    pa, pb = np.asarray(predictions[a]), np.asarray(predictions[b])
    if pa.shape != y.shape or pb.shape != y.shape:
        return None  # predictions of another test split (a stale file): no interval rather than a wrong one
    return metrics.paired_bootstrap(torch.from_numpy(pa == y), torch.from_numpy(pb == y), bootstrap, seed).get("ci95")


def build(ev: dict, ablation: dict | None = None, control: dict | None = None, student: dict | None = None,
          predictions: dict | None = None, labels=None, bootstrap: int = 2000, seed: int = 0) -> dict:
    """The frontier of a run from its JSON: ``ev`` (``evaluation.json``), ``ablation``
    (``ablation.json``), ``control`` (the longer generalist's ``metrics.json``), ``student``
    (``student/metrics.json``); ``predictions``: ``{key: (N,) class ids}`` of the models in
    :data:`PREDICTION_KEYS` and ``labels`` (N,) the test labels, for the intervals not
    recorded. Returns ``{"models": [...], "best_control": ... | None, ...}`` (see the module)."""
    predictions = predictions or {}
    cost = ev.get("cost") or {}
    tc = cost.get("train_compute") or {}
    g_train, s_train = tc.get("generalist"), tc.get("specialists")
    comps = (student or {}).get("comparisons") or {}
    ctrl = (student or {}).get("control") or {}
    # one timing protocol for every row: the student stage's, which times them side by side
    t = ev.get("timing") or {}
    ms = {"generalist": _ms(t.get("generalist_s_per_example")), "ensemble": _ms(t.get("routed_s_per_example"))}
    if comps:
        ms = {k: _ms(c.get("seconds_per_example")) for k, c in comps.items()}
    ms["longer_generalist"] = ms.get("generalist")  # the same network
    models = []

    def add(key, name, kind, top1, ci, flops, train):
        if top1 is None:
            return
        if ci is None and key != "generalist":
            ci = _paired(predictions, labels, "generalist", key, bootstrap, seed)
        models.append({"key": key, "model": name, "kind": kind, "top1": top1, "ci95_vs_generalist": ci,
                       "inference_flops": flops, "inference_ms": ms.get(key), "train_compute": train})

    f_g = cost.get("generalist_flops")
    add("generalist", "generalist", "generalist", _get(ev, "generalist", "top1"), [0.0, 0.0], f_g, g_train)
    m = ev.get("num_specialists", len(ev.get("per_specialist", [])))
    gate = _get(ev, "combine", "gate")
    add("ensemble", f"generalist + {m} specialists (routed{f', gate {gate:g}' if gate is not None else ''})",
        "ensemble", _get(ev, "ensemble", "top1"),
        _get(ev, "significance", "bootstrap", "ci95"), cost.get("ensemble_flops"), tc.get("ensemble"))

    by_id = {s["id"]: s for s in ev.get("per_specialist", [])}
    for r in _get(ablation, "subset_ablation", "rows") or []:
        if not 0 < r["k"] < m:  # k = 0 is the generalist and k = all the ensemble, above
            continue
        rows = [by_id.get(i) or {} for i in r["ids"]]
        parts = [(s.get("flops_per_example"), s.get("routed_fraction")) for s in rows]
        known = f_g is not None and all(f is not None and q is not None for f, q in parts)
        flops = routed_flops(f_g, [f for f, _ in parts], [q for _, q in parts]) if known else None
        add(f"ensemble_k{r['k']}", f"generalist + first {r['k']} specialists", "ensemble", r["top1"], r.get("ci95"),
            flops, _plus(g_train, *(s.get("train_compute") for s in rows)))

    control = control or (ablation or {}).get("control")
    if control:
        own = control.get("train_compute", control.get("train_samples"))
        add("longer_generalist", "generalist trained longer (compute-matched)", "control", control.get("test_top1"),
            None, control.get("inference_flops", f_g), _plus(g_train, own))

    if comps:
        teacher = student.get("teacher")
        below = {"ensemble": [g_train, s_train], "generalist": [g_train]}.get(teacher, [])
        sg = _plus(ctrl.get("second_generalist", {}).get("train_compute"))
        models_of_student = (
            ("student", student.get("inference_flops"), _plus(*below, student.get("train_compute")), None),
            ("born_again", _get(ctrl, "born_again", "inference_flops"),
             _plus(g_train, _get(ctrl, "born_again", "train_compute")), None),
            ("hard_labels", _get(ctrl, "hard_labels", "inference_flops"), _get(ctrl, "hard_labels", "train_compute"),
             None),
            ("two_generalists", _get(ctrl, "two_generalist_average", "inference_flops"), _plus(g_train, sg), None),
            ("cascade", _get(ctrl, "cascade", "inference_flops"), _plus(g_train, sg),
             _get(ctrl, "cascade", "ci95_vs_generalist")),
        )
        for key, flops, train, ci in models_of_student:
            if key in comps:
                add(key, comps[key]["name"], "control", comps[key]["test_top1"], ci,
                    flops if flops is not None else comps[key].get("flops_per_example"), train)

    for entry, on_front in zip(models, pareto_flags([e["top1"] for e in models],
                                                   [e["inference_flops"] for e in models])):
        entry["pareto"] = on_front
    return {"test_examples": ev.get("n"), "flops_unit": cost.get("unit"), "cost_slack": COST_SLACK,
            "models": models, "best_control": best_control(models, predictions, labels, bootstrap, seed)}


def best_control(models: list[dict], predictions: dict | None = None, labels=None, bootstrap: int = 2000,
                 seed: int = 0) -> dict | None:
    """The most accurate control at no more than the routed ensemble's inference FLOPs (times
    ``1 + COST_SLACK``), and the ensemble's top-1 minus its with the paired interval."""
    ens = next((e for e in models if e["key"] == "ensemble"), None)
    if ens is None or ens["inference_flops"] is None:
        return None
    budget = ens["inference_flops"] * (1 + COST_SLACK)
    i = best_within([e["top1"] for e in models], [e["inference_flops"] for e in models], budget,
                    [e["kind"] == "control" for e in models])
    if i is None:
        return None
    c = models[i]
    return {"key": c["key"], "model": c["model"], "top1": c["top1"], "inference_flops": c["inference_flops"],
            "ensemble_top1": ens["top1"], "ensemble_flops": ens["inference_flops"], "budget_flops": budget,
            "ensemble_minus_control": ens["top1"] - c["top1"],
            "ci95": _paired(predictions or {}, labels, c["key"], "ensemble", bootstrap, seed)}


def best_control_sentence(frontier: dict | None) -> str | None:
    """One sentence: the best control at the ensemble's inference cost and the ensemble's gap."""
    if not frontier:
        return None
    b = frontier.get("best_control")
    if b is None:
        return ("No control has been trained yet at no more than the routed ensemble's inference cost "
                "(the generalist trained longer, the students and the cascade are).")
    ci = b.get("ci95")
    interval = f", paired-bootstrap 95% interval [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] points" if ci else ""
    verdict = ("a difference this test set cannot tell from zero" if ci and ci[0] <= 0 <= ci[1] else
               "the specialists are worth their inference cost against it" if b["ensemble_minus_control"] > 0 else
               "the control does better for no more inference")
    gap = b["ensemble_minus_control"]
    return (f"Best control at no more than the ensemble's inference cost ({fmt_flops(b['ensemble_flops'])} per example, "
            f"{100 * frontier.get('cost_slack', COST_SLACK):.0f}% slack): {b['model']}, {pct(b['top1'])} top-1 at "
            f"{fmt_flops(b['inference_flops'])}; the ensemble ({pct(b['ensemble_top1'])}) minus it: "
            f"{pts(gap, ' points')}{interval} ({verdict}).")


def table(frontier: dict) -> list[str]:
    """Markdown rows: every model by cost, with its interval vs the generalist and the front."""
    models = frontier["models"]
    g = next((e for e in models if e["key"] == "generalist"), None)
    f_g = g["inference_flops"] if g else None
    rows = ["| model | test top-1 | 95% CI vs generalist | inference FLOPs / example | x generalist | ms / example "
            "| training compute (generalist examples) | Pareto |", "|---|---:|---|---:|---:|---:|---:|:-:|"]
    for e in sorted(models, key=lambda e: (e["inference_flops"] is None, e["inference_flops"] or 0, -e["top1"])):
        ci = e["ci95_vs_generalist"]
        f = e["inference_flops"]
        rows.append(f"| {e['model']} | {pct(e['top1'])} | "
                    + ("(reference)" if e["key"] == "generalist" else
                       f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] pts" if ci else "-")
                    + f" | {fmt_flops(f)} | " + (f"{f / f_g:.2f}x" if f is not None and f_g else "-")
                    + " | " + (f"{e['inference_ms']:.4f}" if e["inference_ms"] is not None else "-")
                    + " | " + (f"{e['train_compute']:,.0f}" if e["train_compute"] is not None else "-")
                    + f" | {'yes' if e['pareto'] else ''} |")
    return rows


def markdown(frontier: dict | None) -> list[str]:
    """``evaluation.md``'s section on accuracy and cost (nothing when there is no frontier)."""
    if not frontier or not frontier.get("models"):
        return []
    lines = ["## Accuracy and cost", "",
             "Every model of the run so far, by inference FLOPs per example (counted as the models run: a routed "
             "specialist only on its examples). Training compute counts everything it took to obtain the model, in "
             "generalist training examples (training FLOPs / the generalist's per example). Pareto: no other model "
             "is at least as accurate for no more FLOPs.", ""]
    lines += table(frontier)
    sentence = best_control_sentence(frontier)
    return lines + (["", sentence] if sentence else []) + ["", "![frontier](frontier.png)"]


__all__ = ["COST_SLACK", "PREDICTION_KEYS", "best_control", "best_control_sentence", "build", "markdown", "table"]
