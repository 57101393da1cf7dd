"""``student.md`` from ``student/metrics.json``: the student beside its controls, and one
honest sentence on what the specialists added beyond distillation alone."""

from __future__ import annotations

import torch

from ..core import metrics
from .format import seconds
from .frontier import best_control_sentence

# The student stage's models, in the order its tables list them, and their names there
ROWS = ("generalist", "ensemble", "student", "hard_labels", "born_again", "two_generalists", "cascade")
NAMES = {"generalist": "generalist", "ensemble": "routed ensemble (generalist + specialists)",
         "born_again": "born-again student (teacher: generalist)",
         "two_generalists": "two-generalist average (second seed)", "hard_labels": "the same tree on hard labels",
         "cascade": "cascade: the second generalist only where the first is unsure"}


def comparisons(top1: dict, secs: dict, flops: dict, teacher: str, is_tree: bool) -> dict:
    """``metrics.json``'s ``comparisons``: each model's name, test top-1, seconds and FLOPs per
    example, for the models of ``top1`` (a key per model, see :data:`ROWS`)."""
    names = {**NAMES, "student": (f"soft tree distilled from the {teacher}" if is_tree else
                                  f"student of the {'ensemble' if teacher == 'ensemble' else teacher + ' teacher'}")}
    return {k: {"name": names[k], "test_top1": top1[k], "seconds_per_example": secs.get(k),
                "flops_per_example": flops.get(k)} for k in ROWS if k in top1}


def gain(p_control: torch.Tensor, p_student: torch.Tensor, y: torch.Tensor, bootstrap: int, seed: int) -> dict:
    """The student's test top-1 minus a control's (probabilities (N, C), labels (N,)), in points,
    with a paired-bootstrap 95% interval of ``bootstrap`` resamples."""
    boot = metrics.paired_bootstrap(metrics.topk_correct(p_control, y), metrics.topk_correct(p_student, y),
                                    bootstrap, seed)
    points = 100 * (metrics.accuracy(p_student, y) - metrics.accuracy(p_control, y))
    return {"points": points, "ci95_points": [100 * c for c in boot["ci95"]] if boot.get("ci95") else None,
            "test_examples": int(len(y))}


def gain_sentence(result: dict) -> str:
    """One honest sentence on what the specialists added beyond the born-again student."""
    c = result["comparisons"]
    gain = result.get("gain_over_born_again")
    if gain is None:
        if result["teacher"] != "ensemble":
            return (f"This student was distilled from the {result['teacher']} teacher, so it does not measure what the "
                    f"specialists add; run with student.teacher=ensemble and student.controls=true for that.")
        return ("The born-again control was not trained (student.controls=false), so what the specialists add "
                "beyond distillation alone is not measured here.")
    pts, ci_txt = gain["points"], _interval(gain)
    verdict = _verdict(gain, "a gain the specialists bring beyond distillation alone",
                       "so the specialists added nothing beyond distillation alone; the born-again student did better")
    ens_gain = 100 * (c["ensemble"]["test_top1"] - c["generalist"]["test_top1"])
    return (f"Distilling the routed ensemble instead of the generalist alone changed the student's test top-1 by "
            f"{pts:+.2f} points{ci_txt}, {verdict}; the routed ensemble itself is {ens_gain:+.2f} points over the "
            f"generalist" + (f" and the two-generalist average {100 * (c['two_generalists']['test_top1'] - c['generalist']['test_top1']):+.2f}."
                             if "two_generalists" in c else "."))


def _verdict(gain: dict, helped: str, hurt: str) -> str:
    """``helped`` or ``hurt`` by the sign of ``gain["points"]``, unless its interval holds 0."""
    ci = gain.get("ci95_points")
    if ci and ci[0] <= 0 <= ci[1]:
        return "a difference this test set cannot tell from zero"
    return helped if gain["points"] > 0 else hurt


def _interval(gain: dict) -> str:
    ci = gain.get("ci95_points")
    return (f" (95% paired-bootstrap interval [{ci[0]:+.2f}, {ci[1]:+.2f}], {gain['test_examples']} test examples)"
            if ci else f" ({gain['test_examples']} test examples)")


def tree_lines(result: dict) -> list[str]:
    """A soft tree student's section: max-path and mixture top-1 beside the same tree on hard
    labels, and one sentence on what distillation did for the tree."""
    t = result.get("tree")
    if not t:
        return []
    d, h = t["test_top1"]["distilled"], t["test_top1"]["hard_labels"]
    lines = ["## The soft decision tree", "",
             f"Depth {t['depth']} ({t['inner_nodes']} inner nodes, each one filter; {t['leaves']} leaves), "
             f"loss `{t['loss']}`, balance penalty {t['penalty']} (running-average window {t['window']} steps at the "
             f"root, doubling per level), learned inverse temperature {t['beta']:.3f}. The tree's prediction is the "
             "leaf of its most probable path (one readable path per decision); the mixture lets every leaf speak, "
             "weighted by its path probability.", "",
             "| soft tree | test top-1, max path | test top-1, mixture |", "|---|---:|---:|",
             f"| distilled from the {result['teacher']} | {d['max_path']:.4f} | {d['mixture']:.4f} |",
             f"| hard labels only | {h['max_path']:.4f} | {h['mixture']:.4f} |", ""]
    gain = t.get("gain_over_hard_labels")
    if gain:
        verdict = _verdict(gain, "distillation helped the tree",
                           "distillation did not help the tree: the hard-label tree did better")
        lines += [f"Distilling the {result['teacher']} into the tree changed its max-path test top-1 by "
                  f"{gain['points']:+.2f} points over the same tree trained on hard labels{_interval(gain)}: "
                  f"{verdict}.", ""]
    lines += ["Pictures: `tree.png` (every filter, level by level, and the leaves' top classes) and "
              "`tree_path.png` (one test example's path); `specialists predict RUN_DIR FILE --model student "
              "--explain` prints any input's path.", ""]
    return lines


def render_markdown(result: dict, frontier: dict | None = None) -> str:
    """``student.md`` from ``student/metrics.json`` (``result``); ``frontier``: ``frontier.json``,
    for the best control at no more than the ensemble's inference cost."""
    c = result["comparisons"]
    g = c["generalist"]["test_top1"]
    g_t = c["generalist"].get("seconds_per_example")
    lines = ["# Student: the ensemble distilled into one model", "",
             f"Teacher: **{result['teacher']}**; T = {result['temperature']}, alpha = {result['alpha']}, "
             f"loss {result['loss']}; student model `{result['model'].get('name')}`, {result['epochs']} epochs. "
             f"Inference time per example: median of {result['timing_repeats']} interleaved passes over {result['timing_examples']} test examples.", "",
             "| model | test top-1 | change vs generalist | inference time / example | x generalist |",
             "|---|---:|---:|---:|---:|"]
    for key in ROWS:
        if key not in c:
            continue
        r = c[key]
        t = r.get("seconds_per_example")
        rel = f"{t / g_t:.2f}x" if t and g_t else "-"
        lines.append(f"| {r['name']} | {r['test_top1']:.4f} | {r['test_top1'] - g:+.4f} | {seconds(t)} | {rel} |")
    agree = result.get("agreement_with_teacher")
    lines += ["", gain_sentence(result), ""]
    cascade = result.get("control", {}).get("cascade")
    if cascade:
        where = ("on every example (the ensemble costs as much as two generalists)" if cascade["threshold"] > 1 else
                 f"where the first's top probability is below {cascade['threshold']:.4f}")
        lines += [f"The cascade consults the second generalist {where}: on "
                  f"{cascade['consulted_fraction']['test']:.1%} of the test examples "
                  f"({cascade['consulted_fraction']['val']:.1%} of validation, fitted so that it costs what the routed "
                  f"ensemble does: {cascade['target_flops']:.4g} FLOPs per example; {cascade['inference_flops']:.4g} "
                  f"measured on test).", ""]
    best = best_control_sentence(frontier)
    if best:
        lines += [best, ""]
    lines += tree_lines(result)
    if agree is not None:
        lines += [f"The student agrees with its teacher's top-1 on {agree:.1%} of the test examples "
                  f"(with the routed ensemble on {result['agreement_with_ensemble']:.1%}).", ""]
    api = result.get("teacher_api")
    if api:
        asked, got = api["inputs"], api["answered"]
        lines += [f"The API teacher ({api['url']}) answered {got['train']} of {asked['train']} training texts, "
                  f"{got['unlabelled']} of {asked['unlabelled']} unlabelled texts and {got['test']} of "
                  f"{asked['test']} test texts; {api['requests_this_run']} requests in this run, "
                  f"{api['requests_total']} in all (budget: {api['budget'] or 'none'}), the rest from "
                  f"`{api['cache']}`.", ""]
    if result.get("train_time_ratio_vs_generalist"):
        lines += [f"Training: {result['train_seconds_per_epoch']:.2f} s per student epoch, "
                  f"{result['train_time_ratio_vs_generalist']:.2f}x the generalist's "
                  f"({result['generalist_train_seconds_per_epoch']:.2f} s, {result.get('generalist_epoch_time_source')}; "
                  f"both including the per-epoch evaluation). `benchmarks/student_cost.py` measures this ratio "
                  f"without evaluation, on one machine in one process.", ""]
    return "\n".join(lines)


def control_rows(result: dict) -> list[dict]:
    """The student stage's rows ``{"name", "test_top1", "note"}`` for the controls table
    (``result``: ``student/metrics.json``)."""
    c = result["comparisons"]
    rows = []
    t = seconds(c["student"].get("seconds_per_example"))
    for key, note in (("student", f"one model distilled from the {result['teacher']} teacher ({t} per example)"),
                      ("hard_labels", "the same soft tree, same steps, trained on the labels alone"),
                      ("born_again", "same student, same steps, taught by the generalist alone"),
                      ("two_generalists", "a second generalist (seed + 1) averaged with the first"),
                      ("cascade", "the second generalist only where the first is unsure, at the ensemble's FLOPs")):
        if key in c:
            rows.append({"name": c[key]["name"], "test_top1": c[key]["test_top1"], "note": note})
    return rows
