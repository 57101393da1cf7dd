"""Streamed batches (DataLoader workers) against the in-memory batcher, at 64 px and 224 px.

    python benchmarks/stream_throughput.py [--workers 2] [--n64 4000] [--n224 800] [--batch 128]

Writes an ImageFolder of random JPEG images at each size into a temporary folder, then, for each
storage in a fresh process: builds the data set (``data.storage=memory``: every image decoded
into one array; ``stream``: files read by ``--workers`` processes) and times two epochs of
seeded, augmented training batches (the second timed). Prints images per second of each, the
ratio stream / memory, and the peak resident memory of each process (workers included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def write_images(root: Path, n: int, size: int, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        folder = root / "train" / f"c{c}" if i < int(0.9 * n) else root / "test" / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"{i}.jpg", quality=90)


def measure(args) -> None:
    """One storage, in this (fresh) process: images/s of the second epoch, and peak RSS."""
    import torch

    from specialists.data import EpochBatches, batcher_for, build_dataset, seeded_batches
    from specialists.rundir.config import DataConfig

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(name="imagefolder", path=args.dir, storage=args.storage, workers=args.workers,
                                  augment="crop_flip", crop_padding=4))
    built = time.perf_counter() - t0
    batcher = batcher_for(ds, ds.train, "cpu")
    sampler = EpochBatches(len(ds.train), args.batch)
    batches = seeded_batches(batcher, sampler, seed=0)
    rates = []
    for epoch in range(2):
        t0 = time.perf_counter()
        n = sum(len(y) for _, y, _ in batches(epoch))
        rates.append(n / (time.perf_counter() - t0))
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"images_per_s": rates[-1], "peak_rss_mb": rss / 1024, "build_s": built}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n64", type=int, default=4000)
    p.add_argument("--n224", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        measure(args)
        return 0
    print(f"cpu: {os.cpu_count()} cores; {args.workers} workers; batches of {args.batch}; crop + flip")
    with tempfile.TemporaryDirectory(prefix="stream_throughput_") as tmp:
        for size, n in ((64, args.n64), (224, args.n224)):
            root = Path(tmp) / str(size)
            write_images(root, n, size)
            out = {}
            for storage in ("memory", "stream"):
                proc = subprocess.run([sys.executable, __file__, "--measure", "--storage", storage, "--dir", str(root),
                                       "--workers", str(args.workers), "--batch", str(args.batch)],
                                      capture_output=True, text=True, check=True)
                out[storage] = json.loads(proc.stdout.strip().splitlines()[-1])
            m, s = out["memory"], out["stream"]
            print(f"\n{size} px, {n} JPEG images ({int(0.9 * n)} train, of which 90% train the model):")
            print(f"  memory  {m['images_per_s']:8.0f} images/s   peak RSS {m['peak_rss_mb']:7.0f} MB   "
                  f"(decoding took {m['build_s']:.1f} s)")
            print(f"  stream  {s['images_per_s']:8.0f} images/s   peak RSS {s['peak_rss_mb']:7.0f} MB   "
                  f"({args.workers} workers)   ratio stream / memory {s['images_per_s'] / m['images_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
