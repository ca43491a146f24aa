"""End-to-end sweeps (Ray on the 2-core machine): the smoke sweep and its saved launch settings, logical
GPU shares, a killed driver resumed, the batch-size study, failures (a diverging trial, GPUs the cluster
lacks, more trials than cores), benchmarks/gpu.py's tiny run, ResNet-20 and a user's net on folders and idx
files, and a val-size sweep.

The tuned comparison: tests/test_tuned_comparison.py; interrupted, resumed and moved experiments:
tests/test_interruptions.py; reports: tests/test_reports.py.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid

import analysis
import config
import data as data_lib
import experiments
import sweep
import trainable
import tune_main
from conftest import ROOT, launch_until, make_idx_dir
from test_datasets import write_image_folder
from test_gpu import VARIANTS, _table_after

pytestmark = pytest.mark.slow  # every test runs a real sweep (Ray)


def load_grid(path) -> ResultGrid:
    return ResultGrid(ExperimentAnalysis(str(path)))


def reported_epochs(trial_dir: Path) -> list:
    result = trial_dir / "result.json"
    return [json.loads(line)["epoch"] for line in result.read_text().splitlines()] if result.exists() else []


def reported(trial_dir: Path) -> list:
    result = trial_dir / "result.json"
    return [json.loads(line) for line in result.read_text().splitlines()] if result.exists() else []


MY_MODELS = '''
"""A user's builder around a torchvision ResNet factory."""
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


def build(norm_layer, in_channels, num_classes):
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, norm_layer=norm_layer)
    net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return net
'''


@pytest.fixture
def unload_user_modules(tmp_path):
    """Afterwards, forget the modules loaded from tmp_path (a user's mymodels.py), as a new process would."""
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_end_to_end_sweep_on_real_subset(smoke_experiment):
    grid = load_grid(smoke_experiment)
    assert len(grid) == 4 and not grid.errors
    assert sorted(r.config["variant"]["name"] for r in grid) == ["bn", "bn+l1", "gn", "ln"]
    for result in grid:
        df = result.metrics_dataframe
        assert df["epoch"].tolist() == [1, 2]
        assert set(trainable.METRICS) <= set(df.columns)
        assert (df["threads"] == 1).all()  # the trial's CPUs
        best = result.get_best_checkpoint(trainable.BEST_METRIC, trainable.BEST_MODE)
        _, state = trainable.model_from_result_checkpoint(best)
        assert state["net_config"]["norm"] == result.config["variant"]["norm"]
        assert len(list(Path(result.path).glob("checkpoint_*"))) <= 2  # best and latest only


def test_launch_settings_are_saved(smoke_experiment):
    launch = experiments.read_launch(str(smoke_experiment))
    assert launch["dataset"] == "fashion-mnist" and launch["smoke_test"] is True


@pytest.mark.parametrize("gpus, trials, cpu, gpu", [
    (3, 4, 0.5, 0.5),  # the reported case: at 0.75 GPU each only 3 ran at once
    (8, 4, 0.5, 1),
    (0, 3, 0.6666, 0),  # at 0.6667 CPU each (2.0001 in all) only 2 ran at once
])
def test_logical_resources_are_shared_and_all_trials_run_at_once(gpus, trials, cpu, gpu, tmp_path):
    """2 CPUs and Ray's logical GPUs (no real device): each trial gets its share and all run at the same time."""
    import ray
    from ray import tune

    def trainable(config):
        started = tmp_path / "started"
        (started / str(config["i"])).touch()
        deadline = time.time() + 600  # a trial left waiting by the scheduler fails the test after this
        while len(list(started.iterdir())) < trials and time.time() < deadline:  # wait for the others
            time.sleep(0.1)
        tune.report({"together": len(list(started.iterdir())) == trials, "gpu_ids": len(ray.get_gpu_ids())})

    (tmp_path / "started").mkdir()
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        args = Namespace(max_concurrent=0, cpus_per_trial=None, gpus_per_trial=None)
        resources = sweep.trial_resources(ray.cluster_resources(), trials, args)
        assert resources == {"cpu": cpu, "gpu": gpu, "memory": sweep.TRIAL_MEMORY_BYTES}  # the memory Ray reserves
        results = tune.Tuner(tune.with_resources(trainable, resources),
                             param_space={"i": tune.grid_search(list(range(trials)))},
                             run_config=tune.RunConfig(storage_path=str(tmp_path / "results"), verbose=0)).fit()
    finally:
        ray.shutdown()
    assert not results.errors
    assert all(r.metrics["together"] for r in results)  # none waited for another to finish
    assert all(r.metrics["gpu_ids"] == (1 if gpus else 0) for r in results)  # each sees one device, if any


def test_killed_driver_resumes_every_trial_once(tmp_path, session_ray):
    """SIGKILL, as the OOM killer sends: no handler runs. 256 random images, one trial at a time (gn not started)."""
    storage, name, epochs = tmp_path / "results", "killed", 3
    command = [sys.executable, str(ROOT / "tune_main.py"), "--dataset", str(make_idx_dir(tmp_path / "idx", 256, 64)),
               "--variants", "bn,gn", "--epochs", str(epochs), "--max-concurrent", "1", "--cpus-per-trial", "1",
               "--storage-path", str(storage), "--name", name]
    driver = launch_until(command, lambda: list((storage / name).glob("*/checkpoint_000000")), "the first checkpoint",
                          cwd=ROOT)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {p.name: reported_epochs(p) for p in (storage / name).iterdir() if p.is_dir()}
    assert any(len(e) < epochs for e in before.values()), f"killed too late to test resume: {before}"

    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", name, "--cpus-per-trial", "1"]) == 0
    grid = load_grid(storage / name)
    assert len(grid) == 2 and not grid.errors
    for result in grid:
        assert reported_epochs(Path(result.path)) == list(range(1, epochs + 1))
        assert (result.metrics_dataframe["threads"] == 1).all()


def test_batch_size_study_sweep_and_report(tmp_path, capsys, session_ray):
    """A real (tiny) study through tune_main.py: names, the scaled lr, precise BN, the figure and Table 2."""
    data = make_idx_dir(tmp_path / "idx", n_train=64, n_test=32)
    storage = tmp_path / "results"
    code = tune_main.main(["--dataset", str(data), "--variants", "bn,gn", "--batch-sizes", "4,8", "--epochs", "1",
                           "--storage-path", str(storage), "--name", "study", "--cpus-per-trial", "0.5"])
    assert code == 0, capsys.readouterr().err
    assert "bn, batch 4" in capsys.readouterr().out  # the CLI's table keeps the batch sizes apart
    grid, df = analysis.load_experiment(storage / "study")
    assert sorted(df["variant"]) == ["bn, batch 4", "bn, batch 8", "gn, batch 4", "gn, batch 8"]
    assert all("_batch" in trial for trial in df["trial"])
    auto = config.batch_size_for(64)  # 16: the reference batch, where --lr holds
    assert all(result.config["lr"] == config.TrialConfig.lr for result in grid)  # the flag's, unscaled
    for _, row in df.iterrows():
        assert row["peak lr"] == pytest.approx(config.TrialConfig.lr * row["batch_size"] / auto)
        assert row["lr"] == pytest.approx(row["peak lr"] / 25)  # OneCycle starts at max_lr / 25 (div_factor)
        assert math.isfinite(row["test_acc_precise_bn"]) == (row["norm"] == "bn")

    study = analysis.batch_size_study(df)
    assert list(zip(study["variant"], study["batch size"])) == [("bn", 4), ("bn", 8), ("gn", 4), ("gn", 8)]
    table = analysis.batch_size_table(study)
    assert list(table.columns) == ["", "8", "4"]  # large to small, as in the paper
    assert list(table[""]) == ["bn error (%)", "bn, precise BN statistics", "gn error (%)", "gn − bn (points)"]
    assert analysis.progress_note(analysis.progress(grid, df)) == ""

    written = analysis.write_report(storage / "study", tmp_path / "report")
    assert tmp_path / "report" / "batch_size.png" in written
    assert "## Batch size" in (tmp_path / "report" / "summary.md").read_text()


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


def test_gpus_the_cluster_lacks_are_refused_after_ray_starts(tmp_path, capsys, session_ray):
    storage = tmp_path / "results"
    code = tune_main.main(["--smoke-test", "--gpus-per-trial", "1000", "--storage-path", str(storage)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.fullmatch(r"error: --gpus-per-trial 1000: the Ray cluster has (no|\d+) GPUs.*", err), err
    assert not storage.exists()  # no half-made experiment for a later --resume to trip on


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


def test_tiny_run_prints_a_row_per_variant_with_sane_numbers(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--quiet",
                           "--storage-path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    if not torch.cuda.device_count():
        assert lines[0].startswith("GPU: none")
    heading = next(line for line in lines if line.startswith("CPU reference: 1 epoch(s), wall "))
    assert float(heading.split("wall ")[1].split(" s")[0]) > 0
    rows = _table_after(lines, "CPU reference:")
    assert {row["variant"] for row in rows} == VARIANTS and len(rows) == 4
    for row in rows:
        assert row["device"] == "cpu" and row["precision"] == "fp32" and row["epochs"] == "1", row
        assert float(row["img/s epoch 1"].replace(",", "")) > 0 and float(row["train s"]) > 0, row
        assert row["peak MiB"] == "-" and row["img/s later (median)"] == "-", row  # no device memory; 1 epoch
        # 1 epoch on 1,000 images: 45-68% when measured (seed 0); chance is 10%
        assert 20 < float(row["epoch 1 one-view %"]) <= 100, row
        assert row["final one-view %"] == row["epoch 1 one-view %"], row
    assert (tmp_path / "cpu_reference").is_dir()  # --storage-path keeps the experiments


@pytest.mark.parametrize("layout, model, variants", [
    ("folder", "resnet20", "bn,gn,in,gn+ws"),
    ("idx", "resnet20", "bn,gn,in,gn+ws"),
    ("idx", "mymodels.py:build", "bn,gn"),
])
def test_a_sweep_of_resnet20_or_a_users_net_on_a_folder_or_idx_files(tmp_path, monkeypatch, unload_user_modules, layout,
                                                                     model, variants, session_ray):
    if layout == "folder":
        write_image_folder(tmp_path / "data", per_class=(4, 2), size=(16, 16))
    else:
        make_idx_dir(tmp_path / "data", n_train=24, n_test=12)
    (tmp_path / "mymodels.py").write_text(MY_MODELS)
    monkeypatch.chdir(tmp_path)  # the user's file given relative to where they run
    code = tune_main.main(["--dataset", str(tmp_path / "data"), "--model", model, "--variants", variants,
                           "--epochs", "1", "--batch-size", "4", "--storage-path", str(tmp_path / "results"),
                           "--name", "e2e"])
    assert code == 0
    from ray.tune import ExperimentAnalysis, ResultGrid

    grid = ResultGrid(ExperimentAnalysis(str(tmp_path / "results" / "e2e")))
    assert sorted(r.config["variant"]["name"] for r in grid) == sorted(variants.split(",")) and not grid.errors
    channels = 3 if layout == "folder" else 1
    for result in grid:
        assert result.config["model"] == (model if model == "resnet20" else f"{tmp_path / 'mymodels.py'}:build")
        net, state = trainable.model_from_result_checkpoint(result.checkpoint)
        assert state["net_config"]["in_channels"] == channels
        first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert first_conv.in_channels == channels
        assert result.metrics[trainable.PARAMETERS_KEY] == sum(p.numel() for p in net.parameters())


def test_a_val_size_sweep_is_analysed_on_its_held_out_images(tmp_path, session_ray, capsys):
    """The trials scored training images held out of their --train-size subset (--val-size): the analysis
    re-scores those same images, names them validation, and never reads a test split (the directory has none)."""
    directory = make_idx_dir(tmp_path / "tiny", n_train=64, n_test=32)
    for stem in data_lib.SPLIT_FILES["test"]:
        (directory / (stem + ".gz")).unlink()
    held_out = data_lib.load_dataset(str(directory), test_split=False).subset(48).held_out(24)
    storage = tmp_path / "results"
    assert tune_main.main(["--dataset", str(directory), "--train-size", "48", "--val-size", "24", "--variants", "gn",
                           "--epochs", "2", "--cpus-per-trial", "1", "--storage-path", str(storage),
                           "--name", "val"]) == 0
    out = capsys.readouterr().out
    assert "val acc" in out and "test acc" not in out, out
    assert "Scored on 24 training images held out from training (--val-size 24)" in out

    grid, df = analysis.load_experiment(storage / "val")
    sample = analysis.misclassified(grid, df, "gn", n=24)
    best = analysis.best_per_trial(df).iloc[0]
    assert sample["acc"] == pytest.approx(best["test_acc"])  # the trial's own score of its best epoch
    assert torch.equal(sample["images"], held_out.test_images[sample["indices"]])
    assert len(sample["indices"]) == round(24 * (1 - sample["acc"]))  # every mistake: n is the split's size
    assert "misclassified validation images" in analysis.plot_misclassified(sample)._suptitle.get_text()
    # McNemar's per-image correctness: of the final epoch, on the same held-out images
    final = analysis.final_per_trial(df).iloc[0]
    correct = experiments.unpacked_correct(final[experiments.CORRECT_KEY])
    assert len(correct) == 24 and correct.mean() == pytest.approx(final["test_acc_single"])
    assert analysis.plot_curves(df, "test_acc").axes[0].get_ylabel().startswith("validation accuracy")
    assert analysis.main([str(storage / "val"), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "**Scored on 24 training images held out" in summary and "Headline: validation accuracy" in summary
