"""The Ray Tune trainable, thin glue around train.TrainingRun: build the run from the trial's config, resume from its
newest checkpoint when Tune retries or restores the trial, then per epoch report METRICS with a checkpoint."""
import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import torch
from ray import tune

import experiments
import train
from config import TrialConfig
from errors import CheckpointError
from experiments import HEALTH_KEY

# Every epoch reports exactly these (accuracies 0-1; losses in nats). test_acc: flip-averaged; test_acc_single: one
# view; test_acc_precise_bn: BatchNorm's statistics recomputed after the final epoch (else nan); memory nan on CPUs.
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_single", "test_acc_precise_bn", "lr",
           "epoch", "epoch_seconds", "images_per_s", "threads", "peak_device_memory_mib")
BEST_METRIC, BEST_MODE = "test_acc", "max"
# Beside METRICS: CORRECT_KEY, which scored images the one view classified right (experiments.packed_correct: the
# paired image noise of verdicts.py), HEALTH_KEY, the precision ("bf16", "fp32"), the device ("cuda:0 NVIDIA H200
# (sm_90)"), parameters.
PRECISION_KEY, DEVICE_KEY, PARAMETERS_KEY = "precision", "device", "parameters"
CHECKPOINT_FILE = "state.pt"


def trial_config(config: dict, threads: int) -> dict:
    """A trial's flat settings: its Tune config with the grid's variant dict (norm, l1, a final stage's lr and weight
    decay) merged in."""
    flat = {k: v for k, v in config.items() if k != "variant"}
    variant = {k: v for k, v in config["variant"].items() if k in TrialConfig.__dataclass_fields__}
    return {**flat, **variant, "threads": threads}


def train_variant(config: dict, dataset, experiment: str):
    """Function trainable; `dataset` arrives once through Ray's object store (tune.with_parameters), `experiment` is
    where the experiment lies now (a local path or URI)."""
    resources = tune.get_context().get_trial_resources().required_resources
    run = train.TrainingRun(trial_config(config, threads=max(1, int(resources.get("CPU", 1)))),  # a shared core: 1
                            dataset, trial_device(resources))
    reports = resume(run, experiment)
    while run.epoch < run.config["epochs"]:
        metrics = run.run_epoch()
        health = divergence(metrics, run.config)
        report = epoch_report(run, metrics, health)
        if health != "ok":  # stop this trial; no checkpoint of a net full of nan; the others go on
            tune.report(report)
            return
        reports.append(report)
        with tempfile.TemporaryDirectory() as directory:
            run.save(Path(directory) / CHECKPOINT_FILE)
            (Path(directory) / experiments.EPOCHS_FILE).write_text(json.dumps(reports))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))


def trial_device(resources: dict):
    """The CPU for a trial Ray gave no GPU, else None (train.runtime's choice: CUDA). Ray may leave the GPUs visible
    to a trial that asked for none (2.60 did, `--gpus-per-trial 0` on a GPU machine), so CUDA's presence says nothing
    of what the trial was given."""
    return None if resources.get("GPU", 0) else torch.device("cpu")


def resume(run: train.TrainingRun, experiment: str) -> list:
    """Load the trial's newest readable checkpoint on storage into `run`, else Tune's: the trial writes a checkpoint
    before its driver takes the report in and saves it in Tune's state, so a stopped driver's state may lack it. The
    epochs it holds that Tune's log of the trial lacks are reported again. Returns the epochs reported so far."""
    known = tune.get_checkpoint()  # Tune's log of a trial it restores without one starts empty
    trial = experiments.join(experiment, Path(tune.get_context().get_trial_dir()).name)
    located = [experiments.filesystem(c) for c in experiments.checkpoints(trial)]
    for checkpoint in [tune.Checkpoint(path, fs) for fs, path in located] + ([known] if known else []):
        with checkpoint.as_directory() as directory:
            try:
                train.load_checkpoint(Path(directory) / CHECKPOINT_FILE)
            except CheckpointError:  # half-written: the one before it
                continue
            run.load(Path(directory) / CHECKPOINT_FILE)
            reports = Path(directory, experiments.EPOCHS_FILE)
            reports = json.loads(reports.read_text()) if reports.exists() else []
        logged = set(experiments.history(trial).get("epoch", [])) if known else set()
        for report in (r for r in reports if r["epoch"] not in logged):
            report_again(report, experiments.checkpoints(trial, report["epoch"]))
        return reports
    return []


def report_again(report: dict, checkpoints: list) -> None:
    """Report an epoch Tune's log lacks, with its checkpoint on storage if it has one: Tune numbers a trial's
    checkpoints by those it took in, so the next would be written over one it never took in (the best, maybe).
    Reported from a copy: Tune writes the checkpoint back to where it lies, not onto itself."""
    if not checkpoints:
        tune.report(report)
        return
    fs, path = experiments.filesystem(checkpoints[0])
    with tempfile.TemporaryDirectory() as directory:
        copy = tune.Checkpoint(path, fs).to_directory(directory)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(copy))


def epoch_report(run: train.TrainingRun, metrics: dict, health: str = "ok") -> dict:
    """What a trial reports for an epoch: METRICS from run_epoch's `metrics`, and the keys beside them."""
    return {**{k: metrics[k] for k in METRICS}, experiments.CORRECT_KEY: experiments.packed_correct(
        metrics["test_correct"]), HEALTH_KEY: health, PRECISION_KEY: run.precision,
            DEVICE_KEY: train.describe_device(run.device), PARAMETERS_KEY: run.parameters}


def divergence(metrics: dict, config: dict) -> str:
    """"ok", or one line saying which loss stopped being finite (checked once per epoch, not per step)."""
    bad = [f"{k.replace('_', ' ')} {metrics[k]}" for k in ("train_loss", "test_loss") if not math.isfinite(metrics[k])]
    return f"diverged: {', '.join(bad)} at epoch {metrics['epoch']} (lr {config['lr']:g}); lower --lr" if bad else "ok"


def best_epoch(df):
    """The row of a trial's epochs with the best test_acc, ties to the latest (as Tune ranks its checkpoints: the
    kept best checkpoint's epoch); None if no epoch is healthy."""
    scores, health = df[BEST_METRIC].to_numpy(), df.get(HEALTH_KEY, pd.Series("ok", df.index)).to_numpy()
    finite = [i for i, v in enumerate(scores) if math.isfinite(v) and health[i] == "ok"]
    return df.iloc[max(finite, key=lambda i: (scores[i], i))] if finite else None


def model_from_result_checkpoint(checkpoint: tune.Checkpoint):
    """(model, state) from a Tune checkpoint: the net in eval mode on the CPU, and its saved state."""
    with checkpoint.as_directory() as directory:
        return train.model_from_checkpoint(Path(directory) / CHECKPOINT_FILE)
