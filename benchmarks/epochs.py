"""What does a shorter run cost in accuracy? The default sweep at several epoch counts, in one run.

For each epoch count, `tune_main.py` runs the default sweep (every variant, the same recipe; the
one-cycle schedule spans the run, so a 5-epoch run is its own schedule, not the first 5 epochs of
a 20-epoch run). Prints, per variant and epoch count, the final one-view test accuracy (mean and
std over seeds) and the trial's training seconds, the sweep's wall time, and which variants the
sweep's convergence check flags. Experiments go to <storage>/<prefix><epochs>; one that already
finished is read again rather than retrained (its wall time is kept in a file beside it).

    .venv/bin/python benchmarks/epochs.py [--epochs 5,10,20] [--seeds 1] [--dataset fashion-mnist]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import analysis  # noqa: E402

WALL_FILE = "benchmark_wall.json"


def run_sweep(experiment: Path, epochs: int, args) -> float:
    """Wall seconds of the sweep at `epochs`, run now or read back from an earlier run."""
    wall_file = experiment / WALL_FILE
    if wall_file.exists():
        return json.loads(wall_file.read_text())["seconds"]
    command = [sys.executable, str(ROOT / "tune_main.py"), "--dataset", args.dataset, "--epochs", str(epochs),
               "--seeds", str(args.seeds), "--precision", args.precision,
               "--storage-path", str(experiment.parent), "--name", experiment.name]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)  # its console shows the sweep's progress, epoch by epoch
    seconds = time.perf_counter() - start
    wall_file.write_text(json.dumps({"seconds": seconds, "command": command[1:]}))
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="5,10,20", help="comma-separated epoch counts")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant (the default sweep has 1)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--precision", default="auto", help="passed to tune_main.py")
    parser.add_argument("--storage-path", default=str(ROOT / "results"))
    parser.add_argument("--prefix", default="epochs", help="experiment names: <prefix><epochs>")
    args = parser.parse_args()
    counts = [int(e) for e in args.epochs.split(",")]
    rows, walls, flagged = {}, {}, {}
    for epochs in counts:
        experiment = Path(args.storage_path).resolve() / f"{args.prefix}{epochs}"
        walls[epochs] = run_sweep(experiment, epochs, args)
        _, df = analysis.load_experiment(experiment)
        for variant, trials in analysis.trial_table(df).groupby("variant"):
            acc = trials["final one-view acc (%)"]
            spread = f" ± {acc.std():.2f}" if len(acc) > 1 else ""
            rows.setdefault(variant, {})[epochs] = f"{acc.mean():.2f}{spread} ({trials['train s'].mean():.0f} s)"
        flagged[epochs] = [row.variant for row in analysis.convergence(df).itertuples() if not row.converged]
        print(f"{epochs} epochs: sweep wall {walls[epochs]:.0f} s", flush=True)
    print(f"\nfinal-epoch one-view test accuracy (%), mean{' ± std' if args.seeds > 1 else ''} over {args.seeds} "
          f"seed(s), and (training seconds per trial); {args.dataset}")
    print("| variant | " + " | ".join(f"{e} epochs" for e in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for variant, cells in sorted(rows.items()):
        print(f"| {variant} | " + " | ".join(cells.get(e, "") for e in counts) + " |")
    print("| sweep wall | " + " | ".join(f"{walls[e] / 60:.1f} min" for e in counts) + " |")
    print("| flagged (may not have converged) | "
          + " | ".join(", ".join(flagged[e]) or "none" for e in counts) + " |")


if __name__ == "__main__":
    main()
