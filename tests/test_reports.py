"""Reports and analyses of real experiments: the smoke experiment read back (the tidy frame, report files,
misclassified grids and tiles, summary and noise tests, figures of short runs, the README's TensorBoard
instruction, thread counts, a report that reads its data once and names no machine path); and experiments
that are not a clean finished sweep: a trial that has reported nothing yet, checkpoints that were not
copied, every trial diverged, a dataset that moved; what a report says about its data and numbers; the
notebook run headless.

Two real sweeps of its own (Ray on the 2-core machine): one interrupted while a trial has no report, one
whose only trial diverges. The rest reuses the session's smoke experiment.
"""
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import warnings
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

import analysis
import comparisons
import data as data_lib
import errors
import experiments
import sweep
import train
import trainable
import tune_main
from conftest import HANG_SECONDS, ROOT, launch_until, make_idx_dir, reported

matplotlib.use("Agg")
pytestmark = pytest.mark.slow  # every test reads a real sweep (Ray)


@pytest.fixture(scope="module")
def pending_experiment(tmp_path_factory):
    """Interrupted (SIGINT) once the batch-16 trial's first epoch is in, while its batch-500 twin waits for the
    CPUs it holds (each trial asks for every core, so they run one after the other, the smaller batch first):
    a trial Tune created that has reported nothing, whatever the machine's speed."""
    storage, name = tmp_path_factory.mktemp("results"), "pending"
    command = [sys.executable, str(ROOT / "tune_main.py"), "--smoke-test", "--variants", "gn", "--batch-sizes",
               "16,500", "--epochs", "2", "--cpus-per-trial", str(os.cpu_count()), "--storage-path", str(storage),
               "--name", name]
    driver = launch_until(command, reported(storage / name, "*batch_16_*"), "the batch-16 trial's first report",
                          cwd=ROOT)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=HANG_SECONDS)
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
    assert table.loc["gn, batch 16", "epochs in"] == "1"

    assert analysis.main([str(pending_experiment), "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "**Partial experiment" in summary and "gn, batch 16 1 of 2; gn, batch 500 0 of 2" in summary
    assert (tmp_path / "misclassified_gn_batch_16.png").exists()
    # one variant with results: said, not an empty table
    assert "nothing to compare (fewer than two variants have results" in summary and "| comparison" not in summary
    assert (f"Resume it with tune_main.py --resume --storage-path {shlex.quote(str(pending_experiment.parent))} --name "
            f"{pending_experiment.name}." in summary), summary
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
        analysis.misclassified(grid, df, "gn, batch 16")
    assert analysis.main([str(copy), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- misclassified images of gn, batch 16: trial gn_batch_16_seed0_" in summary
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
    assert analysis.trial_table(df).empty and analysis.summary(df).empty and comparisons.verdict_table(df).empty
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
    assert len(err) == 4 and all(line.startswith("skipped misclassified images of ") for line in err), err
    assert all(line.removeprefix("skipped ") in summary for line in err)
    pairs = [line for line in summary.splitlines() if line.startswith("| ") and " − " in line]
    assert len(pairs) == 6 and "McNemar" in summary  # its test reads what the trials reported

    one = tmp_path / "one"
    shutil.copytree(smoke_experiment, one, ignore=shutil.ignore_patterns("report"))
    gn = next(one.glob("gn_seed0_*"))
    for checkpoint in gn.glob("checkpoint_*"):
        shutil.rmtree(checkpoint)
    summary, files, err = _report(one, tmp_path / "r2", capsys)
    assert files == CURVES_AND_TABLES | {f"misclassified_{v}.png" for v in ("bn", "ln", "bn_l1_1e_05")}
    assert [line.split(":")[0] for line in err] == ["skipped misclassified images of gn"]
    mcnemar = summary[summary.index("| comparison"):]
    assert "bn − ln" in mcnemar and ("− gn" in mcnemar or "gn −" in mcnemar)  # its pairs need no checkpoint


def test_an_experiment_whose_dataset_moved(tmp_path, capsys, session_ray):
    """The curves, tables and pair tests need no data; the misclassified grids re-score checkpoints on it: said,
    and --dataset points at where it lies now."""
    data, storage = make_idx_dir(tmp_path / "tiny", n_train=64, n_test=32), tmp_path / "results"
    assert tune_main.main(["--dataset", str(data), "--variants", "bn,gn", "--epochs", "1", "--cpus-per-trial", "1",
                           "--storage-path", str(storage), "--name", "moved"]) == 0
    data.rename(tmp_path / "elsewhere")
    capsys.readouterr()
    summary, files, err = _report(storage / "moved", tmp_path / "r1", capsys)
    assert files == CURVES_AND_TABLES and "| gn " in summary
    [line] = err
    assert line.startswith("skipped misclassified images: the dataset is not readable here")
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


@pytest.fixture(scope="module")
def loaded(smoke_experiment):
    return analysis.load_experiment(smoke_experiment)


def test_tidy_frame_has_one_row_per_trial_and_epoch(loaded):
    grid, df = loaded
    assert len(grid) == 4 and len(df) == 8
    assert sorted(df["variant"].unique()) == ["bn", "bn+l1 (λ=1e-05)", "gn", "ln"]
    assert set(trainable.METRICS) | {"trial", "norm", "l1", "seed", "dataset", "epochs"} <= set(df.columns)
    assert df.groupby("trial")["epoch"].apply(list).tolist() == [[1, 2]] * 4


def test_cli_report_writes_every_file(smoke_experiment, tmp_path):
    out = tmp_path / "report"
    assert analysis.main([str(smoke_experiment), "--out", str(out)]) == 0
    expected = {"test_loss.png", "test_acc.png", "train_loss.png", "train_acc.png",
                "summary.md", "misclassified_bn.png", "misclassified_gn.png", "misclassified_ln.png",
                "misclassified_bn_l1_1e_05.png"}
    assert {p.name for p in out.iterdir()} == expected
    summary = (out / "summary.md").read_text()
    assert "McNemar" in summary and "![test accuracy](test_acc.png)" in summary  # one seed: McNemar's test
    assert re.search(r"^\| bn +\|", summary, re.M)  # the summary table's row


def test_misclassified_tiles_are_the_models_own_mistakes(loaded, fashion):
    grid, df = loaded
    for variant in df["variant"].unique():
        sample = analysis.misclassified(grid, df, variant, dataset=fashion)
        assert len(sample["indices"]) == 10
        assert torch.equal(sample["images"], fashion.test_images[sample["indices"]])
        assert torch.equal(sample["true"], fashion.test_labels[sample["indices"]])
        # the model's predictions, recomputed here from its best checkpoint
        result = next(r for r in grid if Path(r.path).name == sample["trial"])
        model, state = trainable.model_from_result_checkpoint(
            result.get_best_checkpoint(trainable.BEST_METRIC, trainable.BEST_MODE))
        assert train.uses_test_flip(state["config"], fashion.augment)  # scored as image + mirror
        with torch.no_grad():
            x = data_lib.to_input(sample["images"], **state["input_stats"])
            probs = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
        assert torch.equal(probs.argmax(1), sample["pred"])
        assert (sample["pred"] != sample["true"]).all()
        assert torch.allclose(probs.max(1).values, sample["confidence"], atol=1e-5)
        fig = analysis.plot_misclassified(sample)
        titles = [ax.get_title() for ax in fig.axes]
        for title, true, pred in zip(titles, sample["true"], sample["pred"]):
            assert title.startswith(f"true: {fashion.classes[true]}\npred: {fashion.classes[pred]} (")
        assert variant in fig._suptitle.get_text()


def test_summary_and_noise_tests(loaded):
    grid, df = loaded
    table = analysis.summary(df)
    assert len(table) == 4 and (table["parameters"] < 20_000).all()
    # one seed: no seed noise to measure, so no verdict: McNemar's test on the images the final epochs got right
    tables = analysis.comparison_tables(grid, df)
    assert set(tables) == {"mcnemar"} and len(tables["mcnemar"]) == 6 and tables["mcnemar"]["McNemar p"].notna().all()
    final = analysis.final_per_trial(df).set_index("variant")["test_acc_single"]
    assert (tables["mcnemar"]["difference (points)"] >= 0).all()  # the better variant first
    # the per-image correctness each trial reported agrees with its reported accuracy
    assert sorted(tables["mcnemar"]["difference (points)"]) == pytest.approx(sorted(
        100 * abs(final[a] - final[b]) for a, b in itertools.combinations(final.index, 2)))
    offsets = {variant: 0.001 * i for i, variant in enumerate(sorted(df["variant"].unique()))}
    shifted = df.assign(seed=1, trial=df["trial"] + "_copy",
                        test_acc_single=df["test_acc_single"] + df["variant"].map(offsets))
    verdicts = analysis.comparison_tables(grid, pd.concat([df, shifted], ignore_index=True))["verdicts"]
    assert len(verdicts) == 6 and verdicts["seeds"].eq(2).all() and verdicts["verdict"].notna().all()


def test_readme_tensorboard_instruction_reads_the_experiment(smoke_experiment):
    """The README's `tensorboard --logdir results/<name>`: tensorboard (installed by requirements.txt)
    finds every trial's epochs in the experiment directory."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    assert "tensorboard --logdir results/<name>" in (ROOT / "docs/usage.md").read_text()
    runs = EventMultiplexer().AddRunsFromDirectory(str(smoke_experiment))
    runs.Reload()
    scalars = {run: runs.Scalars(run, "ray/tune/test_acc") for run in runs.Runs()}
    assert len(scalars) == 4 and all(len(points) == 2 for points in scalars.values())


def test_short_runs_get_integer_epoch_ticks_and_every_curve_stays_visible(loaded):
    _, df = loaded
    fig = analysis.plot_curves(df, "test_acc")
    ax = fig.axes[0]
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    styles = [(line.get_linestyle(), line.get_marker()) for line in curves]
    assert len(curves) == 4 and len(set(styles)) == 4  # bn under bn+l1 still shows


def test_misclassified_grid_is_scored_as_the_table_scored(loaded):
    """A smoke trial was scored on 500 test images at its best epoch; its grid says the same number."""
    grid, df = loaded
    best = analysis.best_per_trial(df)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib drawing torch tensors warned 80 times in the suite
        for variant in df["variant"].unique():
            sample = analysis.misclassified(grid, df, variant)
            row = best[best["trial"] == sample["trial"]].iloc[0]
            assert sample["epoch"] == row["epoch"]
            assert sample["acc"] == pytest.approx(row["test_acc"], abs=1e-9)
            assert int(sample["indices"].max()) < 500
            fig = analysis.plot_misclassified(sample)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    for upper, lower in zip(axes[:5], axes[5:]):  # a lower tile's title clears the image above it
        gap = upper.get_window_extent(renderer).y0 - lower.title.get_window_extent(renderer).y1
        assert gap >= 16, gap  # pixels at 100 dpi; was 12, the titles all but touched the images above


def test_report_of_a_smoke_experiment_reads_the_data_once_scores_its_split_and_names_no_machine_path(
        smoke_experiment, tmp_path, monkeypatch):
    """What made the report slow (72 s), checked as behaviour rather than seconds: it re-read the data
    per variant and scored the full 10,000-image test set instead of the smoke test's 500."""
    loads, scored = [], []
    load_dataset, evaluate = analysis.data_lib.load_dataset, train.evaluate
    monkeypatch.setattr(analysis.data_lib, "load_dataset", lambda *a, **k: loads.append(a) or load_dataset(*a, **k))
    monkeypatch.setattr(train, "evaluate", lambda model, images, *a, **k: scored.append(len(images))
                        or evaluate(model, images, *a, **k))
    assert analysis.main([str(smoke_experiment), "--out", str(tmp_path / "report")]) == 0
    # one read; each variant's best checkpoint (its grid) on 500 images (McNemar's test reads the reports)
    assert len(loads) == 1 and scored == [500] * 4, (loads, scored)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert f"Experiment: `{smoke_experiment.name}`" in summary and str(tmp_path.parent) not in summary


def test_every_result_row_records_its_thread_count(smoke_experiment):
    """A seed's numbers depend on the torch thread count (README: what reproduces where); each epoch's
    result says which count produced it (the smoke fixture runs 1 CPU, so 1 thread, per trial; a resume at
    another count: tests/test_interruptions.py's SIGTERM test)."""
    rows = [json.loads(line) for path in smoke_experiment.glob("*/result.json")
            for line in path.read_text().splitlines()]
    assert len(rows) == 8 and {row["threads"] for row in rows} == {1}
    _, df = analysis.load_experiment(smoke_experiment)
    assert (df["threads"] == 1).all()
