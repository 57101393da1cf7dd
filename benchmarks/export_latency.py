"""What serving an export costs: onnxruntime over PyTorch eager, latency per example, on the CPU.

Builds a small synthetic run in a temporary folder (generalist, subsets, specialists, a
distilled student), or takes a finished RUN_DIR, exports the student (the generalist when the
run has none) and the ensemble with ``specialists export`` (verified there), then times, in
one process and on the same raw uint8 test images (preprocessing included on both sides):

- the student: :class:`OnnxModel` vs :class:`Student` ``predict_proba``;
- the ensemble: :class:`OnnxEnsemble` (onnxruntime graphs + routing + numpy EM) vs
  :meth:`SpecialistEnsemble.predict_proba` (PyTorch + the torch solver),

at batch 1 (``--single`` examples one call each) and batch 256 (one call per 256 examples),
the median over ``--repeats`` rounds in which the two take turns, so a burst of load on a
shared machine hits both alike. Prints microseconds per example and the ratio onnx / torch
(below 1: onnxruntime is faster).

    python benchmarks/export_latency.py                 # CPU-sized, about a minute
    python benchmarks/export_latency.py runs/quickstart # a finished run

On the CPU both use one thread by default (``--threads``): on a shared machine spinning
threads can be tens of times slower, which would swamp the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _common import device_name  # noqa: E402  benchmarks/_common.py (the script's folder is on sys.path)

from specialists.inference import SingleModel, SpecialistEnsemble, Student  # noqa: E402
from specialists.inference.export import export_run  # noqa: E402
from specialists.inference.onnx_runtime import OnnxEnsemble, OnnxModel  # noqa: E402
from specialists.rundir import Run, load_config  # noqa: E402
from specialists.stages.pipeline import run_stage  # noqa: E402

BATCHES = (1, 256)


def build_run(run_dir: Path) -> Path:
    cfg = load_config(None, [
        f"run_dir={run_dir}", "device=cpu", "seed=0",
        "data.name=synthetic", "data.num_super=5", "data.classes_per_super=4", "data.train_per_class=100",
        "data.test_per_class=20", "data.image_size=16", "model.name=cnn", "model.width=16",
        "generalist.epochs=3", "generalist.batch_size=128", "subsets.num_specialists=5",
        "specialists.epochs=2", "specialists.batch_size=128", "student.epochs=2", "student.batch_size=128",
        "student.controls=false", "evaluate.bootstrap=100", "evaluate.timing_batches=1",
    ])
    for stage in ("generalist", "subsets", "specialists", "evaluate", "student"):
        run_stage(cfg, stage)
    return Path(cfg.run_dir)


def timed(fns: dict, x: np.ndarray, batch: int, single: int, repeats: int) -> dict[str, float]:
    """Median seconds per example of each ``fns[name](chunk)``: at batch 1 over the first
    ``single`` examples one by one, else over ``x`` in chunks of ``batch``; one warm-up pass,
    then ``repeats`` rounds with the functions taking turns."""
    rows = x[:single] if batch == 1 else x
    chunks = [rows[i:i + batch] for i in range(0, len(rows), batch)]

    def one_pass(fn) -> float:
        t0 = time.perf_counter()
        for c in chunks:
            fn(c)
        return time.perf_counter() - t0

    for fn in fns.values():
        one_pass(fn)
    rounds: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            rounds[k].append(one_pass(fn))
    return {k: statistics.median(v) / len(rows) for k, v in rounds.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="a finished run (default: build a small synthetic one)")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--single", type=int, default=64, help="examples timed one call each at batch 1")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="export_latency_")
    t0 = time.perf_counter()
    run_dir = Path(args.run_dir) if args.run_dir else build_run(Path(tmp.name) / "run")
    run = Run.open(run_dir, "cpu")
    print(f"device: {device_name(run.device)}; onnxruntime {args.threads} intra-op thread(s)", flush=True)
    out = Path(tmp.name) / "export"
    single = export_run(run_dir, "student", out=out)  # the generalist when the run has no student
    export_run(run_dir, "ensemble", out=out)

    x = run.data.test.x.numpy().transpose(0, 2, 3, 1)  # raw uint8 (N, H, W, C), as a user hands them over
    x = np.ascontiguousarray(np.concatenate([x] * -(-max(BATCHES) // len(x)))[:max(BATCHES)])
    torch_single = (Student.from_run(run) if single.model == "student" else SingleModel.generalist_from_run(run))
    onnx_single = OnnxModel(out / f"{single.model}.json", threads=args.threads)
    torch_ens, onnx_ens = SpecialistEnsemble.from_run(run), OnnxEnsemble(out, threads=args.threads)
    with torch.inference_mode():
        active = float(torch_ens.predict_all(x)["active"].sum(1).float().mean())
    arch = onnx_single.meta["graph"]["architecture"]
    print(f"run: {run_dir if args.run_dir else 'synthetic (built in a temporary folder)'}, "
          f"{onnx_ens.num_classes} classes, input {tuple(onnx_ens.input_shape)}, {single.model} {arch}, "
          f"{len(onnx_ens.specialists)} specialists, top_n {onnx_ens.top_n} "
          f"({active:.2f} active per example); built and exported in {time.perf_counter() - t0:.1f}s")
    print(f"\nlatency per example, median of {args.repeats} interleaved rounds (raw uint8 in, probabilities out; "
          f"batch 1: {args.single} calls, batch {max(BATCHES)}: one call)")
    print(f"  {'model':<12} {'batch':>5} {'PyTorch eager':>15} {'onnxruntime':>15} {'onnx / torch':>13}")
    pairs = {single.model: (torch_single.predict_proba, onnx_single.predict_proba),
             "ensemble": (torch_ens.predict_proba, onnx_ens.predict_proba)}
    for name, (torch_fn, onnx_fn) in pairs.items():
        for b in BATCHES:
            t = timed({"torch": torch_fn, "onnx": onnx_fn}, x, b, args.single, args.repeats)
            print(f"  {name:<12} {b:>5} {t['torch'] * 1e6:12.1f} us {t['onnx'] * 1e6:12.1f} us "
                  f"{t['onnx'] / t['torch']:12.2f}x")
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
