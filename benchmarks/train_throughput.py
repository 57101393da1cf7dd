"""Is the trainer held back by its data path? Training images/s of the full trainer next to the
raw forward/backward/step on batches that are already on the device.

* **trainer**: ``specialists.engine.trainers.train_classifier`` itself, exactly as the generalist
  stage runs it: the device-resident ``Batcher`` (seeded shuffle, normalization, random crop
  with padding on the device), channels-last and bf16 autocast on CUDA, cross-entropy,
  ``specialists.engine.fit.fit``'s step loop (zero_grad, backward, optimizer and schedule step, the
  per-step loss read-back). One timed window = one epoch (``fit`` times each epoch; there is
  no per-epoch evaluation here).
* **raw**: the same architecture, optimizer and autocast on pre-made, pre-normalized batches
  already on the device (channels-last on CUDA); one window = the same number of steps,
  synchronized at its ends, with no per-step read-back.

Both report the median of ``--windows`` windows after ``--warmup`` windows; the ratio
trainer / raw is the share of the raw speed the full trainer keeps.

Data ``synthetic32``: the embedded synthetic hierarchy as 3x32x32 images, 100 classes,
``--train-size`` training examples (default 10,000 on a GPU, 9,000 after the validation split;
1,500 on the CPU, where the default model is the quickstart's ``cnn`` at width 16, so that the
default CPU run stays under 2 minutes; it uses one thread unless ``--threads`` says otherwise).

    python benchmarks/train_throughput.py [--model resnet18] [--width W] [--device auto|cpu|cuda]
        [--batch-size 512] [--data synthetic32] [--train-size 10000] [--windows 4] [--warmup 1]
        [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from _common import device_name  # benchmarks/_common.py (the script's folder is on sys.path)

from specialists.core.losses import hard_loss
from specialists.core.optim import make_optimizer
from specialists.data import Batcher, EpochBatches, epoch_generator
from specialists.device import DEVICES, autocast, prepare_model, synchronize
from specialists.engine.trainers import train_classifier
from specialists.models import count_parameters
from specialists.rundir import Run, load_config

DATA = {
    # name -> config overrides
    "synthetic32": ["data.name=synthetic", "data.image_size=32", "data.num_super=10", "data.classes_per_super=10",
                    "data.test_per_class=1"],
}


def trainer_windows(run: Run, tcfg, seed: int) -> tuple[list[float], int]:
    """Images/s of each epoch of the real trainer; and the steps per epoch."""
    torch.manual_seed(seed)
    model = run.new_model()
    history = train_classifier(run, model, tcfg, None, seed=seed, desc="trainer", eval_splits=())
    rates = [h["steps"] * tcfg.batch_size / h["seconds"] for h in history]
    return rates, history[0]["steps"]


def raw_windows(run: Run, tcfg, steps: int, windows: int, seed: int) -> list[float]:
    """Images/s of forward/backward/step on pre-made device batches, ``steps`` per window."""
    ds, device = run.data, run.device
    torch.manual_seed(seed)
    model = prepare_model(run.new_model(), device, ds.is_image)
    model.train()
    opt = make_optimizer(model, tcfg.optimizer, tcfg.lr, momentum=tcfg.momentum, nesterov=tcfg.nesterov,
                         weight_decay=tcfg.weight_decay)
    batcher = Batcher(ds, ds.train, device)  # channels-last on CUDA, as in training
    sampler = EpochBatches(len(ds.train), tcfg.batch_size, drop_last=True)
    batches = [batcher.batch(idx) for _, idx in zip(range(steps), sampler.epoch(epoch_generator(seed, 0)))]
    rates = []
    for _ in range(windows):
        synchronize(device)
        t0 = time.perf_counter()
        for x, y in batches:
            with autocast(device):
                loss = hard_loss(model(x), y, tcfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        synchronize(device)
        rates.append(len(batches) * tcfg.batch_size / (time.perf_counter() - t0))
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model registry name (default: resnet18 on GPU, cnn on CPU)")
    p.add_argument("--width", type=int, default=None, help="model width (default: the model's own)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 on GPU, 128 on CPU")
    p.add_argument("--data", default="synthetic32", choices=sorted(DATA))
    p.add_argument("--windows", type=int, default=4, help="timed windows (epochs) after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train-size", type=int, default=None,
                   help="training examples generated (default: 10000 on GPU, 1500 on CPU); 10%% go to validation")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on the CPU, where two OpenMP threads on a busy 2-core "
                        "machine run several times slower than one; torch's default with --device cuda)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    model = args.model or ("resnet18" if cuda else "cnn")
    width = args.width or (None if cuda or args.model else 16)
    batch = args.batch_size or (512 if cuda else 128)
    train_size = args.train_size or (10000 if cuda else 1500)
    per_class = max(2, round(train_size / 100))
    epochs = args.warmup + args.windows
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        overrides = [f"run_dir={tmp}", f"device={args.device}", f"seed={args.seed}", *DATA[args.data],
                     f"data.train_per_class={per_class}", f"model.name={model}", f"generalist.epochs={epochs}",
                     f"generalist.batch_size={batch}"]
        if width:
            overrides.append(f"model.width={width}")
        cfg = load_config(None, overrides)
        run = Run(cfg)
        t0 = time.perf_counter()
        ds = run.data
        t_data = time.perf_counter() - t0
        tcfg = cfg.generalist
        n_params = count_parameters(run.new_model())
        print(f"device: {device_name(run.device)}  (torch {torch.__version__})")
        print(f"data: {args.data}, {len(ds.train)} training images {tuple(ds.input_shape)} per window, "
              f"{ds.num_classes} classes, augment={ds.augment} (generated in {t_data:.1f}s)")
        print(f"model: {model}{f' width {width}' if width else ''} ({n_params / 1e6:.2f}M parameters), batch {batch}, optimizer {tcfg.optimizer}, "
              f"{'bf16 autocast + channels-last' if run.device.type == 'cuda' else 'float32'}")

        trainer, steps = trainer_windows(run, tcfg, args.seed)
        raw = raw_windows(run, tcfg, steps=steps, windows=epochs, seed=args.seed)

    tr, rw = trainer[args.warmup:], raw[args.warmup:]
    tr_med, rw_med = statistics.median(tr), statistics.median(rw)
    print(f"windows: {args.warmup} warm-up + {args.windows} timed, {steps} steps x {batch} images each")
    print(f"  trainer (Batcher + augmentation + step): {tr_med:10.1f} images/s   windows: "
          + " ".join(f"{r:.0f}" for r in tr))
    print(f"  raw step on pre-made device batches    : {rw_med:10.1f} images/s   windows: "
          + " ".join(f"{r:.0f}" for r in rw))
    print(f"  ratio trainer / raw: {tr_med / rw_med:.3f}")


if __name__ == "__main__":
    main()
