"""``ablation.md`` from ``ablation.json``: the subset ablation, the re-clustering ablation and
the controls."""

from __future__ import annotations

from .controls import controls_table
from .format import num


def render_markdown(a: dict, controls: list[dict] | None = None) -> str:
    """``ablation.md`` from ``ablation.json`` (``a``), with the controls table (``controls``:
    :func:`~specialists.reports.controls.control_rows`)."""
    g = a["generalist"]["test_top1"]
    lines = ["# Ablation over the number of specialists", "",
             f"Generalist test top-1: **{g:.4f}**.", ""]
    sub = a["subset_ablation"]
    lines += [f"## Subset ablation (first k specialists, ordered by {sub['order']})", "",
              "| k | top-1 | change | 95% CI of change | conditional n | cond. generalist | cond. ensemble | specialist samples |",
              "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in sub["rows"]:
        interval = f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if r.get("ci95") else "-"
        lines.append(f"| {r['k']} | {r['top1']:.4f} | {r['top1'] - g:+.4f} | {interval} | {r['conditional_count']} | "
                     f"{num(r['conditional_generalist_top1'])} | {num(r['conditional_ensemble_top1'])} | {r['train_samples']} |")
    if a.get("recluster"):
        lines += ["", "## Re-clustering ablation (find-subsets + train-specialists for each M)", "",
                  "| M asked | subsets | top-1 | change | cond. generalist | cond. ensemble | ARI | specialist samples |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in a["recluster"]:
            ari = f"{r['adjusted_rand_index']:.3f}" if r.get("adjusted_rand_index") is not None else "-"
            lines.append(f"| {r['num_specialists']} | {r['num_subsets']} | {r['top1']:.4f} | {r['top1'] - g:+.4f} | "
                         f"{num(r['conditional_generalist_top1'])} | {num(r['conditional_ensemble_top1'])} | {ari} | {r['train_samples']} |")
    if controls:  # the same table as the evaluation's: generalist, all specialists, then each control
        lines += ["", "## Controls: what the same extra compute buys otherwise", ""]
        lines += controls_table(g, sub["rows"][-1]["top1"], controls)
    return "\n".join(lines) + "\n"
