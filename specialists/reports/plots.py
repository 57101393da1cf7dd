"""Plots for the reports: PNG files a person would rather look at than read.

Every function draws on its own ``matplotlib.figure.Figure`` (no pyplot global state, so no
GUI backend is ever needed and plots are safe to make from any thread) and saves atomically
(temp file in the same folder, then ``os.replace``): a killed run never leaves half a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..rundir.io import atomic_write


def _figure(**kwargs):
    """A new ``matplotlib.figure.Figure`` (matplotlib imported on first use: it takes 0.4 s)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save_png(fig, path) -> Path:
    """Render ``fig`` to ``path`` atomically (temp file + ``os.replace``)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _subset_order(c: int, subsets) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Class order putting each subset's classes together, and each subset's block.

    A class goes where its first subset puts it (overlapping ``nearest`` subsets therefore
    draw smaller blocks after the first); classes in no subset come last. Returns the order
    (C,) and a list of (start, length) positions per subset, in subset order.
    """
    seen = np.zeros(c, dtype=bool)
    parts, blocks, pos = [], [], 0
    for s in subsets:
        s = np.asarray(s, dtype=np.int64).ravel()
        if s.size and (s.min() < 0 or s.max() >= c):
            raise ValueError(f"subsets must hold class ids in [0, {c})")
        new = np.unique(s[~seen[s]])  # sorted, first appearance only
        seen[new] = True
        parts.append(new)
        blocks.append((pos, len(new)))
        pos += len(new)
    parts.append(np.flatnonzero(~seen))
    return np.concatenate(parts).astype(np.int64), blocks


def _block_average(m: np.ndarray, order: np.ndarray, b: int, rows_per_step: int = 1024) -> np.ndarray:
    """``m[order][:, order]`` averaged over b x b blocks (last blocks partial), as float32.

    Gathers a band of reordered rows at a time (``rows_per_step`` x C), so neither the
    reordered C x C matrix nor any float64 C x C array is ever built.
    """
    if m.flags.f_contiguous and not m.flags.c_contiguous:
        # e.g. normalize_columns' output: gather rows of the C-ordered transpose instead
        # (contiguous reads); the block average of m.T is the transpose of m's.
        return _block_average(m.T, order, b, rows_per_step).T
    c = len(order)
    starts = np.arange(0, c, b)
    counts = np.diff(np.append(starts, c)).astype(np.float32)
    out = np.empty((len(starts), len(starts)), dtype=np.float32)
    step = max(1, rows_per_step // b) * b  # whole blocks per band
    for r0 in range(0, c, step):
        pos = order[r0:r0 + step]
        band = np.asarray(m[np.ix_(pos, order)], dtype=np.float32)  # (R, C), one gather
        col_sums = np.add.reduceat(band, starts, axis=1)              # (R, nb)
        rel = np.arange(0, len(pos), b)
        sums = np.add.reduceat(col_sums, rel, axis=0)                 # (rows blocks, nb)
        i0 = r0 // b
        out[i0:i0 + len(rel)] = sums / (counts[i0:i0 + len(rel), None] * counts[None, :])
    return out


def plot_covariance(matrix, subsets, path, class_names=None, title=None, max_pixels: int = 1000) -> Path:
    """Heatmap of a class-by-class matrix with the subsets as blocks on the diagonal.

    Args:
        matrix: (C, C) covariance, raw or normalized (numpy or torch; float32 is read
            without copying the whole matrix).
        subsets: list of arrays of class ids. Classes are reordered so each subset's classes
            are contiguous (a class in several subsets sits in the first), classes in no
            subset last; each subset's block is outlined.
        path: PNG to write (atomically; parent folders are created).
        class_names: optional C names, shown on the axes when C <= 60 (else ids, or nothing
            for larger C).
        title: figure title (default: sizes and the downsampling factor).
        max_pixels: for large C the matrix is block-averaged to at most this many pixels per
            side (15,000 classes -> 15 x 15 blocks): readable and fast.

    Colors are symmetric around 0 (red positive, blue negative), clipped at the 99th
    percentile of |off-diagonal| so a dominant diagonal (raw covariance) does not wash out
    the structure.
    """
    if hasattr(matrix, "detach"):  # torch tensor; no hard torch import needed here
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square (C, C), got shape {m.shape}")
    c = m.shape[0]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} names for {c} classes")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    order, blocks = _subset_order(c, list(subsets))
    b = max(1, math.ceil(c / max_pixels))
    img = _block_average(m, order, b)

    # Color limit from off-diagonal pixels (the diagonal is each class's own variance).
    off = ~np.eye(img.shape[0], dtype=bool)
    vals = np.abs(img[off]) if off.any() else np.abs(img).ravel()
    vals = vals[np.isfinite(vals)]
    vmax = float(np.percentile(vals, 99)) if vals.size else 1.0
    if not vmax > 0:
        vmax = float(np.nanmax(np.abs(img))) if img.size and np.isfinite(img).any() else 1.0
        vmax = vmax if vmax > 0 else 1.0

    small = c <= 60
    size = 9.0 if small else 8.0
    from matplotlib.patches import Rectangle

    fig = _figure(figsize=(size + 1.2, size), dpi=150 if not small else 110)
    ax = fig.add_subplot(1, 1, 1)
    # extent in class positions, so subset outlines need no rescaling after downsampling.
    im = ax.imshow(img, cmap="RdBu_r", vmin=-vmax, vmax=vmax, extent=(0, c, c, 0),
                   interpolation="nearest" if small else "antialiased", aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    lw = 1.2 if len(blocks) <= 30 else 0.6
    for start, length in blocks:
        if length:
            ax.add_patch(Rectangle((start, start), length, length, fill=False, edgecolor="black", linewidth=lw))
    covered = sum(length for _, length in blocks)
    if 0 < covered < c:  # classes in no subset: left to the generalist
        for line in (ax.axhline, ax.axvline):
            line(covered, color="gray", linestyle="--", linewidth=0.8)

    if small:
        labels = [str(class_names[i]) if class_names is not None else str(i) for i in order]
        ticks = np.arange(c) + 0.5
        fs = 8 if c <= 30 else 6
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=fs)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=fs)
    else:
        ax.set_xlabel("classes, grouped by subset")
        ax.set_ylabel("classes, grouped by subset")
    if title is None:
        title = f"{c} classes, {len(blocks)} subsets"
        if covered < c:
            title += f", {c - covered} in none (dashed)"
        if b > 1:
            title += f"; {b}x{b} block means"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_curves(history: list[dict], path, title: str | None = None) -> Path:
    """Training curves: train loss (left axis) and val/test top-1 (right axis) per epoch."""
    fig = _figure(figsize=(6.4, 4))
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "k-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    for key, style in (("val_top1", "b-o"), ("test_top1", "r-s")):
        if history and key in history[0]:
            ax2.plot(epochs, [h[key] for h in history], style, ms=3, label=key.replace("_", " "))
    ax2.set_ylabel("top-1 accuracy")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="center right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_ablation(a: dict, path, title: str | None = None) -> Path:
    """Ensemble top-1 and conditional accuracy against the number of specialists (subset
    ablation as lines, re-clustering runs as markers), with the generalist and the
    compute-matched control as horizontal references."""
    fig = _figure(figsize=(7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    rows = a["subset_ablation"]["rows"]
    ks = [r["k"] for r in rows]
    x = [max(k, 0.5) for k in ks]  # log axis: k = 0 drawn at 0.5
    ax.plot(x, [r["top1"] for r in rows], "b-o", ms=4, label="ensemble top-1 (first k)")
    ax.plot(x, [r["conditional_ensemble_top1"] for r in rows], "g--s", ms=4,
            label="conditional top-1 (true class covered)")
    ax.plot(x, [r["conditional_generalist_top1"] for r in rows], color="g", ls=":", lw=1,
            label="generalist, same covered examples")
    rc = a.get("recluster") or []
    if rc:
        ax.plot([r["num_specialists"] for r in rc], [r["top1"] for r in rc], "m^", ms=7,
                label="re-clustered: ensemble top-1")
    ax.axhline(a["generalist"]["test_top1"], color="k", lw=1, label="generalist")
    if a.get("control"):
        ax.axhline(a["control"]["test_top1"], color="r", lw=1, ls="-.", label="generalist trained longer")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("number of specialists (k = 0 at the left)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "Ablation over the number of specialists")
    fig.tight_layout()
    return _save_png(fig, path)


def plot_by_coverage(rows: list[dict], path, title: str | None = None) -> Path:
    """Hinton's Table 4 as bars: top-1 of the generalist and of the ensemble per group of test
    examples by the number of specialists covering the true class, with each group's size.

    ``rows``: ``evaluation.json``'s ``by_coverage`` ({covered, label, count,
    generalist_correct, ensemble_correct}); empty groups are drawn as gaps.
    """
    fig = _figure(figsize=(max(5.0, 1.0 + 0.9 * len(rows)), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    n = np.array([r["count"] for r in rows], dtype=float)
    safe = np.where(n > 0, n, 1)
    g = np.where(n > 0, np.array([r["generalist_correct"] for r in rows]) / safe, np.nan)
    e = np.where(n > 0, np.array([r["ensemble_correct"] for r in rows]) / safe, np.nan)
    w = 0.38
    ax.bar(x - w / 2, g, w, color="#8c8c8c", label="generalist")
    ax.bar(x + w / 2, e, w, color="#1f77b4", label="generalist + specialists")
    for i, r in enumerate(rows):
        top = np.nanmax([g[i], e[i]]) if r["count"] else 0.0
        d = r["ensemble_correct"] - r["generalist_correct"]
        ax.annotate(f"n={r['count']}" + (f"\n{d:+d}" if r["count"] else ""), (x[i], top), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([str(r.get("label", r["covered"])) for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("specialists covering the true class")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_ylim(0, 1.32)  # headroom: the legend sits above the bars and their labels
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    legend = "top-1 by specialist coverage (n = test examples, then the change in # correct)"
    ax.set_title(f"{title}\n{legend}" if title else legend[0].upper() + legend[1:], fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_specialists(rows: list[dict], path, title: str | None = None) -> Path:
    """Per specialist: the top-1 change (ensemble minus generalist, in points) on the test
    examples routed to it, and its own subset top-1 gain over the generalist's (from its
    ``metrics.json``), with the number of routed examples on each bar.

    ``rows``: ``evaluation.json``'s ``per_specialist`` ({id, routed, change, subset_top1,
    generalist_subset_top1}).
    """
    fig = _figure(figsize=(max(5.0, 1.2 + 0.45 * len(rows)), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))

    def pts(v):
        return np.nan if v is None else 100.0 * v

    routed = np.array([pts(r.get("change")) for r in rows], dtype=float)
    own = np.array([pts(None if r.get("subset_top1") is None or r.get("generalist_subset_top1") is None
                        else r["subset_top1"] - r["generalist_subset_top1"]) for r in rows], dtype=float)
    w = 0.38
    ax.bar(x - w / 2, routed, w, color="#1f77b4", label="ensemble - generalist, on routed examples")
    ax.bar(x + w / 2, own, w, color="#ff7f0e", label="specialist - generalist, within its subset")
    for i, r in enumerate(rows):
        v = routed[i] if np.isfinite(routed[i]) else 0.0
        ax.annotate(f"n={r['routed']}", (x[i] - w / 2, v), xytext=(0, 3 if v >= 0 else -10),
                    textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([str(r["id"]) for r in rows], fontsize=8 if len(rows) <= 30 else 6)
    ax.set_xlabel("specialist id")
    ax.set_ylabel("top-1 change (points)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "Per specialist: accuracy change", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def _as_picture(w: np.ndarray, input_shape: tuple) -> tuple[np.ndarray, dict]:
    """One filter (D,) -> an image to draw and ``imshow`` arguments: in the input's shape for
    images (colour filters mapped to [0, 1] around grey, one-channel ones on a diverging map
    centred on 0), a one-row strip for vectors."""
    scale = float(np.abs(w).max()) or 1.0
    if len(input_shape) == 3 and input_shape[0] == 3:
        return np.clip(0.5 + 0.5 * w.reshape(input_shape).transpose(1, 2, 0) / scale, 0, 1), {}
    shape = input_shape[1:] if len(input_shape) == 3 else (1, input_shape[0])
    return w.reshape(shape), {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale}


def _draw_filter(ax, w: np.ndarray, input_shape: tuple) -> None:
    img, kw = _as_picture(w, input_shape)
    ax.imshow(img, interpolation="nearest", aspect="auto" if len(input_shape) != 3 else "equal", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def _top_text(q: np.ndarray, class_names, k: int = 2) -> str:
    top = np.argsort(-q)[:k]
    return "\n".join(f"{class_names[c][:12]} {q[c]:.2f}" for c in top)


def plot_tree(filters: np.ndarray, leaf_q: np.ndarray, class_names, input_shape: tuple, path,
              max_levels: int = 5, subject: str = "soft decision tree") -> Path:
    """A soft decision tree: every inner node's filter drawn in the input's shape, level by
    level, and every leaf's top classes under them.

    ``filters`` (N, D): the inner nodes in heap order (``beta * w_i`` is what the node
    thresholds; the picture is ``w_i``); ``leaf_q`` (L, C). Only the top ``max_levels``
    levels are drawn (2^5 = 32 leaves fill a page); below the cut each box shows the mean
    distribution of the leaves of that subtree.
    """
    depth = int(round(math.log2(len(leaf_q))))
    levels = min(depth, max_levels)
    boxes = 2 ** levels
    q = leaf_q.reshape(boxes, -1, leaf_q.shape[1]).mean(1)  # leaves grouped by the subtree they sit in
    width = max(8.0, 0.62 * boxes)
    fig = _figure(figsize=(width, 1.3 * (levels + 1) + 0.4))
    row_h = 0.9 / (levels + 1)
    line_ax = fig.add_axes((0, 0, 1, 1), zorder=-1)
    line_ax.set_xlim(0, 1)
    line_ax.set_ylim(0, 1)
    line_ax.axis("off")
    centres = {}
    for d in range(levels + 1):
        n = 2 ** d
        size = min(row_h * 0.8 * width / (1.3 * (levels + 1) + 0.4), 0.9 / n)  # a square in inches
        y = 0.92 - (d + 1) * row_h
        for j in range(n):
            cx = (j + 0.5) / n
            centres[(d, j)] = (cx, y + row_h * 0.4)
            if d > 0:
                px, py = centres[(d - 1, j // 2)]
                line_ax.plot([px, cx], [py - row_h * 0.4, y + row_h * 0.8], color="0.7", lw=0.6)
            if d < levels:
                ax = fig.add_axes((cx - size / 2, y, size, row_h * 0.8))
                _draw_filter(ax, filters[2 ** d - 1 + j], input_shape)
                if n <= 16:
                    ax.set_title(f"{2 ** d - 1 + j}", fontsize=6, pad=1)
            else:
                line_ax.text(cx, y + row_h * 0.7, _top_text(q[j], class_names), ha="center", va="top",
                             fontsize=6 if n <= 16 else 5, rotation=0 if n <= 16 else 90)
    cut = ("" if levels == depth else
           f"\nlevel{'s' if depth - levels > 1 else ''} {levels}{f'..{depth - 1}' if depth - levels > 1 else ''} not drawn: "
           f"under each box, the mean of the {2 ** (depth - levels)} leaves below it")
    legend = "grey = 0" if len(input_shape) == 3 and input_shape[0] == 3 else "red +, blue -"
    fig.suptitle(f"{subject}, depth {depth}: filters ({legend}) and leaves' top classes{cut}", fontsize=9)
    return _save_png(fig, path)


def plot_tree_path(example: np.ndarray, filters: np.ndarray, decisions: list[dict], leaf_q: np.ndarray, class_names,
                   input_shape: tuple, path, k: int = 5, title: str | None = None) -> Path:
    """One example's path through a soft tree: the input, each node's filter on the way with
    its probability of the turn taken, and the top-k classes of the leaf it ends in.

    ``example`` (D,) normalized; ``filters`` (depth, D): the nodes on the path; ``decisions``
    as :meth:`specialists.models.SoftDecisionTree.decision_paths` gives them; ``leaf_q`` (C,).
    """
    n = len(decisions)
    fig = _figure(figsize=(1.3 * (n + 3), 2.4))
    ax = fig.add_subplot(1, n + 3, 1)
    if len(input_shape) == 3:  # the input as a picture: min-max scaled, grey for one channel
        img = example.reshape(input_shape).transpose(1, 2, 0)
        img = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
        ax.imshow(img[..., 0] if input_shape[0] == 1 else img, cmap="gray", interpolation="nearest")
    else:
        _draw_filter(ax, example, input_shape)
    ax.set_title("input", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for i, d in enumerate(decisions):
        ax = fig.add_subplot(1, n + 3, i + 2)
        _draw_filter(ax, filters[i], input_shape)
        ax.set_title(f"node {d['node']}\n{d['turn']} {d['prob']:.2f}", fontsize=7)
    top = np.argsort(-leaf_q)[:k][::-1]
    ax = fig.add_subplot(1, n + 3, (n + 2, n + 3))
    ax.barh(np.arange(len(top)), leaf_q[top], color="#1f77b4")
    ax.set_yticks(np.arange(len(top)))
    ax.set_yticklabels([class_names[c][:14] for c in top], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_title("leaf", fontsize=8)
    ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(title or "one example's path", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_frontier(models: list[dict], path, title: str | None = None) -> Path:
    """Test top-1 against inference FLOPs per example (log x) for every model of
    ``frontier.json`` (``models``), with its 95% interval (the paired interval of its
    difference to the generalist, drawn around its own top-1) and the Pareto front as a step
    line. Each point is numbered (models at the same point share a number) and the numbers are
    named beside the axes, so crowded points stay readable. Models without FLOPs are left out."""
    pts = sorted((m for m in models if m.get("inference_flops") and m.get("top1") is not None),
                 key=lambda m: (m["inference_flops"], -m["top1"]))
    fig = _figure(figsize=(10, 4.8))
    ax = fig.add_axes((0.08, 0.11, 0.5, 0.8))
    g = next((m["top1"] for m in models if m["key"] == "generalist"), None)
    colors = {"generalist": "k", "ensemble": "#1f77b4", "control": "#d62728"}
    for m in pts:
        x, y, ci = m["inference_flops"], m["top1"], m.get("ci95_vs_generalist")
        yerr = None
        if ci and g is not None:  # the interval of top-1 - generalist, around this model's top-1
            yerr = [[max(0.0, y - (g + ci[0]))], [max(0.0, g + ci[1] - y)]]
        ax.errorbar([x], [y], yerr=yerr, fmt="o", ms=5, capsize=3, lw=1, color=colors.get(m["kind"], "gray"),
                    mfc="white" if not m.get("pareto") else None)
    points: dict = {}  # models at the same point share one number
    for m in pts:
        points.setdefault((m["inference_flops"], m["top1"]), []).append(m["model"])
    key = []
    for i, ((x, y), names) in enumerate(points.items(), 1):
        ax.annotate(str(i), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
        key.append(f"{i}: {' = '.join(names)}")
    fig.text(0.62, 0.91, "\n".join(key), fontsize=7, va="top", ha="left", wrap=True)
    right = max((m["inference_flops"] for m in pts), default=1.0) * 1.3
    front = sorted((m["inference_flops"], m["top1"]) for m in pts if m.get("pareto"))
    if front:  # a staircase, carried on to the right edge: what each budget buys at best
        xs, ys = zip(*front, (right, front[-1][1]))
        ax.step(xs, ys, where="post", color="#2ca02c", lw=1.2, alpha=0.8, label="Pareto front")
    for kind, color in colors.items():
        ax.plot([], [], "o", color=color, ms=5, label=kind)
    ax.legend(fontsize=7, loc="best")
    ax.set_xscale("log")
    if pts:
        ax.set_xlim(pts[0]["inference_flops"] / 1.15, right)
    ax.set_xlabel("inference FLOPs per example (log scale)")
    ax.set_ylabel("test top-1")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "Accuracy against inference cost (filled: on the Pareto front)", fontsize=9)
    return _save_png(fig, path)
