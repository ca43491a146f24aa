"""Comparisons (comparisons.py): a planted difference is called better and a null one equivalent, counting the
seeds and the images; arms and batch sizes are separate families; one seed gets McNemar's test and no verdict; and
the pairing itself holds: one seed gives every variant the same starting weights and data order."""
import numpy as np
import pandas as pd
import pytest
import torch

import comparisons
import data as data_lib
import experiments
import train
from model import NORMS


def final_frame(correct: dict, arm: str = "") -> pd.DataFrame:
    """One final-epoch row per (variant, seed): correct maps a variant to bool (seeds, images), the images each
    seed's trial classified right on one view."""
    rows = [{"trial": f"{variant}_{arm}_seed{seed}", "variant": variant, "variant name": variant, "seed": seed,
             "epoch": 10, "epochs": 10, "test_acc_single": right.mean(), "train_acc": 0.99, "diverged": False,
             "arm": arm, "batch_size": 32, experiments.CORRECT_KEY: experiments.packed_correct(right)}
            for variant, per_seed in correct.items() for seed, right in enumerate(per_seed)]
    return pd.DataFrame(rows)


def seeds_of(rng, seeds: int = 5, images: int = 4000, spread: float = 0.03) -> np.ndarray:
    """bool (seeds, images): each seed's accuracy drawn around 88%, `spread` apart (the seed noise)."""
    return rng.random((seeds, images)) < rng.normal(0.88, spread, (seeds, 1))


def flipped(rng, right: np.ndarray, gained: float, lost: float) -> np.ndarray:
    """`right` with a share `gained` of its wrong images made right and a share `lost` of its right ones wrong."""
    draw = rng.random(right.shape)
    return np.where(right, draw >= lost, draw < gained)


def test_a_planted_difference_that_seed_noise_would_hide_is_better():
    rng = np.random.default_rng(0)
    gn = seeds_of(rng)  # seeds move both variants together, by more than the gap
    bn = flipped(rng, gn, gained=0.25, lost=0.005)  # about +2.6 points on every seed
    row = comparisons.verdict_table(final_frame({"bn": bn, "gn": gn})).iloc[0]
    assert row["comparison"] == "bn − gn" and row["verdict"] == "bn better" and row["first wins (seeds)"] == "100%"
    low, high = (float(v) for v in row["unadjusted 95% CI (points)"].split(" to "))
    assert 0 < low < row["difference (points)"] < high
    # the same accuracies, unpaired, cannot tell them apart: the seed-to-seed spread is larger than the gap
    from scipy import stats
    assert stats.ttest_ind(bn.mean(1), gn.mean(1)).pvalue > 0.05


def test_null_differences_are_equivalent_within_the_margin_and_undecided_within_a_tight_one():
    rng = np.random.default_rng(1)
    base = seeds_of(rng)
    correct = {name: flipped(rng, base, gained=0.088, lost=0.012) for name in ("bn", "gn", "ln")}  # +-1.05 points
    table = comparisons.verdict_table(final_frame(correct), margin=1.0)
    assert len(table) == 3 and (table["verdict"] == "equivalent (within ±1)").all(), table
    tight = comparisons.verdict_table(final_frame(correct), margin=0.05)
    assert tight["verdict"].str.startswith("undecided").all(), tight


def test_arms_and_batch_sizes_are_separate_families():
    rng = np.random.default_rng(2)
    base = seeds_of(rng, seeds=3)
    better = flipped(rng, base, gained=0.4, lost=0.0)
    tuned = final_frame({"bn": better, "gn": base}, arm="tuned")
    recipe = final_frame({"bn": base, "gn": flipped(rng, base, gained=0.04, lost=0.005)}, arm="recipe")
    table = comparisons.verdict_table(pd.concat([tuned, recipe], ignore_index=True))
    assert sorted(table["family"]) == ["recipe", "tuned"] and len(table) == 2
    arms = comparisons.verdict_table(pd.concat([tuned, recipe], ignore_index=True), compare="arm", within=("variant name",))
    assert set(arms["family"]) == {"bn", "gn"}
    assert tuple(arms.set_index("family").loc["bn", ["comparison", "verdict"]]) == ("tuned − recipe", "tuned better")


def test_one_seed_has_no_verdict_and_mcnemar_measures_the_images():
    rng = np.random.default_rng(3)
    n = 2000
    gn = rng.random(n) < 0.88
    bn = gn.copy()
    flip_up = np.flatnonzero(~gn)[:60]  # bn also gets 60 of gn's errors right, and loses 20 gn got right
    flip_down = np.flatnonzero(gn)[:20]
    bn[flip_up], bn[flip_down] = True, False
    ln = gn.copy()
    ln[np.flatnonzero(~gn)[:30]] = True  # symmetric: 30 gained, 30 lost
    ln[np.flatnonzero(gn)[:30]] = False
    df = final_frame({"bn": [bn], "gn": [gn], "ln": [ln]})
    assert (comparisons.verdict_table(df)["verdict"] == "needs 2+ seeds").all()
    table = comparisons.mcnemar_tests(df).set_index("comparison")
    assert table.loc["bn − gn", "verdict"] == "beyond test-image noise"
    assert (table.loc["bn − gn", "only first right"], table.loc["bn − gn", "only second right"]) == (60, 20)
    assert table.loc["gn − ln", "verdict"] == "within test-image noise"
    assert table.loc["gn − ln", "difference (points)"] == pytest.approx(0.0)


def test_one_seed_gives_every_variant_the_same_start_and_data_order(idx_dir):
    """The pairing: norm layers draw no random numbers, so a seed fixes the conv and head weights, and the
    shuffling and augmentation draws, whatever the norm."""
    dataset = data_lib.load_dataset(str(idx_dir))
    runs = {norm: train.TrainingRun({"norm": norm, "seed": 3, "epochs": 1, "batch_size": 16, "compile": "off"},
                                    dataset, device=torch.device("cpu")) for norm in NORMS}
    shared = {norm: {k: v for k, v in run.model.state_dict().items() if k.endswith(".weight") and v.dim() > 1}
              for norm, run in runs.items()}
    reference = shared["bn"]
    assert len(reference) >= 3  # the convolutions and the head
    for norm, weights in shared.items():
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference), norm
        assert torch.equal(runs[norm].generator.get_state(), runs["bn"].generator.get_state())
    other_seed = train.TrainingRun({"norm": "bn", "seed": 4, "epochs": 1, "batch_size": 16, "compile": "off"},
                                   dataset, device=torch.device("cpu"))
    assert not torch.equal(next(iter(other_seed.model.state_dict().values())), next(iter(reference.values())))


def test_replayed_looks_decide_a_pair_at_the_look_that_decided_it():
    """--seeds auto's table replays its searcher's looks: a pair decided at an early look keeps that look's
    verdict and seeds; one no look decides stays undecided, at the last look's seeds."""
    rng = np.random.default_rng(4)
    base = seeds_of(rng, seeds=6)
    correct = {"bn": flipped(rng, base, gained=0.4, lost=0.0), "gn": base,
               "ln": flipped(rng, base, gained=0.02, lost=0.004)}  # bn far ahead; gn and ln about 0.1 apart
    table = comparisons.verdict_table(final_frame(correct), looks=[(3, 0.01), (6, 0.04)],
                                      margin=0.1).set_index("comparison")
    assert tuple(table.loc["bn − gn", ["seeds", "verdict"]]) == (3, "bn better")
    assert table.loc["gn − ln", "seeds"] == 6 and table.loc["gn − ln", "verdict"].startswith("undecided")
    assert comparisons.verdict_table(final_frame(correct), looks=[(7, 0.05)])["verdict"].eq("needs 2+ seeds").all()


def test_a_trial_not_at_its_last_epoch_is_left_out_of_verdicts_and_means():
    """An interrupted sweep: bn's seed 2 stopped at epoch 1 of 10 with a low score. The verdict pairs the seeds every
    variant finished, and the means over seeds are of finished trials (they averaged the stopped one in)."""
    import analysis

    rng = np.random.default_rng(3)
    gn = seeds_of(rng, seeds=3)
    bn = flipped(rng, gn, gained=0.25, lost=0.005)
    df = final_frame({"bn": bn, "gn": gn})
    stopped = (df["variant"] == "bn") & (df["seed"] == 2)
    df.loc[stopped, ["epoch", "test_acc_single"]] = [1, 0.3]
    df.loc[stopped, experiments.CORRECT_KEY] = experiments.packed_correct(rng.random(gn.shape[1]) < 0.3)
    df = df.assign(test_acc=df["test_acc_single"], epoch_seconds=1.0, parameters=100, train_loss=0.1, test_loss=0.1)
    table = comparisons.verdict_table(df)
    assert table["seeds"].tolist() == [2] and table["difference (points)"].iloc[0] == pytest.approx(
        100 * (bn[:2].mean() - gn[:2].mean())), table  # seeds 0-1 only
    means = analysis.summary(df).set_index("variant")
    assert means.loc["bn", "seeds"] == 2 and means.loc["bn", "final one-view acc mean (%)"] == pytest.approx(
        100 * bn[:2].mean(1).mean()), means


def test_an_interval_stays_within_100_points():
    """12-30 test images and 2 seeds: t with 1 degree of freedom gave intervals such as -147 to +214 points."""
    labels = np.repeat([0, 1, 2], 10)
    table = comparisons.verdict_table(final_frame({"gn": np.ones((2, 30), dtype=bool),
                                                   "bn": np.stack([labels == 0, labels == 1])}))
    low, high = (float(v) for v in table["unadjusted 95% CI (points)"].iloc[0].split(" to "))
    assert -100 <= low < high <= 100 and table["verdict"].iloc[0].startswith("undecided"), table
