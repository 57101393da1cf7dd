"""Scaling out, measured in one run: Ray tasks for the specialists, DDP for one model.

    python benchmarks/scale_out.py [--specialists 4] [--epochs 8] [--ddp-epochs 3] [--skip-ray] [--skip-ddp]

1. **Fan-out**: a synthetic run (generalist and subsets built first), then the specialists
   stage twice from the same starting point: the local executor (one job after another, one
   thread) and ``launch.executor=ray`` on a local Ray instance with one CPU, and so one
   thread, per job (Ray is started before the clock; the workers' start-up, imports and data
   loading are inside it). Prints both wall times and their ratio (target: at most 0.6 with 2
   workers on a 2-core machine).
2. **Data parallel**: the generalist's training loop (no evaluation) under torchrun-style
   ranks on the CPU (gloo): 1 process with 1 thread, 1 process with all threads, and N
   processes with 1 thread each; images per second of each, measured by the loop itself.
   On a GPU machine the same, one GPU per rank (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _common import device_name  # noqa: E402  benchmarks/_common.py

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
DATA = ["data.name=synthetic", "data.num_super=4", "data.classes_per_super=5", "data.train_per_class=300",
        "data.image_size=16", "model.name=cnn", "model.width=16", "generalist.epochs=2"]


def fan_out(root: Path, specialists: int, epochs: int) -> dict:
    import ray

    from specialists.rundir import load_config
    from specialists.stages.pipeline import run_stage

    base = [*DATA, f"subsets.num_specialists={specialists}", f"specialists.epochs={epochs}", "device=cpu"]
    torch.set_num_threads(1)
    seed_dir = root / "seed"
    cfg = load_config(QUICKSTART, [f"run_dir={seed_dir}", *base])
    for stage in ("generalist", "subsets"):
        run_stage(cfg, stage)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    out = {}
    for executor in ("local", "ray"):
        d = root / executor
        shutil.copytree(seed_dir, d)
        cfg = load_config(QUICKSTART, [f"run_dir={d}", *base, f"launch.executor={executor}"])
        t0 = time.perf_counter()
        run_stage(cfg, "specialists")
        out[executor] = time.perf_counter() - t0
    ray.shutdown()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(args) -> None:
    """One rank: the generalist's training loop, no evaluation; rank 0 prints images/s."""
    from specialists.device import init_distributed, is_main
    from specialists.engine.trainers import train_classifier
    from specialists.rundir import Run, load_config

    cfg = load_config(QUICKSTART, [f"run_dir={args.run_dir}", f"device={args.device}", *DATA,
                                   "data.image_size=32", f"generalist.epochs={args.ddp_epochs}",
                                   "generalist.batch_size=256"])
    init_distributed(cfg.device)
    run = Run(cfg)
    torch.manual_seed(0)
    history = train_classifier(run, run.new_model(), cfg.generalist, None, seed=0, desc="bench", eval_splits=())
    timed = history[1:] or history  # the first epoch warms up
    rate = sum(h["steps"] * cfg.generalist.batch_size for h in timed) / sum(h["seconds"] for h in timed)
    if is_main():
        print(json.dumps({"images_per_s": rate}))


def ddp(root: Path, ranks: int, epochs: int, device: str) -> dict:
    def launch(n: int, threads: int) -> float:
        port, procs = _free_port(), []
        for rank in range(n):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "WORLD_SIZE": str(n), "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, __file__, "--ddp-worker", "--run-dir",
                                           str(root / f"ddp{n}x{threads}"), "--ddp-epochs", str(epochs),
                                           "--device", device], env=env, stdout=subprocess.PIPE, text=True))
        outs = [p.communicate()[0] for p in procs]
        return json.loads(outs[0].strip().splitlines()[-1])["images_per_s"]

    cores = os.cpu_count() or 1
    return {"1 process, 1 thread": launch(1, 1), f"1 process, {cores} threads": launch(1, cores),
            f"{ranks} processes, 1 thread each": launch(ranks, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specialists", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8, help="specialist epochs")
    p.add_argument("--ddp-epochs", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    print(f"device: {device_name(torch.device(args.device))}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="scale_out_") as tmp:
        root = Path(tmp)
        if not args.skip_ray:
            t = fan_out(root, args.specialists, args.epochs)
            print(f"\nspecialists stage, {args.specialists} specialists x {args.epochs} epochs, one thread per job:")
            print(f"  local executor      {t['local']:7.1f} s")
            print(f"  Ray, {os.cpu_count()} workers      {t['ray']:7.1f} s   ratio {t['ray'] / t['local']:.2f} "
                  "(target <= 0.6)")
        if not args.skip_ddp:
            r = ddp(root, args.ranks, args.ddp_epochs, args.device)
            base = r["1 process, 1 thread"]
            print("\ngeneralist training loop (cnn width 16, 32x32, batch 256 global), images/s:")
            for k, v in r.items():
                print(f"  {k:<28} {v:8.0f}   {v / base:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
