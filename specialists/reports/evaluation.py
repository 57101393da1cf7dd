"""``evaluation.md`` and the console summary of ``specialists run``, from ``evaluation.json``.

Accuracies in the JSON are fractions; the reports show percentages and signed points.
"""

from __future__ import annotations

from pathlib import Path

from .controls import controls_table
from .format import ci, num, pct, pts
from .frontier import best_control_sentence
from .frontier import markdown as frontier_markdown


def _headline(ev: dict) -> list[str]:
    g, e, ch = ev["generalist"], ev["ensemble"], ev["change"]
    rows = ["| metric | generalist | ensemble | change | relative |", "|---|---:|---:|---:|---:|",
            f"| top-1 | {pct(g['top1'])} | {pct(e['top1'])} | {pts(ch['top1_abs'])} | {pts(ch['top1_rel'], '%')} |",
            f"| top-5 | {pct(g['top5'])} | {pct(e['top5'])} | {pts(ch['top5_abs'])} | {pts(ch['top5_rel'], '%')} |",
            f"| NLL (nats) | {num(g['nll'])} | {num(e['nll'])} | {num(e['nll'] - g['nll'], '+.4f')} | |",
            f"| ECE | {num(g['ece'])} | {num(e['ece'])} | {num(e['ece'] - g['ece'], '+.4f')} | |"]
    return rows


def _significance_line(ev: dict) -> str:
    s = ev["significance"]
    mc, bs = s["mcnemar"], s["bootstrap"]
    return (f"Top-1 change {pts(bs['diff'], ' points')}, paired-bootstrap 95% CI {ci(bs.get('ci95'))} "
            f"({bs.get('samples', '?')} resamples); exact McNemar p = {mc['p_value']:.3g} "
            f"(ensemble right where the generalist was wrong: {mc['a_wrong_b_right']}, the reverse: {mc['a_right_b_wrong']}).")


def _conditional_lines(ev: dict) -> list[str]:
    c = ev["conditional"]
    return [f"On the {c['count']} of {ev['n']} test examples whose true class at least one specialist covers: "
            f"generalist {pct(c['generalist_top1'])} -> ensemble {pct(c['ensemble_top1'])} "
            f"({pts(c.get('change_abs'))}; top-5 {pct(c['generalist_top5'])} -> {pct(c['ensemble_top5'])})."]


def _coverage_table(ev: dict) -> list[str]:
    rows = ["| specialists covering the true class | test examples | generalist correct | ensemble correct "
            "| change in # correct | generalist top-1 | ensemble top-1 | change | relative change |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ev["by_coverage"]:
        rows.append(f"| {r.get('label', r['covered'])} | {r['count']} | {r['generalist_correct']} | {r['ensemble_correct']} "
                    f"| {r['ensemble_correct'] - r['generalist_correct']:+d} | {pct(r.get('generalist_top1'))} "
                    f"| {pct(r.get('ensemble_top1'))} | {pts(r.get('change'))} | {pts(r.get('relative_change'), '%')} |")
    return rows


def render_markdown(evaluation: dict, controls: list[dict] | None = None, frontier: dict | None = None) -> str:
    """``evaluation.md``: the evaluation dict as tables a person reads.

    ``controls``: rows for the controls table, each ``{"name", "test_top1", "note"}``
    (:func:`~specialists.reports.controls.control_rows`: what the same compute buys otherwise).
    ``frontier``: ``frontier.json`` (:mod:`~specialists.reports.frontier`): every model by
    accuracy and cost, and the best control at no more than the ensemble's inference cost.
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
        lines += ["", "## Controls: what the same extra compute buys otherwise", ""] + controls_table(ev["generalist"]["top1"], ev["ensemble"]["top1"], controls)
    fr = frontier_markdown(frontier)
    if fr:
        lines += [""] + fr

    if ev.get("routing"):
        r = ev["routing"]
        lines += ["", "## Routing", "",
                  f"Mean active specialists per example: {num(r['mean_active'], '.3f')} (max {r['max_active']}); "
                  f"examples with none active (answered by the generalist alone): {pct(r['no_active_fraction'], 1)}."]
    if ev.get("all_routing"):
        a = ev["all_routing"]
        lines.append(f"With `all` routing (every specialist on every example): top-1 {pct(a['top1'])} "
                     f"({pts(a['change_vs_generalist'])} vs the generalist, {pts(a['change_vs_routed'])} vs routed).")
    if ev.get("validation"):
        v = ev["validation"]
        lines += ["", f"On the validation split ({v['examples']} examples; where settings are chosen): generalist "
                  f"{pct(v['generalist']['top1'])}, routed ensemble {pct(v['ensemble']['top1'])} "
                  f"({pts(v['ensemble']['top1'] - v['generalist']['top1'])}), `all` routing "
                  f"{pct(v['all_routing']['top1'])}."]
        if v.get("gate"):
            lines += ["", "The gate (`combine.gate`: the specialists consulted only where the generalist's top "
                      "probability is below the threshold) on the validation split: each routing's top-1 and "
                      "inference FLOPs (over the generalist's) at each share of examples consulted.", "",
                      "| threshold | consulted | routed top-1 | routed FLOPs | `all` top-1 | `all` FLOPs |",
                      "|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {g['threshold']:.4g} | {pct(g['share'], 1)} | {pct(g['routed']['top1'])} "
                      f"| {g['routed']['flops_ratio']:.2f}x | {pct(g['all']['top1'])} | {g['all']['flops_ratio']:.2f}x |"
                      for g in v["gate"]]
    if ev.get("per_specialist"):
        lines += ["", "## Per specialist", "",
                  "Routed: test examples that activated it; accuracy of the generalist and of the ensemble on them. "
                  "Subset top-1: on test examples of its classes, restricted to its classes (its `metrics.json`).", "",
                  "| id | classes | routed | generalist | ensemble | change | subset top-1 (specialist / generalist) |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        for s in ev["per_specialist"]:
            names = ", ".join(s.get("names", [])[:6]) + (", ..." if len(s.get("names", [])) > 6 else "")
            lines.append(f"| {s['id']} | {s['size']}: {names} | {s['routed']} | {pct(s['generalist_top1'])} "
                         f"| {pct(s['ensemble_top1'])} | {pts(s['change'])} "
                         f"| {pct(s.get('subset_top1'))} / {pct(s.get('generalist_subset_top1'))} |")
    if ev.get("timing"):
        t = ev["timing"]
        lines += ["", "## Inference time", "",
                  f"Median of {t['repeats']} passes over one batch of {t['batch']} on `{t['device']}`"
                  + (f" ({t['threads']} threads)" if t.get("threads") else "")
                  + ", after a warm-up; the three take turns in every pass.", "",
                  "| model | ms per example | vs generalist |", "|---|---:|---:|",
                  f"| generalist alone | {1e3 * t['generalist_s_per_example']:.4f} | 1.00x |",
                  f"| routed ensemble | {1e3 * t['routed_s_per_example']:.4f} | {num(t['routed_over_generalist'], '.2f')}x |",
                  f"| `all` routing | {1e3 * t['all_s_per_example']:.4f} | {num(t['all_over_generalist'], '.2f')}x |"]
    if ev.get("cost"):
        c = ev["cost"]
        lines += ["", f"Counted FLOPs per example on the same {c['examples']} examples: routed ensemble "
                  f"{num(c['flops_ratio'], '.2f')}x the generalist's, `all` routing {num(c['all_flops_ratio'], '.2f')}x "
                  f"(measured time: {num(c['time_ratio'], '.2f')}x and {num(c['all_time_ratio'], '.2f')}x)."]
    if ev.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in ev["plots"]]
    return "\n".join(lines) + "\n"


def print_summary(evaluation: dict, run_dir=None, controls: list[dict] | None = None,
                  frontier: dict | None = None) -> str:
    """The quickstart's closing console text (returned; the caller prints it): the headline
    table, conditional accuracy, the Table-4 rows, the controls, the best control at no more
    than the ensemble's inference cost (``frontier``: ``frontier.json``) and where the plots
    are (joined to ``run_dir`` when given, else relative to the run directory)."""
    ev = evaluation
    lines = [f"Evaluation on the test split ({ev['n']} examples, {ev['num_specialists']} specialists)", ""]
    lines += _headline(ev) + ["", _significance_line(ev), ""] + _conditional_lines(ev) + ["", "Table 4:"]
    lines += _coverage_table(ev)
    if controls:
        lines += ["", "Controls (what the same extra compute buys otherwise):"] + controls_table(ev["generalist"]["top1"], ev["ensemble"]["top1"], controls)
    sentence = best_control_sentence(frontier)
    if sentence:
        lines += ["", sentence]
    plots = [str(Path(run_dir) / p) if run_dir is not None else p for p in ev.get("plots", [])]
    if plots:
        lines += ["", "Plots:"] + [f"  {p}" for p in plots]
    return "\n".join(lines)
