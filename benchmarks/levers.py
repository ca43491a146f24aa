"""Which speed levers pay on this CPU? Training images/s per norm and lever, with ratios, in one run.

Each trial of the default CPU layout is one torch process on one thread (benchmarks/concurrency.py),
so this measures one thread too (--threads to change it). For every norm (bn, gn, ln) it trains
normsweep's own net with the real training step (`train.train_epoch`: augmentation, the default
batch, nesterov SGD, OneCycle) on a Fashion-MNIST subset under each lever:

- fp32: the current CPU default (channels-last activations, eager)
- fp32 NCHW: the same in torch's default contiguous layout (what channels-last buys)
- bf16: convolutions and the head under bf16 autocast, norms in float32 (--precision bf16)
- fp32 compiled / bf16 compiled: the same under torch.compile; the first (compiling) epoch's
  extra seconds are printed, since a sweep has to earn them back

An epoch of warm-up, then the best of --repeats timed epochs. Ratios are against fp32 eager.

    .venv/bin/python benchmarks/levers.py [--train-size 6400] [--repeats 2] [--compile]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data as data_lib  # noqa: E402
import train  # noqa: E402


def images_per_s(norm: str, dataset, *, batch_size: int, bf16: bool, compiled: bool, layout, repeats: int) -> tuple:
    """(best training images/s over `repeats` timed epochs, seconds of the first epoch)."""
    train.MEMORY_FORMAT = layout
    run = train.TrainingRun({"norm": norm, "precision": "bf16" if bf16 else "fp32", "epochs": repeats + 1,
                             "batch_size": batch_size}, dataset)
    model = torch.compile(run.model) if compiled else run.model
    args = dict(generator=run.generator, batch_size=run.config["batch_size"], mean=run.mean, std=run.std,
                augment=run.augment, label_smoothing=run.config["label_smoothing"], bf16=bf16)
    first = train.train_epoch(model, run.optimizer, run.scheduler, run.train_x, run.train_y, **args)
    best = max(train.train_epoch(model, run.optimizer, run.scheduler, run.train_x, run.train_y, **args)["images_per_s"]
               for _ in range(repeats))
    return best, first["epoch_seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=6400, help="training images per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a default CPU trial has 1)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--batch-size", type=int, default=train.batch_size_for(60_000),
                        help="images per step (default: the auto batch of the full training split)")
    parser.add_argument("--norms", default="bn,gn,ln")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = data_lib.load_dataset("fashion-mnist").subset(args.train_size, 1000)
    channels_last = train.MEMORY_FORMAT
    levers = [("fp32", False, False, channels_last), ("fp32 NCHW", False, False, torch.contiguous_format),
              ("bf16", True, False, channels_last)]
    if args.compile:
        levers += [("fp32 compiled", False, True, channels_last), ("bf16 compiled", True, True, channels_last)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.train_size} Fashion-MNIST training images, "
          f"batch {args.batch_size}; best of {args.repeats} epochs after one warm-up", flush=True)
    print(f"{'norm':5s} {'lever':14s} {'img/s':>7s} {'ratio':>6s} {'1st epoch s':>12s}")
    for norm in args.norms.split(","):
        base = None
        for label, bf16, compiled, layout in levers:
            rate, first = images_per_s(norm, dataset, batch_size=args.batch_size, bf16=bf16, compiled=compiled,
                                       layout=layout, repeats=args.repeats)
            base = base or rate
            print(f"{norm:5s} {label:14s} {rate:7.0f} {rate / base:6.2f} {first:12.1f}", flush=True)


if __name__ == "__main__":
    main()
