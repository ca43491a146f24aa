"""The verdict procedure (verdicts.sequential) run on simulated sweeps with a known true difference.

Per variant, seed and image, correctness is drawn as a trained net's would be: most images are right (or wrong)
for every variant and seed; on a `contested` fraction each variant has its own per-image chance (the image noise,
paired across seeds) shifted by a per-seed effect (the seed noise, `seed_sd` points of accuracy) and by the
variant's true effect. The true accuracy difference between two variants is exactly the difference of their
effects, since the per-image and per-seed terms average to zero over images and seeds.

    python benchmarks/verdict_simulation.py [--runs 2000]
prints, per true difference, how often each verdict came and the mean seeds used.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import verdicts  # noqa: E402


def simulator(rng, effects: dict, images: int, seed_sd: float = 0.2, contested: float = 0.1, spread: float = 0.25):
    """draw(seeds) for verdicts.sequential: variant -> bool array (seeds, images). effects: variant -> true
    accuracy effect (points); seed_sd: per-seed accuracy noise (points); spread: per-image chance half-range."""
    hard = rng.random(images) < contested
    rest_right = rng.random(images) < 0.95  # the images every variant gets right (or wrong) on every seed
    chance = {v: 0.5 + e / 100 / contested + rng.uniform(-spread, spread, images) for v, e in effects.items()}

    def draw(seeds):
        out = {}
        for v in effects:
            shift = rng.normal(0, seed_sd / 100 / contested, (len(seeds), 1))
            out[v] = np.repeat(rest_right[None, :], len(seeds), 0)
            out[v][:, hard] = rng.random((len(seeds), hard.sum())) < np.clip(chance[v][hard] + shift, 0, 1)
        return out
    return draw


def run(true_points: float, variants: int = 2, runs: int = 2000, images: int = 10_000, round_seeds: int = 2,
        max_seeds: int = 10, margin: float = verdicts.MARGIN,
        seed: int = 0) -> dict:
    """Shares of runs whose first pair (variant 0 - variant 1, true difference `true_points`) ended "better" (in
    the right or wrong direction), "equivalent" or undecided, and the mean seeds used."""
    rng = np.random.default_rng(seed)
    counts, seeds_used = {"better": 0, "wrong way": 0, "equivalent": 0, "undecided": 0}, []
    effects = {f"v{k}": (true_points if k == 0 else 0.0) for k in range(variants)}
    for _ in range(runs):
        result, used = verdicts.sequential(simulator(rng, effects, images), list(effects), round_seeds, max_seeds,
                                           margin)
        verdict, d = result[("v0", "v1")]
        if verdict == "better" and (d.points > 0) != (true_points > 0):
            verdict = "wrong way"
        counts[verdict or "undecided"] += 1
        seeds_used.append(used)
    return {**{k: v / runs for k, v in counts.items()}, "mean seeds": float(np.mean(seeds_used))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args(argv)
    m = verdicts.MARGIN
    print(f"| true difference (points) | better | wrong way | equivalent | undecided | mean seeds |")
    print("|---|---|---|---|---|---|")
    for true in (0.0, 0.5 * m, m, 1.5 * m, 2 * m):
        r = run(true, runs=args.runs, images=args.images)
        print(f"| {true:.2f} | {r['better']:.3f} | {r['wrong way']:.3f} | {r['equivalent']:.3f} | "
              f"{r['undecided']:.3f} | {r['mean seeds']:.1f} |")


if __name__ == "__main__":
    main()
