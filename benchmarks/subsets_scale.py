"""Class-subset discovery at JFT scale: 15,000 classes, 61 specialists (Hinton et al., sec. 5).

Generates synthetic generalist probabilities with planted groups of confusable classes,
then times each step of ``specialists.core`` (covariance, kmeans, subsets) (covariance, normalization, both k-means
methods, both subset modes, statistics) and the downsampled covariance plot. Prints seconds
per step, the total, the peak resident memory (``ru_maxrss``) and the adjusted Rand index of
the clusters against the planted groups (a quality check, not a timing).

    python benchmarks/subsets_scale.py                       # 15000 classes x 20000 examples
    python benchmarks/subsets_scale.py --classes 2000 --examples 4000 --clusters 20

Target on a 2-core, 24 GiB machine: under 3 minutes and 8 GiB in total. Every C x C array is
float32 (15k^2 x 4 B = 0.9 GB); at most two are alive (covariance and normalized points).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from specialists.core.covariance import covariance, normalize_columns  # noqa: E402
from specialists.core.kmeans import kmeans  # noqa: E402
from specialists.core.subsets import adjusted_rand_index, select_subsets, subset_stats  # noqa: E402
from specialists.reports.plots import plot_covariance  # noqa: E402


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic_probs(classes: int, examples: int, groups: int, seed: int = 0, chunk: int = 2048):
    """Planted-hierarchy probabilities (examples, classes) float32, generated chunk by chunk.

    Classes are split into ``groups`` near-equal groups under a random permutation of ids (so
    groups are not contiguous id ranges). Each example of true class y puts a random peak
    (0.3-0.9) on y, 30% of the rest spread over y's group with uniform random weights, and
    the remainder as uniform background noise over all classes: the generalist confuses
    classes within a group. Returns (probs, labels (N,), group of each class (C,)).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(classes, generator=g)
    group_of = torch.empty(classes, dtype=torch.long)
    group_of[perm] = torch.arange(classes) * groups // classes
    # Padded member table: row = group, columns = its classes (pad with a repeat + weight 0).
    sizes = torch.bincount(group_of, minlength=groups)
    gmax = int(sizes.max())
    members = torch.zeros((groups, gmax), dtype=torch.long)
    valid = torch.zeros((groups, gmax), dtype=torch.bool)
    order = torch.argsort(group_of, stable=True)
    offsets = torch.cumsum(sizes, 0) - sizes
    for j in range(groups):
        members[j, : sizes[j]] = order[offsets[j]: offsets[j] + sizes[j]]
        members[j, sizes[j]:] = members[j, 0]
        valid[j, : sizes[j]] = True

    labels = torch.randint(classes, (examples,), generator=g)
    probs = np.empty((examples, classes), dtype=np.float32)
    for start in range(0, examples, chunk):
        y = labels[start:start + chunk]
        n = len(y)
        p = torch.rand((n, classes), generator=g)
        p *= 1.0 / p.sum(1, keepdim=True)                     # background, sums to 1
        peak = 0.3 + 0.6 * torch.rand((n, 1), generator=g)
        rest = 1.0 - peak
        w = torch.rand((n, gmax), generator=g) * valid[group_of[y]]
        w *= 1.0 / w.sum(1, keepdim=True)                     # group spread, sums to 1
        p *= 0.7 * rest
        p.scatter_add_(1, members[group_of[y]], w * (0.3 * rest))
        p[torch.arange(n), y] += peak[:, 0]
        probs[start:start + n] = p.numpy()
    return probs, labels.numpy(), group_of.numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=15000)
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--clusters", type=int, default=61, help="k-means clusters = specialists")
    ap.add_argument("--groups", type=int, default=None, help="planted groups (default: --clusters)")
    ap.add_argument("--nearest-size", type=int, default=300, help="classes per specialist in nearest mode")
    ap.add_argument("--niter", type=int, default=50, help="faiss iterations (at most; stops when converged)")
    ap.add_argument("--passes", type=int, default=5, help="minibatch passes over the classes")
    ap.add_argument("--nredo", type=int, default=3, help="faiss restarts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="PNG path (default: a temp folder)")
    args = ap.parse_args(argv)
    groups = args.groups or args.clusters
    c, n = args.classes, args.examples

    print(f"subsets_scale: {c} classes x {n} examples, {args.clusters} clusters, {groups} planted groups, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share the cores)", flush=True)
    times: dict[str, float] = {}

    cpu: dict[str, float] = {}

    def step(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0
        print(f"  {name:<36s} {times[name]:7.2f} s wall {cpu[name]:7.2f} s cpu   peak RSS {peak_rss_gib():5.2f} GiB",
              flush=True)
        return out

    probs, y, group_of = step("generate (not in total)", lambda: synthetic_probs(c, n, groups, args.seed))
    cov = step("covariance", lambda: covariance(probs))
    points = step("normalize (correlation)", lambda: normalize_columns(cov, "correlation"))
    rows = points.T  # C-contiguous, one row per class
    lab_f, cen_f = step(f"kmeans faiss (niter {args.niter}, nredo {args.nredo})",
                        lambda: kmeans(rows, args.clusters, "faiss", seed=args.seed, niter=args.niter, nredo=args.nredo))
    lab_m, cen_m = step(f"kmeans minibatch ({args.passes} passes)",
                        lambda: kmeans(rows, args.clusters, "minibatch", seed=args.seed, passes=args.passes))
    part = step("select partition", lambda: select_subsets(rows, lab_f, cen_f, "partition"))
    near = step(f"select nearest ({args.nearest_size})",
                lambda: select_subsets(rows, lab_f, cen_f, "nearest", classes_per_specialist=args.nearest_size))
    stats = step("subset_stats (nearest)", lambda: subset_stats(probs, y, near))
    plot_path = args.plot or os.path.join(tempfile.mkdtemp(prefix="subsets_scale_"), "covariance.png")
    step("plot (downsampled)", lambda: plot_covariance(points, part, plot_path))

    total = sum(v for k, v in times.items() if not k.startswith("generate"))
    total_cpu = sum(v for k, v in cpu.items() if not k.startswith("generate"))
    sizes = [len(s) for s in part]
    cover = np.zeros(c, dtype=np.int64)
    for s in near:
        cover[s] += 1
    print(f"total (without generation) {total:.1f} s wall, {total_cpu:.1f} s cpu (all threads); "
          f"peak RSS {peak_rss_gib():.2f} GiB; load average now {os.getloadavg()[0]:.1f}")
    print(f"ARI vs planted groups: faiss {adjusted_rand_index(lab_f, group_of):.3f}, "
          f"minibatch {adjusted_rand_index(lab_m, group_of):.3f}")
    print(f"partition: {len(part)} subsets, sizes {min(sizes)}-{max(sizes)}; "
          f"nearest: {len(near)} subsets of {args.nearest_size}, classes covered {int((cover > 0).sum())}/{c}, "
          f"max coverage {int(cover.max())}")
    conf = [s["confusion_mass"] for s in stats if s["confusion_mass"] is not None]
    print(f"nearest-mode mean confusion_mass {np.mean(conf):.3f}; plot {plot_path} "
          f"({os.path.getsize(plot_path) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
