"""Failures read from results: best-epoch ties, the progress line's one-view accuracy. (Through real sweeps:
tests/test_sweeps.py; Ctrl-C, SIGTERM and --resume: tests/test_interruptions.py.)"""
import re
from types import SimpleNamespace

import pandas as pd

import analysis
import trainable


def test_best_epoch_ties_go_to_the_latest_epoch():
    """Tune keeps the later of two equal-score checkpoints; the table and the analysis pick that epoch too."""
    df = pd.DataFrame({"epoch": [1, 2, 3], "test_acc": [0.5, 0.7, 0.7], trainable.HEALTH_KEY: ["ok"] * 3})
    assert trainable.best_epoch(df)["epoch"] == 3
    diverged = df.assign(**{trainable.HEALTH_KEY: ["ok", "ok", "diverged: x"]})
    assert trainable.best_epoch(diverged)["epoch"] == 2  # a diverged epoch has no checkpoint
    frame = df.assign(trial="t", variant="bn", diverged=False)
    assert analysis.best_per_trial(frame)["epoch"].tolist() == [3]


def test_a_progress_line_prints_the_tables_one_view_accuracy(capsys):
    """Issue 25, item 28: the progress line's accuracy is the one-view number the tables head with, and says so
    (test_acc is flip-averaged); under --val-size it is named validation."""
    import console

    progress = console.Progress(epochs=2, n_trials=1)
    config = {"variant": {"name": "gn", "l1": 0.0}, "seed": 0}
    trial = SimpleNamespace(trial_id="a", config=config, last_result={}, status="RUNNING")
    result = {"epoch": 1, "test_acc": 0.9, "test_acc_single": 0.8512, trainable.HEALTH_KEY: "ok", "images_per_s": 1000.0}
    progress.on_trial_result(1, [trial], trial, result)
    assert re.match(r"gn seed 0 +epoch 1/2  one-view test acc 85\.12%  1,000 img/s  \| sweep 1/2 epochs", capsys.readouterr().out)
    trial.config = {**config, "val_size": 100}
    progress.on_trial_result(1, [trial], trial, result)
    assert "one-view val acc 85.12%" in capsys.readouterr().out
