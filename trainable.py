"""The Ray Tune trainable: thin glue around train.TrainingRun.

Build the run from the trial's config, resume from `tune.get_checkpoint()` when Tune retries or
restores the trial, then per epoch report the fixed metric set with a checkpoint.
"""
import tempfile
from pathlib import Path

from ray import tune

import train

# Every epoch reports exactly these keys (mode "max" for accuracies, "min" for losses).
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_single", "lr", "epoch",
           "epoch_seconds", "images_per_s", "threads")
BEST_METRIC, BEST_MODE = "test_acc", "max"
CHECKPOINT_FILE = "state.pt"


def trial_config(config: dict, threads: int) -> dict:
    """A trial's flat TrainingRun config: the grid's variant dict merged into the base config."""
    variant = config["variant"]
    flat = {k: v for k, v in config.items() if k != "variant"}
    return {**flat, "norm": variant["norm"], "l1": variant["l1"], "threads": threads}


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
        with tempfile.TemporaryDirectory() as directory:
            run.save(Path(directory) / CHECKPOINT_FILE)
            tune.report({k: metrics[k] for k in METRICS},
                        checkpoint=tune.Checkpoint.from_directory(directory))


def model_from_result_checkpoint(checkpoint: tune.Checkpoint):
    """(model, state) from a Tune checkpoint: the net in eval mode on the CPU, and its saved state."""
    with checkpoint.as_directory() as directory:
        return train.model_from_checkpoint(Path(directory) / CHECKPOINT_FILE)
