"""verdicts.py: its error rates, simulated with benchmarks/verdict_simulation.py's sweeps of known true difference,
stay at most ALPHA (sequential, and with a fixed number of seeds); the standard error matches the spread of the
estimates; identical variants are equivalent; bad input is refused. Seeded, so the same on every run."""
import dataclasses
import importlib.util
import itertools
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

import verdicts
from conftest import ROOT

SIMULATION = importlib.util.spec_from_file_location("verdict_simulation", ROOT / "benchmarks" / "verdict_simulation.py")
simulation = importlib.util.module_from_spec(SIMULATION)
SIMULATION.loader.exec_module(simulation)

RUNS = 1000  # simulated sweeps per rate: an observed rate of 0.075 against ALPHA 0.05 fails the binomial test


def assert_at_most_alpha(errors: int, runs: int, what: str):
    """The observed error rate is not significantly above ALPHA (one-sided binomial test at 0.001)."""
    p = stats.binomtest(errors, runs, verdicts.ALPHA, alternative="greater").pvalue
    assert p > 0.001, f"{what}: {errors} of {runs} runs, significantly above alpha {verdicts.ALPHA} (p = {p:.2g})"


@pytest.mark.parametrize("true_points, error", [(0.0, "false better"), (1.5 * verdicts.MARGIN, "false equivalent")])
def test_sequential_error_rates_at_most_alpha(true_points, error):
    """3 variants: 3 pairs in the Holm family; at 1.5 x margin, v1 - v2 (truth 0) may also be falsely "better". Seed
    noise 0.6 points: where the t is about exact, so a look not paid for shows (testing each at alpha: ~0.1)."""
    r = simulation.run(true_points, variants=3, runs=RUNS, seed_sd=0.6, seed=1)
    print(f"true difference {true_points} points: mean seeds {r['mean seeds']:.2f}, {r}")
    assert_at_most_alpha(round(r[error] * RUNS), RUNS, error)
    assert_at_most_alpha(round(r["false better"] * RUNS), RUNS, "false better")


def test_fixed_seeds_false_better_at_most_alpha():
    """One look at ALPHA with 3 seeds, where seed noise dominates: the t's degrees of freedom matter most here
    (Satterthwaite's estimated ones gave ~1.5 x alpha)."""
    rng = np.random.default_rng(2)
    errors = 0
    for _ in range(RUNS):
        correct = simulation.simulator(rng, {"a": 0.0, "b": 0.0}, 10_000, seed_sd=0.6)(range(3))
        errors += verdicts.decide(correct, {("a", "b")}, verdicts.ALPHA)[("a", "b")][0] in ("better", "worse")
    assert_at_most_alpha(errors, RUNS, "false better, 3 seeds, one look")


@pytest.mark.parametrize("seeds, seed_sd", [(10, 0.05), (3, 0.6)])  # the image part ~45% of the variance; ~1%
def test_standard_error_matches_the_spread_of_estimates(seeds, seed_sd):
    rng = np.random.default_rng(3)
    points, variances = [], []
    for _ in range(1000):
        correct = simulation.simulator(rng, {"a": 0.3, "b": 0.0}, 10_000, seed_sd=seed_sd)(range(seeds))
        d = verdicts.difference(correct["a"], correct["b"])
        points.append(d.points)
        variances.append(d.se ** 2)
        assert d.se ** 2 == pytest.approx(d.per_seed_var / seeds + d.image_var)
    # 1000 estimates: the empirical variance is within ~4.5% (one sd) of the truth
    assert np.mean(variances) == pytest.approx(np.var(points, ddof=1), rel=0.15)
    assert np.mean(points) == pytest.approx(0.3, abs=4 * np.std(points) / np.sqrt(1000))


def test_the_difference_against_a_direct_anova():
    """The contested-images shortcut gives the two-way ANOVA on the whole table."""
    rng = np.random.default_rng(4)
    a, b = rng.random((4, 300)) < 0.7, rng.random((4, 300)) < 0.6
    a[:, :100] = b[:, :100] = True
    d = verdicts.difference(a, b)
    x = a.astype(float) - b
    s, n = x.shape
    residual = x - x.mean(1, keepdims=True) - x.mean(0) + x.mean()
    ms_seed, ms_image = n * x.mean(1).var(ddof=1), s * x.mean(0).var(ddof=1)
    ms_residual = (residual ** 2).sum() / ((s - 1) * (n - 1))
    assert d.points == pytest.approx(100 * x.mean())
    assert d.se ** 2 == pytest.approx(1e4 * (ms_seed + max(ms_image - ms_residual, 0)) / (s * n))
    assert (d.df, d.seeds) == (s - 1, s)


def test_equal_arrays_are_equivalent():
    rng = np.random.default_rng(5)
    same = rng.random((3, 500)) < 0.9
    d = verdicts.difference(same, same)
    cells = same.size  # no discordant cell: the floor's one added (Laplace) in cells + 2
    assert (d.points, d.p_a_beats_b) == (0.0, 0.5) and d.se == pytest.approx(100 * (1 / (cells + 2) / cells) ** 0.5)
    verdict, _ = verdicts.decide({"a": same, "b": same.copy()}, {("a", "b")}, verdicts.ALPHA)[("a", "b")]
    assert verdict == "equivalent"


def test_few_test_images_or_a_collapsed_variant_are_not_read_as_no_noise():
    """30 test images, 3 classes, 2 seeds: gn and ln right on all, bn collapsed to one class (class 0 on seed 0,
    class 1 on seed 1: 10 right on each, so its seeds agree and MS_seed is 0). Without a floor the standard errors
    were 0: gn - ln "equivalent" and gn - bn "better" with a zero-width interval."""
    labels = np.repeat([0, 1, 2], 10)
    perfect, collapsed = np.ones((2, 30), dtype=bool), np.stack([labels == 0, labels == 1])
    seen = verdicts.decide({"gn": perfect, "ln": perfect.copy(), "bn": collapsed}, {("gn", "ln"), ("gn", "bn")},
                           verdicts.ALPHA)
    assert seen[("gn", "ln")][0] is None and seen[("gn", "ln")][1].se > 1  # one image is 3.3 points
    assert seen[("gn", "bn")][0] is None and seen[("gn", "bn")][1].se > 1


def test_false_equivalence_on_few_test_images_stays_at_alpha():
    """The sibling: 2 seeds on 30 or 100 test images at true accuracies 99% and 97% (2 points apart, twice the
    margin), each image drawn independently: "equivalent" at most alpha (it came 14% of the time on 30 images
    without the floor)."""
    rng = np.random.default_rng(11)
    for images in (30, 100):
        runs = 500
        false = sum(verdicts.decide({"a": rng.random((2, images)) < 0.99, "b": rng.random((2, images)) < 0.97},
                                    {("a", "b")}, verdicts.ALPHA)[("a", "b")][0] == "equivalent" for _ in range(runs))
        assert stats.binomtest(false, runs, verdicts.ALPHA, alternative="greater").pvalue > 0.01, (images, false)


def test_the_sign_says_which_is_better():
    rng = np.random.default_rng(6)
    strong, weak = rng.random((5, 2000)) < 0.9, rng.random((5, 2000)) < 0.6
    decided = verdicts.decide({"strong": strong, "weak": weak}, {("strong", "weak"), ("weak", "strong")}, 0.05)
    assert decided[("strong", "weak")][0] == "better" and decided[("weak", "strong")][0] == "worse"


def test_bad_input_is_refused():
    two = np.ones((2, 50), dtype=bool)
    with pytest.raises(ValueError, match="seeds >= 2"):
        verdicts.difference(two[:1], two[:1])
    with pytest.raises(ValueError, match="one shape"):
        verdicts.difference(two, two[:, :40])
    with pytest.raises(ValueError, match="one shape"):
        verdicts.decide({"a": two, "b": two[:, :1]}, {("a", "b")}, verdicts.ALPHA)
    with pytest.raises(ValueError, match="max_seeds >= 2"):
        verdicts.sequential(lambda seeds: {}, ["a", "b"], 1, 1)


def test_holm_and_spending():
    rng = np.random.default_rng(7)
    for size in [1, 2, 6] * 8:  # statsmodels collects garbage on every call: 0.15 s each
        p = np.round(rng.random(size) ** 3, 2)  # ties too
        reject, adjusted, _, _ = multipletests(p, alpha=0.05, method="holm")
        assert [a.tolist() for a in verdicts.holm(p, 0.05)] == [reject.tolist(), adjusted.tolist()]  # bit for bit
    fractions = np.linspace(0.1, 1, 10)
    spent = [verdicts.spent(t) for t in fractions]
    assert spent[-1] == pytest.approx(verdicts.ALPHA) and all(np.diff(spent) > 0)  # one look spends all alpha
    assert verdicts.spent(0.5) == pytest.approx(2 * stats.norm.sf(stats.norm.isf(verdicts.ALPHA / 2) / np.sqrt(0.5)))


def test_seeds_needed():
    d = verdicts.Difference(points=0.0, se=0.3, df=2, seeds=3, per_seed_var=2.7, image_var=0.01, p_a_beats_b=0.5)
    needed = verdicts.seeds_needed(d, margin=1.0, level=0.05)
    target = (1.0 / (stats.norm.isf(0.05) + stats.norm.ppf(verdicts.POWER))) ** 2  # se that decides "equivalent"
    assert d.per_seed_var / needed + d.image_var <= target < d.per_seed_var / (needed - 1) + d.image_var
    assert verdicts.seeds_needed(dataclasses.replace(d, image_var=target)) == math.inf  # the images alone: too noisy


def test_sequential_stops_when_all_pairs_are_decided():
    rng = np.random.default_rng(8)
    effects = dict(zip("abc", (0.0, 0.0, 3.0)))
    result, seeds = verdicts.sequential(simulation.simulator(rng, effects, 10_000), list(effects), 2, 20)
    assert seeds < 20 and {pair: v for pair, (v, _) in result.items()} == {
        ("a", "b"): "equivalent", ("a", "c"): "worse", ("b", "c"): "worse"}
    assert set(result) == set(itertools.combinations("abc", 2))
