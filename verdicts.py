"""Verdicts between variants: better, equivalent or undecided, counting both sources of noise.

A pair's data is x[s, i] = correct_A[s, i] - correct_B[s, i] over seeds s (init, data order, augmentation; paired
across variants) and scored images i (paired too). Both are samples: more seeds do not shrink the part of the
uncertainty that comes from the images (Bouthillier et al. 2021, "Accounting for Variance in Machine Learning
Benchmarks"). The mean difference's variance is estimated from the seed x image table as a crossed two-way
random-effects design (ANOVA estimators, Satterthwaite degrees of freedom).

Looking after every round of seeds is paid for with alpha spending (Lan & DeMets 1983, O'Brien-Fleming-type
function): the look at information fraction t spends alpha(t) - alpha(t_before), and a pair is tested at that
level, Holm-corrected over the family's pairs still undecided. "Better" is a two-sided t-test; "equivalent" is two
one-sided tests against +-margin (Schuirmann 1987). Both error rates stay at most ALPHA (tests/test_verdicts.py
simulates it).
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05  # the family-wise rate of a false "better", and of a false "equivalent"
MARGIN = 1.0  # accuracy points: differences within it count as equivalent
POWER = 0.8  # of the seed count said to be needed for an undecided pair


@dataclass(frozen=True)
class Difference:
    """A paired difference A - B in accuracy points: its mean, standard error, the Satterthwaite degrees of
    freedom, the seed and image variance components per seed (points^2) and P(A beats B on a seed)."""
    points: float
    se: float
    df: float
    seeds: int
    per_seed_var: float  # of the mean, times seeds: what more seeds divide
    image_var: float  # of the mean: what no number of seeds removes
    p_a_beats_b: float


def difference(a, b) -> Difference:
    """a, b: bool arrays (seeds, images), the scored images each seed of A and of B classified right.

    Raises ValueError under 2 seeds (no seed variance) or for different shapes."""
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or np.shape(a) != np.shape(b):
        raise ValueError(f"need (seeds >= 2, images) arrays of one shape, got {np.shape(a)} and {np.shape(b)}")
    s, n = x.shape
    seed_means, image_means, mean = x.mean(1), x.mean(0), x.mean()
    ms_seed = n * ((seed_means - mean) ** 2).sum() / (s - 1)
    ms_image = s * ((image_means - mean) ** 2).sum() / (n - 1)
    residual = x - seed_means[:, None] - image_means[None, :] + mean
    ms_residual = (residual ** 2).sum() / ((s - 1) * (n - 1))
    # E[MS_seed] = e + n seed, E[MS_image] = e + s image, E[MS_residual] = e; components clipped at 0
    terms = [(max(ms_seed - ms_residual, 0.0), s - 1), (max(ms_image - ms_residual, 0.0), n - 1),
             (ms_residual, (s - 1) * (n - 1))]
    variance = sum(v for v, _ in terms) / (s * n)
    df = variance ** 2 * (s * n) ** 2 / sum(v ** 2 / d for v, d in terms if v > 0) if variance > 0 else math.inf
    per_seed = (terms[0][0] + terms[2][0]) / n  # variance of the mean times seeds
    accuracy_gap = np.asarray(a, dtype=float).mean(1) - np.asarray(b, dtype=float).mean(1)
    wins = (accuracy_gap > 0).mean() + (accuracy_gap == 0).mean() / 2
    return Difference(100 * mean, 100 * math.sqrt(variance), df, s, 1e4 * per_seed, 1e4 * terms[1][0] / (s * n), wins)


def tests(d: Difference, margin: float = MARGIN) -> tuple:
    """(p of "no difference", two-sided t; p of "not equivalent", the larger of the two one-sided tests)."""
    if d.se == 0:  # the same difference on every seed and image (identical variants, say)
        return float(d.points == 0), float(abs(d.points) >= margin)
    t = stats.t(d.df)
    return 2 * t.sf(abs(d.points) / d.se), max(t.sf((d.points + margin) / d.se), t.cdf((d.points - margin) / d.se))


def spent(fraction: float, alpha: float = ALPHA) -> float:
    """The alpha spent by information fraction t in (0, 1] (O'Brien-Fleming-type, Lan & DeMets 1983)."""
    return 2 * stats.norm.sf(stats.norm.isf(alpha / 2) / math.sqrt(fraction)) if fraction > 0 else 0.0


def seeds_needed(d: Difference, margin: float = MARGIN, level: float = ALPHA) -> float:
    """Seeds with which the observed difference would likely (POWER) be decided better or equivalent; inf where
    the images alone leave too much noise (more seeds cannot decide it)."""
    best = math.inf
    for gap, z in ((abs(d.points), stats.norm.isf(level / 2)), (margin - abs(d.points), stats.norm.isf(level))):
        room = (gap / (z + stats.norm.ppf(POWER))) ** 2 - d.image_var
        if gap > 0 and room > 0:
            best = min(best, math.ceil(d.per_seed_var / room))
    return max(best, d.seeds + 1)


def decide(correct: dict, undecided: set, level: float, margin: float = MARGIN) -> dict:
    """(A, B) -> (verdict, Difference) for each undecided pair of variants tested at `level`, Holm-corrected
    over those pairs. correct: variant -> bool array (seeds, images); verdict "better", "equivalent" or None."""
    pairs = sorted(undecided)
    diffs = {pair: difference(correct[pair[0]], correct[pair[1]]) for pair in pairs}
    p = np.array([tests(diffs[pair], margin) for pair in pairs]).reshape(-1, 2)
    better = multipletests(p[:, 0], alpha=level, method="holm")[0] if pairs else []
    equivalent = multipletests(p[:, 1], alpha=level, method="holm")[0] if pairs else []
    return {pair: ("better" if b else "equivalent" if e else None, diffs[pair])
            for pair, b, e in zip(pairs, better, equivalent)}


def sequential(draw, variants, round_seeds: int, max_seeds: int, margin: float = MARGIN, alpha: float = ALPHA):
    """Run rounds of `round_seeds` seeds until every pair is decided or `max_seeds` are spent.

    draw(seeds) -> variant -> bool array (len(seeds), images) trains (or simulates) the given seeds. Returns
    (pair -> (verdict, Difference), seeds used); a pair left undecided has verdict None."""
    correct, undecided, verdicts, spent_before, seeds = {}, set(itertools.combinations(variants, 2)), {}, 0.0, 0
    while undecided and seeds < max_seeds:
        batch = range(seeds, min(seeds + round_seeds, max_seeds))
        new = draw(list(batch))
        correct = {v: np.concatenate([correct[v], new[v]]) if v in correct else new[v] for v in variants}
        seeds = batch.stop
        if seeds < 2:
            continue
        level = spent(seeds / max_seeds, alpha) - spent_before
        spent_before += level
        for pair, (verdict, d) in decide(correct, undecided, level, margin).items():
            verdicts[pair] = (verdict, d)
            if verdict:
                undecided.discard(pair)
    return verdicts, seeds
