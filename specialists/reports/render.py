"""Every report of a run, rendered from the artifacts on disk (JSON, .npy), never from memory.

Each function renders one report and does nothing when its input is not there yet. Which
reports a stage's results feed is a column of the stage table (``specialists.stages``); the
pipeline calls them after the stage, so a report is re-rendered exactly when something it
shows has changed, and no stage renders another stage's report.
"""

from __future__ import annotations

import torch

from ..core.covariance import normalize_columns
from ..data import batcher_for
from ..rundir import Run
from ..rundir.config import TREE, student_model_config
from ..rundir.io import read_json, read_npy, write_json, write_text
from . import ablation, evaluation, student
from . import frontier as frontier_report
from . import summary as summary_table
from .controls import control_rows
from .plots import (
    plot_ablation,
    plot_by_coverage,
    plot_covariance,
    plot_curves,
    plot_frontier,
    plot_specialists,
    plot_tree,
    plot_tree_path,
)

MAX_NAMED_CLASSES = 60  # the covariance plot names classes up to this many


def curves(run: Run) -> None:
    """``generalist/curves.png``: loss and accuracy per epoch."""
    history = read_json(run.generalist.metrics)["history"]
    plot_curves(history, run.generalist.curves, title=f"generalist ({run.cfg.model.name} on {run.cfg.data.name})")


def covariance(run: Run) -> None:
    """``subsets/covariance.png``: the normalized covariance with the subsets as blocks."""
    m = read_json(run.subsets_metrics)
    subsets = [e["classes"] for e in run.load_subsets()]
    names = run.data_info()["class_names"]
    points = normalize_columns(read_npy(run.covariance_npy), m["normalize"])
    plot_covariance(points, subsets, run.covariance_png, class_names=names if len(names) <= MAX_NAMED_CLASSES else None,
                    title=f"{m['normalize']} of the generalist's probabilities, {len(subsets)} subsets")


def evaluation_plots(run: Run) -> None:
    """``evaluation/by_coverage.png`` (Table 4) and ``evaluation/specialists.png``."""
    ev = read_json(run.evaluation_json)
    by_coverage, per_specialist = run.evaluation_plots
    plot_by_coverage(ev["by_coverage"], by_coverage,
                     title=f"{ev['num_specialists']} specialists, test split (n={ev['n']})")
    plot_specialists(ev["per_specialist"], per_specialist)


def frontier(run: Run) -> None:
    """``evaluation/frontier.json`` and ``frontier.png``: every model of the run so far by
    accuracy and cost, the Pareto front, the best control at the ensemble's inference cost
    (rendered before the reports that name it)."""
    if not run.evaluation_json.exists():
        return

    def optional(path):
        return read_json(path) if path.exists() else None

    preds = {k: read_npy(run.predictions(k)) for k in frontier_report.PREDICTION_KEYS if run.predictions(k).exists()}
    labels = read_npy(run.test_labels_npy) if run.test_labels_npy.exists() else None
    fr = frontier_report.build(read_json(run.evaluation_json), optional(run.ablation_json), optional(run.control.metrics),
                               optional(run.student.metrics), preds, labels, run.cfg.evaluate.bootstrap, run.cfg.seed)
    write_json(run.frontier_json, fr)
    plot_frontier(fr["models"], run.frontier_png)


def _frontier(run: Run) -> dict | None:
    """``frontier.json`` as the last :func:`frontier` wrote it (None before the first)."""
    return read_json(run.frontier_json) if run.frontier_json.exists() else None


def evaluation_report(run: Run) -> None:
    """``evaluation/evaluation.md``, with every control trained so far and the accuracy-cost
    frontier."""
    if run.evaluation_json.exists():
        write_text(run.evaluation_md, evaluation.render_markdown(read_json(run.evaluation_json), control_rows(run),
                                                                 _frontier(run)))


def ablation_plot(run: Run) -> None:
    """``ablation/ablation.png``."""
    plot_ablation(read_json(run.ablation_json), run.ablation_png)


def ablation_report(run: Run) -> None:
    """``ablation/ablation.md``, with every control trained so far."""
    if run.ablation_json.exists():
        write_text(run.ablation_md, ablation.render_markdown(read_json(run.ablation_json), control_rows(run)))


def student_report(run: Run) -> None:
    """``student/student.md``."""
    write_text(run.student_md, student.render_markdown(read_json(run.student.metrics), _frontier(run)))


def tree_plots(run: Run) -> None:
    """A soft tree student's ``student/tree.png`` (its filters and leaves) and
    ``student/tree_path.png`` (the path of the first test example)."""
    model_cfg = student_model_config(run.cfg)
    if model_cfg.name != TREE or not run.student.weights.exists():
        return
    info, cpu = run.data_info(), torch.device("cpu")
    shape, names = tuple(info["input_shape"]), info["class_names"]
    tree = run.load_model(run.student, info["num_classes"], model_cfg).to(cpu)
    filters = tree.inner.weight.detach().numpy()
    plot_tree(filters, tree.leaf_log_q().exp().detach().numpy(), names, shape, run.tree_png,
              subject=f"soft decision tree student (teacher: {run.cfg.student.teacher})")
    x = batcher_for(run.data, run.data.test, cpu).batch(torch.arange(1))[0]
    (path,) = tree.decision_paths(x)
    plot_tree_path(x[0].flatten().numpy(), filters[[d["node"] for d in path["decisions"]]], path["decisions"],
                   path["leaf_q"].numpy(), names, shape, run.tree_path_png,
                   title=f"test example 0 (class {names[int(run.data.test.y[0])]}): path probability "
                         f"{path['path_prob']:.3f}")


def run_summary(run: Run) -> str:
    """What ``specialists run`` prints last: the evaluation table with the controls, and where
    every report and plot of the run is."""
    if not run.evaluation_json.exists():
        return f"no evaluation in {run.dir} yet"
    ev = read_json(run.evaluation_json)
    shown = set(ev.get("plots", []))
    reports = sorted(str(p) for p in run.dir.glob("*/*") if p.suffix in (".md", ".png") and run.rel(p) not in shown)
    return "\n".join([evaluation.print_summary(ev, run.dir, control_rows(run), _frontier(run)), "", "Reports:"]
                     + [f"  {p}" for p in reports])


def summary(run: Run) -> None:
    """``summary.csv``: one row per model so far (rendered after every stage)."""
    write_text(run.summary_csv, summary_table.render_csv(summary_table.rows(run.dir)))
