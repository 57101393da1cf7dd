"""How much faster is the EM combiner than Hinton's gradient descent, at equal accuracy?

Prints, for (a) 100 classes / 10 subsets of 15 and (b) 15,000 classes / 61 subsets of 300
(random overlapping subsets, 2-3 active specialists per example, batch 256), the examples per
second of ``combine(solver="em")`` and ``combine(solver="gradient")`` (L-BFGS on softmax logits),
both in float64, the objectives they reach on the same examples, and the speed ratio. EM runs at
its default tolerance; the gradient reference runs at ``--grad-tol`` (max |dL/dz|), chosen so
that its objective lands within ~1e-5 relative of EM's (the run prints the gap it measured). EM times are medians over a few repeats of the whole batch; the gradient
reference is slow, so it runs on the first few examples only, once each, and its rate is per
example. EM in float32 is timed as well (the default dtype in inference).

    python benchmarks/combine_speed.py [--device cpu|cuda] [--batch 256] [--repeats 5] [--threads 1]

On CPU it uses one intra-op thread by default: on a shared machine torch's thread pool spins
against other processes (we measured the EM call 20x slower with 2 threads at load 9 on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import device_name  # benchmarks/_common.py (the script's folder is on sys.path)

from specialists.combine import combine, objective, prepare_subsets
from specialists.device import synchronize


def make_problem(B, C, M, size, device, seed=0, sharp=3.0, active_per_example=(2, 3)):
    """Random overlapping subsets and softmax probabilities; each example has 2 or 3 active
    specialists (chosen among all M, like routing on the generalist's top classes would)."""
    g = torch.Generator().manual_seed(seed)
    subsets = [torch.randperm(C, generator=g)[:size] for _ in range(M)]
    pg = torch.softmax(sharp * torch.randn(B, C, generator=g, dtype=torch.float64), 1)
    ps = [torch.softmax(sharp * torch.randn(B, size + 1, generator=g, dtype=torch.float64), 1) for _ in range(M)]
    lo, hi = active_per_example
    k = torch.randint(lo, hi + 1, (B,), generator=g)
    ranks = torch.rand(B, M, generator=g).argsort(1).argsort(1)
    active = ranks < k[:, None]
    return (
        pg.to(device),
        [s.to(device) for s in subsets],
        [p.to(device) for p in ps],
        active.to(device),
    )


def timed(fn, device):
    synchronize(device)
    t = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t, out


def run_case(name, C, M, size, n_grad, args, device):
    pg, subsets, ps, act = make_problem(args.batch, C, M, size, device)
    table = prepare_subsets(subsets, C, device)  # validated once, as the ensemble would
    B = args.batch

    def em(dtype):
        p = pg.to(dtype)
        s = [x.to(dtype) for x in ps]
        return lambda: combine(p, table, s, act, solver="em", return_info=True)

    results = {}
    for dtype in (torch.float64, torch.float32):
        fn = em(dtype)
        fn()  # warm-up
        times, info = [], None
        for _ in range(args.repeats):
            t, (q, info) = timed(fn, device)
            times.append(t)
        results[dtype] = (statistics.median(times), q, info)

    t_em64, q_em, info_em = results[torch.float64]
    t_em32, q_em32, _ = results[torch.float32]

    # Gradient reference on the first n_grad examples, one run.
    sl = slice(0, n_grad)
    sub = (pg[sl], table, [x[sl] for x in ps], act[sl])
    combine(*[pg[:1], table, [x[:1] for x in ps], act[:1]], solver="gradient", max_iter=5)  # warm-up
    t_grad, (q_grad, info_grad) = timed(
        lambda: combine(*sub, solver="gradient", tol=args.grad_tol, return_info=True), device
    )

    L_em = objective(q_em[sl], *sub)
    L_grad = objective(q_grad, *sub)
    L_em32 = objective(q_em32[sl].double(), *sub)
    rel = ((L_grad - L_em) / L_em.abs().clamp_min(1e-12)).cpu()
    rel32 = ((L_em32 - L_em) / L_em.abs().clamp_min(1e-12)).cpu()

    em_rate = B / t_em64
    em32_rate = B / t_em32
    grad_rate = n_grad / t_grad
    print(f"\n({name}) C={C}, M={M} subsets of {size}, 2-3 active per example")
    print(
        f"  em (float64)      : {em_rate:12.1f} examples/s  (median of {args.repeats} x {B} examples; "
        f"iterations: max {info_em['iterations']}, "
        f"mean {info_em['iterations_per_example'].double().mean().item():.1f})"
    )
    print(f"  em (float32)      : {em32_rate:12.1f} examples/s")
    print(
        f"  gradient (float64): {grad_rate:12.3f} examples/s  ({n_grad} examples, one run, tol {args.grad_tol:g}; "
        f"L-BFGS iterations: max {info_grad['iterations']}, "
        f"mean {info_grad['iterations_per_example'].double().mean().item():.0f})"
    )
    print(
        f"  objective on those {n_grad}: mean L em {L_em.mean().item():.10f}, gradient {L_grad.mean().item():.10f};"
        f" (L_grad - L_em)/L_em max {rel.max().item():+.2e}, min {rel.min().item():+.2e};"
        f" em float32 vs float64 max |rel| {rel32.abs().max().item():.1e}"
    )
    within = "within" if rel.abs().max().item() <= 1e-5 else "NOT within"
    print(f"  gradient objective {within} 1e-5 relative of em's on every example")
    print(f"  speed ratio em / gradient (float64): {em_rate / grad_rate:,.0f}x")
    return em_rate / grad_rate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grad-small", type=int, default=16, help="examples for the gradient reference, case (a)")
    ap.add_argument("--grad-large", type=int, default=2, help="examples for the gradient reference, case (b)")
    ap.add_argument("--grad-tol", type=float, default=5e-6, help="gradient solver tolerance on max |dL/dz|")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    ra = run_case("a", 100, 10, 15, args.grad_small, args, device)
    rb = run_case("b", 15000, 61, 300, args.grad_large, args, device)
    print(f"\nsummary: em is {ra:,.0f}x (a) and {rb:,.0f}x (b) faster than gradient descent (target > 100x)")


if __name__ == "__main__":
    main()
