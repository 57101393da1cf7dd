"""What the student costs: training time per epoch over the generalist's, inference time per
example over the routed ensemble's (docs/method.md, "Distilling the ensemble into one student").

Builds a small synthetic run in a temporary folder (generalist, subsets, specialists), then,
in one process and on the same batches:

- trains a fresh generalist (hard labels), a fresh student with the routed-ensemble teacher
  (generalist + routed specialists + combine on every augmented batch) and the born-again
  student (generalist teacher) for reference, taking turns one epoch each for ``--epochs``
  epochs; no per-epoch evaluation, same batch size; prints the median seconds per epoch (wall,
  and on the CPU this process's CPU time) and the ratios (target with the routed-ensemble
  teacher: at most 1.8x the generalist);
- times inference over the test split (median of ``--repeats`` passes): generalist, routed
  ensemble, student; prints seconds per example and the ratio student / ensemble.

    python benchmarks/student_cost.py                        # CPU-sized, < 3 minutes
    python benchmarks/student_cost.py --device cuda --train-per-class 2000 --image-size 32
    python benchmarks/student_cost.py --config configs/quickstart.yaml  # a config's data/model

On the CPU the benchmark uses one thread by default (``--threads``): on a shared machine two
spinning OpenMP threads can be tens of times slower than one, which would swamp the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _common import device_name  # noqa: E402  benchmarks/_common.py (the script's folder is on sys.path)

from specialists.device import DEVICES  # noqa: E402
from specialists.engine.teachers import EnsembleTeacher, GeneralistTeacher  # noqa: E402
from specialists.engine.timing import seconds_per_example, timing_rows  # noqa: E402
from specialists.engine.trainers import train_classifier, train_student  # noqa: E402
from specialists.inference import SingleModel, SpecialistEnsemble  # noqa: E402
from specialists.rundir import Run, load_config  # noqa: E402
from specialists.stages.pipeline import run_stage  # noqa: E402
from specialists.stages.student import new_student  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config whose data/model to use (default: a small synthetic run)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--epochs", type=int, default=4, help="timed epochs of each trainer (median reported)")
    p.add_argument("--repeats", type=int, default=5, help="timed inference passes (median reported)")
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument("--run-dir", help="keep the run here instead of a temporary folder")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="student_cost_")
        run_dir = Path(tmp.name) / "run"
    small = [] if args.config else [
        "data.name=synthetic", "data.num_super=5", "data.classes_per_super=4",
        f"data.train_per_class={args.train_per_class}", "data.test_per_class=50", f"data.image_size={args.image_size}",
        "model.name=cnn", "model.width=16", "generalist.epochs=4", "generalist.batch_size=128",
        "subsets.num_specialists=5", "specialists.epochs=2", "specialists.batch_size=128",
    ]
    cfg = load_config(args.config, [f"run_dir={run_dir}", f"device={args.device}", "seed=0", *small, *args.overrides])
    run = Run(cfg)
    print(f"device: {device_name(run.device)}", flush=True)

    t0 = time.perf_counter()
    for stage in ("generalist", "subsets", "specialists"):
        run_stage(cfg, stage)
    ds = run.data
    ens = SpecialistEnsemble.from_run(run)
    sizes = [len(s) for s in ens.subsets]
    print(f"run: {cfg.data.name}, {ds.num_classes} classes, {len(ds.train)} train / {len(ds.test)} test examples, "
          f"model {cfg.model.name}, {len(sizes)} specialists of sizes {sizes}, top_n {ens.top_n} "
          f"(built in {time.perf_counter() - t0:.1f}s)", flush=True)

    # --- training time per epoch -------------------------------------------------------
    # The three trainers take turns, one epoch each (each resumes its own checkpoint), so a
    # burst of load on a shared machine hits them alike; per epoch we keep the loop's wall
    # time and, on the CPU, this process's CPU time (immune to other processes' load).
    E, bs = args.epochs, cfg.generalist.batch_size
    cfg.student.batch_size = bs  # same batches per epoch as the generalist
    ckpt = run.dir / "bench"
    ckpt.mkdir(exist_ok=True)
    torch.manual_seed(0)
    gmodel = run.new_model()
    smodel, bmodel = new_student(run, cfg.seed), new_student(run, cfg.seed)
    ens_teacher = EnsembleTeacher(ens)
    gen_teacher = GeneralistTeacher(run.load_generalist(), run.device)

    def student_epochs(model, teacher, name):
        def train(k):
            cfg.student.epochs = k
            return train_student(run, model, teacher, ckpt / f"{name}.pt", seed=cfg.seed, desc=f"bench {name}",
                                 eval_splits=())
        return train

    trainers = {
        "generalist": lambda k: train_classifier(run, gmodel, OmegaConf.merge(cfg.generalist, {"epochs": k}),
                                                 ckpt / "generalist.pt", seed=cfg.seed, desc="bench generalist",
                                                 eval_splits=()),
        "ensemble": student_epochs(smodel, ens_teacher, "student"),
        "generalist_teacher": student_epochs(bmodel, gen_teacher, "born_again"),
    }
    wall = {k: [] for k in trainers}
    cpu = {k: [] for k in trainers}
    for k in range(1, E + 1):
        for name, train in trainers.items():
            c0 = time.process_time()
            hist = train(k)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(hist[-1]["seconds"])
    x = ens.preprocess(ds.test.x[timing_rows(len(ds.test), len(ds.test))])
    with torch.inference_mode():  # how many specialist forwards the routing asks for per example
        active = ens.components(x)[2]
    med = lambda v: float(statistics.median(v))  # noqa: E731
    g, s, b = med(wall["generalist"]), med(wall["ensemble"]), med(wall["generalist_teacher"])
    steps = hist[-1]["steps"]
    print(f"\ntraining, median seconds per epoch over {E} interleaved epochs ({steps} steps of {bs}), wall time:")
    print(f"  generalist (hard labels)              {g:8.3f} s")
    print(f"  student, routed-ensemble teacher      {s:8.3f} s   {s / g:5.2f}x the generalist  (target <= 1.8x)")
    print(f"  student, generalist teacher (control) {b:8.3f} s   {b / g:5.2f}x the generalist")
    if run.device.type == "cpu":
        gc, sc, bc = med(cpu["generalist"]), med(cpu["ensemble"]), med(cpu["generalist_teacher"])
        print(f"  same, CPU seconds of this process:    {gc:.3f} / {sc:.3f} / {bc:.3f} s   "
              f"student {sc / gc:.2f}x, born-again {bc / gc:.2f}x the generalist")
    print(f"  routed specialists per example (|A|)  {float(active.sum(1).float().mean()):8.3f}  "
          f"(the teacher runs 1 + |A| forwards, the student 1 forward + 1 backward)")
    student = smodel

    # --- inference time per example ----------------------------------------------------
    generalist = run.load_generalist()
    bsz = min(len(x), 1024)
    one = lambda m: SingleModel(m, ens.info, run.device, bsz).proba  # noqa: E731
    t = seconds_per_example({"generalist": one(generalist), "ensemble": ens.proba, "student": one(student)}, x, bsz,
                            args.repeats)
    t_g, t_e, t_s = t["generalist"], t["ensemble"], t["student"]
    print(f"\ninference, median of {args.repeats} interleaved passes over {len(x)} test examples (batches of {bsz}):")
    print(f"  generalist        {t_g * 1e6:10.2f} us/example")
    print(f"  routed ensemble   {t_e * 1e6:10.2f} us/example   {t_e / t_g:5.2f}x the generalist")
    print(f"  student           {t_s * 1e6:10.2f} us/example   {t_s / t_e:5.3f}x the routed ensemble "
          f"({t_e / t_s:.2f}x faster)")
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
