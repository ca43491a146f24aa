"""Which trial layout finishes a CPU sweep fastest? Prints wall seconds and ratios in one run.

Runs the same 4-variant sweep (bn, gn, ln, bn+l1) on a Fashion-MNIST subset under each layout:
all trials at once on fractional CPUs, two at a time on one CPU each, one at a time on all CPUs.
The first layout is the baseline of the ratios.

    .venv/bin/python benchmarks/concurrency.py [--train-size 10000] [--epochs 2]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    args = parser.parse_args()
    cpus = os.cpu_count()
    layouts = {f"4 at once, {cpus / 4:g} CPU each": cpus / 4,
               f"{cpus} at once, 1 CPU each": 1,
               f"1 at once, {cpus} CPUs each": cpus}
    seconds = {}
    with tempfile.TemporaryDirectory() as storage:
        for i, (label, cpus_per_trial) in enumerate(layouts.items()):
            command = [sys.executable, str(ROOT / "tune_main.py"), "--dataset", "fashion-mnist",
                       "--train-size", str(args.train_size), "--epochs", str(args.epochs),
                       "--cpus-per-trial", str(cpus_per_trial), "--storage-path", storage, "--name", f"layout{i}"]
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            seconds[label] = time.perf_counter() - start
            print(f"{label:28s} {seconds[label]:7.1f} s", flush=True)
    baseline = next(iter(seconds.values()))
    print(f"\n4 variants x {args.epochs} epochs x {args.train_size} images on {cpus} CPUs; "
          f"ratio = seconds / first layout's")
    for label, s in seconds.items():
        print(f"{label:28s} {s:7.1f} s  ratio {s / baseline:.2f}")


if __name__ == "__main__":
    main()
