"""The one timing protocol: median seconds per example, the models taking turns.

Every inference-time figure in the reports (generalist, routed and ``all``-routed ensemble,
student, controls) comes from :func:`seconds_per_example`: one warm-up chunk per model
(allocator, cuDNN autotuning, lazy init), then ``repeats`` rounds in which every model runs
over the same inputs in turn, so a burst of load on a shared machine hits all of them alike
instead of skewing their ratio; the device is synchronized before each clock read.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..device import synchronize

REPEATS = 5  # timed rounds per model (median)


def timing_rows(n: int, k: int) -> torch.Tensor:
    """``k`` of ``n`` row ids (sorted), a seeded random sample: test sets are often stored class
    by class, and their first rows would all route to one specialist."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values


@torch.inference_mode()
def seconds_per_example(fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, batch_size: int,
                        repeats: int = REPEATS) -> dict[str, float]:
    """Median over ``repeats`` rounds of the wall time of each ``fns[name]`` over ``x`` (a
    prepared batch on the device) in chunks of ``batch_size``, per example (seconds)."""
    if not len(x):
        return {k: float("nan") for k in fns}

    def one_pass(fn, stop: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, stop, batch_size):
            fn(x[i:min(i + batch_size, stop)])
        synchronize(x.device)
        return time.perf_counter() - t0

    for fn in fns.values():
        one_pass(fn, min(batch_size, len(x)))
    rounds: dict = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            rounds[k].append(one_pass(fn, len(x)))
    return {k: statistics.median(v) / len(x) for k, v in rounds.items()}
