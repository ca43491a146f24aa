"""Statistics of a comparison: paired tests between variants and the convergence checks.

Trials of one seed share their starting weights (norm layers draw no random numbers, so the same
`torch.manual_seed` gives every variant the same convolution and head weights), their data order and
their augmentation (train.TrainingRun), and every trial is scored on the same test images. So
variants are compared by *paired* differences:
- over seeds: the per-seed difference of final one-view accuracies, its mean with a t confidence
  interval, and a paired t-test (scipy.stats.ttest_rel);
- with one seed: McNemar's exact test on the test images one variant gets right and the other wrong
  (statsmodels' `mcnemar`; McNemar 1947, as recommended for comparing classifiers by Dietterich 1998).
The pairs of a family share a Holm-Bonferroni correction (Holm 1979; statsmodels' `multipletests`),
so "beyond noise" holds at the stated level for the whole table, not per row.

Input frames are analysis.results_frame's: one row per trial and epoch, accuracies as fractions.
The analysis, the CLI's table and the notebook all call this module; it never trains.
"""
import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05  # family-wise level of "beyond noise" (Holm-Bonferroni over the family's pairs)
CONFIDENCE = 0.95  # of the mean paired difference's interval
# "May not have converged" (see convergence()): accuracies in percentage points.
RISE_EPOCHS, RISE_POINTS = 2, 1.0
TRAIN_GAP_POINTS = 5.0
PAIRED_COLUMNS = ["comparison", "seeds", "difference (points)", "95% CI (points)", "paired t p", "Holm p", "verdict"]
MCNEMAR_COLUMNS = ["comparison", "seed", "difference (points)", "only first right", "only second right",
                   "McNemar p", "Holm p", "verdict"]


def healthy(df) -> pd.DataFrame:
    """The rows of trials that did not diverge (a diverged trial's curves end in nan)."""
    return df[~df["diverged"]] if "diverged" in df else df


def final_per_trial(df) -> pd.DataFrame:
    """One row per healthy trial at its last reported epoch: the headline, which chooses nothing on the
    test split."""
    df = healthy(df)
    return df.loc[df.groupby("trial")["epoch"].idxmax()].reset_index(drop=True)


WITHIN = ("arm", "batch_size")  # variants are compared within an arm of a tuned comparison and a batch size


def families(final: pd.DataFrame, within=WITHIN):
    """(name, rows) per family of comparable trials: those that agree on every column in `within` that
    varies (by default the same arm of a tuned comparison, "tuned" or "recipe", and the same batch size
    of a batch-size study)."""
    keys = [k for k in within if k in final and final[k].nunique() > 1]
    if not keys:
        yield "", final
        return
    for values, rows in final.groupby(keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        yield ", ".join(f"{'batch ' if k == 'batch_size' else ''}{v}" for k, v in zip(keys, values)), rows


def _ordered(accs: dict) -> list:
    return sorted(accs, key=lambda v: -np.mean(list(accs[v].values())))  # the better variant first


def paired_tests(df, compare: str = "variant", within=WITHIN, metric: str = "test_acc_single") -> pd.DataFrame:
    """Per pair of `compare` values (variants, by default) in a family (see `families`): the paired
    difference over shared seeds of final-epoch `metric` (percentage points, first minus second, the
    better mean first), its CONFIDENCE t interval, the paired t-test's two-sided p and its Holm-adjusted
    p over the family. `compare="arm", within=("variant name", "batch_size")` sets each variant's tuned
    configuration against the shared recipe.

    Returns PAIRED_COLUMNS (plus "family" when there is more than one); a pair with fewer than 2
    shared seeds gets nan and "needs 2+ seeds" (see `mcnemar_tests` for one seed).
    """
    rows = []
    for family, final in families(final_per_trial(df), within):
        accs = {v: dict(zip(g["seed"], 100 * g[metric])) for v, g in final.groupby(compare)}
        block = []
        for a, b in itertools.combinations(_ordered(accs), 2):
            seeds = sorted(set(accs[a]) & set(accs[b]))
            diffs = np.array([accs[a][s] - accs[b][s] for s in seeds])
            row = {"family": family, "comparison": f"{a} − {b}", "seeds": len(seeds),
                   "difference (points)": diffs.mean() if len(diffs) else math.nan,
                   "95% CI (points)": "-", "paired t p": math.nan, "Holm p": math.nan, "verdict": "needs 2+ seeds"}
            if len(diffs) >= 2:
                if np.allclose(diffs, diffs[0]):  # no spread: t is undefined (identical trials, or a constant shift)
                    row.update(verdict="identical on every seed" if diffs[0] == 0 else "same difference on every seed")
                else:
                    low, high = stats.t.interval(CONFIDENCE, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
                    row.update({"95% CI (points)": f"{low:+.2f} to {high:+.2f}",
                                "paired t p": stats.ttest_rel([accs[a][s] for s in seeds],
                                                              [accs[b][s] for s in seeds]).pvalue})
            block.append(row)
        _holm(block, "paired t p", "seed noise")
        rows += block
    return _table(rows, PAIRED_COLUMNS)


def mcnemar_tests(df, correct: dict) -> pd.DataFrame:
    """McNemar's exact test per pair of variants of a family (see `families`) and seed, on the same test
    images, Holm-corrected per family and seed.

    df: the trials' frame; correct: trial -> bool array (N,), which test images the trial's final epoch
    classified right (one view); trials missing from it are left out. Returns MCNEMAR_COLUMNS ("difference" in
    points of accuracy; the "only ... right" columns count images).
    """
    rows = []
    for family, final in families(final_per_trial(df)):
        for seed, trials in final[final["trial"].isin(correct)].groupby("seed"):
            by_variant = {row.variant: np.asarray(correct[row.trial], dtype=bool) for row in trials.itertuples()}
            block = []
            for a, b in itertools.combinations(sorted(by_variant, key=lambda v: -by_variant[v].mean()), 2):
                x, y = by_variant[a], by_variant[b]
                only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
                table = [[int((x & y).sum()), only_a], [only_b, int((~x & ~y).sum())]]
                p = mcnemar(table, exact=True).pvalue if only_a + only_b else 1.0
                block.append({"family": family, "comparison": f"{a} − {b}", "seed": seed,
                              "difference (points)": 100 * (x.mean() - y.mean()), "only first right": only_a,
                              "only second right": only_b, "McNemar p": p, "Holm p": math.nan, "verdict": ""})
            _holm(block, "McNemar p", f"{scored_on(df)}-image noise")
            rows += block
    return _table(rows, MCNEMAR_COLUMNS)


def _holm(block: list, p_key: str, noise: str) -> None:
    """Holm-adjusted p and a verdict for each row of one family that has a p-value."""
    tested = [row for row in block if not math.isnan(row[p_key])]
    if not tested:
        return
    reject, adjusted, _, _ = multipletests([row[p_key] for row in tested], alpha=ALPHA, method="holm")
    for row, beyond, p in zip(tested, reject, adjusted):
        row["Holm p"] = p
        row["verdict"] = f"beyond {noise}" if beyond else f"within {noise}"


def _table(rows: list, columns: list) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=["family"] + columns)
    return table if table["family"].nunique() > 1 else table.drop(columns="family")


def scored_on(df) -> str:
    """The split the trials' test_* metrics were scored on: "validation" for held-out training images
    (--val-size, and a tuning stage), else "test"."""
    return "validation" if "val_size" in df and (df["val_size"].fillna(0) > 0).any() else "test"


def convergence(df) -> pd.DataFrame:
    """Per variant, on the mean over its seeds: may it not have converged, and why.

    Flagged when the one-view test accuracy peaks at the last epoch at least RISE_POINTS above the best
    it reached before the last RISE_EPOCHS epochs (a schedule that anneals to zero flattens a
    converged curve; measuring from the earlier best, not from one epoch, keeps a dip in the middle of
    training followed by its recovery from reading as a rise; with RISE_EPOCHS epochs or fewer the rise
    cannot be judged, which is flagged and said), when its final train accuracy is TRAIN_GAP_POINTS or
    more below the best variant's (it has not fitted the data the others fitted), or when a trial has
    not reached its planned epochs.
    """
    rows, df = [], healthy(df)
    if df.empty:
        return pd.DataFrame(columns=["variant", "converged", "rise (points)", "train gap (points)", "why"])
    train_final = {v: 100 * g["train_acc"].mean() for v, g in final_per_trial(df).groupby("variant")}
    best_train = max(train_final.values())
    leader = max(train_final, key=train_final.get)
    split = scored_on(df)
    for variant, group in df.groupby("variant"):
        curve = 100 * group.groupby("epoch")["test_acc_single"].mean()  # index: epochs every seed reached
        last, planned = int(curve.index.max()), int(group["epochs"].max())
        # no epoch before the last RISE_EPOCHS: 2 epochs compare neighbours, 1 compares nothing
        judged = len(curve) > RISE_EPOCHS
        rise = curve.iloc[-1] - curve.iloc[:max(1, len(curve) - RISE_EPOCHS)].max() if len(curve) > 1 else float("nan")
        reasons = []
        if group.groupby("trial")["epoch"].max().min() < planned:
            reasons.append(f"only {int(group.groupby('trial')['epoch'].max().min())} of {planned} epochs in")
        if not judged:
            moved = (f"; it moved {rise:+.2f} points from epoch {int(curve.index[0])} to {last}"
                     if len(curve) > 1 else "")
            reasons.append(f"{len(curve)} epoch{'s' if len(curve) != 1 else ''} reported: too few to judge whether "
                           f"{split} accuracy has stopped rising (that takes {RISE_EPOCHS + 1} or more{moved}); only the "
                           f"train-accuracy gap between variants is checked")
        elif int(curve.idxmax()) == last and rise >= RISE_POINTS:
            reasons.append(f"{split} accuracy still rising: best at the last epoch ({last}), "
                           f"+{rise:.2f} points over the best before the last {RISE_EPOCHS} epochs")
        gap = best_train - train_final[variant]
        if gap >= TRAIN_GAP_POINTS:
            reasons.append(f"final train accuracy {train_final[variant]:.1f}%, {gap:.1f} points below {leader}'s")
        rows.append({"variant": variant, "converged": not reasons, "rise (points)": rise,
                     "train gap (points)": gap, "why": "; ".join(reasons)})
    return pd.DataFrame(rows)


def convergence_warnings(df) -> list:
    """One line per variant that may not have converged; empty when every variant has."""
    return [f"warning: {row.variant} may not have converged; the comparison is not settled ({row.why})"
            for row in convergence(df).itertuples() if not row.converged]


def rank_agreement(df, at_fraction: float = 1 / 3, keep_fraction: float = 1 / 3) -> pd.DataFrame:
    """How early stopping would have ranked a tuning stage's configurations (one trial per configuration).

    Per variant: Spearman's rank correlation between each configuration's one-view accuracy at epoch
    round(at_fraction * epochs) and at its final epoch, and whether the configuration best at the end was
    in the top keep_fraction at that epoch, i.e. whether an ASHA-type scheduler (Li et al. 2020) with a
    rung there and reduction factor 1/keep_fraction would have kept it. Under a OneCycle schedule the
    early epochs run at a warming-up learning rate, so early ranks may not be final ones.
    """
    df = healthy(df)
    rows = []
    for variant, group in df.groupby("variant name" if "variant name" in df else "variant"):
        planned = int(group["epochs"].max())
        rung = max(1, round(at_fraction * planned))
        at_rung = group[group["epoch"] == rung].set_index("trial")["test_acc_single"]
        final = final_per_trial(group).set_index("trial")["test_acc_single"]
        shared = at_rung.index.intersection(final.index)
        if len(shared) < 3 or rung >= planned:
            continue
        rho = stats.spearmanr(at_rung[shared], final[shared]).statistic
        best = final[shared].idxmax()
        kept = math.ceil(keep_fraction * len(shared))
        rank = int((at_rung[shared] > at_rung[best]).sum()) + 1
        rows.append({"variant": variant, "configurations": len(shared), "rung epoch": rung,
                     "Spearman rho": rho, "final best's rank at rung": rank, "ASHA keeps": kept,
                     "final best kept": "yes" if rank <= kept else "no"})
    return pd.DataFrame(rows)
