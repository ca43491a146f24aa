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

An epoch of warm-up, then --repeats timed epochs per lever, taken in turns (lever A, B, C, A, B,
C, ...) so that the machine's slow spells fall on every lever; the best of each lever's epochs is
printed. Ratios are against fp32 eager.

    .venv/bin/python benchmarks/levers.py [--train-size 6400] [--repeats 3] [--compile]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data as data_lib  # noqa: E402
import config  # noqa: E402
import train  # noqa: E402


def start_run(norm: str, dataset, *, batch_size: int, bf16: bool, compiled: bool, layout, epochs: int) -> dict:
    """A run under one lever, its first (warm-up, compiling) epoch done: {"epoch": ..., "first_s": ...}."""
    train.MEMORY_FORMAT = layout
    run = train.TrainingRun({"norm": norm, "precision": "bf16" if bf16 else "fp32", "compile": "on" if compiled else "off",
                             "epochs": epochs, "batch_size": batch_size}, dataset)

    def epoch() -> float:
        train.MEMORY_FORMAT = layout  # the levers take turns, and the layout is module state
        return run.train_one_epoch()["images_per_s"]

    start = time.perf_counter()
    epoch()
    return {"epoch": epoch, "first_s": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=6400, help="training images per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per lever, taken in turns (the best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a default CPU trial has 1)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--batch-size", type=int, default=config.batch_size_for(60_000),
                        help="images per step (default: the auto batch of the full training split)")
    parser.add_argument("--norms", default="bn,gn,ln")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one fp32 epoch of the first norm spends its time, by torch op")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = data_lib.load_dataset("fashion-mnist").subset(args.train_size, 1000)
    channels_last = train.MEMORY_FORMAT
    levers = [("fp32", False, False, channels_last), ("fp32 NCHW", False, False, torch.contiguous_format),
              ("bf16", True, False, channels_last)]
    if args.compile:
        levers += [("fp32 compiled", False, True, channels_last), ("bf16 compiled", True, True, channels_last)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.train_size} Fashion-MNIST training images, "
          f"batch {args.batch_size}; best of {args.repeats} epochs per lever, in turns, after one warm-up", flush=True)
    print(f"{'norm':5s} {'lever':14s} {'img/s':>7s} {'ratio':>6s} {'1st epoch s':>12s}")
    for norm in args.norms.split(","):
        runs = {label: start_run(norm, dataset, batch_size=args.batch_size, bf16=bf16, compiled=compiled,
                                 layout=layout, epochs=args.repeats + 1)
                for label, bf16, compiled, layout in levers}
        # Round-robin over the levers, so that a slow spell of a shared machine hits every lever alike.
        rates = {label: [] for label in runs}
        for _ in range(args.repeats):
            for label, run in runs.items():
                rates[label].append(run["epoch"]())
        base = max(rates["fp32"])
        for label, run in runs.items():
            print(f"{norm:5s} {label:14s} {max(rates[label]):7.0f} {max(rates[label]) / base:6.2f} "
                  f"{run['first_s']:12.1f}", flush=True)
    if args.profile:
        profile(args.norms.split(",")[0], dataset, args.batch_size)


def profile(norm: str, dataset, batch_size: int):
    """torch.profiler's table of the ops one fp32 (default) training epoch spends its time in."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run = start_run(norm, dataset, batch_size=batch_size, bf16=False, compiled=False,
                    layout=train.MEMORY_FORMAT, epochs=2)
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        run["epoch"]()
    print(f"\n{norm}, fp32, one epoch, by self CPU time:")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
