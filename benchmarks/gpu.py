"""Does the CUDA path work, and how fast is it? The default sweep on the GPU against a CPU reference, in one run.

Runs `tune_main.py` as a subprocess, each sweep in its own local Ray:

1. **the default sweep** (bn, gn, ln, bn+l1; `--precision auto`, `--compile auto`, GPU shares from
   tune_main: 4 trials on 1 GPU get 0.25 each and run at once), for --epochs;
2. **the same sweep for 1 epoch** on the GPU (skipped when --epochs is 1: sweep 1 is it). OneCycle spans
   a run's epochs, so epoch 1 of a 20-epoch run is not a 1-epoch run; the accuracy check needs one;
3. **the CPU reference**: the same sweep with `--epochs 1 --gpus-per-trial 0 --precision fp32
   --compile off`. A trial Ray gave no GPU trains on the CPU (trainable.trial_device).

Prints each sweep's wall time (Ray's start and shutdown included), then per trial the device and
precision it reported (trainable.DEVICE_KEY, PRECISION_KEY), training images/s in epoch 1 (which holds
torch.compile's compiling) and the median over later epochs, its peak device memory
(torch.cuda.max_memory_allocated in that trial's process, MiB) and its one-view test accuracy; the
whole GPU's peak memory in use during sweep 1 (nvidia-smi: every process with its CUDA context); and
per variant the 1-epoch one-view test accuracy on the GPU against the CPU reference. Those differ:
on CUDA the shuffling and augmentation draw from a generator on the device (another random stream),
and auto runs bf16 there. A gap of a point or so is that noise; over ~2 points is suspicious.

Without a GPU it prints "GPU: none" and runs the CPU reference only (on a CPU the default sweep
resolves to those settings anyway): its table, and nothing to compare.

    .venv/bin/python benchmarks/gpu.py                    # on a CUDA machine: 20 epochs, full Fashion-MNIST
    .venv/bin/python benchmarks/gpu.py --tiny             # 1 epoch on 1,000 / 500 images: checks the script
"""
import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402
import trainable  # noqa: E402

SUSPICIOUS_POINTS = 2.0  # a 1-epoch accuracy gap (GPU - CPU, one view) beyond seed and bf16 noise
REFERENCE_FLAGS = ["--gpus-per-trial", "0", "--precision", "fp32", "--compile", "off"]


def run_sweep(name: str, flags: list, storage: Path, quiet: bool) -> float:
    """Wall seconds of `tune_main.py FLAGS --storage-path STORAGE --name NAME`; exits on a failed sweep."""
    command = [sys.executable, str(ROOT / "tune_main.py"), *flags, "--storage-path", str(storage), "--name", name]
    print("$", " ".join(["tune_main.py", *command[2:]]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL if quiet else None)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"error: sweep {name} failed (exit {done.returncode}); rerun without --quiet to see its output")
    return seconds


class GpuMemory:
    """Peak memory in use over all GPUs while the block runs, MiB, sampled from nvidia-smi every
    `interval` seconds (what the 4 trial processes hold together, CUDA contexts and caches included);
    None where nvidia-smi is missing."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mib = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                used = sum(float(line) for line in done.stdout.split() if line.strip())
                self.peak_mib = max(self.peak_mib or 0.0, used)
            self._stop.wait(self.interval)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def trial_rows(experiment: Path) -> pd.DataFrame:
    """One row per trial of a finished sweep: what it reported as device and precision, images/s, peak
    device memory (MiB, nan on the CPU) and one-view test accuracy (%), sorted by variant and seed."""
    grid, df = analysis.load_experiment(experiment)
    # The string keys are not among trainable.METRICS, so the analysis frame leaves them out: read them here.
    reported = {}
    for result in grid:
        metrics = result.metrics_dataframe
        if metrics is not None and not metrics.empty:
            last = metrics.iloc[-1]
            reported[Path(result.path).name] = (last.get(trainable.DEVICE_KEY, "?"),
                                                last.get(trainable.PRECISION_KEY, "?"))
    rows = []
    for trial, epochs in df.sort_values("epoch").groupby("trial"):
        later = epochs.loc[epochs["epoch"] > 1, "images_per_s"]
        device, precision = reported.get(trial, ("?", "?"))
        rows.append({"variant": epochs["variant"].iloc[0], "seed": int(epochs["seed"].iloc[0]),
                     "device": device, "precision": precision, "epochs": int(epochs["epoch"].max()),
                     "img/s epoch 1": epochs["images_per_s"].iloc[0],
                     "img/s later (median)": later.median() if len(later) else math.nan,
                     "train s": epochs["epoch_seconds"].sum(),
                     "peak MiB": epochs["peak_device_memory_mib"].max(),
                     "epoch 1 one-view %": 100 * epochs["test_acc_single"].iloc[0],
                     "final one-view %": 100 * epochs["test_acc_single"].iloc[-1]})
    return pd.DataFrame(rows).sort_values(["variant", "seed"]).reset_index(drop=True)


def sweep_images_per_s(table: pd.DataFrame) -> float:
    """Training images/s of a sweep, all trials at once: the sum over trials of the median after epoch 1
    (which holds torch.compile's compiling), or of epoch 1 where there is no later epoch."""
    return table["img/s later (median)"].fillna(table["img/s epoch 1"]).sum()


def accuracy_gaps(gpu: pd.DataFrame, cpu: pd.DataFrame) -> pd.DataFrame:
    """Per variant and seed: the 1-epoch one-view test accuracy (%) of two trial_rows tables and
    their difference in points ("GPU - CPU"), with `suspicious` where |difference| > SUSPICIOUS_POINTS."""
    key = ["variant", "seed"]
    both = gpu[key + ["epoch 1 one-view %"]].merge(cpu[key + ["epoch 1 one-view %"]], on=key, suffixes=(" GPU", " CPU"))
    both = both.rename(columns={"epoch 1 one-view % GPU": "GPU %", "epoch 1 one-view % CPU": "CPU reference %"})
    both["GPU - CPU (points)"] = both["GPU %"] - both["CPU reference %"]
    both["suspicious"] = both["GPU - CPU (points)"].abs() > SUSPICIOUS_POINTS
    return both


def markdown(table: pd.DataFrame) -> str:
    """A markdown table: images/s and MiB as whole numbers, other floats to 2 decimals, nan as "-"."""
    def cell(column, v):
        if not isinstance(v, float):
            return str(v)
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if "img/s" in column or "MiB" in column else f"{v:.2f}"
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def print_comparison(tables: dict) -> None:
    """The GPU sweeps against the CPU reference: where the trials ran, the speed ratio, the 1-epoch accuracy gaps."""
    if not tables["default sweep"]["device"].str.startswith("cuda").all():
        print("warning: some default-sweep trials did not run on a GPU although torch sees one; see the device column")
    if tables["CPU reference"]["device"].ne("cpu").any():
        print("warning: some CPU-reference trials ran on a GPU; the reference is not a CPU one")
    gpu_rate, cpu_rate = sweep_images_per_s(tables["default sweep"]), sweep_images_per_s(tables["CPU reference"])
    print(f"\nGPU over CPU reference, img/s over all trials: {gpu_rate / cpu_rate:.2f}x "
          f"({gpu_rate:,.0f} against {cpu_rate:,.0f}; the GPU's after epoch 1 where it ran more)")
    gaps = accuracy_gaps(tables.get("1-epoch sweep", tables["default sweep"]), tables["CPU reference"])
    print(f"\naccuracy after 1 epoch, one view: GPU (precision auto, compile auto) against the CPU reference "
          f"(fp32, eager); a gap over ~{SUSPICIOUS_POINTS:g} points is suspicious")
    print(markdown(gaps.assign(suspicious=gaps["suspicious"].map({True: "SUSPICIOUS", False: "no"}))))
    worst = gaps["GPU - CPU (points)"].abs().max()
    verdict = ("within the noise of another random stream and bf16" if worst <= SUSPICIOUS_POINTS
               else "suspicious, look at the GPU path")
    print(f"largest gap {worst:.2f} points: {verdict}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", help="passed to tune_main.py")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the default sweep (the README's: 20)")
    parser.add_argument("--train-size", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant (the default sweep has 1)")
    parser.add_argument("--tiny", action="store_true",
                        help="the smoke-test subset (1,000 train / 500 test images), 1 epoch: checks the script")
    parser.add_argument("--storage-path", default=None,
                        help="keep the experiments here (default: a temporary directory)")
    parser.add_argument("--quiet", action="store_true", help="hide the sweeps' own consoles")
    args = parser.parse_args(argv)
    epochs = 1 if args.tiny else args.epochs
    data_flags = ["--dataset", args.dataset, "--seeds", str(args.seeds)]
    if args.tiny:
        data_flags.append("--smoke-test")
    elif args.train_size:
        data_flags += ["--train-size", str(args.train_size)]
    gpus = torch.cuda.device_count()  # no CUDA context is made here: the trials' processes own the GPU
    print(f"GPU: {f'{gpus} CUDA device(s) visible to torch' if gpus else 'none'}; torch {torch.__version__}",
          flush=True)
    if not gpus:
        print("no GPU: running the CPU reference only (the default sweep on a CPU resolves to its settings, "
              "fp32 and eager); nothing to compare", flush=True)
    sweeps = {}  # label -> (experiment name, tune_main.py flags)
    if gpus:
        sweeps["default sweep"] = ("gpu_default", data_flags + ["--epochs", str(epochs)])
        if epochs != 1:
            sweeps["1-epoch sweep"] = ("gpu_epoch1", data_flags + ["--epochs", "1"])
    sweeps["CPU reference"] = ("cpu_reference", data_flags + ["--epochs", "1"] + REFERENCE_FLAGS)

    walls, tables, whole_gpu_mib = {}, {}, None
    with tempfile.TemporaryDirectory() as temporary:
        storage = Path(args.storage_path or temporary).resolve()
        for label, (name, flags) in sweeps.items():
            with GpuMemory() as memory:
                walls[label] = run_sweep(name, flags, storage, args.quiet)
            if label == "default sweep":
                whole_gpu_mib = memory.peak_mib
            tables[label] = trial_rows(storage / name)

    print(f"\n{args.dataset}{' (smoke-test subset)' if args.tiny else ''}, {args.seeds} seed(s); wall time includes "
          f"Ray's start and shutdown; img/s is each trial's training images per second, all trials running at once")
    for label, table in tables.items():
        print(f"\n{label}: {table['epochs'].max()} epoch(s), wall {walls[label]:.1f} s, "
              f"{sweep_images_per_s(table):,.0f} img/s over all trials")
        print(markdown(table))
    if whole_gpu_mib is not None:
        print(f"\nwhole-GPU memory in use, peak during the default sweep: {whole_gpu_mib:,.0f} MiB (nvidia-smi; "
              f"every trial process with its CUDA context)")
    if gpus:
        print_comparison(tables)

if __name__ == "__main__":
    main()
