"""normsweep against the loop a user would write, same net, data and epochs, in one run.

(a) The typical loop: a torch Dataset that hands out PIL images, per-sample torchvision transforms
    (random flip, ToTensor, Normalize) in a DataLoader with 2 workers, the variants trained one
    after another, each evaluated on the test split every epoch, fp32.
(b) normsweep: `tune_main.py` with the same variants and epochs (Ray's start included), fp32.
(c) with --bf16: the same sweep with --precision bf16.
Prints wall seconds, training images per second, the ratio (a) / (b), the net's FLOPs per image
(forward + backward, torch's FLOP counter), each path's fraction of this machine's measured fp32
and bf16 matrix-product rates, and the sweep's peak memory over all its processes.

    .venv/bin/python benchmarks/typical_vs_normsweep.py [--epochs 2] [--train-size 0 (all)] [--bf16]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data as data_lib  # noqa: E402
import train  # noqa: E402
from config import DEFAULT_L1, TrialConfig, batch_size_for  # noqa: E402
from model import build_model  # noqa: E402

VARIANTS = (("bn", 0.0), ("gn", 0.0), ("ln", 0.0), ("bn", DEFAULT_L1))


class PILDataset(torch.utils.data.Dataset):
    """What the typical solution iterates: one PIL image at a time through torchvision transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images[:, 0].numpy(), labels, transform  # (N, H, W) grayscale

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def typical_loop(dataset, epochs: int, batch_size: int) -> float:
    """(a): every variant in turn with the same recipe as normsweep, data through a DataLoader."""
    mean, std = data_lib.image_stats(dataset.train_images)
    normalise = [transforms.ToTensor(), transforms.Normalize(mean.tolist(), std.tolist())]
    train_set = PILDataset(dataset.train_images, dataset.train_labels,
                           transforms.Compose([transforms.RandomHorizontalFlip(), *normalise]))
    test_set = PILDataset(dataset.test_images, dataset.test_labels, transforms.Compose(normalise))
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=2)
    test_loader = DataLoader(test_set, batch_size=1000, num_workers=2)
    start = time.perf_counter()
    for norm, l1 in VARIANTS:
        torch.manual_seed(0)
        model = build_model(norm)
        optimizer = torch.optim.SGD(train.param_groups(model, TrialConfig.weight_decay),
                                    lr=TrialConfig.lr, momentum=0.9, nesterov=True)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=TrialConfig.lr, epochs=epochs,
                                                        steps_per_epoch=len(train_loader))
        for epoch in range(epochs):
            model.train()
            for x, y in train_loader:
                loss = F.cross_entropy(model(x), y, label_smoothing=TrialConfig.label_smoothing)
                if l1:
                    loss = loss + l1 * train.l1_penalty(model)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in test_loader:
                    correct += (model(x).argmax(1) == y).sum().item()
            print(f"  typical {norm}{'+l1' if l1 else ''} epoch {epoch + 1}: test acc {correct / len(test_set):.4f}",
                  flush=True)
    return time.perf_counter() - start


def normsweep(epochs: int, train_size: int, precision: str) -> tuple:
    """(b): the CLI as a user runs it, in a subprocess (Ray's start and shutdown included).

    Returns (wall seconds, peak memory in bytes, where the time went): memory is the proportional set
    size (shared pages split between the processes sharing them) summed over the driver and every
    process it started, Ray's workers included, sampled every 0.5 s.
    """
    import psutil

    with tempfile.TemporaryDirectory() as storage:
        command = [sys.executable, str(ROOT / "tune_main.py"), "--dataset", "fashion-mnist", "--epochs", str(epochs),
                   "--storage-path", storage, "--name", "bench", "--no-test-flip", "--precision", precision]
        if train_size:
            command += ["--train-size", str(train_size)]
        start = time.perf_counter()
        driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
        peak = 0
        while driver.poll() is None:
            total = 0
            try:
                tree = [psutil.Process(driver.pid)] + psutil.Process(driver.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for process in tree:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak = max(peak, total)
            time.sleep(0.5)
        if driver.wait():
            raise SystemExit(f"tune_main.py failed with exit status {driver.returncode}")
        return time.perf_counter() - start, peak, time_split(Path(storage) / "bench")


def time_split(experiment: Path) -> dict:
    """Seconds from the trials' progress.csv files: the mean per trial of its training steps and of the
    rest of its epochs (evaluation, precise BN, checkpoint, report), and the longest trial's whole life."""
    import pandas as pd

    trials = [pd.read_csv(f) for f in experiment.glob("*/progress.csv")]
    training = sum(t["epoch_seconds"].sum() for t in trials) / len(trials)
    epochs = sum(t["time_this_iter_s"].sum() for t in trials) / len(trials)
    longest = max(t["time_total_s"].iloc[-1] for t in trials)
    return {"training": training, "evaluation and reporting": epochs - training, "longest trial": longest}


def flops_per_image(batch: int = 128) -> tuple:
    """(training, evaluation) FLOPs per image of the default net: forward + backward, forward only."""
    model, x = build_model("bn"), torch.randn(batch, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    train_flops = counter.get_total_flops() / batch
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return train_flops, counter.get_total_flops() / batch


def matmul_rate(dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matrix product on this machine's CPU threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant, both paths")
    parser.add_argument("--train-size", type=int, default=0, help="first N training images (0 = all 60,000)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run (c): normsweep with --precision bf16 (convolutions in bf16, norms in fp32)")
    args = parser.parse_args()
    dataset = data_lib.load_dataset("fashion-mnist")
    if args.train_size:
        dataset = dataset.subset(args.train_size, len(dataset.test_labels))
    n_train, n_test = len(dataset.train_labels), len(dataset.test_labels)
    batch = batch_size_for(n_train)
    train_flops, eval_flops = flops_per_image()
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    work = len(VARIANTS) * args.epochs * (n_train * train_flops + n_test * eval_flops)  # FLOPs, both paths
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matrix products: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    print(f"net: {train_flops / 1e6:.1f} MFLOP per training image (forward + backward), "
          f"{eval_flops / 1e6:.1f} per test image; {len(VARIANTS)} variants x {args.epochs} epochs x "
          f"{n_train} train + {n_test} test images, batch {batch}", flush=True)
    sweeps = {"(b) normsweep": normsweep(args.epochs, args.train_size, "fp32")}
    if args.bf16:
        sweeps["(c) normsweep bf16"] = normsweep(args.epochs, args.train_size, "bf16")
    seconds = {"(a) typical loop": typical_loop(dataset, args.epochs, batch),
               **{label: sweep[0] for label, sweep in sweeps.items()}}
    print(f"\n{'path':18s} {'wall s':>8s} {'train img/s':>12s} {'GFLOP/s':>8s} {'of fp32':>8s} {'of bf16':>8s}")
    for label, s in seconds.items():
        rate = work / s
        print(f"{label:18s} {s:8.1f} {len(VARIANTS) * args.epochs * n_train / s:12.0f} {rate / 1e9:8.1f} "
              f"{rate / rates['fp32']:8.1%} {rate / rates['bf16']:8.1%}")
    for label, (wall, memory, split) in sweeps.items():
        print(f"\n{label}: {seconds['(a) typical loop'] / wall:.2f}x the typical loop's speed; peak memory, all its "
              f"processes (PSS): {memory / 2**30:.2f} GiB")
        print(f"  of its {wall:.0f} s wall, per trial: " + ", ".join(f"{k} {v:.0f} s" for k, v in split.items())
              + f"; Ray's start, scheduling and shutdown and the final table: {wall - split['longest trial']:.0f} s")
    print(f"the dataset as uint8 tensors is "
          f"{(dataset.train_images.numel() + dataset.test_images.numel()) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
