"""The verdict procedure (verdicts.sequential) run on simulated sweeps with a known true difference.

Per variant, seed and image, correctness is drawn as a trained net's would be: most images are right (or wrong)
for every variant and seed; on a `contested` share each variant has its own per-image chance (the image noise,
paired across seeds) shifted by a per-seed effect (the seed noise, `seed_sd` points of accuracy) and by the
variant's true effect. The true accuracy difference between two variants is the difference of their effects (in
expectation over the drawn images: the per-image and per-seed terms average to zero; chances beyond [0, 1], which
these settings make rare, act as 0 or 1). Images are exchangeable, so the contested ones come first and only they
are drawn.

    python benchmarks/verdict_simulation.py [--runs 2000]
prints its settings, then per true difference how often each verdict came and the mean seeds used.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import verdicts  # noqa: E402

SEED_SD, CONTESTED, SPREAD = 0.2, 0.1, 0.25  # points of accuracy; share of images; half-range of a chance


def simulator(rng, effects: dict, images: int, seed_sd: float = SEED_SD, contested: float = CONTESTED,
              spread: float = SPREAD):
    """draw(seeds) for verdicts.sequential: variant -> bool array (seeds, images). effects: variant -> true
    accuracy effect (points); seed_sd: per-seed accuracy noise (points); spread: per-image chance half-range."""
    hard = rng.binomial(images, contested)  # images [0, hard) are contested
    rest_right = rng.random(images - hard) < 0.95  # the others: every variant right (or wrong) on every seed
    chance = {v: 0.5 + e / 100 / contested + rng.uniform(-spread, spread, hard) for v, e in effects.items()}

    def draw(seeds):
        out = {}
        for v in effects:
            shift = rng.normal(0, seed_sd / 100 / contested, (len(seeds), 1))
            out[v] = np.empty((len(seeds), images), dtype=bool)
            out[v][:, hard:] = rest_right
            out[v][:, :hard] = rng.random((len(seeds), hard)) < chance[v] + shift
        return out
    return draw


def run(true_points: float, variants: int = 2, runs: int = 2000, images: int = 10_000, round_seeds: int = 2,
        max_seeds: int = 10, margin: float = verdicts.MARGIN, alpha: float = verdicts.ALPHA, seed_sd: float = SEED_SD,
        seed: int = 0) -> dict:
    """Shares of runs whose first pair (v0 - v1, true difference `true_points`; any others have 0) ended "v0
    better", "v1 better", "equivalent" or undecided; of runs with a false verdict on any pair ("false better":
    a difference where there is none or in the wrong direction; "false equivalent": where the truth is at least the
    margin); and the mean seeds used."""
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(["v0 better", "v1 better", "equivalent", "undecided", "false better", "false equivalent"],
                           0)
    seeds_used = []
    effects = {f"v{k}": (true_points if k == 0 else 0.0) for k in range(variants)}
    sign = {"better": 1, "worse": -1}
    for _ in range(runs):
        result, used = verdicts.sequential(simulator(rng, effects, images, seed_sd), list(effects), round_seeds,
                                           max_seeds, margin, alpha)
        first = result[("v0", "v1")][0]
        counts[{"better": "v0 better", "worse": "v1 better"}.get(first, first or "undecided")] += 1
        truths = {pair: effects[pair[0]] - effects[pair[1]] for pair in result}
        counts["false better"] += any(v in sign and np.sign(truths[p]) != sign[v] for p, (v, _) in result.items())
        counts["false equivalent"] += any(v == "equivalent" and abs(truths[p]) >= margin
                                          for p, (v, _) in result.items())
        seeds_used.append(used)
    return {**{k: v / runs for k, v in counts.items()}, "mean seeds": float(np.mean(seeds_used))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000, help="simulated sweeps per true difference")
    parser.add_argument("--images", type=int, default=10_000, help="scored test images")
    parser.add_argument("--variants", type=int, default=2, help="variants per sweep (all but v0 have effect 0)")
    parser.add_argument("--round-seeds", type=int, default=2, help="seeds per round (one look after each)")
    parser.add_argument("--max-seeds", type=int, default=10)
    parser.add_argument("--seed-sd", type=float, default=SEED_SD, help="per-seed accuracy noise of a variant (points)")
    parser.add_argument("--margin", type=float, default=verdicts.MARGIN, help="accuracy points of equivalence")
    parser.add_argument("--alpha", type=float, default=verdicts.ALPHA)
    args = parser.parse_args(argv)
    print(f"images {args.images}, contested share {CONTESTED}, per-image chance 0.5 +- {SPREAD} per variant, "
          f"seed sd {args.seed_sd} points per variant, variants {args.variants}, rounds of {args.round_seeds} seeds up "
          f"to {args.max_seeds}, margin {args.margin} points, alpha {args.alpha}, runs {args.runs}")
    print("| true difference (points) | v0 better | v1 better | equivalent | undecided | false better (any pair) "
          "| false equivalent (any pair) | mean seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for true in (0.0, 0.5 * args.margin, args.margin, 1.5 * args.margin, 2 * args.margin):
        r = run(true, args.variants, args.runs, args.images, args.round_seeds, args.max_seeds, args.margin,
                args.alpha, args.seed_sd)
        print(f"| {true:.2f} | {r['v0 better']:.3f} | {r['v1 better']:.3f} | {r['equivalent']:.3f} | "
              f"{r['undecided']:.3f} | {r['false better']:.3f} | {r['false equivalent']:.3f} | "
              f"{r['mean seeds']:.1f} |")


if __name__ == "__main__":
    main()
