"""The convergence warning: it fires on a run stopped too early and stays quiet on a converged one.

Both runs are real training on real Fashion-MNIST (train.TrainingRun, no Ray), read by the same
analysis functions the report and the CLI's final table use.
"""
import pandas as pd
import pytest
import torch

import analysis
import data as data_lib
import train

NORMS = ("bn", "gn", "ln")


def train_frame(dataset, epochs: int) -> pd.DataFrame:
    """The analysis's tidy frame (one row per trial and epoch) for bn, gn and ln trained on `dataset`."""
    rows = []
    for norm in NORMS:
        run = train.TrainingRun({"norm": norm, "epochs": epochs, "threads": 1}, dataset)
        for _ in range(epochs):
            rows.append({**run.run_epoch(), "trial": norm, "variant": norm, "norm": norm, "seed": 0,
                         "epochs": epochs, "groups": run.config["groups"], "parameters": run.parameters})
    return pd.DataFrame(rows)


def test_fires_on_a_run_stopped_too_early(fashion):
    # 2,000 images of all ten classes, 3 epochs: every variant's accuracy is still climbing.
    df = train_frame(fashion.subset(2000, 2000), epochs=3)
    table = analysis.convergence(df)
    assert not table["converged"].any(), table.to_string()
    warnings = analysis.convergence_warnings(df)
    assert len(warnings) == len(NORMS)
    for norm, line in zip(sorted(NORMS), warnings):
        assert line.startswith(f"warning: {norm} may not have converged; the comparison is not settled (")
        assert "still rising" in line and "\n" not in line
    assert (analysis.summary(df)["converged"] != "yes").all()


def test_quiet_on_a_converged_run(fashion):
    # Trousers against bags: an easy real task that every norm fits in a few epochs.
    def two_classes(images, labels, n):
        keep = torch.nonzero((labels == 1) | (labels == 8)).flatten()[:n]
        return images[keep], labels[keep]

    easy = data_lib.Dataset(fashion.name, *two_classes(fashion.train_images, fashion.train_labels, 1000),
                            *two_classes(fashion.test_images, fashion.test_labels, 1000), fashion.classes)
    df = train_frame(easy, epochs=5)
    table = analysis.convergence(df)
    assert table["converged"].all(), table.to_string()
    assert analysis.convergence_warnings(df) == []
    final = analysis.final_per_trial(df)
    assert (final["test_acc_single"] > 0.97).all()  # it really did converge


def test_train_gap_alone_flags_a_variant():
    # A flat test curve (no rise) but train accuracy far below the best variant's: under-fitted.
    epochs = [1, 2, 3, 4]
    rows = [{"trial": v, "variant": v, "seed": 0, "epoch": e, "epochs": 4, "test_acc_single": 0.8,
             "train_acc": train_acc} for v, train_acc in (("bn", 0.95), ("ln", 0.85)) for e in epochs]
    table = analysis.convergence(pd.DataFrame(rows)).set_index("variant")
    assert table.loc["bn", "converged"] and not table.loc["ln", "converged"]
    assert "10.0 points below bn's" in table.loc["ln", "why"]


def test_unfinished_trial_is_flagged():
    rows = [{"trial": "bn", "variant": "bn", "seed": 0, "epoch": e, "epochs": 4, "test_acc_single": 0.8,
             "train_acc": 0.9} for e in (1, 2)]
    assert "only 2 of 4 epochs in" in analysis.convergence(pd.DataFrame(rows)).iloc[0]["why"]


def test_a_dip_and_its_recovery_is_not_a_rise():
    # ln's curve on trousers against bags on one machine: a dip at epoch 3 while the learning rate is high,
    # back to where it was by epoch 4. Climbing to a new high is what the rule flags, not recovering.
    curves = {"ln": (0.987, 0.991, 0.974, 0.992, 0.993), "gn": (0.90, 0.92, 0.93, 0.945, 0.96)}
    rows = [{"trial": v, "variant": v, "seed": 0, "epoch": e, "epochs": 5, "test_acc_single": acc, "train_acc": 0.99}
            for v, curve in curves.items() for e, acc in enumerate(curve, start=1)]
    table = analysis.convergence(pd.DataFrame(rows)).set_index("variant")
    assert table.loc["ln", "converged"], table.loc["ln", "why"]
    assert table.loc["ln", "rise (points)"] == pytest.approx(0.2)  # 99.3 against the earlier best, 99.1
    assert not table.loc["gn", "converged"]  # 96.0 against 93.0 before the last 2 epochs: still rising
    assert "+3.00 points over the best before the last 2 epochs" in table.loc["gn", "why"]


def curve_frame(curve, planned=None):
    return pd.DataFrame([{"trial": "bn", "variant": "bn", "seed": 0, "epoch": e, "epochs": planned or len(curve),
                          "test_acc_single": acc, "train_acc": 0.9} for e, acc in enumerate(curve, start=1)])


def test_one_epoch_says_it_cannot_judge_the_rise():
    # a 1-epoch run: there is no earlier epoch to compare with, so no "+0.00 points over ... the last 0 epochs"
    why = analysis.convergence(curve_frame([0.8])).iloc[0]["why"]
    assert why == ("1 epoch reported: too few to judge whether test accuracy has stopped rising (that takes 3 or "
                   "more); only the train-accuracy gap between variants is checked")
    # interrupted after 1 of 3 epochs: both said
    line, = analysis.convergence_warnings(curve_frame([0.8], planned=3))
    assert "(only 1 of 3 epochs in; 1 epoch reported: too few to judge" in line and "+0.00" not in line


def test_two_epochs_say_what_moved_and_what_cannot_be_judged():
    # 2 epochs compare neighbours only: a dip and its recovery cannot be told from a rise; flagged, and said
    for curve, moved in (([0.80, 0.85], "+5.00"), ([0.85, 0.849], "-0.10")):
        row = analysis.convergence(curve_frame(curve)).iloc[0]
        assert not row["converged"]
        assert row["why"] == ("2 epochs reported: too few to judge whether test accuracy has stopped rising (that "
                              f"takes 3 or more; it moved {moved} points from epoch 1 to 2); only the "
                              "train-accuracy gap between variants is checked")
