"""Plots for the reports: PNG files a person would rather look at than read.

Every function draws on its own ``matplotlib.figure.Figure`` (no pyplot global state, so no
GUI backend is ever needed and plots are safe to make from any thread) and saves atomically
(temp file in the same folder, then ``os.replace``): a killed run never leaves half a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; Figure below does not need pyplot, but be explicit
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .io import atomic_write


def _save_png(fig: Figure, path) -> Path:
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
    fig = Figure(figsize=(size + 1.2, size), dpi=150 if not small else 110)
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
    fig = Figure(figsize=(6.4, 4))
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
