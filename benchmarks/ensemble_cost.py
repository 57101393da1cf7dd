"""What does routing save, and what does a shared trunk save? Inference cost of the routed
ensemble over the generalist's alone: FLOPs (counted, machine-independent) and time.

With top-1 routing every example activates the specialists whose subset holds the
generalist's top class: one specialist for a partition. Each specialist runs only on its
routed rows, so for same-size specialists the ensemble should cost about two forward passes
plus the combination (the target: under 2.3x the generalist alone), against 1 + M passes for
``all`` routing, which runs every specialist on every example. With shared-trunk specialists
(``--branch``: ``all``, the whole network, or k, the blocks a specialist owns; default
``all,1,0``) the trunk runs once per batch and each specialist adds only its tail and head on
its rows: at k = 1 the goal is a routed time ratio of at most 1.35x on the CPU.

By default the models are built at random initialization (timing needs no trained weights):
a ``--model`` (cnn) over 3 x ``--image-size``^2 inputs (32), ``--classes`` classes (100)
split into ``--specialists`` equal subsets (10). With ``--run-dir`` the run's trained ensemble
is timed instead, on its test images. All times are medians of ``--repeats`` passes over one
fixed, already-normalized batch of ``--batch`` examples, after one warm-up pass. On the CPU the
default is one thread (``--threads``): with several threads every forward call pays a fixed
synchronization cost that, on a loaded machine, dwarfs a specialist's share of the batch.

    python benchmarks/ensemble_cost.py [--device cpu|cuda] [--batch 128] [--specialists 10] [--branch all,1,0]
    python benchmarks/ensemble_cost.py --run-dir runs/quickstart
"""

from __future__ import annotations

import argparse

import torch
from _common import device_name  # benchmarks/_common.py (the script's folder is on sys.path)
from omegaconf import OmegaConf

from specialists.core.combine import SOLVERS
from specialists.core.cost import flops_per_example
from specialists.core.heads import make_specialist
from specialists.device import DEVICES, resolve_device
from specialists.engine.timing import seconds_per_example, timing_rows
from specialists.inference import SingleModel, SpecialistEnsemble
from specialists.models import build_model, count_parameters
from specialists.models.branch import parse_branch, split, tail_classifier
from specialists.rundir import Run


def synthetic_ensemble(args, device: torch.device, routing: str, branch: int | None = None
                       ) -> tuple[SpecialistEnsemble, torch.Tensor]:
    """Random-init generalist + M specialists made from it (whole copies, or with ``branch`` its
    last blocks on its shared trunk) over equal class blocks, and a normalized batch of random
    images (B, 3, S, S)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    C, M, S = args.classes, args.specialists, args.image_size
    shape = (3, S, S)
    mcfg = OmegaConf.create({"name": args.model, "width": args.width, "depth": 2, "dropout": 0.0})
    generalist = build_model(mcfg, C, shape).to(device).eval()
    x = torch.randn(args.batch, *shape, generator=g).to(device)
    # At random initialization every input gives nearly the same features, so the head's
    # top-1 (and with it the routing) is the same class for the whole batch. Standardizing
    # the features the head sees (on this batch) spreads the top-1 over the classes as a
    # trained generalist's would, so each specialist runs on a batch of realistic size.
    with torch.no_grad():
        f = generalist.features(x)
        mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
        w = generalist.head.weight / sd
        generalist.head.weight.copy_(w)
        generalist.head.bias.copy_(-(w @ mu))
    perm = torch.randperm(C, generator=g)
    subsets = [perm[m::M].sort().values for m in range(M)]  # M disjoint subsets of about C / M classes
    trunk, part = None, generalist
    if branch is not None:
        trunk, tail = split(generalist, branch, x, args.model)
        part = tail_classifier(generalist, tail)
    specialists = [make_specialist(part, s) for s in subsets]
    info = {"input_shape": list(shape), "mean": [0.5] * 3, "std": [0.25] * 3, "scale": 1 / 255,
            "class_names": [f"c{i}" for i in range(C)], "num_classes": C}
    ens = SpecialistEnsemble(generalist, specialists, subsets, info, device, top_n=args.top_n, solver=args.solver,
                             routing=routing, batch_size=max(args.batch, 1), trunk=trunk, generalist_part=part)
    return ens, x


def run_ensemble(args, device: torch.device, routing: str) -> tuple[SpecialistEnsemble, torch.Tensor]:
    run = Run.open(args.run_dir, str(device))
    ens = SpecialistEnsemble.from_run(run, routing=routing, top_n=args.top_n, batch_size=max(args.batch, 1))
    test = run.data.test
    return ens, ens.preprocess(test.x[timing_rows(len(test), args.batch)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="time this run's trained ensemble instead of random-init models")
    p.add_argument("--model", default="cnn", help="model registry name (default cnn)")
    p.add_argument("--width", type=int, default=None, help="model width (default: the model's own)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--specialists", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--top-n", type=int, default=1)
    p.add_argument("--solver", default="em", choices=SOLVERS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--branch", default="all,1,0", help="comma list: all (whole-network specialists) or k blocks")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared machine, multi-threaded small batches spend "
                        "their time waiting for descheduled peer threads, which swamps the ratio)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if args.run_dir:
        report(args, device, *run_ensemble(args, device, "routed"), label=f"run {args.run_dir}")
        return
    for value in args.branch.split(","):
        k = parse_branch(value)
        report(args, device, *synthetic_ensemble(args, device, "routed", k), label=f"branch={value}")


def report(args, device, ens: SpecialistEnsemble, x: torch.Tensor, label: str) -> None:
    ens_all = ens.with_routing("all")
    gen = SingleModel(ens.generalist, ens.info, ens.device, batch_size=ens.batch_size)
    B, M = len(x), len(ens.specialists)

    with torch.inference_mode():
        comps = ens.components(x)
        active = comps[2]
        flops = {k: flops_per_example(f, x) for k, f in (("g", gen.proba), ("r", ens.proba), ("a", ens_all.proba))}
    per_spec = active.sum(0).tolist()
    # the package's timing protocol (seconds per example), here over one batch of B
    t = seconds_per_example({"g": gen.proba, "r": ens.proba, "a": ens_all.proba,
                             "c": lambda _: ens.combine(*comps)}, x, B, args.repeats)
    t_g, t_r, t_a, t_comb = (B * t[k] for k in ("g", "r", "a", "c"))

    src = f"run {args.run_dir}" if args.run_dir else (
        f"random-init {args.model}, {args.classes} classes, 3x{args.image_size}x{args.image_size} inputs")
    print(f"== {label} ==")
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"ensemble: {src}; {M} specialists of sizes {sorted({len(s) for s in ens.subsets})}, "
          f"{count_parameters(ens.generalist):,} parameters in the generalist, "
          f"{count_parameters(ens.specialists[0]) if M else 0:,} in a specialist")
    print(f"batch {B}, top_n={ens.top_n}, solver={ens.solver}, medians of {args.repeats} interleaved passes after a warm-up")
    print(f"routing: {float(active.sum(1).float().mean()):.2f} active specialists per example; "
          f"rows per specialist min {min(per_spec)} / max {max(per_spec)} (of {B})")
    print(f"{'model':<22}{'ms / batch':>12}{'us / example':>14}{'time vs gen':>13}{'MFLOPs / ex':>13}{'FLOPs vs gen':>14}")
    for name, k, tk in (("generalist alone", "g", t_g), ("routed ensemble", "r", t_r), ("all routing", "a", t_a)):
        print(f"{name:<22}{1e3 * tk:>12.2f}{1e6 * tk / B:>14.1f}{tk / t_g:>12.2f}x{flops[k] / 1e6:>13.2f}"
              f"{flops[k] / flops['g']:>13.2f}x")
    print(f"{'  of which combine':<22}{1e3 * t_comb:>12.2f}{1e6 * t_comb / B:>14.1f}{t_comb / t_g:>12.2f}x")
    print(f"routed / generalist: time {t_r / t_g:.2f}x, FLOPs {flops['r'] / flops['g']:.2f}x; "
          f"routed / all routing: time {t_r / t_a:.2f}x (1 + M = {1 + M} forward passes for whole networks)")
    print()


if __name__ == "__main__":
    main()
