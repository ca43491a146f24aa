"""The Ray Tune trainable: thin glue around train.TrainingRun.

Build the run from the trial's config, resume from `tune.get_checkpoint()` when Tune retries or restores
the trial, then per epoch report the fixed metric set with a checkpoint.
"""
import math
import tempfile
from pathlib import Path

import pandas as pd
from ray import tune

import train
from config import TrialConfig
from experiments import HEALTH_KEY

# Every epoch reports exactly these numbers (accuracies 0-1, "max"; losses in nats, "min").
# test_acc_single: one view; test_acc_precise_bn: one view with BatchNorm's statistics recomputed on large batches
# after the final epoch (nan otherwise, train.precise_bn); peak_device_memory_mib: nan on the CPU.
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_single", "test_acc_precise_bn", "lr",
           "epoch", "epoch_seconds", "images_per_s", "threads", "peak_device_memory_mib")
BEST_METRIC, BEST_MODE = "test_acc", "max"
# Beside METRICS: HEALTH_KEY ("ok" or why the trial stopped), what the trial computed in ("bf16" or "fp32") and
# on ("cpu", "cuda:0 NVIDIA H200 (sm_90)"), and the net's parameter count.
PRECISION_KEY, DEVICE_KEY, PARAMETERS_KEY = "precision", "device", "parameters"
CHECKPOINT_FILE = "state.pt"


def trial_config(config: dict, threads: int) -> dict:
    """A trial's flat settings from its Tune config: the grid's variant dict (its norm and L1 lambda, and in a
    tuned comparison's final stage its own lr and weight decay) merged into the rest."""
    flat = {k: v for k, v in config.items() if k != "variant"}
    variant = {k: v for k, v in config["variant"].items() if k in TrialConfig.__dataclass_fields__}
    return {**flat, **variant, "threads": threads}


def train_variant(config: dict, dataset):
    """Function trainable; `dataset` arrives once through Ray's object store (tune.with_parameters)."""
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    # fractional CPUs (several trials sharing a core) still need one thread
    run = train.TrainingRun(trial_config(config, threads=max(1, int(cpus))), dataset)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            run.load(Path(directory) / CHECKPOINT_FILE)
    while run.epoch < run.config["epochs"]:
        metrics = run.run_epoch()
        health = divergence(metrics, run.config)
        report = epoch_report(run, metrics, health)
        if health != "ok":  # stop this trial; no checkpoint of a net full of nan; the others go on
            tune.report(report)
            return
        with tempfile.TemporaryDirectory() as directory:
            run.save(Path(directory) / CHECKPOINT_FILE)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))


def epoch_report(run: train.TrainingRun, metrics: dict, health: str = "ok") -> dict:
    """What a trial reports for an epoch: METRICS from run_epoch's `metrics`, and the keys beside them."""
    return {**{k: metrics[k] for k in METRICS}, HEALTH_KEY: health, PRECISION_KEY: run.precision,
            DEVICE_KEY: train.describe_device(run.device), PARAMETERS_KEY: run.parameters}


def divergence(metrics: dict, config: dict) -> str:
    """"ok", or one line saying which loss stopped being finite (checked once per epoch, not per step)."""
    bad = [f"{k.replace('_', ' ')} {metrics[k]}" for k in ("train_loss", "test_loss") if not math.isfinite(metrics[k])]
    if not bad:
        return "ok"
    return f"diverged: {', '.join(bad)} at epoch {metrics['epoch']} (lr {config['lr']:g}); lower --lr"


def best_epoch(df):
    """The row of a trial's epochs DataFrame with the best test_acc, ties to the latest epoch (as Tune's checkpoint
    manager ranks them, so this is the epoch of the kept best checkpoint); None if no epoch is healthy."""
    scores, health = df[BEST_METRIC].to_numpy(), df.get(HEALTH_KEY, pd.Series("ok", df.index)).to_numpy()
    finite = [i for i, v in enumerate(scores) if math.isfinite(v) and health[i] == "ok"]
    return df.iloc[max(finite, key=lambda i: (scores[i], i))] if finite else None


def model_from_result_checkpoint(checkpoint: tune.Checkpoint):
    """(model, state) from a Tune checkpoint: the net in eval mode on the CPU, and its saved state."""
    with checkpoint.as_directory() as directory:
        return train.model_from_checkpoint(Path(directory) / CHECKPOINT_FILE)
