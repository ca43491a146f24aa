"""Analysis of a finished (or partial) normsweep experiment. Reads results; never trains.

Loads a Ray Tune experiment directory into a ResultGrid and a tidy DataFrame, draws the curves,
each variant's misclassified test images, a summary table with convergence checks and a seed-noise
test, and a figure of what each norm pools (the notebook's; the report leaves this fixed figure out).
`python analysis.py RESULTS_DIR --out DIR` writes the experiment's figures as PNGs and a markdown
summary; analysis.ipynb calls the same functions.
"""
import argparse
import io
import re
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd
import torch

import config as config_lib
import errors
import itertools
import comparisons
import data as data_lib
import experiments
import train
import trainable
import tuned as tuning
from comparisons import (convergence, convergence_warnings, final_per_trial, healthy,  # noqa: F401 (the notebook's)
                         scored_on)
from model import build_model, count_parameters

CURVES = {  # metric -> (axis label, higher is better); {split}: the split the trials were scored on (scored_on)
    "test_loss": ("{split} loss (cross-entropy, nats)", False),
    "test_acc": ("{split} accuracy (%)", True),
    "train_loss": ("train loss (cross-entropy + label smoothing, nats)", False),
    "train_acc": ("train accuracy on augmented batches (%)", True),
}
LINESTYLES = ("-", "--", "-.", ":")  # with markers, so a curve lying on another stays visible
MARKERS = ("o", "s", "^", "D", "v", "P")


# A tuned comparison's trial whose chosen configuration is the shared recipe's is counted in both arms:
# its rows appear twice in results_frame, the copy's trial name with this suffix.
RECIPE_COPY = "~recipe"


AnalysisError = experiments.ExperimentError


def latest_experiment(root="results") -> str:
    """The newest experiment under root, a local directory or a storage URI (what the notebook opens by
    default), or a one-line experiments.ExperimentError."""
    return experiments.latest(experiments.resolve(root))


def load_experiment(path):
    """(ResultGrid, DataFrame) of an experiment, a local directory or a URI (`s3://bucket/results/name`);
    one DataFrame row per trial and epoch.

    Columns beyond the metrics: `health` ("ok" or why the trial stopped), `diverged` (per trial),
    `epochs` (planned) among the trial's settings. Trials that never reported are absent (see `progress`).
    Raises AnalysisError (one line) for a location that holds no Tune experiment or no epoch yet.
    """
    location = experiments.resolve(path)
    if not experiments.is_experiment(location):
        raise AnalysisError(f"{location} is not a Ray Tune experiment directory (no experiment_state-*.json); "
                            f"pass results/<name> (or the storage URI and name) as printed by tune_main.py")
    experiments.check_intact(location, "analyse")
    from ray.tune import ExperimentAnalysis, ResultGrid  # after the checks: a bad path is refused without Ray

    fs, fs_path = experiments.filesystem(location)
    grid = ResultGrid(ExperimentAnalysis(fs_path, storage_filesystem=fs))
    df = results_frame(grid)
    if df.empty:
        raise AnalysisError(f"{location} holds no reported epochs yet; wait for the first epoch or check the trials' errors")
    return grid, df


def experiment_location(grid) -> str:
    """Where a ResultGrid's experiment lives, as a local path or URI that the experiments module reads."""
    fs = next((r.filesystem for r in grid if r.filesystem is not None), None)
    return grid.experiment_path if fs is None else experiments.location_of(fs, grid.experiment_path)


def results_frame(grid) -> pd.DataFrame:
    """One row per trial and reported epoch of a ResultGrid (trials with no epoch yet are left out).

    `data` says what the trials trained and were scored on when the launch took a subset (--smoke-test,
    --train-size); "" for the whole dataset or an experiment without launch settings.
    """
    frames = []
    for result in grid:
        df = result.metrics_dataframe
        if df is None or df.empty or not result.config:  # a trial that has not reported yet
            continue
        config = result.config
        variant, flat = config["variant"], trainable.trial_config(config, threads=0)
        frame = df.reindex(columns=list(trainable.METRICS))  # metrics added later are nan in older results
        # results from before the health key have none: they ran to the end or failed loudly
        frame["health"] = df[trainable.HEALTH_KEY].fillna("ok") if trainable.HEALTH_KEY in df else "ok"
        frame["diverged"] = (frame["health"] != "ok").any()
        frame.insert(0, "trial", Path(result.path).name)
        frame.insert(1, "variant", trial_label(config))
        frame["variant name"] = variant_label(variant)  # without the batch size of a batch-size study
        frame.insert(2, "norm", variant["norm"])
        frame.insert(3, "l1", variant["l1"])
        frame.insert(4, "seed", config["seed"])
        for key in ("dataset", "epochs", "batch_size", "groups", "weight_decay", "label_smoothing", "val_size"):
            frame[key] = flat.get(key)
        frame["model"] = flat.get("model") or "small"  # results from before --model ran the small net
        frame["parameters"] = df.get(trainable.PARAMETERS_KEY, np.nan)
        frame["peak lr"] = train.peak_lr(flat)  # the "lr" column is the metric: each epoch's starting lr
        # Tune's own: when each epoch's report arrived (unix seconds) and how long the epoch took, for wall_minutes
        frame["timestamp"] = df.get("timestamp", np.nan)
        frame["time_this_iter_s"] = df.get("time_this_iter_s", np.nan)
        frame["arm"] = variant.get("arm", "")  # a tuned comparison's final stage: tuned or recipe
        frame["evidence"] = variant.get("evidence", "")  # what the arm's configuration was chosen on
        frames.append(frame)
        if variant.get("recipe_too"):  # its tuned configuration is the recipe's: one trial counts in both arms
            frames.append(frame.assign(trial=frame["trial"] + RECIPE_COPY, arm=tuning.RECIPE, variant=trial_label(
                {**config, "variant": {**variant, "arm": tuning.RECIPE}}),
                evidence="the shared recipe, which tuning also chose (the tuned trial, counted in both arms)"))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    df["data"] = data_subset(experiments.read_launch(experiment_location(grid)))
    return df


def result_of(grid, trial: str):
    """The Result of a trial of results_frame (a RECIPE_COPY row is its tuned trial's)."""
    return next(r for r in grid if Path(r.path).name == trial.removesuffix(RECIPE_COPY))


def data_subset(launch: dict) -> str:
    """What part of the dataset a launch trained and scored on, in words; "" for all of it."""
    if launch.get("smoke_test"):
        return f"smoke-test subset: {config_lib.SMOKE['train_size']:,} train / {config_lib.SMOKE['test_size']:,} test images"
    if launch.get("train_size"):
        scored = (f"{launch['val_size']:,} of them held out to score on" if launch.get("val_size")
                  else "every test image")
        return f"--train-size subset: {launch['train_size']:,} train images, {scored}"
    return ""


def trial_configs(grid) -> dict:
    """Per trial path, its config, also for trials that have not reported yet: a Result's config comes
    from its last report (None before the first), so theirs is read from Tune's experiment state."""
    analysis = getattr(grid, "_experiment_analysis", None)  # a ResultGrid; other iterables of Results lack it
    configs = {trial.path: trial.config for trial in getattr(analysis, "trials", None) or []}
    for result in grid:
        if result.config:
            configs[result.path] = result.config
    return configs


def variant_label(variant: dict) -> str:
    """The variant alone: its name, and an L1 lambda in brackets."""
    return f"{variant['name']} (λ={variant['l1']:g})" if variant["l1"] else variant["name"]


trial_label = experiments.variant_label  # the variant and whatever else of the config is not the seed


def _title(df, what: str, wrap: bool = False) -> str:
    """'what: dataset[, net NET] (subset), N epochs, K seeds per variant' (the net unless it is the default
    small one); wrap: the subset on a line of its own (figure titles)."""
    seeds = df.groupby("variant")["seed"].nunique().max()
    planned, reached = int(df["epochs"].max()), int(df["epoch"].max())  # "epochs": the planned count
    epochs = _count(planned, "epoch") if reached >= planned else f"partial: {reached} of {planned} epochs in"
    subset = str(df["data"].iloc[0]) if "data" in df else ""
    subset = (f"\n({subset})" if wrap else f" ({subset})") if subset else ""
    model = str(df["model"].iloc[0]) if "model" in df else "small"
    net = f", net {Path(model).name}" if model != "small" else ""  # a user's builder: its file's name
    return (f"{what}: {Path(str(df['dataset'].iloc[0])).name}{net}, {epochs}, "
            f"{_count(seeds, 'seed')} per variant{subset}")


def best_per_trial(df, metric="test_acc") -> pd.DataFrame:
    """One row per healthy trial at its best epoch; ties go to the latest epoch, as in the CLI's table
    and in the checkpoint Tune keeps (trainable.best_epoch)."""
    assert metric == trainable.BEST_METRIC, "the tie rule is defined for the checkpoint metric"
    rows = [trainable.best_epoch(group) for _, group in healthy(df).groupby("trial")]
    return pd.DataFrame([r for r in rows if r is not None]).reset_index(drop=True)


def progress(grid, df) -> pd.DataFrame:
    """Per variant: trials planned and reporting, epochs in (fewest, most) against the planned epochs,
    and trials that diverged. Complete when every trial ran its planned epochs or diverged; trials that
    have reported nothing yet (or that Tune has not created) count with 0 epochs in."""
    rows, configs = {}, trial_configs(grid)

    def row_of(label, planned):
        return rows.setdefault(label, {"variant": label, "trials": 0, "epochs in": [], "planned epochs": planned,
                                       "diverged": 0, "done": []})

    for result in grid:
        config = configs.get(result.path)
        if not config:  # not in Tune's state either: counted below from the launch settings
            continue
        row = row_of(trial_label(config), config.get("epochs"))
        row["trials"] += 1
        trial = df[df["trial"] == Path(result.path).name] if len(df) and result.path else df.iloc[:0]
        epochs_in, diverged = (int(trial["epoch"].max()), bool(trial["diverged"].iloc[0])) if len(trial) else (0, False)
        row["epochs in"].append(epochs_in)
        row["diverged"] += diverged
        row["done"].append(diverged or epochs_in >= (row["planned epochs"] or 0))
    # trials Tune never created are missing from the grid; the launch settings list them
    launch = experiments.read_launch(experiment_location(grid))
    if launch.get("variants"):
        axes = config_lib.grid_axes(config_lib.SweepConfig().from_launch(launch))
        seeds = len(axes.pop("seed"))
        for point in itertools.product(*axes.values()):
            config = {**dict(zip(axes, point)), "stage": launch.get("stage")}
            config["lr_reference_batch"] = config.get("batch_size") or 0
            row = row_of(trial_label(config), launch["epochs"])
            missing = max(0, seeds - row["trials"])
            row["epochs in"] += [0] * missing
            row["done"] += [False] * missing
    table = pd.DataFrame(rows.values())
    table["complete"] = table.pop("done").map(all)
    table["epochs in"] = [f"{min(es)}" if min(es) == max(es) else f"{min(es)}-{max(es)}" for es in table["epochs in"]]
    return table.sort_values("variant").reset_index(drop=True)


def progress_note(table: pd.DataFrame) -> str:
    """'' for a complete experiment, else one sentence saying it is partial, per variant."""
    if table["complete"].all():
        return ""
    parts = [f"{row['variant']} {row['epochs in']} of {row['planned epochs']}" for _, row in table.iterrows()]
    return ("Partial experiment: these figures and tables cover only the epochs reported so far "
            f"(epochs in, per variant: {'; '.join(parts)}). Resume it with tune_main.py --resume.")


def diverged_note(df) -> str:
    """'' when no trial diverged, else one sentence naming each diverged trial and why it stopped."""
    trials = df[df["diverged"]].groupby("trial")["health"].last() if "diverged" in df else {}
    if not len(trials):
        return ""
    named = "; ".join(f"{trial} ({health})" for trial, health in trials.items())
    if len(trials) == df["trial"].nunique():
        return (f"Every trial diverged ({_count(len(trials), 'trial')}), so there is no accuracy to report or "
                f"compare: {named}.")
    return f"Diverged trials, left out of the figures and tables: {named}."


def validation_note(df) -> str:
    """'' for trials scored on the test split, else one sentence saying they were scored on held-out training images."""
    if scored_on(df) == "test":
        return ""
    n = int(df["val_size"].max())
    return (f"Scored on {n:,} training images held out from training (--val-size {n}), not on the test split: "
            f"every \"test\" column, figure and comparison of this experiment is of those validation images.")


def _count(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def plot_curves(df, metric: str):
    """One metric against epoch, all variants on one axes; mean and +-1 std band over seeds."""
    label, higher_better = CURVES[metric]
    split = scored_on(df)
    label = label.format(split=split)
    scale = 100 if metric.endswith("acc") else 1
    # test_acc averages each image and its mirror on flip-trained data; the headline is test_acc_single
    # at the final epoch, so the test_acc legend gives both, each named
    flipped = metric == "test_acc" and not np.allclose(df["test_acc"], df["test_acc_single"], equal_nan=True)
    headline = metric == "test_acc"
    if headline:
        label = f"{split} accuracy, {'flip-averaged' if flipped else 'one view'} (%)"
    fig, ax = plt.subplots(figsize=(8, 5))
    late = []  # values over the second half of training, for zooming the accuracy axis
    all_variants = sorted(df["variant"].unique())
    for variant in sorted(set(all_variants) - set(healthy(df)["variant"])):  # marked, not drawn as nan
        ax.plot([], [], color="grey", linestyle="none", marker="x", label=f"{variant}: diverged (not plotted)")
    everything, df = df, healthy(df)
    for variant, group in sorted(df.groupby("variant"), key=lambda kv: kv[0]):
        i = all_variants.index(variant)
        by_epoch = group.groupby("epoch")[metric].agg(["mean", "std", "count"]) * [scale, scale, 1]
        epochs, mean, std = by_epoch.index.to_numpy(), by_epoch["mean"].to_numpy(), by_epoch["std"].fillna(0).to_numpy()
        best_at = int(np.argmax(mean) if higher_better else np.argmin(mean))
        per_seed_best = (group.groupby("trial")[metric].max() if higher_better
                         else group.groupby("trial")[metric].min()) * scale
        spread = f" ± {per_seed_best.std():.2f}" if len(per_seed_best) > 1 else ""
        fmt = ".2f" if scale == 100 else ".4f"
        color = f"C{i}"
        text = f"{variant}: best {per_seed_best.mean():{fmt}}{spread} (mean-curve best at epoch {epochs[best_at]})"
        if headline:
            final = 100 * group.loc[group.groupby("trial")["epoch"].idxmax(), "test_acc_single"]
            final_spread = f" ± {final.std():.2f}" if len(final) > 1 else ""
            text = (f"{variant}: final one view {final.mean():.2f}{final_spread}; "
                    f"best {'flip-averaged' if flipped else 'one view'} {per_seed_best.mean():.2f}{spread}")
        ax.plot(epochs, mean, color=color, linestyle=LINESTYLES[i % len(LINESTYLES)],
                marker=MARKERS[i % len(MARKERS)], markersize=4, markevery=max(1, len(epochs) // 10), label=text)
        if by_epoch["count"].max() > 1:
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        ax.plot(epochs[best_at], mean[best_at], marker="*", markersize=12, color=color, markeredgecolor="k")
        late.extend((mean - std)[len(mean) // 2:]), late.extend((mean + std)[len(mean) // 2:])
    if higher_better and late and df["epoch"].max() >= 4:
        low, high = min(late), max(late)
        pad = max(0.1 * (high - low), 0.05 * scale / 100)
        ax.set_ylim(low - pad, high + pad)  # zoom: variants often sit within a point of each other
        label += " (zoomed to the second half of training)"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers, even on 2-epoch runs
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    seeds = everything.groupby("variant")["seed"].nunique().max()
    band = "; band = ±1 std over seeds" if seeds > 1 else ""
    head, _, subset = _title(everything, metric.replace("_", " ").replace("test", split), wrap=True).partition("\n")
    ax.set_title(head + band + (f"\n{subset}" if subset else ""), fontsize=10)
    legend = ("variant: final epoch, one view (the summary's headline); each seed's best epoch, as plotted"
              if headline else "variant: each seed's best epoch")
    ax.legend(fontsize=8, title=f"{legend}, mean over seeds\n(★ = best epoch of the mean curve)", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def misclassified(grid, df, variant: str, n: int = 10, dataset=None):
    """The first n misclassified test images of `variant`'s best checkpoint (best trial by test_acc).

    Returns a dict with the images (uint8), true and predicted labels, confidences (max softmax),
    the test indices, the model's accuracy on the split (flip-averaged where `flip`, as the trial's
    test_acc), its seed and epoch, and the class names. A one-line AnalysisError for a variant with no
    healthy trial, or whose best epoch's checkpoint is missing.
    """
    best = best_per_trial(df)
    candidates = best[best["variant"] == variant] if len(best) else best
    if not len(candidates):
        raise AnalysisError(f"{variant} has no trial with a healthy epoch (every trial of it diverged or has not "
                            f"reported yet), so no checkpoint to show")
    row = candidates.sort_values("test_acc", kind="stable").iloc[-1]
    trial = row["trial"]
    result = result_of(grid, trial)
    # the checkpoint of the epoch the table names (Tune keeps it: the best, ties to the latest)
    kept = [c for c, metrics in (result.best_checkpoints or []) if metrics.get("epoch") == row["epoch"]]
    if not kept or not experiments.exists(experiments.join(experiments.location_of(kept[-1].filesystem, kept[-1].path),
                                                           trainable.CHECKPOINT_FILE)):
        raise AnalysisError(f"trial {trial} has no checkpoint of its best epoch {int(row['epoch'])} "
                            f"(not saved yet, or not copied with the results); resume the experiment or copy its "
                            f"checkpoint_* directories too")
    model, state = trainable.model_from_result_checkpoint(kept[-1])
    config = state["config"]
    dataset = evaluation_split(experiment_location(grid), config, dataset)
    split = "validation" if config.get("val_size") else "test"
    flip = train.uses_test_flip(config, dataset.augment)
    out = train.evaluate(model, dataset.test_images, dataset.test_labels, **state["input_stats"],
                         flip=flip)  # as the trial evaluated its test_acc
    wrong = torch.nonzero(out["preds"] != dataset.test_labels).flatten()[:n]
    return {"variant": variant, "trial": trial, "seed": config.get("seed"), "epoch": state["epoch"],
            "acc": out["acc"], "flip": flip, "split": split,
            "indices": wrong, "images": dataset.test_images[wrong], "true": dataset.test_labels[wrong],
            "pred": out["preds"][wrong], "confidence": out["confidence"][wrong], "classes": dataset.classes}


def evaluation_split(experiment: str, config: dict, dataset=None):
    """The dataset as the experiment's trials saw it, its test split the images they were scored on: the part
    of the data its launch gave them (experiments.as_launched: the --smoke-test or --train-size subset), and for
    a --val-size N experiment the N training images held out of that (Dataset.held_out, as train.TrainingRun)."""
    if dataset is None:
        dataset = _read_dataset(config)
    dataset = train.trial_data(dataset, config_lib.TrialConfig.of(config))
    return dataset.held_out(config["val_size"]) if config.get("val_size") else dataset


def _read_dataset(config: dict) -> data_lib.Dataset:
    """The whole dataset a trial's config names; without its test split where the trials scored held-out images."""
    return data_lib.load_dataset(config["dataset"], config["data_dir"], test_split=not config.get("val_size"))


def show_image(ax, image):
    """One uint8 image (C, H, W) or (H, W) on `ax`: colour as it is, grayscale dark-on-light (as the digits and
    clothes are drawn on paper)."""
    image = image.squeeze(0) if image.dim() == 3 and image.shape[0] == 1 else image
    if image.dim() == 3:
        ax.imshow(image.permute(1, 2, 0).numpy())  # (H, W, C); numpy: matplotlib warns on tensors
    else:
        ax.imshow(image.numpy(), cmap="gray_r")


def plot_misclassified(sample: dict):
    """A 2x5 grid: each tile shows the true label, the predicted label and the confidence."""
    fig, axes = plt.subplots(2, 5, figsize=(11, 6.4))  # room for a two-line suptitle and two-line tile titles
    classes = sample["classes"]
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(sample["indices"]):
            continue
        show_image(ax, sample["images"][k])
        ax.set_title(f"true: {classes[sample['true'][k]]}\npred: {classes[sample['pred'][k]]} "
                     f"({100 * sample['confidence'][k]:.0f}%)", fontsize=9)
    seed = f", seed {sample['seed']}" if sample.get("seed") is not None else ""
    view = "flip-averaged" if sample.get("flip") else "one view"
    split = sample.get("split", "test")
    fig.suptitle(f"{sample['variant']}: misclassified {split} images of the best checkpoint "
                 f"(epoch {sample['epoch']}{seed})\n"
                 f"its {split} accuracy {100 * sample['acc']:.2f}%, {view}, at that best epoch "
                 f"(the summary's headline is the final epoch, one view)", fontsize=10)
    fig.tight_layout(h_pad=2.0)  # room between a tile's two-line title and the row above
    return fig


TRIAL_COLUMNS = ["variant", "seed", "epochs", "final one-view acc (%)", "final acc (%)", "best acc (%)",
                 "best epoch", "final train acc (%)", "train s"]
SUMMARY_COLUMNS = ["variant", "seeds", "final one-view acc mean (%)", "std (%)", "final acc mean (%)",
                   "best acc mean (%)", "best epochs", "parameters", "converged"]


def trial_table(df) -> pd.DataFrame:
    """Per trial: final-epoch accuracy one view and flip-averaged, and the best epoch's (by test_acc)."""
    final, best = final_per_trial(df).set_index("trial"), best_per_trial(df)
    if final.empty:  # every trial diverged (diverged_note says so)
        return pd.DataFrame(columns=TRIAL_COLUMNS)
    best = best.set_index("trial")
    train_seconds = df.groupby("trial")["epoch_seconds"].sum()
    rows = [{"variant": row.variant, "seed": int(row.seed), "epochs": int(row.epoch),
             "final one-view acc (%)": 100 * row.test_acc_single, "final acc (%)": 100 * row.test_acc,
             "best acc (%)": 100 * best.loc[trial, "test_acc"], "best epoch": int(best.loc[trial, "epoch"]),
             "final train acc (%)": 100 * row.train_acc, "train s": round(train_seconds[trial])}
            for trial, row in final.iterrows()]
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS).sort_values(["variant", "seed"]).reset_index(drop=True)


def summary(df) -> pd.DataFrame:
    """Per variant: final-epoch one-view accuracy (the headline) with its std over seeds, then the
    flip-averaged final and best-epoch accuracies, best epochs, parameters and convergence."""
    final, best = final_per_trial(df), best_per_trial(df)
    converged = convergence(df).set_index("variant")["converged"]
    rows = []
    for variant, group in final.groupby("variant"):
        norm, groups = group["norm"].iloc[0], int(group["groups"].iloc[0])
        best_group = best[best["variant"] == variant].sort_values("seed")
        rows.append({"variant": variant, "seeds": len(group),
                     "final one-view acc mean (%)": 100 * group["test_acc_single"].mean(),
                     "std (%)": 100 * group["test_acc_single"].std() if len(group) > 1 else float("nan"),
                     # each test image and its mirror (on flip-trained datasets; else the same as one view)
                     "final acc mean (%)": 100 * group["test_acc"].mean(),
                     "best acc mean (%)": 100 * best_group["test_acc"].mean(),
                     "best epochs": ", ".join(str(int(e)) for e in best_group["epoch"]),
                     "parameters": _parameters(group, norm, groups),
                     "converged": "yes" if converged[variant] else "MAY NOT (see warnings)"})
    return (pd.DataFrame(rows, columns=SUMMARY_COLUMNS).sort_values("final one-view acc mean (%)", ascending=False)
            .reset_index(drop=True))


def _parameters(group, norm: str, groups: int) -> int:
    """The trials' reported parameter count; results written before trials reported it ran the small net."""
    reported = group["parameters"].dropna() if "parameters" in group else []
    return int(reported.iloc[0]) if len(reported) else count_parameters(build_model(norm, groups=groups))


def final_correct(grid, df, dataset=None) -> dict:
    """Per trial, which evaluation images its final epoch classified right on one view: bool tensor (N,),
    from the trial's latest checkpoint (the final epoch's, which Tune always keeps). For McNemar's test
    (comparisons.mcnemar_tests). Trials whose latest checkpoint is not their final epoch's are left out."""
    correct = {}
    for row in final_per_trial(df).itertuples():
        result = result_of(grid, row.trial)
        if result.checkpoint is None:
            continue
        model, state = trainable.model_from_result_checkpoint(result.checkpoint)
        if state["epoch"] != row.epoch:
            continue
        split = evaluation_split(experiment_location(grid), state["config"], dataset)
        preds = train.evaluate(model, split.test_images, split.test_labels, **state["input_stats"])["preds"]
        correct[row.trial] = preds == split.test_labels
    return correct


def comparison_tables(grid, df, dataset=None) -> dict:
    """The paired comparisons of an experiment (comparisons.py), by name: "paired" (over seeds, where
    variants have 2+ seeds), "mcnemar" (one seed: over the shared test images), "tuned vs recipe" (a tuned
    comparison's final stage). Each a DataFrame; absent where it does not apply."""
    final = final_per_trial(df)
    if final.empty or final["variant"].nunique() < 2:
        return {}
    tables = {}
    if final.groupby("variant")["seed"].nunique().max() >= 2:
        tables["paired"] = comparisons.paired_tests(df)
    else:
        tables["mcnemar"] = comparisons.mcnemar_tests(df, final_correct(grid, df, dataset))
    if final["arm"].nunique() > 1:
        tables["tuned vs recipe"] = comparisons.paired_tests(df, compare="arm", within=("variant name", "batch_size"))
    return tables


def comparison_text(tables: dict) -> list:
    """The report's markdown for comparison_tables."""
    level = f"Holm-Bonferroni correction over each family of pairs, {comparisons.ALPHA:g} family-wise level"
    text = []
    if "paired" in tables:
        text += ["Paired differences over seeds (every variant of a seed starts from the same convolution and head "
                 "weights and sees the same data order and augmentation): the mean per-seed difference of final "
                 f"one-view accuracies with its {comparisons.CONFIDENCE:.0%} t interval, and the paired t-test "
                 f"(two-sided; {level}):", "", _markdown(tables["paired"]), ""]
    if "mcnemar" in tables:
        text += ["One seed, so no seed noise to measure: McNemar's exact test on the test images one variant "
                 f"classifies right and the other wrong (final epoch, one view; {level}). It measures the noise of "
                 "the test images, not of the seed: another seed may order the variants differently.", "",
                 _markdown(tables["mcnemar"]), ""]
    if "tuned vs recipe" in tables:
        text += ["Tuned configuration against the shared recipe, per variant, paired over seeds:", "",
                 _markdown(tables["tuned vs recipe"]), ""]
    return text or ["Pairwise differences: only one variant has results, so there is nothing to compare.", ""]


def stage(grid_or_location) -> str:
    """"tuning" or "final" for a tuned comparison's stages (tuning.py), "" for a plain sweep."""
    location = grid_or_location if isinstance(grid_or_location, str) else experiment_location(grid_or_location)
    return experiments.read_launch(location).get("stage", "")


def tuning_experiment(final_location: str) -> str:
    """The tuning stage's location beside a final stage's."""
    return experiments.sibling(final_location, experiments.read_launch(final_location)["tuning_name"])


def wall_minutes(df) -> float:
    """Wall time of an experiment's reported epochs, minutes: from the first epoch's start to the last report
    (a resumed experiment counts the time it was stopped too)."""
    return float((df["timestamp"].max() - (df["timestamp"] - df["time_this_iter_s"]).min()) / 60)


def tuning_frame(grid, df):
    """The tuning stage's frame of a tuned comparison (df itself for a tuning stage, read from beside a final
    stage); None for a plain sweep. A one-line AnalysisError if a final stage's tuning stage is unreadable."""
    kind = stage(grid)  # one read of the launch file (a request, on object storage)
    if kind == "tuning":
        return df
    if kind == "final":
        return load_experiment(tuning_experiment(experiment_location(grid)))[1]
    return None


def configuration_table(df) -> pd.DataFrame:
    """A tuned comparison's final stage: per variant and arm, the configuration it trained with and why."""
    rows = []
    for (label, arm), group in final_per_trial(df).groupby(["variant", "arm"]):
        rows.append({"variant": label, "peak lr": f"{group['peak lr'].iloc[0]:g}",
                     "weight decay": f"{group['weight_decay'].iloc[0]:g}", "chosen on": group["evidence"].iloc[0]})
    return pd.DataFrame(rows, columns=["variant", "peak lr", "weight decay", "chosen on"])


def tuning_text(tuning_df, figure: str) -> list:
    """The report's markdown for a tuning stage: the sensitivity table and figure, the choices and the rank
    agreement of early stopping."""
    chosen = tuning.choose(tuning_df)
    choices = pd.DataFrame([{"variant": name, "peak lr": f"{c['lr']:g}", "weight decay": f"{c['weight_decay']:g}",
                             "evidence": c["evidence"]} for name, c in sorted(chosen.items())])
    n_val, epochs = int(tuning_df["val_size"].iloc[0]), int(tuning_df["epochs"].max())
    agreement = comparisons.rank_agreement(tuning_df)
    text = [f"## Tuning stage: {_title(tuning_df, 'validation accuracy')}", "",
            f"Every variant trained once (seed 0) at each learning rate and weight decay below, {epochs} epochs, "
            f"on the training split less {n_val:,} validation images; accuracy on those validation images at the "
            f"final epoch, one view (%). Empty: diverged. The stage's {tuning_df['trial'].nunique()} trials took "
            f"{wall_minutes(tuning_df):.0f} min of wall time.", "",
            _markdown(tuning.sensitivity(tuning_df)), "", f"![learning-rate sensitivity]({figure})", "",
            "Chosen per variant (highest final validation accuracy; ties to the lower validation loss):", "",
            _markdown(choices), ""]
    if len(agreement):
        text += ["Would early stopping have found the same configurations? Spearman's rank correlation between "
                 "each configuration's validation accuracy at the rung epoch and at the final epoch, and whether an "
                 "ASHA-type scheduler with that rung and reduction factor 3 would have kept the final winner:", "",
                 _markdown(agreement), ""]
    return text


def is_batch_study(df) -> bool:
    return df["batch_size"].nunique() > 1


def batch_size_study(df) -> pd.DataFrame:
    """Per variant and batch size: final-epoch one-view test error (%), mean and std over seeds, beside
    the same with precise BatchNorm statistics (train.precise_bn; nan for nets without BatchNorm)."""
    converged = convergence(df).set_index("variant")["converged"]
    rows = []
    for (name, batch), group in final_per_trial(df).groupby(["variant name", "batch_size"]):
        error, precise = 100 * (1 - group["test_acc_single"]), 100 * (1 - group["test_acc_precise_bn"])
        rows.append({"variant": name, "batch size": int(batch), "seeds": len(group),
                     "error (%)": error.mean(), "std": error.std() if len(group) > 1 else float("nan"),
                     "precise-BN error (%)": precise.mean(), "precise-BN std": precise.std() if len(group) > 1 else float("nan"),
                     "peak lr": f"{group['peak lr'].iloc[0]:g}",
                     "converged": bool(converged[group["variant"].iloc[0]])})
    columns = ["variant", "batch size", "seeds", "error (%)", "std", "precise-BN error (%)", "precise-BN std",
               "peak lr", "converged"]
    return pd.DataFrame(rows, columns=columns).sort_values(["variant", "batch size"]).reset_index(drop=True)


def batch_size_table(study: pd.DataFrame) -> pd.DataFrame:
    """The study laid out like Table 2 of Wu & He (2018): one row per normalisation (and BatchNorm with
    precise statistics), one column per batch size from large to small, "mean ± std" test error (%);
    then the difference to BatchNorm. A "*" marks a cell whose variant may not have converged."""
    def cell(mean, std, converged=True):
        if not np.isfinite(mean):  # e.g. precise BN of a trial that has not reached its final epoch
            return "-"
        spread = f" ± {std:.2f}" if np.isfinite(std) else ""
        return f"{mean:.2f}{spread}" + ("" if converged else " *")

    batches = sorted(study["batch size"].unique(), reverse=True)
    rows = []
    for name, group in study.groupby("variant", sort=True):
        by_batch = group.set_index("batch size")
        rows.append({"": f"{name} error (%)", **{str(b): cell(by_batch.loc[b, "error (%)"], by_batch.loc[b, "std"],
                                                               by_batch.loc[b, "converged"])
                                                  for b in batches if b in by_batch.index}})
        if by_batch["precise-BN error (%)"].notna().any():
            rows.append({"": f"{name}, precise BN statistics",
                         **{str(b): cell(by_batch.loc[b, "precise-BN error (%)"], by_batch.loc[b, "precise-BN std"])
                            for b in batches if b in by_batch.index}})
    means = study.pivot(index="variant", columns="batch size", values="error (%)")
    if "bn" in means.index:
        for name in (n for n in means.index if n != "bn"):
            rows.append({"": f"{name} − bn (points)",
                         **{str(b): f"{means.loc[name, b] - means.loc['bn', b]:+.2f}" for b in batches
                            if np.isfinite(means.loc[name, b] - means.loc["bn", b])}})
    return pd.DataFrame(rows).fillna("")


def plot_batch_sizes(study: pd.DataFrame, title: str = "batch-size study"):
    """Final-epoch one-view test error against batch size (log scale), one line per normalisation,
    mean ± std over seeds; dashed: BatchNorm with precise statistics."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, group) in enumerate(study.groupby("variant", sort=True)):
        color = f"C{i}"
        ax.errorbar(group["batch size"], group["error (%)"], yerr=group["std"].fillna(0), color=color,
                    marker=MARKERS[i % len(MARKERS)], capsize=3, label=name)
        if group["precise-BN error (%)"].notna().any():
            ax.errorbar(group["batch size"], group["precise-BN error (%)"], yerr=group["precise-BN std"].fillna(0),
                        color=color, linestyle="--", marker=MARKERS[i % len(MARKERS)], markerfacecolor="none",
                        capsize=3, label=f"{name}, precise BN statistics")
    batches = sorted(study["batch size"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size (images per step; peak lr scaled linearly with it)")
    ax.set_ylabel("test error at the final epoch, one view (%)")
    ax.set_title(title + "; mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_norm_pooling(n=4, c=8, groups=4):
    """Which (sample, channel) cells share one mean and variance under BN, LN and GN.

    Each cell stands for all H x W positions of one sample's channel; one colour = one set of
    statistics (all the cells of a colour, and every pixel in them, are pooled together).
    """
    layouts = {
        "BatchNorm: per channel,\npooled over N, H, W": np.tile(np.arange(c), (n, 1)),
        "LayerNorm: per sample,\npooled over C, H, W": np.tile(np.arange(n)[:, None], (1, c)),
        f"GroupNorm ({groups} groups): per sample and\nchannel group, pooled over C/G, H, W":
            np.arange(n)[:, None] * groups + np.arange(c)[None, :] // (c // groups),
    }
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (title, ids) in zip(axes, layouts.items()):
        ax.imshow(ids % 20, cmap="tab20", vmin=0, vmax=19, aspect="auto")
        ax.set_xticks(range(c), [f"c{j}" for j in range(c)], fontsize=8)
        ax.set_yticks(range(n), [f"n{i}" for i in range(n)], fontsize=8)
        ax.set_xlabel("channel C (each cell spans all H×W pixels)")
        ax.set_ylabel("sample N in the batch")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(np.arange(-0.5, c), minor=True)
        ax.set_yticks(np.arange(-0.5, n), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
    fig.suptitle("What each normalisation pools for one mean and variance (a batch of shape N, C, H×W); "
                 "one colour = one set of statistics", fontsize=10)
    fig.tight_layout()
    return fig


def _markdown(table: pd.DataFrame) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) and not np.isnan(v) else ("-" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def experiment_line(experiment) -> str:
    """How summary.md names the experiment, and what the name is relative to (experiments.shown)."""
    shown = experiments.shown(experiment)
    if experiments.is_uri(shown):
        return f"`{shown}`"
    if Path(experiments.resolve(experiment)).is_relative_to(Path.cwd()):
        return f"`{shown}` (relative to the directory the analysis ran in)"
    return f"`{shown}` (its name; it lies outside the directory the analysis ran in)"


def experiment_dataset(grid) -> data_lib.Dataset:
    """The whole dataset an experiment's trials were drawn from, read once (`misclassified` takes the
    trials' own subset of it); from any trial's config, reported or not."""
    config = next((c for c in trial_configs(grid).values() if c), None)
    if config is None:
        raise AnalysisError("no trial of this experiment has a config yet; wait for the first trial to start")
    return _read_dataset(config)


def write_report(experiment, out_dir) -> list:
    """Every figure as PNG plus summary.md into out_dir, a local directory or a storage URI; returns
    the written paths (Path objects for a local out_dir, URIs otherwise)."""
    grid, df = load_experiment(experiment)
    if experiments.is_uri(out_dir):
        out, written = experiments.resolve(out_dir), []
    else:
        out, written = Path(out_dir), []
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AnalysisError(f"cannot write the report to {out} ({e.strerror}); pass a writable --out") from None

    def put(name, data: bytes):
        target = experiments.join(out, name) if isinstance(out, str) else out / name
        experiments.write_bytes(str(target), data)
        written.append(target)

    def save(fig, name):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        put(name, buffer.getvalue())

    heading = [f"# {_title(df, 'normsweep summary')}", "", f"Experiment: {experiment_line(experiment)}", ""]
    notes = [note for note in (progress_note(progress(grid, df)), diverged_note(df), validation_note(df)) if note]
    notes = [line for note in notes for line in (f"**{note}**", "")]
    kind = stage(grid)
    if kind == "tuning":  # the learning-rate sensitivity and the choices; every trial is one configuration
        save(tuning.plot_sensitivity(df, _title(df, "learning-rate sensitivity", wrap=True)), "lr_sensitivity.png")
        put("summary.md", "\n".join(heading + notes + tuning_text(df, "lr_sensitivity.png") + [
            "Per trial (validation accuracy in the test columns):", "", _markdown(trial_table(df)), ""]).encode())
        return written
    if healthy(df).empty:  # every trial diverged: no curve, table or checkpoint to show
        put("summary.md", "\n".join(heading + notes).encode())
        return written
    tuned = []
    if kind == "final":
        tuned = ["## Tuned comparison", "", "Each variant at the configuration its tuning stage chose on validation "
                 "images (arm \"tuned\") and at the shared recipe (arm \"recipe\"), the same seeds, scored on the "
                 f"test split; this final stage took {wall_minutes(df):.0f} min of wall time:", "",
                 _markdown(configuration_table(df)), ""]
        try:
            _, tuning_df = load_experiment(tuning_experiment(experiment_location(grid)))
            save(tuning.plot_sensitivity(tuning_df, _title(tuning_df, "learning-rate sensitivity", wrap=True)),
                 "lr_sensitivity.png")
            tuned += tuning_text(tuning_df, "lr_sensitivity.png")
        except AnalysisError as e:
            tuned += [f"(The tuning stage's results are not readable here: {e}.)", ""]
    for metric in CURVES:
        save(plot_curves(df, metric), f"{metric}.png")
    dataset = experiment_dataset(grid)  # read once for every grid
    grids, missing = [], []
    for variant in sorted(healthy(df)["variant"].unique()):
        try:
            sample = misclassified(grid, df, variant, dataset=dataset)
        except AnalysisError as e:  # e.g. a best epoch whose checkpoint was not copied with the results
            missing.append(f"No misclassified images for {variant}: {e}.")
            continue
        name = "misclassified_" + re.sub(r"[^A-Za-z0-9]+", "_", variant).strip("_") + ".png"  # ASCII file names
        save(plot_misclassified(sample), name)
        grids.append((variant, name))
    study_text = []
    if is_batch_study(df):
        study = batch_size_study(df)
        save(plot_batch_sizes(study, _title(df, "batch-size study", wrap=True)), "batch_size.png")
        study_text = ["## Batch size", "", "Final-epoch test error on one view (%), mean ± std over seeds, laid out "
                      "like Table 2 of Wu & He (2018); \"precise BN statistics\" recomputes BatchNorm's running "
                      "statistics on batches of 500 training images after training (`train.precise_bn`). "
                      "\"*\": may not have converged.", "", _markdown(batch_size_table(study)), "",
                      "![test error against batch size](batch_size.png)", "", "Per variant and batch size:", "",
                      _markdown(study), ""]
    table, warnings, split = summary(df), convergence_warnings(df), scored_on(df)
    compared = comparison_text(comparison_tables(grid, df, dataset))
    text = [*heading, *notes, *tuned,
            *study_text,
            f"Headline: {split} accuracy at the final epoch on one view of each image (no choice made on the "
            f"{split} split), mean and sample std over seeds. Beside it, the final epoch scored with the "
            "test-time flip (each image and its mirror, on flip-trained datasets) and the best epoch's "
            f"flip-averaged accuracy (an epoch chosen on the {split} split: optimistic).", "",
            _markdown(table), "", *(warnings or ["Every variant converged by the checks in `analysis.convergence`."]), "",
            "Per trial:", "", _markdown(trial_table(df)), "",
            *compared,
            f"The {split}-accuracy figure plots the flip-averaged accuracy per epoch (one view where the data was not "
            "trained with flips); its legend gives each variant's final one-view accuracy (the headline above) "
            "and its best epoch's. Each misclassified grid is of the best trial's best checkpoint, titled with "
            "that checkpoint's accuracy.", "",
            "![test loss](test_loss.png)", "![test accuracy](test_acc.png)",
            "![train loss](train_loss.png)", "![train accuracy](train_acc.png)", ""]
    text += [f"![{variant} misclassified]({name})" for variant, name in grids]
    text += [line for note in missing for line in ("", note)]
    text += [""]
    put("summary.md", "\n".join(text).encode())
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the figures and a markdown summary of a normsweep experiment.")
    parser.add_argument("experiment", help="the experiment, results/<name> or a storage URI such as "
                                           "s3://bucket/results/<name>, as printed by tune_main.py")
    parser.add_argument("--out", default=None, help="output directory or URI (default: <experiment>/report)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # files only; the notebook keeps its inline backend
    try:
        written = write_report(args.experiment, args.out or experiments.join(experiments.resolve(args.experiment), "report"))
    except errors.NormsweepError as e:  # AnalysisError, ExperimentError, DataError, CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return errors.USAGE_EXIT
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
