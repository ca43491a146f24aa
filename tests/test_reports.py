"""Reports of experiments that are not a clean finished sweep: a trial that has reported nothing yet,
checkpoints that were not copied, every trial diverged; and what a report says about its data and numbers.

Two real sweeps (Ray on the 2-core machine): one interrupted while a trial has no report, one whose
only trial diverges. The rest reuses the session's smoke experiment.
"""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import matplotlib
import pandas as pd
import pytest

import analysis
import comparisons
import errors
import experiments
import sweep
import tune_main
from conftest import ROOT, make_idx_dir

matplotlib.use("Agg")
pytestmark = pytest.mark.slow  # every test reads a real sweep (Ray)


@pytest.fixture(scope="module")
def pending_experiment(tmp_path_factory):
    """Interrupted (SIGINT) once the batch-2 trial's first epoch is in, while its batch-500 twin waits for the
    CPUs it holds (each trial asks for every core, so they run one after the other, the smaller batch first):
    a trial Tune created that has reported nothing, whatever the machine's speed."""
    storage, name = tmp_path_factory.mktemp("results"), "pending"
    command = [sys.executable, str(ROOT / "tune_main.py"), "--smoke-test", "--variants", "gn", "--batch-sizes", "2,500",
               "--epochs", "2", "--cpus-per-trial", str(os.cpu_count()), "--storage-path", str(storage),
               "--name", name]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def reported():  # result.json is written by the driver once it has taken the report in
        return any(f.read_text().strip() for f in (storage / name).glob("*batch_2_*/result.json"))

    hang = time.monotonic() + 1800  # a hang guard only: a loaded machine is slow, not wrong
    while not reported():
        assert driver.poll() is None, f"the driver ended before the first report: {driver.communicate()}"
        if time.monotonic() > hang:
            driver.kill()
            pytest.fail(f"no report in 30 minutes: {driver.communicate()}")
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=1800)  # a hang guard
    assert driver.returncode == errors.INTERRUPTED_EXIT, (out, err)
    assert "Traceback" not in out + err, err
    return storage / name


def test_partial_report_with_a_trial_that_has_reported_nothing(pending_experiment, tmp_path, monkeypatch):
    ray_said, handler = [], logging.Handler()  # Ray warned "Failed to fetch metrics" of the silent trial (issue 25,
    handler.emit = ray_said.append  # item 28); its handler writes to a descriptor pytest's capfd does not capture
    monkeypatch.setattr(logging.getLogger("ray.tune.analysis.experiment_analysis"), "handlers", [handler])
    grid, df = analysis.load_experiment(pending_experiment)
    assert not ray_said, [record.getMessage() for record in ray_said]
    silent = [r for r in grid if r.config is None]
    assert len(grid) == 2 and len(silent) == 1, "the batch-500 trial must not have reported for this test"

    table = analysis.progress(grid, df).set_index("variant")
    assert table.loc["gn, batch 500", "epochs in"] == "0" and not table.loc["gn, batch 500", "complete"]
    assert table.loc["gn, batch 2", "epochs in"] == "1"

    assert analysis.main([str(pending_experiment), "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "**Partial experiment" in summary and "gn, batch 2 1 of 2; gn, batch 500 0 of 2" in summary
    assert (tmp_path / "misclassified_gn_batch_2.png").exists()
    # one variant with results: said, not an empty table
    assert "nothing to compare (fewer than two variants have results" in summary and "| comparison" not in summary
    assert "Resume it with tune_main.py --resume." in summary
    with experiments.owned(str(pending_experiment)):  # a run writing it is not to be resumed (issue 25, item 22)
        assert analysis.main([str(pending_experiment), "--out", str(tmp_path / "running")]) == 0
    running = (tmp_path / "running" / "summary.md").read_text()
    assert f"It is still running (another run (pid {os.getpid()} on " in running and "--resume" not in running

    console = sweep.summary_text(grid)
    assert re.search(r"^gn_batch_500_seed0_\w+: no epoch reported$", console, re.M), console


def test_results_copied_without_checkpoints_still_report(pending_experiment, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(pending_experiment, copy, ignore=shutil.ignore_patterns("checkpoint_*", "report"))
    grid, df = analysis.load_experiment(copy)
    with pytest.raises(analysis.AnalysisError, match=r"has no checkpoint of its best epoch 1 \(not saved yet, "
                                                     r"or not copied with the results\)"):
        analysis.misclassified(grid, df, "gn, batch 2")
    assert analysis.main([str(copy), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- misclassified images of gn, batch 2: trial gn_batch_2_seed0_" in summary
    assert "![test accuracy](test_acc.png)" in summary


def test_every_trial_diverged(tmp_path, capfd, session_ray):
    storage = tmp_path / "results"
    code = tune_main.main(["--smoke-test", "--variants", "none", "--epochs", "1", "--lr", "1000", "--cpus-per-trial", "2",
                           "--storage-path", str(storage), "--name", "diverged"])
    out, err = capfd.readouterr()
    assert code == 1, (out, err)
    assert "Traceback" not in out + err and "KeyError" not in out + err, err
    trial = next(p.name for p in (storage / "diverged").iterdir() if p.name.startswith("none_seed0_"))
    assert f"error: trial {trial} stopped, diverged: " in err
    assert f"Every trial diverged (1 trial), so there is no accuracy to report or compare: {trial} (diverged: " in out
    assert "final one-view acc" not in out  # no empty table

    assert analysis.main([str(storage / "diverged"), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "1 epoch, 1 seed per variant" in summary
    assert f"**Every trial diverged (1 trial), so there is no accuracy to report or compare: {trial} (diverged: " in summary
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["summary.md"]


def all_diverged(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(diverged=True, health="diverged: train loss nan at epoch 2 (lr 1000); lower --lr")


def test_every_trial_of_a_multi_trial_experiment_diverged(smoke_experiment, tmp_path, monkeypatch):
    grid, df = analysis.load_experiment(smoke_experiment)
    df = all_diverged(df)
    assert analysis.trial_table(df).empty and analysis.summary(df).empty and comparisons.paired_tests(df).empty
    assert analysis.convergence_warnings(df) == []
    assert analysis.diverged_note(df).startswith("Every trial diverged (4 trials), so there is no accuracy")
    with pytest.raises(analysis.AnalysisError, match="^gn has no trial with a healthy epoch"):
        analysis.misclassified(grid, df, "gn")
    legend = [t.get_text() for t in analysis.plot_curves(df, "test_acc").axes[0].get_legend().get_texts()]
    assert legend == [f"{v}: diverged (not plotted)" for v in sorted(df["variant"].unique())]

    frame = analysis.results_frame
    monkeypatch.setattr(analysis, "results_frame", lambda g: all_diverged(frame(g)))
    assert analysis.main([str(smoke_experiment), "--out", str(tmp_path)]) == 0
    assert "**Every trial diverged (4 trials)" in (tmp_path / "summary.md").read_text()
    assert "Every trial diverged (4 trials)" in sweep.summary_text(grid)


def test_report_says_what_data_and_which_accuracy(smoke_experiment, tmp_path, monkeypatch):
    """The smoke test's subset in the summary and figures, plurals, the path and what it is relative to,
    and which accuracy each figure shows beside the headline's."""
    monkeypatch.chdir(smoke_experiment.parent.parent)
    relative = f"{smoke_experiment.parent.name}/{smoke_experiment.name}"
    assert analysis.main([relative, "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# normsweep summary: fashion-mnist, 2 epochs, 1 seed per variant "
                              "(smoke-test subset: 1,000 train images, 500 test images)\n")
    assert f"Experiment: `{relative}` (relative to the directory the analysis ran in)" in summary

    grid, df = analysis.load_experiment(smoke_experiment)
    fig = analysis.plot_curves(df, "test_acc")
    assert "smoke-test subset: 1,000 train images, 500 test images" in fig.axes[0].get_title()
    assert fig.axes[0].get_ylabel() == "test accuracy, flip-averaged (%)"
    headline = analysis.summary(df).set_index("variant")["final one-view acc mean (%)"]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for variant, text in zip(sorted(headline.index), legend):
        assert text.startswith(f"{variant}: final one view {headline[variant]:.2f}; best flip-averaged "), text
    assert "the summary's headline" in fig.axes[0].get_legend().get_title().get_text()

    sample = analysis.misclassified(grid, df, "bn")
    title = analysis.plot_misclassified(sample)._suptitle.get_text()
    assert f"its test accuracy {100 * sample['acc']:.2f}%, flip-averaged, at that best epoch" in title
    assert "the summary's headline is the final epoch, one view" in title


def test_subset_and_plurals_of_other_launches(smoke_experiment, tmp_path, monkeypatch):
    assert analysis.data_subset({"train_size": 1000}) == "--train-size subset: 1,000 train images, every test image"
    assert analysis.data_subset({"train_size": 0}) == ""
    _, df = analysis.load_experiment(smoke_experiment)
    one = df[df["epoch"] == 1].assign(epochs=1, data="")
    assert analysis._title(one, "t") == "t: fashion-mnist, 1 epoch, 1 seed per variant"
    # an experiment outside the working directory is named, and said to be
    monkeypatch.chdir(tmp_path)
    assert analysis.experiment_line(str(smoke_experiment)) == (
        f"`{smoke_experiment.name}` (its name; it lies outside the directory the analysis ran in)")


def _report(experiment, out, capsys, *flags):
    """analysis.py's report: (summary.md, the files written, stderr's lines)."""
    assert analysis.main([str(experiment), "--out", str(out), *flags]) == 0
    return (out / "summary.md").read_text(), {p.name for p in out.iterdir()}, capsys.readouterr().err.splitlines()


CURVES_AND_TABLES = {"summary.md", "test_loss.png", "test_acc.png", "train_loss.png", "train_acc.png"}


def test_results_copied_without_checkpoints_or_one_trials_checkpoint(smoke_experiment, tmp_path, capsys):
    """Every part that needs no checkpoint is written; each left-out part is said once, in summary.md and on
    stderr. Sibling: one trial's checkpoints missing while the others' are there."""
    bare = tmp_path / "bare"
    shutil.copytree(smoke_experiment, bare, ignore=shutil.ignore_patterns("checkpoint_*", "report"))
    summary, files, err = _report(bare, tmp_path / "r1", capsys)
    assert files == CURVES_AND_TABLES and "| bn " in summary and "Per trial:" in summary
    assert len(err) == 8 and all(line.startswith("skipped ") for line in err), err  # 4 grids, 4 McNemar trials
    assert all(line.removeprefix("skipped ") in summary for line in err)
    assert "McNemar's test of bn_seed0_" in summary and "copy its checkpoint_* directories too" in summary

    one = tmp_path / "one"
    shutil.copytree(smoke_experiment, one, ignore=shutil.ignore_patterns("report"))
    gn = next(one.glob("gn_seed0_*"))
    for checkpoint in gn.glob("checkpoint_*"):
        shutil.rmtree(checkpoint)
    summary, files, err = _report(one, tmp_path / "r2", capsys)
    assert files == CURVES_AND_TABLES | {f"misclassified_{v}.png" for v in ("bn", "ln", "bn_l1_1e_05")}
    assert [line.split(":")[0] for line in err] == ["skipped misclassified images of gn", f"skipped McNemar's test of {gn.name}"]
    mcnemar = summary[summary.index("| comparison"):]
    assert "bn − ln" in mcnemar and "− gn" not in mcnemar and "gn −" not in mcnemar  # its pairs left out, not guessed


def test_an_experiment_whose_dataset_moved(tmp_path, capsys, session_ray):
    """The curves, tables and paired tests need no data; the misclassified grids and McNemar's test re-score
    checkpoints on it: said, and --dataset points at where it lies now."""
    data, storage = make_idx_dir(tmp_path / "tiny", n_train=64, n_test=32), tmp_path / "results"
    assert tune_main.main(["--dataset", str(data), "--variants", "bn,gn", "--epochs", "1", "--cpus-per-trial", "1",
                           "--storage-path", str(storage), "--name", "moved"]) == 0
    data.rename(tmp_path / "elsewhere")
    capsys.readouterr()
    summary, files, err = _report(storage / "moved", tmp_path / "r1", capsys)
    assert files == CURVES_AND_TABLES and "| gn " in summary
    [line] = err
    assert line.startswith("skipped misclassified images and McNemar's test: the dataset is not readable here")
    assert "--dataset PATH" in line and line.removeprefix("skipped ") in summary
    summary, files, err = _report(storage / "moved", tmp_path / "r2", capsys, "--dataset", str(tmp_path / "elsewhere"))
    assert files == CURVES_AND_TABLES | {"misclassified_bn.png", "misclassified_gn.png"} and not err
    assert "McNemar p" in summary


def test_notebook_run_headless_writes_beside_the_report_and_fails_in_one_line(smoke_experiment, tmp_path, capsys):
    tracked = (ROOT / "analysis.ipynb").read_bytes()
    assert analysis.main([str(smoke_experiment), "--notebook", "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "analysis.ipynb").read_text())
    outputs = [out for cell in run["cells"] if cell["cell_type"] == "code" for out in cell["outputs"]]
    assert not [out for out in outputs if out["output_type"] == "error"]
    # nothing on the kernel's stderr (Ray said "Missing packages: ['ipywidgets']" twice there)
    assert not [out["text"] for out in outputs if out.get("name") == "stderr"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 4 + 4 + 1  # curves, grids, pooling
    tables = "".join(str(out.get("data", {}).get("text/plain", "")) for cell in run["cells"]
                     if "analysis.formatted(" in "".join(cell["source"]) for out in cell.get("outputs", []))
    assert "McNemar p" in tables and "Holm p" in tables  # the smoke experiment has one seed
    assert "NaN" not in tables and not re.search(r"\d\.\d+e-\d", tables)  # as the report: "-", "<0.001"
    assert (ROOT / "analysis.ipynb").read_bytes() == tracked  # the tracked notebook keeps no outputs
    capsys.readouterr()
    # sibling of a mistyped name: an experiment with no epoch, refused inside the notebook
    empty = tmp_path / "empty"
    shutil.copytree(smoke_experiment, empty, ignore=lambda d, names: [n for n in names if "_seed" in n or n == "report"])
    assert analysis.main([str(empty), "--notebook", "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no reported epochs yet" in err and "\x1b[" not in err, err
