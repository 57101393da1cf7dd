"""Kill a run at random moments, resume it each time, and compare it with an uninterrupted run.

    python benchmarks/crash_resume.py [--kills 24] [--seed 0] [--config configs/quickstart.yaml] [key=value ...]

1. ``specialists run`` once, uninterrupted (a subprocess, in a temporary folder): the reference,
   and how long each stage takes.
2. The same run killed with SIGKILL ``--kills`` times and started again after each kill. Kill i
   targets a stage (the stages in pipeline order, the kills spread evenly over them): it waits
   for that stage (or a later one) to start, then a seeded random share of the stage's
   reference duration, then kills. Where each kill landed is read from the run's log.
3. Every artifact compared with the reference: ``.safetensors`` and ``.npy`` byte for byte,
   every ``.json`` with its timing fields removed (reports and plots, which print times, and
   resume state are not compared).

Prints the kills per stage, the files that differ (none, when resuming works), and the time
the interrupted run took against the uninterrupted one; the last line is a JSON summary. Exit
status 1 when any artifact differs or a run failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generalist", "subsets", "specialists", "evaluate", "ablate", "student")
# fields that hold times (they differ between any two runs)
TIMES = {"seconds", "started", "finished", "attempts", "timing", "train_seconds_per_epoch",
         "generalist_train_seconds_per_epoch", "train_time_ratio_vs_generalist", "inference_seconds_per_example",
         "inference_ratio_vs_ensemble", "seconds_per_example", "artifacts", "reports", "shared_from",
         "time_ratio", "all_time_ratio", "inference_ms", "samples_per_s"}  # evaluation.json's cost, frontier.json: measured times


def command(run_dir: Path, config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "specialists.cli", "run", config, f"run_dir={run_dir}", *overrides]


def reference(run_dir: Path, config: str, overrides: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run(command(run_dir, config, overrides), cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return wall, {k: max(0.05, float(v["seconds"])) for k, v in stages.items()}


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _kill_when_due(proc, lines: queue.Queue, stages: list[str], target: str, durations: dict,
                   rng: np.random.Generator) -> str | None:
    """Kill ``proc`` a random share of a stage's duration after ``target`` (or a later stage)
    starts; the stage it was in, or None when it ended first."""
    current, deadline = None, None
    while True:
        try:
            line = lines.get(timeout=0.01)
        except queue.Empty:
            line = ""
        if line is None:
            return None
        for s in stages:
            if f"stage {s}: starting" in line and "/recluster/" not in line:  # (not the ablation's sub-runs)
                current = s
                if deadline is None and stages.index(s) >= stages.index(target):
                    deadline = time.perf_counter() + rng.uniform(0.05, 0.95) * durations[s]
        if deadline is not None and time.perf_counter() >= deadline:
            proc.send_signal(signal.SIGKILL)
            return current


def killed_run(run_dir: Path, config: str, overrides: list[str], durations: dict, kills: int,
               rng: np.random.Generator) -> tuple[float, list[str], int]:
    """The run, killed up to ``kills`` times, started again after each kill; returns (wall
    seconds, the stage each kill landed in, attempts)."""
    stages = [s for s in STAGES if s in durations]
    targets = [stages[i * len(stages) // kills] for i in range(kills)]
    landed, attempts, t0 = [], 0, time.perf_counter()
    while True:
        attempts += 1
        proc = subprocess.Popen(command(run_dir, config, overrides), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
        stage = _kill_when_due(proc, lines, stages, targets[len(landed)], durations, rng) \
            if len(landed) < len(targets) else None
        proc.wait()
        if stage is not None:
            landed.append(stage)
            continue
        if proc.returncode != 0:
            raise SystemExit(f"the run failed (status {proc.returncode}) on attempt {attempts}")
        return time.perf_counter() - t0, landed, attempts


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def compare(ref: Path, other: Path) -> list[str]:
    """The artifacts of ``ref`` that ``other`` lacks or holds differently."""
    bad = []
    for p in sorted(ref.rglob("*")):
        rel = p.relative_to(ref)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts) or p.suffix in (".md", ".png", ".lock", ".html"):
            continue
        if p.name in ("state.pt", "config.yaml"):
            continue
        q = other / rel
        if not q.exists():
            bad.append(f"{rel}: missing")
        elif p.suffix == ".json":
            if _strip(json.loads(p.read_text())) != _strip(json.loads(q.read_text())):
                bad.append(f"{rel}: differs")
        elif p.suffix == ".csv":  # history.csv, summary.csv: every column but the times
            if _csv_rows(p) != _csv_rows(q):
                bad.append(f"{rel}: differs")
        elif p.read_bytes() != q.read_bytes():
            bad.append(f"{rel}: differs")
    return bad


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [_strip(row) for row in csv.DictReader(f)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--keep", help="keep both run directories under this folder")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="crash_resume_"))
    ref_dir, run_dir = root / "uninterrupted", root / "killed"
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same threads for both runs: the same floats

    ref_wall, durations = reference(ref_dir, args.config, args.overrides)
    print(f"uninterrupted: {ref_wall:.1f} s; stages " + ", ".join(f"{k} {v:.1f} s" for k, v in durations.items()))
    wall, landed, attempts = killed_run(run_dir, args.config, args.overrides, durations, args.kills,
                                        np.random.default_rng(args.seed))
    per_stage = {s: landed.count(s) for s in STAGES if landed.count(s)}
    print(f"killed {len(landed)} times ({', '.join(f'{k} {v}' for k, v in per_stage.items())}), "
          f"{attempts} attempts, {wall:.1f} s in all ({wall / ref_wall:.2f}x the uninterrupted run)")
    bad = compare(ref_dir, run_dir)
    print("every artifact identical to the uninterrupted run's" if not bad else "DIFFERENT:\n  " + "\n  ".join(bad))
    summary = {"kills": len(landed), "per_stage": per_stage, "attempts": attempts, "identical": not bad,
               "differing": bad, "uninterrupted_s": round(ref_wall, 2), "interrupted_s": round(wall, 2)}
    print(json.dumps(summary))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
