"""What does a shared trunk save in training? One specialist's epoch, whole network vs shared trunk.

Trains a generalist briefly on generated 32x32 images (``--classes`` classes in groups of 10),
then the same specialist (the first subset) three ways, each for ``--epochs`` epochs through the
real stage code (:func:`specialists.stages.specialists.train_one`): the whole network
(``specialists.branch=all``), its last ``--branch`` blocks on the generalist's frozen trunk with
augmented batches (the trunk runs every step, without gradients), and the same with the trunk's
outputs cached (``specialists.cache_trunk=true``: the trunk runs once per example). Prints the
median epoch time and the training FLOPs per sample of each, as ratios to the whole network.
The goal: a shared-trunk epoch at most 0.5x a whole-network one.

    python benchmarks/specialist_cost.py [--branch 1] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from _common import device_name  # benchmarks/_common.py (the script's folder is on sys.path)

from specialists.rundir import Run, load_config
from specialists.stages.pipeline import run_stage
from specialists.stages.specialists import train_one

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--per-class", type=int, default=100, help="training images per class")
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--branch", default="1")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = ["device=cpu", "seed=0", "data.name=synthetic", f"data.num_super={args.classes // 10}",
            "data.classes_per_super=10", f"data.train_per_class={args.per_class}", "data.test_per_class=20",
            "data.image_size=32", "model.name=cnn", f"model.width={args.width}", "generalist.epochs=1",
            "subsets.num_specialists=5", f"specialists.epochs={args.epochs}"]
    root = Path(tempfile.mkdtemp(prefix="specialist-cost-"))
    try:
        cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"run_dir={root / 'run'}", *base])
        for stage in ("generalist", "subsets"):
            run_stage(cfg, stage)
        rows = {}
        for name, extra in (("whole network", ["specialists.branch=all"]),
                            (f"branch={args.branch}, augmented", [f"specialists.branch={args.branch}",
                                                                  "specialists.cache_trunk=false"]),
                            (f"branch={args.branch}, cached trunk", [f"specialists.branch={args.branch}",
                                                                     "specialists.cache_trunk=true"])):
            shutil.rmtree(root / "run" / "specialists", ignore_errors=True)
            run = Run(load_config(REPO / "configs" / "quickstart.yaml", [f"run_dir={root / 'run'}", *base, *extra]))
            s = run.load_subsets()[0]
            out = train_one(run, s["id"], s["classes"], run.load_generalist())
            # the first epoch of a cached run also fills the cache: its cost is in the total, not the median
            rows[name] = (statistics.median(h["seconds"] for h in out["history"]), out["seconds"],
                          out["train_flops_per_sample"], out["subset_top1"])
        print(f"device: cpu ({device_name(torch.device('cpu'))}), torch {torch.__version__}, {args.threads} thread(s)")
        print(f"generated 3x32x32 images, {args.classes} classes x {args.per_class}, cnn width {args.width}; "
              f"specialist {s['id']} (|S| = {len(s['classes'])}), {args.epochs} epochs each")
        ref = rows["whole network"]
        print(f"{'specialist':<28}{'s / epoch':>10}{'vs whole':>10}{'total s':>9}{'MFLOPs / sample':>17}"
              f"{'vs whole':>10}{'subset top-1':>14}")
        for name, (epoch, total, flops, top1) in rows.items():
            print(f"{name:<28}{epoch:>10.2f}{epoch / ref[0]:>9.2f}x{total:>9.1f}{flops / 1e6:>17.1f}"
                  f"{flops / ref[2]:>9.2f}x{top1:>14.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
