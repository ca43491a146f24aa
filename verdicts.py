"""Verdicts between variants: better, worse, equivalent or undecided, counting both sources of noise.

A pair's data is x[s, i] = correct_A[s, i] - correct_B[s, i] over seeds s (init, data order, augmentation; paired
across variants) and scored images i (paired too). Both are samples: more seeds do not shrink the part of the
uncertainty that comes from the images (Bouthillier et al. 2021, "Accounting for Variance in Machine Learning
Benchmarks"). The mean difference's variance is estimated from the seed x image table as a crossed two-way
random-effects design (ANOVA estimators); its t has the seeds' degrees of freedom, the conservative end of
Satterthwaite's (1946) range.

Looking after every round of seeds is paid for with alpha spending (Lan & DeMets 1983, O'Brien-Fleming-type
function): the look at information fraction t spends alpha(t) - alpha(t_before), and a pair is tested at that
level, Holm-corrected (Holm 1979) over the family's pairs still undecided. The looks' levels add up to alpha, so by
the union bound the procedure keeps its error rates at most alpha, if conservatively. "Better" or "worse" is a
two-sided t-test; "equivalent" is two one-sided tests against +-margin (Schuirmann 1987). A fixed number of seeds
is one look: decide(correct, pairs, ALPHA, margin). Both error rates stay at most ALPHA (tests/test_verdicts.py
simulates it; docs/verdicts.md).
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import special

ALPHA = 0.05  # the family-wise rate of a false "better" (or "worse"), and of a false "equivalent"
MARGIN = 1.0  # accuracy points: differences within it count as equivalent (docs/verdicts.md says why 1)
POWER = 0.8  # of the seed count said to be needed for an undecided pair


@dataclass(frozen=True)
class Difference:
    """A paired difference A - B in accuracy points: its mean, standard error, the t's degrees of freedom, the
    seeds, the variance of the mean split into what more seeds divide and what they leave (points^2), and the share
    of seeds on which A scored higher (ties count half)."""
    points: float
    se: float
    df: float
    seeds: int
    per_seed_var: float  # of the mean, times seeds: seed variance + interaction / images
    image_var: float  # of the mean: what no number of seeds removes
    p_a_beats_b: float


def _differences(correct: dict, pairs: list) -> dict:
    """(A, B) -> Difference for each pair; correct: variant -> bool array (seeds, images), one shape for all."""
    shapes = {np.shape(correct[v]) for pair in pairs for v in pair}
    seeds, images = next(iter(shapes)) if len(shapes) == 1 and len(next(iter(shapes))) == 2 else (0, 0)
    if seeds < 2 or images < 2:
        raise ValueError(f"need bool arrays (seeds >= 2, images >= 2) of one shape per variant, got {sorted(shapes)}: "
                         "run 2 or more seeds of every variant, scored on the same images")
    names = sorted({v for pair in pairs for v in pair})
    table = np.stack([np.asarray(correct[v], dtype=bool) for v in names])  # (variants, seeds, images)
    # An image every variant and seed got right (or every one wrong) is 0 in every pair's x: it only counts in n.
    contested = (table != table[:1, :1]).any((0, 1))
    table = table[:, :, contested].astype(float)
    row = {v: k for k, v in enumerate(names)}
    x = table[[row[a] for a, _ in pairs]] - table[[row[b] for _, b in pairs]]  # (pairs, seeds, contested)
    s, n, zeros = seeds, images, images - x.shape[2]
    seed_sums = x.sum(2)  # (pairs, seeds): net images A got right and B wrong
    mean = seed_sums.sum(1) / (s * n)
    image_means = x.mean(1)
    ss_seed = n * ((seed_sums / n - mean[:, None]) ** 2).sum(1)
    ss_image = s * (((image_means - mean[:, None]) ** 2).sum(1) + zeros * mean ** 2)
    ss_residual = np.maximum((x * x).sum((1, 2)) - s * n * mean ** 2 - ss_seed - ss_image, 0.0)  # >= 0 but rounding
    ms_seed, ms_image, ms_residual = ss_seed / (s - 1), ss_image / (n - 1), ss_residual / ((s - 1) * (n - 1))
    # E[MS_seed] = e + n var_seed, E[MS_image] = e + s var_image, E[MS_residual] = e, so
    # Var(mean) = (var_seed + e / n) / s + var_image / n = (MS_seed + MS_image - MS_residual) / (s n). The first
    # term, a seed's mean's variance over s, is MS_seed / (s n) itself; an image component estimated below 0 is 0.
    # A floor under it: Var(mean) >= Var(x) / (s n), and Var(x) <= P(x != 0), estimated with one discordant cell
    # added (Laplace), so that few test images or a collapsed variant (the same count right on every seed, MS_seed
    # 0) are not read as no noise at all.
    discordant = (x != 0).sum((1, 2))
    per_seed = np.maximum(ms_seed, (discordant + 1) / (s * n + 2)) / n
    image = np.maximum(ms_image - ms_residual, 0.0) / (s * n)
    wins = (seed_sums > 0).mean(1) + (seed_sums == 0).mean(1) / 2
    # The t's degrees of freedom: the smaller of the two parts' (s - 1 in practice), the conservative end of
    # Satterthwaite's (1946) range. Satterthwaite's own estimate grows when MS_seed happens to come out small: with
    # 2-3 seeds that made a false "better" 1.5-14 times as frequent as its level, with 5 up to 2 (docs/verdicts.md).
    df = min(s - 1, n - 1)
    se = np.sqrt(per_seed / s + image)
    return {pair: Difference(float(100 * mean[k]), float(100 * se[k]), df, s, float(1e4 * per_seed[k]),
                             float(1e4 * image[k]), float(wins[k])) for k, pair in enumerate(pairs)}


def difference(a, b) -> Difference:
    """a, b: bool arrays (seeds, images), the scored images each seed of A and of B classified right.

    Raises ValueError under 2 seeds (no seed variance) or images, or for different shapes."""
    return _differences({"A": a, "B": b}, [("A", "B")])[("A", "B")]


def _p_values(points, se, df, margin: float):
    """Arrays of p of "no difference" (two-sided t) and of "not equivalent" (the larger one-sided p of TOST)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # se 0: the same difference on every seed and image
        differ = np.where(se > 0, 2 * special.stdtr(df, -np.abs(points) / se), (points == 0).astype(float))
        beyond = np.maximum(special.stdtr(df, -(points + margin) / se), special.stdtr(df, (points - margin) / se))
        return differ, np.where(se > 0, beyond, (np.abs(points) >= margin).astype(float))


def holm(p, level: float = ALPHA) -> tuple:
    """(rejected, adjusted p) arrays of Holm's (1979) step-down procedure at family-wise `level`, as statsmodels'
    multipletests(method="holm") gives them (without its gc.collect() per call, 200x the simulation's time)."""
    p = np.asarray(p, dtype=float)
    order, steps = np.argsort(p), np.arange(len(p), 0, -1)
    reject, adjusted = np.empty(len(p), dtype=bool), np.empty(len(p))
    reject[order] = np.logical_and.accumulate(p[order] <= level / steps)
    adjusted[order] = np.minimum(np.maximum.accumulate(p[order] * steps), 1.0)
    return reject, adjusted


def spent(fraction: float, alpha: float = ALPHA) -> float:
    """The alpha spent by information fraction t in (0, 1]: 2 (1 - Phi(z_{alpha/2} / sqrt(t))), O'Brien-Fleming-type
    (Lan & DeMets 1983; O'Brien & Fleming 1979). All of alpha at t = 1."""
    return 2 * special.ndtr(special.ndtri(alpha / 2) / math.sqrt(fraction)) if fraction > 0 else 0.0


def seeds_needed(d: Difference, margin: float = MARGIN, level: float = ALPHA) -> float:
    """Seeds with which the observed difference, taken as true, would likely (POWER, normal approximation) be
    decided better or equivalent at `level`; inf where the images alone leave too much noise (more seeds cannot
    decide it)."""
    best = math.inf
    z_power = special.ndtri(POWER)
    for gap, z in ((abs(d.points), -special.ndtri(level / 2)), (margin - abs(d.points), -special.ndtri(level))):
        room = (gap / (z + z_power)) ** 2 - d.image_var  # what the seed part of the variance may be
        if gap > 0 and room > 0:
            best = min(best, math.ceil(d.per_seed_var / room))
    return max(best, d.seeds + 1)


def decide(correct: dict, undecided: set, level: float, margin: float = MARGIN) -> dict:
    """A look: (A, B) -> (verdict, Difference) for each undecided pair of variants tested at `level`, Holm-corrected
    over those pairs (for "differ" and for "equivalent" each); the pairs decided leave `undecided` (in place).
    correct: variant -> bool array (seeds, images), one shape for all. Verdict: "better" (A beats B), "worse" (B
    beats A), "equivalent" (within +-margin points) or None; a difference shown to exist but also within the margin
    is "better" or "worse"."""
    pairs = sorted(undecided)
    if not pairs:
        return {}
    diffs = _differences(correct, pairs)
    points, se, df = (np.array([getattr(diffs[p], f) for p in pairs]) for f in ("points", "se", "df"))
    differ, beyond = _p_values(points, se, df, margin)
    (differs, _), (equivalent, _) = holm(differ, level), holm(beyond, level)
    seen = {pair: ("better" if differs[k] and points[k] > 0 else "worse" if differs[k] else
                   "equivalent" if equivalent[k] else None, diffs[pair]) for k, pair in enumerate(pairs)}
    undecided -= {pair for pair, (verdict, _) in seen.items() if verdict}
    return seen


def look(correct: dict, undecided: set, fraction: float, spent_before: float, margin: float = MARGIN,
         alpha: float = ALPHA) -> tuple:
    """A look at information fraction `fraction` (seeds done / max seeds), after looks that spent `spent_before`:
    (decide at the level it spends, spent(fraction) - spent_before; that level)."""
    level = float(spent(fraction, alpha)) - spent_before
    return decide(correct, undecided, level, margin), level


def sequential(draw, variants, round_seeds: int, max_seeds: int, margin: float = MARGIN, alpha: float = ALPHA):
    """Run rounds of `round_seeds` seeds until every pair is decided or `max_seeds` are spent; the looks spend
    alpha at information fraction seeds / max_seeds, so the last look at max_seeds spends what is left.

    draw(seeds) -> variant -> bool array (len(seeds), images) trains (or simulates) the given seeds. Returns
    (pair -> (verdict, Difference), seeds used); a pair left undecided has verdict None."""
    if round_seeds < 1 or max_seeds < 2:
        raise ValueError(f"need round_seeds >= 1 and max_seeds >= 2, got {round_seeds} and {max_seeds}")
    correct, undecided, verdicts, spent_before, seeds = {}, set(itertools.combinations(variants, 2)), {}, 0.0, 0
    while undecided and seeds < max_seeds:
        batch = range(seeds, min(seeds + round_seeds, max_seeds))
        new = draw(list(batch))
        correct = {v: np.concatenate([correct[v], new[v]]) if v in correct else new[v] for v in variants}
        seeds = batch.stop
        if seeds < 2:
            continue
        found, level = look(correct, undecided, seeds / max_seeds, spent_before, margin, alpha)
        spent_before += level
        verdicts.update(found)
    return verdicts, seeds
