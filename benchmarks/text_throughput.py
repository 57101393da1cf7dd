"""Text models, measured in one run: training examples/s of ``textcnn`` and ``bilstm`` over
``transformer``, and each student's inference time per example over the routed ensemble's.

* **training**: ``specialists.engine.trainers.train_classifier`` itself (the device-resident
  batcher, batches cut to their longest text, the real step loop) for one epoch per model, the
  models taking turns for ``--rounds`` rounds after one warm-up round; the median epoch of each.
* **inference**: :func:`specialists.engine.timing.seconds_per_example` (the protocol of the
  reports) over the same test batch: the routed ensemble (a transformer generalist and its
  specialists, top-1 routing, EM) against a ``textcnn`` and a ``bilstm`` student.

By default everything is built on the embedded ``synthetic_text`` (20 classes, 5 topics) with
freshly initialized weights: cost does not depend on what the weights learnt, except through
routing, which sends every example to the specialist of its generalist's top class either way.
With ``--run RUN_DIR`` (a finished text run: ``configs/debian.yaml``, say) the data and the
trained ensemble are the run's; ``--students RUN_DIR ...`` adds the students of other runs of
the same data (a BiLSTM distilled into a copy of the run). Widths follow the run's config.

    python benchmarks/text_throughput.py [--run RUN_DIR] [--students RUN_DIR ...] [--threads 1]
        [--rounds 3 (0: inference only)] [--batch-size 128] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

import torch
from _common import device_name  # benchmarks/_common.py (the script's folder is on sys.path)
from omegaconf import OmegaConf

from specialists.data import EpochBatches, batcher_for
from specialists.device import DEVICES
from specialists.engine.timing import seconds_per_example, timing_rows
from specialists.engine.trainers import train_classifier
from specialists.inference import SingleModel, SpecialistEnsemble, Student
from specialists.models import count_parameters
from specialists.rundir import Run, load_config

MODELS = ("transformer", "textcnn", "bilstm")
SYNTHETIC = ["data.name=synthetic_text", "data.train_per_class=300", "data.vocab_size=1000", "data.max_length=32",
             "model.width=64", "model.depth=2", "student.model.width=64"]


def epoch_rates(run: Run, rounds: int, batch_size: int) -> dict[str, float]:
    """Median training examples/s of one epoch of each model (after a warm-up round)."""
    rates: dict = {m: [] for m in MODELS}
    steps = EpochBatches(len(run.data.train), batch_size).steps
    for r in range(rounds + 1):
        for name in MODELS:
            model_cfg = run.cfg.model if name == run.cfg.model.name else OmegaConf.merge(
                run.cfg.model, {"name": name, "width": run.cfg.student.model.width or run.cfg.model.width,
                                "depth": None, "pooling": None})
            tcfg = OmegaConf.merge(run.cfg.generalist, {"epochs": 1, "batch_size": batch_size})
            torch.manual_seed(r)
            history = train_classifier(run, run.new_model(model_cfg=model_cfg), tcfg, None, seed=r,
                                       desc=f"{name} (round {r})", eval_splits=())
            if r:  # round 0 warms up: allocator, lazy imports, threads
                rates[name].append(steps * batch_size / history[0]["seconds"])
    return {m: statistics.median(v) for m, v in rates.items()}


def untrained_ensemble(run: Run, device, batch_size: int) -> SpecialistEnsemble:
    """The generalist and one specialist per topic of the synthetic text, freshly initialized."""
    C, per = run.data.num_classes, run.cfg.data.classes_per_super
    subsets = [list(range(s, s + per)) for s in range(0, C, per)]
    specialists = [run.new_model(len(s) + 1) for s in subsets]
    return SpecialistEnsemble(run.new_model(), specialists, subsets, run.data_info(), device, batch_size=batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a finished text run (default: synthetic text, untrained models)")
    p.add_argument("--students", nargs="*", default=[], help="other runs of the same data whose students to time")
    p.add_argument("--rounds", type=int, default=3, help="timed training epochs per model (0: inference only)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--timing-examples", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", choices=DEVICES)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            run = Run.open(args.run, device=args.device)  # the training rounds write nothing into it
        else:
            run = Run(load_config("configs/text_quickstart.yaml", [f"run_dir={tmp}", f"device={args.device}",
                                                                  *SYNTHETIC]))
        ds, device = run.data, run.device
        print(f"device: {device_name(device)}; data: {ds.name}, {len(ds.train)} training texts, {ds.num_classes} "
              f"classes, max_length {ds.input_shape[0]}, vocabulary {ds.encoder.vocab_size}")

        if args.rounds:  # --rounds 0: inference only
            rates = epoch_rates(run, args.rounds, args.batch_size)
            print(f"\ntraining, examples/s (median of {args.rounds} epochs, batch {args.batch_size}):")
            for name in MODELS:
                print(f"  {name:12s} {rates[name]:10.0f}   {rates[name] / rates['transformer']:5.2f}x transformer")

        if args.run:
            ens = SpecialistEnsemble.from_run(args.run, device=args.device, batch_size=args.batch_size)
            students = {f"{Run.open(r).cfg.student.model.name} student ({r})": Student.from_run(r, device=args.device)
                        for r in [args.run, *args.students]}
        else:
            ens = untrained_ensemble(run, device, args.batch_size)
            students = {}
            for name in ("textcnn", "bilstm"):
                cfg = OmegaConf.merge(run.cfg.model, {"name": name, "width": run.cfg.student.model.width,
                                                      "depth": None})
                students[f"{name} student"] = SingleModel(run.new_model(model_cfg=cfg).eval(), run.data_info(), device)
        rows = timing_rows(len(ds.test), min(args.timing_examples, len(ds.test)))
        x = batcher_for(ds, ds.test, device).batch(rows)[0]
        fns = {"routed ensemble": ens.proba, **{k: s.proba for k, s in students.items()}}
        secs = seconds_per_example(fns, x, args.batch_size)
        params = {"routed ensemble": count_parameters(ens.generalist) + sum(map(count_parameters, ens.specialists)),
                  **{k: count_parameters(s.model) for k, s in students.items()}}
        print(f"\ninference, ms per example ({len(x)} test texts, batch {args.batch_size}, median of 5 rounds; "
              f"the ensemble: a generalist and {len(ens.specialists)} specialists):")
        for k, s in secs.items():
            print(f"  {k:40s} {1e3 * s:8.4f} ms  {s / secs['routed ensemble']:6.3f}x ensemble  "
                  f"{params[k] / 1e6:6.2f}M parameters")


if __name__ == "__main__":
    main()
