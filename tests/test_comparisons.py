"""Paired statistics (comparisons.py): a planted difference is found, a null one is not; the pairs share
one Holm correction per family; and the pairing itself holds: one seed gives every variant the same
starting weights and data order."""
import numpy as np
import pandas as pd
import pytest
import torch

import comparisons
import data as data_lib
import train
from model import NORMS


def final_frame(accs: dict, arm: str = "") -> pd.DataFrame:
    """One final-epoch row per (variant, seed): accs maps a variant to its per-seed accuracies (%)."""
    rows = [{"trial": f"{variant}_{arm}_seed{seed}", "variant": variant, "variant name": variant, "seed": seed,
             "epoch": 10, "epochs": 10, "test_acc_single": acc / 100, "train_acc": 0.99, "diverged": False,
             "arm": arm, "batch_size": 32}
            for variant, per_seed in accs.items() for seed, acc in enumerate(per_seed)]
    return pd.DataFrame(rows)


def test_paired_test_finds_a_planted_difference_that_seed_noise_would_hide():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(88, 1.0, size=5)  # seeds move both variants together, by more than the gap
    df = final_frame({"bn": seed_effect + 0.5 + rng.normal(0, 0.05, 5), "gn": seed_effect})
    row = comparisons.paired_tests(df).iloc[0]
    assert row["comparison"] == "bn − gn" and row["verdict"] == "beyond seed noise"
    assert row["difference (points)"] == pytest.approx(0.5, abs=0.1)
    low, high = (float(v) for v in row["95% CI (points)"].split(" to "))
    assert 0 < low < 0.5 < high
    # the same accuracies, unpaired, cannot tell them apart: the seed-to-seed spread is twice the gap
    from scipy import stats
    assert stats.ttest_ind(df[df.variant == "bn"].test_acc_single, df[df.variant == "gn"].test_acc_single).pvalue > 0.05


def test_paired_test_calls_a_null_difference_noise():
    rng = np.random.default_rng(1)
    df = final_frame({"bn": rng.normal(88, 0.3, 5), "gn": rng.normal(88, 0.3, 5), "ln": rng.normal(88, 0.3, 5)})
    table = comparisons.paired_tests(df)
    assert len(table) == 3 and (table["verdict"] == "within seed noise").all()
    assert (table["Holm p"] >= table["paired t p"] - 1e-12).all()  # Holm only ever raises a p


def test_holm_corrects_over_the_family_not_each_pair():
    rng = np.random.default_rng(2)
    base = rng.normal(88, 1.0, 4)
    # five variants: ten pairs; a difference just past 0.05 alone, not after Holm's correction
    accs = {name: base + rng.normal(0, 0.2, 4) for name in ("a", "b", "c", "d", "e")}
    table = comparisons.paired_tests(final_frame(accs))
    assert len(table) == 10
    smallest = table.sort_values("paired t p").iloc[0]
    assert smallest["Holm p"] == pytest.approx(min(1.0, 10 * smallest["paired t p"]))


def test_arms_and_batch_sizes_are_separate_families():
    tuned = final_frame({"bn": [90, 91, 92], "gn": [89, 90, 91.5]}, arm="tuned")
    recipe = final_frame({"bn": [88, 89, 90], "gn": [89, 90, 90.5]}, arm="recipe")
    table = comparisons.paired_tests(pd.concat([tuned, recipe]))
    assert sorted(table["family"]) == ["recipe", "tuned"] and len(table) == 2
    arms = comparisons.paired_tests(pd.concat([tuned, recipe]), compare="arm", within=("variant name",))
    assert set(arms["family"]) == {"bn", "gn"} and (arms["comparison"] == "tuned − recipe").all()
    assert arms.set_index("family").loc["bn", "verdict"] == "same difference on every seed"  # +2 on each seed


def test_one_seed_needs_mcnemar():
    table = comparisons.paired_tests(final_frame({"bn": [90], "gn": [89]}))
    assert table.iloc[0]["verdict"] == "needs 2+ seeds"


def test_mcnemar_finds_a_planted_difference_and_not_a_null_one():
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
    df = final_frame({"bn": [90], "gn": [88], "ln": [88]})  # the accuracies the test reads come from `correct`
    correct = {"bn__seed0": bn, "gn__seed0": gn, "ln__seed0": ln}
    table = comparisons.mcnemar_tests(df, correct).set_index("comparison")
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
