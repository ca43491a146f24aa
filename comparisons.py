"""Statistics of a comparison: the verdicts between variants, the convergence checks, early stopping's ranks.

Trials of one seed share their starting weights (norm layers draw no random numbers), data order and augmentation,
and are scored on the same images, so variants are compared on differences paired over both seeds and images, from
the one view's right answers each trial reports (experiments.CORRECT_KEY): with 2+ seeds a verdict per pair
(verdicts.py: better, equivalent within --margin, or undecided with the seeds it would likely take); with one seed
McNemar's exact test (Dietterich 1998), which measures the images' noise only. A family of pairs shares one Holm
correction. Frames are analysis.results_frame's (accuracies as fractions).
"""
import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

import experiments
import verdicts

ALPHA, CONFIDENCE = verdicts.ALPHA, 0.95  # the family-wise error rate; the difference's interval
RISE_EPOCHS, RISE_POINTS, TRAIN_GAP_POINTS = 2, 1.0, 5.0  # "may not have converged" (convergence()), points
WITHIN = ("arm", "batch_size")  # variants are compared within an arm of a tuned comparison and a batch size


def healthy(df) -> pd.DataFrame:
    """The rows of trials that did not diverge (a diverged trial's curves end in nan)."""
    return df[~df["diverged"]] if "diverged" in df else df


def final_per_trial(df, complete: bool = False) -> pd.DataFrame:
    """One row per healthy trial at its last reported epoch: the headline, chosen on no split. complete: only the
    trials that ran all their epochs (means and verdicts: a trial still running, or stopped, is at another epoch)."""
    last = (df := healthy(df)).loc[df.groupby("trial")["epoch"].idxmax()]
    return (last[last["epoch"] >= last["epochs"]] if complete and "epochs" in last else last).reset_index(drop=True)


def scored_on(df) -> str:
    """The split the test_* metrics were scored on: "validation" (held-out training images), else "test"."""
    return "validation" if "val_size" in df and (df["val_size"].fillna(0) > 0).any() else "test"


def families(final: pd.DataFrame, within=WITHIN):
    """(name, rows) per family of comparable trials: those that agree on each varying column of `within`."""
    keys = [k for k in within if k in final and final[k].nunique() > 1]
    prefix = {"batch_size": "batch ", "seed": "seed "}
    for values, rows in final.groupby(keys) if keys else [((), final)]:
        yield ", ".join(f"{prefix.get(k, '')}{v}" for k, v in zip(keys, values)), rows


def verdict_table(df, margin: float = verdicts.MARGIN, compare: str = "variant", within=WITHIN,
                  looks=None) -> pd.DataFrame:
    """Per pair of `compare` values in a family (the better first), over the seeds all of them reached: the mean
    difference of final one-view accuracies (points), its CONFIDENCE interval, the share of seeds the first won, and
    the verdict: at ALPHA family-wise, or replaying `looks`, [(seeds, alpha level), ...] as --seeds auto's searcher
    took them (rounds.py), a pair decided at the first look that decides it. `compare="arm", within=("variant
    name", "batch_size")`: tuned vs recipe."""
    rows, interval = [], f"unadjusted {CONFIDENCE:.0%} CI (points)"
    for family, final in families(final_per_trial(df, complete=True), within):
        by_value = {v: g.set_index("seed")[experiments.CORRECT_KEY] for v, g in final.groupby(compare)}
        seeds = sorted(set.intersection(*(set(s.index) for s in by_value.values()))) if by_value else []
        correct = {v: np.array([experiments.unpacked_correct(s[seed]) for seed in seeds]) for v, s in by_value.items()}
        pairs = list(itertools.combinations(sorted(correct, key=lambda v: -correct[v].mean() if seeds else 0), 2))
        decided, undecided = {}, set(pairs)
        for n, level in looks or [(len(seeds), ALPHA)]:
            if 2 <= n <= len(seeds) and undecided:
                decided.update(verdicts.decide({v: right[:n] for v, right in correct.items()}, undecided, level,
                                               margin))
        for a, b in pairs:
            row = {"family": family, "comparison": f"{a} − {b}"}
            if (a, b) not in decided:
                rows.append({**row, "seeds": len(seeds), "difference (points)": math.nan, interval: "-",
                             "first wins (seeds)": "-", "verdict": "needs 2+ seeds"})
                continue
            verdict, d = decided[a, b]
            half = stats.t.isf((1 - CONFIDENCE) / 2, d.df) * d.se if d.se else 0.0
            needed = verdicts.seeds_needed(d, margin)
            said = {"better": f"{a} better", "worse": f"{b} better", "equivalent": f"equivalent (within ±{margin:g})",
                    None: f"undecided: about {needed} seeds would decide it" if math.isfinite(needed) else
                    "undecided: the test images alone are too few to decide it"}[verdict]
            rows.append({**row, "seeds": d.seeds, "difference (points)": d.points,  # two accuracies: 100 apart at most
                         interval: f"{max(d.points - half, -100):+.2f} to {min(d.points + half, 100):+.2f}",
                         "first wins (seeds)": f"{d.p_a_beats_b:.0%}", "verdict": said})
    return _table(rows)


def mcnemar_tests(df) -> pd.DataFrame:
    """Per pair of variants of a family and seed, McNemar's exact test on the images the final epoch's one view of
    one gets right and of the other wrong. "difference" in points; "only ... right" in images."""
    rows, noise = [], f"{scored_on(df)}-image noise"
    for family, trials in families(final_per_trial(df, complete=True), WITHIN + ("seed",)):  # Holm per seed too
        right = dict(zip(trials["variant"], map(experiments.unpacked_correct, trials[experiments.CORRECT_KEY])))
        block = []
        for a, b in itertools.combinations(sorted(right, key=lambda v: -right[v].mean()), 2):
            only_a, only_b, p = mcnemar_exact(right[a], right[b])
            block.append({"family": family, "comparison": f"{a} − {b}", "seed": trials["seed"].iloc[0],
                          "difference (points)": 100 * (right[a].mean() - right[b].mean()),
                          "only first right": only_a, "only second right": only_b, "McNemar p": p})
        reject, adjusted = verdicts.holm([row["McNemar p"] for row in block])
        rows += [dict(row, **{"Holm p": p, "verdict": f"{'beyond' if beyond else 'within'} {noise}"})
                 for row, beyond, p in zip(block, reject, adjusted)]
    return _table(rows)


def mcnemar_exact(first, second) -> tuple:
    """(images only the first got right, only the second, McNemar's exact two-sided p) of two bool (N,) arrays."""
    only_first, only_second = int((first & ~second).sum()), int((~first & second).sum())
    tested = only_first + only_second
    return only_first, only_second, mcnemar([[0, only_first], [only_second, 0]], exact=True).pvalue if tested else 1.0


def _table(rows: list) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    return table.drop(columns="family") if len(table) and table["family"].nunique() == 1 else table


def convergence(df) -> pd.DataFrame:
    """Per variant, on the mean over its seeds: may it not have converged, and why. Flagged when its one-view
    accuracy peaks at the last epoch RISE_POINTS or more above its best before the last RISE_EPOCHS epochs (or too
    few epochs to judge), its final train accuracy is TRAIN_GAP_POINTS or more below the best variant's, or a trial
    has not reached its planned epochs. An annealed schedule flattens a converged curve; the best before the last
    epochs keeps a dip and its recovery from reading as a rise."""
    df, split = healthy(df), scored_on(df)
    train_final = {v: 100 * g["train_acc"].mean() for v, g in final_per_trial(df).groupby("variant")}
    leader = max(train_final, key=train_final.get, default=None)
    rows = []
    for variant, group in df.groupby("variant"):
        curve = 100 * group.groupby("epoch")["test_acc_single"].mean()  # index: epochs every seed reached
        first, last, planned = int(curve.index[0]), int(curve.index[-1]), int(group["epochs"].max())
        reached = int(group.groupby("trial")["epoch"].max().min())
        rise = curve.iloc[-1] - curve.iloc[:max(1, len(curve) - RISE_EPOCHS)].max() if len(curve) > 1 else math.nan
        why = [f"only {reached} of {planned} epochs in"] if reached < planned else []
        if len(curve) <= RISE_EPOCHS:  # 2 epochs compare neighbours only, 1 compares nothing
            moved = f"; it moved {rise:+.2f} points from epoch {first} to {last}" if len(curve) > 1 else ""
            why.append(f"{len(curve)} epoch{'s' if len(curve) != 1 else ''} reported: too few to judge whether "
                       f"{split} accuracy has stopped rising (that takes {RISE_EPOCHS + 1} or more{moved}); only the "
                       f"train-accuracy gap between variants is checked")
        elif int(curve.idxmax()) == last and rise >= RISE_POINTS:
            why.append(f"{split} accuracy still rising: best at the last epoch ({last}), "
                       f"+{rise:.2f} points over the best before the last {RISE_EPOCHS} epochs")
        if (gap := train_final[leader] - train_final[variant]) >= TRAIN_GAP_POINTS:
            why.append(f"final train accuracy {train_final[variant]:.1f}%, {gap:.1f} points below {leader}'s")
        rows.append({"variant": variant, "converged": not why, "rise (points)": rise, "train gap (points)": gap,
                     "why": "; ".join(why)})
    return pd.DataFrame(rows, columns=["variant", "converged", "rise (points)", "train gap (points)", "why"])


def convergence_warnings(df) -> list:
    """One line per variant that may not have converged; empty when every variant has."""
    return [f"warning: {row.variant} may not have converged; the comparison is not settled ({row.why})"
            for row in convergence(df).itertuples() if not row.converged]


def rank_agreement(df, at_fraction: float = 1 / 3, keep_fraction: float = 1 / 3) -> pd.DataFrame:
    """How early stopping would have ranked a tuning stage's configurations, per variant: Spearman's rho between
    their one-view accuracies at epoch round(at_fraction * epochs) and at the final epoch, and whether the final
    best was in the top keep_fraction there, as an ASHA scheduler (Li et al. 2020) with that rung would keep."""
    rows = []
    for variant, group in healthy(df).groupby("variant name"):
        planned = int(group["epochs"].max())
        rung = max(1, round(at_fraction * planned))  # ASHA's rung: the epoch it ranks at
        at_rung = group[group["epoch"] == rung].set_index("trial")["test_acc_single"]
        final = final_per_trial(group).set_index("trial")["test_acc_single"]
        if len(shared := at_rung.index.intersection(final.index)) < 3 or rung >= planned:
            continue
        best, kept = final[shared].idxmax(), math.ceil(keep_fraction * len(shared))
        rank = int((at_rung[shared] > at_rung[best]).sum()) + 1
        rows.append({"variant": variant, "configurations": len(shared), "rung epoch": rung,
                     "Spearman rho": stats.spearmanr(at_rung[shared], final[shared]).statistic,
                     "final best's rank at rung": rank, "ASHA keeps": kept,
                     "final best kept": "yes" if rank <= kept else "no"})
    return pd.DataFrame(rows)
