"""The Ray Tune trainable: thin glue around train.TrainingRun.

Build the run from the trial's config, resume from `tune.get_checkpoint()` when Tune retries or
restores the trial, then per epoch report the fixed metric set with a checkpoint.
"""
import math
import tempfile
from pathlib import Path

from ray import tune

import experiments
import train
from config import TrialConfig

# Every epoch reports exactly these keys (mode "max" for accuracies, "min" for losses).
# test_acc_precise_bn: one view, BatchNorm statistics recomputed on large batches (train.precise_bn);
# a number after the final epoch of a net with BatchNorm, nan otherwise.
# peak_device_memory_mib: the trial's peak GPU memory so far, MiB (train.peak_memory_mib); nan on the CPU.
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_single", "test_acc_precise_bn", "lr",
           "epoch", "epoch_seconds", "images_per_s", "threads", "peak_device_memory_mib")
BEST_METRIC, BEST_MODE = "test_acc", "max"
# Reported every epoch beside METRICS: "ok", or why the trial stopped early ("diverged: ..."); part of
# the results contract (experiments.HEALTH_KEY).
HEALTH_KEY = experiments.HEALTH_KEY
# Also beside METRICS, strings: what the trial computed in ("bf16" or "fp32", train.resolve_precision, with
# "auto" resolved) and on (train.describe_device: "cpu", "cuda:0 NVIDIA H200 (sm_90)").
# Results written before these keys existed lack them.
PRECISION_KEY, DEVICE_KEY = "precision", "device"
# Also beside METRICS: the net's parameter count (it depends on the net, the norm and the data's channels).
PARAMETERS_KEY = "parameters"
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
    # Fractional CPUs (several trials sharing a core) still need one thread.
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
    """What a trial reports for an epoch: METRICS (numbers) from run_epoch's `metrics`, HEALTH_KEY, and the
    run's resolved PRECISION_KEY and DEVICE_KEY (strings) and its PARAMETERS_KEY."""
    return {**{k: metrics[k] for k in METRICS}, HEALTH_KEY: health,
            PRECISION_KEY: run.precision, DEVICE_KEY: train.describe_device(run.device), PARAMETERS_KEY: run.parameters}


def divergence(metrics: dict, config: dict) -> str:
    """"ok", or one line saying which loss stopped being finite (checked once per epoch, not per step)."""
    bad = [f"{k.replace('_', ' ')} {metrics[k]}" for k in ("train_loss", "test_loss") if not math.isfinite(metrics[k])]
    if not bad:
        return "ok"
    return f"diverged: {', '.join(bad)} at epoch {metrics['epoch']} (lr {config['lr']:g}); lower --lr"


def best_epoch(df):
    """The row of a trial's epochs DataFrame with the best test_acc; ties go to the latest epoch.

    Tune's checkpoint manager ranks an equal score reported later above the earlier one, so
    this is the epoch of the trial's kept best checkpoint, and the table and the analysis agree.
    """
    scores = df[BEST_METRIC].to_numpy()
    health = df[HEALTH_KEY].fillna("ok").to_numpy() if HEALTH_KEY in df else ["ok"] * len(df)
    # a diverged epoch has no checkpoint, so it cannot be the best one
    finite = [i for i, v in enumerate(scores) if math.isfinite(v) and health[i] == "ok"]
    if not finite:
        return None
    best = max(finite, key=lambda i: (scores[i], i))
    return df.iloc[best]


def model_from_result_checkpoint(checkpoint: tune.Checkpoint):
    """(model, state) from a Tune checkpoint: the net in eval mode on the CPU, and its saved state."""
    with checkpoint.as_directory() as directory:
        return train.model_from_checkpoint(Path(directory) / CHECKPOINT_FILE)
