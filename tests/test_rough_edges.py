"""What a new user hits: unsafe checkpoints, a notebook with no results, figures of short runs,
the report of a smoke experiment, machine paths and stray files in the repository."""
import hashlib
import subprocess
import time
import warnings
from pathlib import Path

import matplotlib
import nbformat
import pytest
import torch
from ray import tune

import analysis
import experiments
import train
import trainable

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(path, "w"): a file appears if the loader runs pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path):
    live = tmp_path / "live"
    torch.save({"model": Payload(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)["model"].close()  # the payload is real: an unsafe load runs it
    assert live.exists()

    marker = tmp_path / "pwned"
    directory = tmp_path / "checkpoint_000000"
    directory.mkdir()
    torch.save({"model": Payload(marker), "net_config": {}, "config": {}}, directory / trainable.CHECKPOINT_FILE)
    for load in (lambda: train.load_checkpoint(directory / trainable.CHECKPOINT_FILE),
                 lambda: train.model_from_checkpoint(directory / trainable.CHECKPOINT_FILE),
                 lambda: trainable.model_from_result_checkpoint(tune.Checkpoint.from_directory(directory))):
        with pytest.raises(train.CheckpointError) as refused:
            load()
        assert "\n" not in str(refused.value) and "not a normsweep checkpoint" in str(refused.value)
        assert not marker.exists()


def test_notebook_without_results_says_so_in_one_sentence(tmp_path):
    with pytest.raises(experiments.ExperimentError, match="no experiment under .*; run `python tune_main.py --smoke-test` first"):
        analysis.latest_experiment(tmp_path / "results")
    notebook = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code").source
    assert "analysis.latest_experiment(" in first and "max(" not in first


@pytest.fixture(scope="module")
def loaded(smoke_experiment):
    return analysis.load_experiment(smoke_experiment)


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


def test_report_of_a_smoke_experiment_is_quick_and_names_no_machine_path(smoke_experiment, tmp_path):
    start = time.perf_counter()
    assert analysis.main([str(smoke_experiment), "--out", str(tmp_path / "report")]) == 0
    seconds = time.perf_counter() - start
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert f"Experiment: `{smoke_experiment.name}`" in summary and str(tmp_path.parent) not in summary
    assert seconds < 45, f"report took {seconds:.0f} s"  # was 72 s: full test set re-read and re-scored


def _tracked():
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_repository_holds_no_machine_paths_duplicates_or_ignored_files():
    tracked = _tracked()
    if not tracked:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert not ignored, f".gitignore matches tracked files: {ignored}"
    digests = {}
    for name in tracked:
        path = ROOT / name
        if path.is_file():
            digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(name)
    assert not [names for names in digests.values() if len(names) > 1]
    assert "/work/" not in (ROOT / "docs/results/summary.md").read_text()


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_internals_are_hidden_unless_verbose(verbose, tmp_path, monkeypatch):
    """Up to ray.init: the default quiets Ray's loggers and keeps workers' output off the console."""
    import ray

    import console
    import tune_main
    from conftest import make_idx_dir

    calls = []

    class Stop(Exception):
        pass

    def init(**kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(console, "quiet_ray", lambda: calls.append("quiet"))
    monkeypatch.setattr(ray, "init", init)
    flags = ["--dataset", str(make_idx_dir(tmp_path / "idx")), "--variants", "bn", "--epochs", "1",
             "--storage-path", str(tmp_path / "results")] + (["--verbose"] if verbose else [])
    with pytest.raises(Stop):
        tune_main.main(flags)
    assert ("quiet" in calls) is not verbose
    assert calls[-1]["log_to_driver"] is verbose


def test_readme_leads_with_the_smoke_test_and_says_what_a_new_user_needs():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    readme = " ".join(text.split())  # prose wraps anywhere
    commands = [line for line in first_block.splitlines() if "tune_main.py" in line]
    assert "--smoke-test" in commands[0] and "--dataset fashion-mnist" in commands[1]  # a minute before 80
    assert "Python 3.11" in readme and "several GB" in readme  # the CUDA wheels
    assert "`ray stop`" in readme  # how to stop a `ray start` cluster
    assert "measures nothing" in readme  # what a smoke test's accuracies mean
    assert "\"Typical solution\" is the" in readme  # what the comparisons compare against
