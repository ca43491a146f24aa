"""Failures through real sweeps: a diverging trial, a refused GPU request, many more trials than cores.
Each test runs Ray on the 2-core machine. (Ctrl-C and --resume: tests/test_storage.py, on S3; SIGTERM:
tests/test_launches.py; a killed driver: tests/test_sweep.py.)"""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid

import analysis
import trainable
import sweep
import tune_main
from conftest import make_idx_dir


def load_grid(path) -> ResultGrid:
    return ResultGrid(ExperimentAnalysis(str(path)))


def reported(trial_dir: Path) -> list:
    result = trial_dir / "result.json"
    return [json.loads(line) for line in result.read_text().splitlines()] if result.exists() else []


@pytest.mark.slow
def test_diverging_trial_stops_is_named_and_the_others_finish(tmp_path, capfd, monkeypatch):
    """One grid, two learning rates: the lr-1000 trial diverges, the lr-0.05 one runs its epochs. On a private
    Ray, as a user's run: the console is checked from ray.init on."""
    space = sweep.param_space

    def two_learning_rates(*args):
        config = space(*args)
        config["lr"] = tune.grid_search([0.05, 1000.0])
        return config

    monkeypatch.setattr(sweep, "param_space", two_learning_rates)
    storage = tmp_path / "results"
    code = tune_main.main(["--smoke-test", "--variants", "gn", "--cpus-per-trial", "1",
                           "--lr", "0.05", "--storage-path", str(storage), "--name", "diverge"])
    out, err = capfd.readouterr()
    assert code == 1
    grid = load_grid(storage / "diverge")
    by_lr = {r.config["lr"]: r for r in grid}
    healthy, diverged = reported(Path(by_lr[0.05].path)), reported(Path(by_lr[1000.0].path))
    assert [r["epoch"] for r in healthy] == [1, 2] and {r[trainable.HEALTH_KEY] for r in healthy} == {"ok"}
    assert len(diverged) == 1 and diverged[0][trainable.HEALTH_KEY].startswith("diverged: train loss nan")
    name = Path(by_lr[1000.0].path).name
    assert f"error: trial {name} stopped, diverged: train loss nan" in err
    assert "lower --lr" in err

    # the console: one line per report, no Ray boxes or warnings
    assert re.search(r"^gn seed 0 +epoch 2/2  one-view test acc +\d+\.\d\d%  [\d,]+ img/s  \| sweep \d+/\d+ epochs, ~\S+ left$",
                     out, re.M), out
    assert "STOPPED, diverged" in out
    console = (out + err).strip().splitlines()
    assert len(console) <= 12, "\n".join(console)
    # every line is normsweep's own (not a list of Ray's wordings, which change between releases)
    own = set(sweep.summary_text(grid).splitlines()) | {"", f"experiment: {storage / 'diverge'}"}
    foreign = [line for line in console
               if line not in own and not re.fullmatch(r"normsweep: .*|gn seed 0 +epoch .*|error: .*", line)]
    assert not foreign, "\n".join(console)

    # the analysis marks the diverged trial and draws no nan
    _, df = analysis.load_experiment(storage / "diverge")
    assert df.groupby("trial")["diverged"].first().sum() == 1
    assert len(analysis.best_per_trial(df)) == 1
    for metric in ("test_loss", "test_acc"):
        legend = [t.get_text() for t in analysis.plot_curves(df, metric).axes[0].get_legend().get_texts()]
        assert not any("nan" in text for text in legend), legend
    assert "diverged" in analysis.diverged_note(df)


@pytest.mark.slow
def test_gpus_the_cluster_lacks_are_refused_after_ray_starts(tmp_path, capsys, session_ray):
    storage = tmp_path / "results"
    code = tune_main.main(["--smoke-test", "--gpus-per-trial", "1000", "--storage-path", str(storage)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.fullmatch(r"error: --gpus-per-trial 1000: the Ray cluster has (no|\d+) GPUs.*", err), err
    assert not storage.exists()  # no half-made experiment for a later --resume to trip on


@pytest.mark.slow
def test_soak_more_trials_than_cores(tmp_path, session_ray):
    """6 trials on 2 cores, 3 at a time (2/3 CPU each; each Ray worker holds ~0.6 GB, so not all at
    once on a small machine), so two waves: every one finishes, every epoch reported exactly once."""
    storage = tmp_path / "results"
    assert tune_main.main([
        "--dataset", str(make_idx_dir(tmp_path / "idx")), "--variants", "bn,gn,none", "--seeds", "2", "--epochs", "1",
        "--max-concurrent", "3", "--storage-path", str(storage), "--name", "soak"]) == 0
    grid = load_grid(storage / "soak")
    assert len(grid) == 6 and not grid.errors
    assert sorted((r.config["variant"]["name"], r.config["seed"]) for r in grid) == sorted(
        (v, s) for v in ("bn", "gn", "none") for s in range(2))
    for result in grid:
        assert [r["epoch"] for r in reported(Path(result.path))] == [1]


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
