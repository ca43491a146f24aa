"""Analysis of a finished (or partial) normsweep experiment: reads results, never trains.

An experiment (a directory or storage URI) becomes a ResultGrid and a tidy DataFrame; from them the figures, tables
and tests (comparisons.py) that `python analysis.py EXPERIMENT` writes as PNGs and summary.md, and the notebook shows
(`--notebook`: run headless). Ray is imported only where a ResultGrid or checkpoint is read.
"""
import argparse
import io
import itertools
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import MaxNLocator

import comparisons
import config as config_lib
import data as data_lib
import experiments
import train
import tuned
import verdicts
from comparisons import convergence, convergence_warnings, final_per_trial, healthy, scored_on
from errors import USAGE_EXIT, DataError, ExperimentError, NormsweepError
from model import GHOST_BATCH

AnalysisError = ExperimentError  # what this module raises: one line that says what to do
# metric -> (axis label, higher is better); {split}: the split the trials were scored on (scored_on), {view}: whether
# test_acc averages each image and its mirror
CURVES = {
    "test_loss": ("{split} loss (cross-entropy, nats)", False),
    "test_acc": ("{split} accuracy, {view} (%)", True),
    "train_loss": ("train loss (cross-entropy + label smoothing, nats)", False),
    "train_acc": ("train accuracy on augmented batches (%)", True),
}
LINESTYLES, MARKERS = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v", "P")  # a curve on another stays visible
RECIPE_COPY = "~recipe"  # suffix of the copied rows of a tuned trial whose choice is the recipe (in both arms)


def printable(text) -> str:
    """data.printable's escapes, and mathtext's `$` escaped: any str as matplotlib and markdown show it verbatim."""
    return data_lib.printable(text).replace("$", r"\$")


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """A table as shown, all str: "... p" columns 3 significant digits or "<0.001", other floats 2 decimals, nan "-"."""
    def cell(v, p_value: bool) -> str:
        if not isinstance(v, float):
            return printable(v)
        return "-" if np.isnan(v) else ("<0.001" if v < 0.001 else f"{v:.3g}") if p_value else f"{v:.2f}"
    return pd.DataFrame({c: [cell(v, str(c).endswith(" p")) for v in table[c]] for c in table.columns})


def _markdown(table: pd.DataFrame) -> str:
    return formatted(table).map(lambda s: s.replace("|", r"\|")).to_markdown(index=False, disable_numparse=True)


def latest_experiment(root="results") -> str:
    """The newest experiment under root, a directory or URI (the notebook's default); ExperimentError if none."""
    return experiments.latest(experiments.resolve(root))


def check_experiment(path) -> str:
    """The location of the experiment at path; a one-line AnalysisError, without Ray, where there is none."""
    location = experiments.resolve(path)
    if not experiments.is_experiment(location):
        raise AnalysisError(f"{location} is not a Ray Tune experiment directory (no experiment_state-*.json); "
                            f"pass results/<name> (or the storage URI and name) as printed by tune_main.py")
    experiments.check_intact(location, "analyse")
    return location


def load_experiment(path):
    """(ResultGrid, results_frame) of an experiment, a directory or URI; a one-line AnalysisError if no Tune epoch."""
    location = check_experiment(path)
    if any(experiments.last_results(location).values()):
        from ray.tune import ExperimentAnalysis, ResultGrid  # after the checks: a bad path is refused without Ray

        fs, fs_path = experiments.filesystem(location)
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # its per-trial "no epoch"
        grid = ResultGrid(ExperimentAnalysis(fs_path, storage_filesystem=fs))
        if not (df := results_frame(grid)).empty:
            return grid, df
    raise AnalysisError(f"{location} holds no reported epochs yet; wait for the first epoch or check the trials' "
                        "errors")


def experiment_location(grid) -> str:
    """Where a ResultGrid's experiment lives, a local path or URI."""
    fs = next((r.filesystem for r in grid if r.filesystem is not None), None)
    return grid.experiment_path if fs is None else experiments.location_of(fs, grid.experiment_path)


def results_frame(grid) -> pd.DataFrame:
    """One row per trial and reported epoch (trials with no epoch yet left out): the epoch's report (trainable.METRICS,
    `health`, `parameters`, Tune's `timestamp`, ...), the trial's scalar settings (`dataset`, `epochs` planned, `seed`,
    `arm`, ...; `lr` is the metric), `trial`, `variant` (its label), `variant name`, `peak lr`, `diverged`, `data`."""
    import trainable  # Ray's: a config read as the trial read it

    frames = []
    for result in grid:  # every epoch, from result.json or, where that was cut short, progress.csv
        config, metrics = result.config, experiments.history(experiments.location_of(result.filesystem, result.path))
        if not config or metrics.empty:
            continue
        variant, settings = config["variant"], {**config["variant"], **trainable.trial_config(config, threads=0)}
        frame = metrics.loc[:, ~metrics.columns.str.startswith("config/")]  # Tune's nested copy of the config
        frame = frame.assign(**{k: v for k, v in settings.items() if k not in frame and (v is None or np.isscalar(v))})
        frame.insert(0, "trial", Path(result.path).name)
        frame.insert(1, "variant", experiments.variant_label(config))
        frame["variant name"] = experiments.variant_label({"variant": {"name": variant["name"], "l1": variant["l1"]}})
        frame["peak lr"], frame["diverged"] = train.peak_lr(settings), (frame["health"] != "ok").any()
        frames.append(frame)
        if variant.get("recipe_too"):  # its tuned configuration is the recipe's: one trial in both arms
            label = experiments.variant_label({**config, "variant": {**variant, "arm": tuned.RECIPE}})
            frames.append(frame.assign(trial=frame["trial"] + RECIPE_COPY, variant=label, arm=tuned.RECIPE, evidence=(
                "the shared recipe, which tuning also chose (the tuned trial, counted in both arms)")))
    if not frames:
        return pd.DataFrame()
    launch = experiments.read_launch(experiment_location(grid))
    return pd.concat(frames, ignore_index=True).assign(data=data_subset(launch))


def data_subset(launch: dict) -> str:
    """What part of the dataset a launch trained and scored on, in words; "" for all of it."""
    if not (n_train := launch.get("train_size")):
        return ""
    held_out = tuned.val_size_for(n_train) if launch.get("stage") == "tuning" else launch.get("val_size")
    scored = (f"{held_out:,} of them held out for validation" if held_out else
              f"{launch['test_size']:,} test images" if launch.get("test_size") else "every test image")
    return f"{'smoke-test' if launch.get('smoke_test') else '--train-size'} subset: {n_train:,} train images, {scored}"


def _title(df, what: str, wrap: bool = False) -> str:
    """'what: dataset[, net NET], N epochs, K seeds per variant (subset)'; wrap: the subset on a line of its own."""
    planned, reached = int(df["epochs"].max()), int(df["epoch"].max())  # "epochs": the planned count
    epochs = _count(planned, "epoch") if reached >= planned else f"partial: {reached} of {planned} epochs in"
    subset, model = df["data"].iloc[0], str(df["model"].iloc[0])
    subset = (f"\n({subset})" if wrap else f" ({subset})") if subset else ""
    net = f", net {printable(Path(model).name)}" if model != "small" else ""  # a user's builder: its file's name
    seeds = _count(df.groupby("variant")["seed"].nunique().max(), "seed")
    return f"{what}: {printable(Path(str(df['dataset'].iloc[0])).name)}{net}, {epochs}, {seeds} per variant{subset}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"  # '1 epoch', '2 epochs'


def _mean_std(values: pd.Series, fmt: str = ".2f") -> str:
    return f"{values.mean():{fmt}}" + (f" ± {values.std():{fmt}}" if len(values) > 1 else "")


def best_per_trial(df) -> pd.DataFrame:
    """One row per healthy trial at its best epoch by test_acc, ties to the latest (trainable.best_epoch)."""
    import trainable  # Ray's: the rule lives beside the checkpoints it names

    rows = [trainable.best_epoch(group) for _, group in healthy(df).groupby("trial")]
    return pd.DataFrame([r for r in rows if r is not None]).reset_index(drop=True)


def progress(grid, df) -> pd.DataFrame:
    """Per variant: trials (the launch's, or those reporting), epochs in (fewest-most; a trial not reported yet
    counts 0) of the planned epochs, trials diverged, complete (each ran its epochs or diverged)."""
    location, planned_epochs = experiment_location(grid), int(df["epochs"].max())
    launch = experiments.read_launch(location)
    axes = config_lib.grid_axes(config_lib.SweepConfig().from_launch(launch)) if launch else {"seed": []}
    seeds = len(axes.pop("seed"))
    if launch.get("seeds") == config_lib.AUTO_SEEDS and experiments.searcher_state(location).get("stopped"):
        seeds = 0  # a --seeds auto sweep that has stopped planned the trials it ran
    planned = {experiments.variant_label({**dict(zip(axes, point)), "stage": launch.get("stage"),
                                          "lr_reference_batch": 1 if "batch_size" in axes else 0}): seeds
               for point in itertools.product(*axes.values())}
    trials = df.groupby("trial").agg({"variant": "first", "epoch": "max", "diverged": "first"})  # epoch: the last
    rows = []
    for label in sorted(set(planned) | set(trials["variant"])):
        mine = trials[trials["variant"] == label]
        epochs_in = [*mine["epoch"], *[0] * (planned.get(label, 0) - len(mine))]
        rows.append({"variant": label, "trials": len(epochs_in), "planned epochs": planned_epochs,
                     "epochs in": "-".join(str(e) for e in sorted({min(epochs_in), max(epochs_in)})),
                     "diverged": int(mine["diverged"].sum()), "complete": len(mine) == len(epochs_in)
                     and bool((mine["diverged"] | (mine["epoch"] >= planned_epochs)).all())})
    return pd.DataFrame(rows)


def progress_note(table: pd.DataFrame, running: str | None = None, experiment: str | None = None) -> str:
    """'' if complete, else one sentence: each variant's epochs in, then who runs it (running) or how to resume
    (the experiment's storage path and name: a bare --resume finds only the latest under ./results)."""
    parts = "; ".join(f"{row['variant']} {row['epochs in']} of {row['planned epochs']}" for _, row in table.iterrows())
    base, sep, query = str(experiment).partition("?")  # a URI's query string belongs to its storage path
    where = (f" --storage-path {shlex.quote(base.rstrip('/').rsplit('/', 1)[0] + sep + query)} --name "
             f"{shlex.quote(experiments.name_of(experiment))}") if experiment else ""
    then = f"It is still running ({running})." if running else f"Resume it with tune_main.py --resume{where}."
    return "" if table["complete"].all() else (
        "Partial experiment: these figures and tables cover only the epochs reported so far (epochs in, per "
        f"variant: {parts}). {then}")


def diverged_note(df) -> str:
    """'' when no trial diverged, else one sentence naming each diverged trial and why it stopped."""
    trials = df[df["diverged"]].groupby("trial")["health"].last()
    named = "; ".join(f"{trial} ({health})" for trial, health in trials.items())
    if not named or len(trials) < df["trial"].nunique():
        return named and f"Diverged trials, left out of the figures and tables: {named}."
    return (f"Every trial diverged ({_count(len(trials), 'trial')}), so there is no accuracy to report or compare: "
            f"{named}.")


def ghost_note(df) -> str:
    """'' unless gbn trained at a batch of at most GHOST_BATCH images, where its one ghost batch makes it bn."""
    batches = sorted(df.loc[(df["norm"] == "gbn") & (df["batch_size"] <= GHOST_BATCH), "batch_size"].unique())
    return "" if not batches else (f"gbn at batch {', '.join(map(str, batches))} is bn: its ghost batches of "
                                   f"{GHOST_BATCH} images need a larger batch to differ from it.")


def validation_note(df) -> str:
    """'' for trials scored on the test split, else one sentence saying they were scored on held-out images."""
    n = int(df["val_size"].max())
    return "" if scored_on(df) == "test" else (
        f"Scored on {n:,} training images held out from training (--val-size {n}), not on the test split: "
        f"every \"test\" column, figure and comparison of this experiment is of those validation images.")


def _legend(ax, **kwargs):
    """The legend beside the axes, where it covers no curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize=8, title_fontsize=8, **kwargs)


def plot_curves(df, metric: str):
    """A CURVES metric against epoch, all variants on one axes: the mean over seeds with a ±1 std band, ★ at each
    mean curve's best epoch; a diverged variant is named in the legend, not drawn."""
    label, higher_better = CURVES[metric]
    split, (scale, fmt) = scored_on(df), (100, ".2f") if metric.endswith("acc") else (1, ".4f")
    # test_acc averages each image and its mirror on flip-trained data; the headline is test_acc_single
    view = "one view" if np.allclose(df["test_acc"], df["test_acc_single"], equal_nan=True) else "flip-averaged"
    fig, ax = plt.subplots(figsize=(12, 5))
    names = sorted(df["variant"].unique())
    for name in sorted(set(names) - set(healthy(df)["variant"])):  # marked, not drawn as nan
        ax.plot([], [], color="grey", linestyle="none", marker="x", label=f"{printable(name)}: diverged (not plotted)")
    late = []  # the bands over the second half of training: variants often sit within a point of each other
    for name, group in healthy(df).groupby("variant"):
        i, curve = names.index(name), group.groupby("epoch")[metric].agg(["mean", "std", "count"]).fillna({"std": 0})
        epochs, mean, std = curve.index.to_numpy(), scale * curve["mean"].to_numpy(), scale * curve["std"].to_numpy()
        per_seed_best = scale * group.groupby("trial")[metric].agg("max" if higher_better else "min")
        best_at = np.argmax(mean) if higher_better else np.argmin(mean)
        text = f"{printable(name)}: best {_mean_std(per_seed_best, fmt)} (mean-curve best at epoch {epochs[best_at]})"
        if metric == "test_acc":
            text = (f"{printable(name)}: final one view {_mean_std(100 * final_per_trial(group)['test_acc_single'])}; "
                    f"best {view} {_mean_std(per_seed_best)}")
        ax.plot(epochs, mean, color=f"C{i}", linestyle=LINESTYLES[i % len(LINESTYLES)], label=text,
                marker=MARKERS[i % len(MARKERS)], markersize=4, markevery=max(1, len(epochs) // 10))
        if curve["count"].max() > 1:
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2, linewidth=0)
        ax.plot(epochs[best_at], mean[best_at], marker="*", markersize=12, color=f"C{i}", markeredgecolor="k")
        late += [*(mean - std)[len(mean) // 2:], *(mean + std)[len(mean) // 2:]]
    if higher_better and late and df["epoch"].max() >= 4:
        pad = max(0.1 * (max(late) - min(late)), 0.05 * scale / 100)
        ax.set_ylim(min(late) - pad, max(late) + pad)
        label += " (zoomed to the second half of training)"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even for 1 epoch
    ax.set(xlabel="epoch", ylabel=label.format(split=split, view=view))
    band = "; band = ±1 std over seeds" if df.groupby("variant")["seed"].nunique().max() > 1 else ""
    head, _, subset = _title(df, metric.replace("_", " ").replace("test", split), wrap=True).partition("\n")
    ax.set_title(head + band + (f"\n{subset}" if subset else ""), fontsize=10)
    legend = ("variant: final epoch, one view (the summary's headline);\neach seed's best epoch, as plotted"
              if metric == "test_acc" else "variant: each seed's best epoch")
    _legend(ax, title=f"{legend}; mean over seeds\n(★ = best epoch of the mean curve)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _skip(skipped, error, what: str):
    if skipped is None:
        raise error
    skipped.append(f"{what}: {error}")


def experiment_dataset(grid, skipped=None, dataset=None, data_dir=None) -> data_lib.Dataset:
    """The whole dataset the trials were drawn from, read once; dataset (a directory or name), data_dir: where it
    lies now if it moved. Not readable: DataError, or None with the reason appended to `skipped`."""
    config = next(r.config for r in grid if r.config)
    try:  # held-out images are scored where the trials had --val-size, not the test split
        return data_lib.load_dataset(dataset or config["dataset"], data_dir or config["data_dir"],
                                     test_split=not config["val_size"])
    except DataError as e:  # moved, or not copied with the results
        _skip(skipped, DataError(f"the dataset is not readable here ({e}); pass analysis.py --dataset PATH (or "
                                 f"--data-dir DIR) where it lies now"), "misclassified images")


def misclassified(grid, df, variant: str, n: int = 10, dataset=None) -> dict:
    """The first n misclassified evaluation images of `variant`'s best checkpoint (best trial by test_acc): images
    (uint8), true, pred, confidence (max softmax), indices, acc (flip-averaged where `flip`), seed, epoch, classes;
    dataset: experiment_dataset's. A one-line AnalysisError without a healthy trial or its best epoch's checkpoint."""
    import trainable  # Ray's checkpoints
    from ray import tune

    best = best_per_trial(df)
    if not len(best) or variant not in set(best["variant"]):
        raise AnalysisError(f"{variant} has no trial with a healthy epoch (every trial of it diverged or has not "
                            f"reported yet), so no checkpoint to show")
    row = best[best["variant"] == variant].sort_values("test_acc", kind="stable").iloc[-1]
    # the checkpoint of the epoch the table names (Tune keeps it: the best, ties to the latest), found on storage; a
    # RECIPE_COPY row's is its tuned trial's
    result = next(r for r in grid if Path(r.path).name == row["trial"].removesuffix(RECIPE_COPY))
    kept = [c for c in experiments.checkpoints(experiments.location_of(result.filesystem, result.path), row["epoch"])
            if experiments.exists(experiments.join(c, trainable.CHECKPOINT_FILE))]
    if not kept:
        raise AnalysisError(f"trial {row['trial']} has no checkpoint of its best epoch {int(row['epoch'])} (not saved "
                            f"yet, or not copied with the results); resume the experiment or copy its checkpoint_* "
                            f"directories too")
    fs, path = experiments.filesystem(kept[0])
    model, state = trainable.model_from_result_checkpoint(tune.Checkpoint(path, fs))
    config = state["config"]  # scored as its trial was: held-out images where it had --val-size
    dataset = experiment_dataset(grid) if dataset is None else dataset
    split = train.trial_data(dataset, config_lib.TrialConfig.of(config))
    split = split.held_out(config["val_size"]) if config["val_size"] else split
    flip = train.uses_test_flip(config, split.augment)
    out = train.evaluate(model, split.test_images, split.test_labels, **state["input_stats"], flip=flip)
    wrong = torch.nonzero(out["preds"] != split.test_labels).flatten()[:n]
    return {"variant": variant, "trial": row["trial"], "seed": config["seed"], "epoch": state["epoch"],
            "acc": out["acc"], "flip": flip, "split": "validation" if config["val_size"] else "test",
            "indices": wrong, "images": split.test_images[wrong], "true": split.test_labels[wrong],
            "pred": out["preds"][wrong], "confidence": out["confidence"][wrong], "classes": split.classes}


def misclassified_grids(grid, df, skipped=None, dataset=None, data_dir=None) -> dict:
    """variant -> plot_misclassified's figure per healthy variant, the data read once (experiment_dataset's dataset,
    data_dir); what is not drawable here (the data, a checkpoint): said in skipped, or raised where it is None."""
    dataset, figures = experiment_dataset(grid, skipped, dataset, data_dir), {}
    for variant in sorted(healthy(df)["variant"].unique()) if dataset is not None else []:
        try:
            figures[variant] = plot_misclassified(misclassified(grid, df, variant, dataset=dataset))
        except AnalysisError as e:  # e.g. a best epoch whose checkpoint was not copied with the results
            _skip(skipped, e, f"misclassified images of {variant}")
    return figures


def plot_misclassified(sample: dict):
    """A 2x5 grid of a `misclassified` sample, each tile titled with the true and predicted label and confidence."""
    fig, axes = plt.subplots(2, 5, figsize=(11, 6.4))  # room for a two-line suptitle and two-line tile titles
    classes = [printable(name) for name in sample["classes"]]
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(sample["indices"]):
            image = sample["images"][k].permute(1, 2, 0).numpy()  # (H, W, C) uint8; matplotlib warns on tensors
            # as stored: 0 black, 255 white, not stretched per image (an RGB image ignores cmap and the range)
            ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"true: {classes[sample['true'][k]]}\npred: {classes[sample['pred'][k]]} "
                         f"({100 * sample['confidence'][k]:.0f}%)", fontsize=9)
    split, view = sample.get("split", "test"), "flip-averaged" if sample.get("flip") else "one view"
    if not len(sample["indices"]):
        axes.flat[0].text(0, 0.5, f"no {split} image misclassified", fontsize=12)
    seed = f", seed {sample['seed']}" if "seed" in sample else ""
    fig.suptitle(f"{printable(sample['variant'])}: misclassified {split} images of the best checkpoint (epoch "
                 f"{sample['epoch']}{seed})\nits {split} accuracy {100 * sample['acc']:.2f}%, {view}, at that best "
                 "epoch (the summary's headline is the final epoch, one view)", fontsize=10)
    fig.tight_layout(h_pad=2.0)  # room between a tile's two-line title and the row above
    return fig


def trial_table(df) -> pd.DataFrame:
    """Per trial: final-epoch accuracy one view and flip-averaged, the best epoch's (by test_acc), train seconds."""
    final = final_per_trial(df)  # empty, and so this table, where every trial diverged (diverged_note says so)
    best = best_per_trial(df).reindex(columns=["trial", "test_acc", "epoch"]).set_index("trial").loc[final["trial"]]
    return pd.DataFrame({
        "variant": final["variant"], "seed": final["seed"], "epochs": final["epoch"].astype(int),
        "final one-view acc (%)": 100 * final["test_acc_single"], "final acc (%)": 100 * final["test_acc"],
        "best acc (%)": 100 * best["test_acc"].to_numpy(), "best epoch": best["epoch"].to_numpy(dtype=int),
        "final train acc (%)": 100 * final["train_acc"],
        "train s": final["trial"].map(df.groupby("trial")["epoch_seconds"].sum()).round().astype(int),
    }).sort_values(["variant", "seed"]).reset_index(drop=True)


def summary(df) -> pd.DataFrame:
    """Per variant, best first: trial_table's accuracies of the trials that ran all their epochs as means over seeds,
    the headline's std, convergence."""
    table = trial_table(df[df["trial"].isin(final_per_trial(df, complete=True)["trial"])]).groupby("variant").agg(**{
        "seeds": ("seed", "size"), "final one-view acc mean (%)": ("final one-view acc (%)", "mean"),
        "std (%)": ("final one-view acc (%)", "std"), "final acc mean (%)": ("final acc (%)", "mean"),
        "best acc mean (%)": ("best acc (%)", "mean"), "best epochs": ("best epoch", lambda e: ", ".join(map(str, e)))})
    table["parameters"] = final_per_trial(df).groupby("variant")["parameters"].first().astype(int)
    converged = convergence(df).set_index("variant")["converged"]
    table["converged"] = converged.map({True: "yes", False: "MAY NOT (see warnings)"})
    return table.reset_index().sort_values("final one-view acc mean (%)", ascending=False).reset_index(drop=True)


def comparison_tables(grid, df) -> dict:
    """The comparisons that apply, by name: "verdicts" (variants with 2+ seeds; --margin from the launch), else
    "mcnemar" (one seed), and "tuned vs recipe" (a tuned comparison's final stage)."""
    final, tables = final_per_trial(df), {}
    if final["variant"].nunique() < 2:
        return tables
    location = experiment_location(grid)
    margin = experiments.read_launch(location).get("margin", verdicts.MARGIN)
    if final.groupby("variant")["seed"].nunique().max() >= 2:  # --seeds auto: as its searcher looked
        looks = experiments.searcher_state(location).get("looks")
        tables["verdicts"] = comparisons.verdict_table(df, margin, looks=looks)
    else:
        tables["mcnemar"] = comparisons.mcnemar_tests(df)
    if "arm" in final and final["arm"].nunique() > 1:
        tables["tuned vs recipe"] = comparisons.verdict_table(df, margin, compare="arm",
                                                              within=("variant name", "batch_size"))
    return tables


def stage(grid) -> str:
    """"tuning" or "final" for a tuned comparison's stages (tuned.py), "" for a plain sweep."""
    return experiments.read_launch(experiment_location(grid)).get("stage", "")


def tuning_frame(grid, df):
    """A tuned comparison's tuning-stage frame (df, or read from beside a final stage); None for a plain sweep."""
    launch = experiments.read_launch(location := experiment_location(grid))
    if launch.get("stage") == "final":
        return load_experiment(experiments.sibling(location, tuned.tuning_name(launch["final_name"])))[1]
    return df if launch.get("stage") == "tuning" else None


def wall_time(df) -> str:
    """From the first epoch's start to the last report (a resumed experiment's pause counted): "159 s", "12 min"."""
    seconds = float(df["timestamp"].max() - (df["timestamp"] - df["time_this_iter_s"]).min())
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def configuration_table(df) -> pd.DataFrame:
    """A tuned comparison's final stage: per variant and arm, the configuration it trained with and why."""
    final = final_per_trial(df).drop_duplicates("variant").sort_values("variant")
    return pd.DataFrame({"variant": final["variant"], "peak lr": final["peak lr"].map("{:g}".format),
                         "weight decay": final["weight_decay"].map("{:g}".format), "chosen on": final["evidence"]})


def is_batch_study(df) -> bool:
    return df["batch_size"].nunique() > 1


def batch_size_study(df) -> pd.DataFrame:
    """Per variant and batch size: final one-view test error (%) over seeds, plain and precise-BN (nan without BN)."""
    final = final_per_trial(df)
    final = final.assign(error=100 * (1 - final["test_acc_single"]), precise=100 * (1 - final["test_acc_precise_bn"]),
                         converged=final["variant"].map(convergence(df).set_index("variant")["converged"]))
    study = final.groupby(["variant name", "batch_size"]).agg(**{
        "seeds": ("seed", "size"), "error (%)": ("error", "mean"), "std": ("error", "std"),
        "precise-BN error (%)": ("precise", "mean"), "precise-BN std": ("precise", "std"),
        "peak lr": ("peak lr", lambda lr: f"{lr.iloc[0]:g}"), "converged": ("converged", "all")})
    return study.reset_index().rename(columns={"variant name": "variant", "batch_size": "batch size"})


def batch_size_table(study: pd.DataFrame) -> pd.DataFrame:
    """The study as Table 2 of Wu & He (2018): a row per norm (and precise BN), a column per batch size, large to
    small, of "mean ± std" test error (%), then each norm's difference to bn; "*": may not have converged."""
    def cells(group, mean, std, marked=False):  # "-": e.g. precise BN of a trial short of its final epoch
        return {str(r["batch size"]): "-" if np.isnan(r[mean]) else f"{r[mean]:.2f}"
                + (f" ± {r[std]:.2f}" if np.isfinite(r[std]) else "") + (" *" if marked and not r["converged"] else "")
                for _, r in group.iterrows()}

    rows = []
    for name, group in study.groupby("variant"):
        rows.append({"": f"{name} error (%)", **cells(group, "error (%)", "std", marked=True)})
        if group["precise-BN error (%)"].notna().any():
            precise = cells(group, "precise-BN error (%)", "precise-BN std")
            rows.append({"": f"{name}, precise BN statistics", **precise})
    means = study.pivot(index="variant", columns="batch size", values="error (%)")
    if "bn" in means.index:
        rows += [{"": f"{name} − bn (points)", **{str(b): f"{d:+.2f}" for b, d in diffs.items() if np.isfinite(d)}}
                 for name, diffs in (means.drop("bn") - means.loc["bn"]).iterrows()]
    return pd.DataFrame(rows, columns=["", *map(str, sorted(study["batch size"].unique(), reverse=True))]).fillna("")


def plot_batch_sizes(study: pd.DataFrame, title: str = "batch-size study"):
    """Final one-view test error against batch size, mean ± std over seeds, per norm; dashed: precise BN."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (variant, group) in enumerate(study.groupby("variant")):
        name, style = printable(variant), {"color": f"C{i}", "marker": MARKERS[i % len(MARKERS)], "capsize": 3}
        ax.errorbar(group["batch size"], group["error (%)"], yerr=group["std"].fillna(0), label=name, **style)
        if group["precise-BN error (%)"].notna().any():
            ax.errorbar(group["batch size"], group["precise-BN error (%)"], yerr=group["precise-BN std"].fillna(0),
                        linestyle="--", markerfacecolor="none", label=f"{name}, precise BN statistics", **style)
    _log2_axis(ax, study["batch size"])
    ax.set(xlabel="batch size (images per step; peak lr scaled linearly with it)",
           ylabel="test error at the final epoch, one view (%)")
    ax.set_title(title + "; mean ± std over seeds", fontsize=10)
    _legend(ax)
    fig.tight_layout()
    return fig


def _log2_axis(ax, values):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))], minor=False)
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def plot_sensitivity(df, title: str = "learning-rate sensitivity"):
    """Tuning-stage validation accuracy against peak lr, a line per variant, a panel per weight decay; x: diverged."""
    table = tuned.configurations(df)
    decays = sorted(table["weight decay"].unique())
    fig, axes = plt.subplots(1, len(decays), figsize=(5.2 * len(decays) + 2, 4.2), sharey=True, squeeze=False)
    floor = table["val acc (%)"].min() - 2 if table["val acc (%)"].notna().any() else 0
    for ax, decay in zip(axes[0], decays):
        for i, (name, rows) in enumerate(table[table["weight decay"] == decay].sort_values("lr").groupby("variant")):
            line, = ax.plot(rows["lr"], rows["val acc (%)"], marker=MARKERS[i % len(MARKERS)], label=printable(name))
            bad = rows[rows["val acc (%)"].isna()]
            ax.plot(bad["lr"], [floor] * len(bad), "x", color=line.get_color(), markersize=9)
        _log2_axis(ax, table["lr"])
        ax.set_xlabel("peak learning rate (OneCycle)")
        ax.set_title(f"weight decay {decay:g}", fontsize=10)
    axes[0][0].set_ylabel("validation accuracy, final epoch, one view (%)")
    _legend(axes[0][-1], title="x: diverged")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def experiment_line(experiment) -> str:
    """How summary.md names the experiment, and what the name is relative to (experiments.shown)."""
    shown = printable(experiments.shown(experiment))
    if experiments.is_uri(shown):
        return f"`{shown}`"
    inside = Path(experiments.resolve(experiment)).is_relative_to(Path.cwd())
    return f"`{shown}` ({'relative to' if inside else 'its name; it lies outside'} the directory the analysis ran in)"


def write_report(experiment, out_dir, dataset=None, data_dir=None) -> list:
    """Every figure as PNG plus summary.md into out_dir, a directory or URI; the paths written (Path, or URI). A part
    that needs data or a checkpoint that is not here is left out and said, in summary.md and on stderr (one line
    each). dataset, data_dir: where the experiment's data lies now, if it moved since the sweep."""
    grid, df = load_experiment(experiment)
    location, figures, skipped = experiment_location(grid), {}, []  # file name -> PNG; "what: why" of parts left out
    notes = [progress_note(progress(grid, df), experiments.holder(location), location), diverged_note(df),
             validation_note(df), ghost_note(df)]
    text = [f"# {_title(df, 'normsweep summary')}", "", f"Experiment: {experiment_line(experiment)}", "",
            *[line for note in notes if note for line in (f"**{note}**", "")]]
    if (kind := stage(grid)) == "tuning":  # the learning-rate sensitivity and the choices
        text += [*_tuning_section(grid, df, figures), "Per trial (validation accuracy in the test columns):", "",
                 _markdown(trial_table(df)), ""]
    elif not healthy(df).empty:  # where every trial diverged there is no curve, table or checkpoint to show
        if kind == "final":  # the configurations of its two arms, then its tuning stage's section
            text += ["## Tuned comparison", "", "Each variant at the configuration its tuning stage chose on "
                     "validation images (arm \"tuned\") and at the shared recipe (arm \"recipe\"), the same seeds, "
                     f"scored on the test split; this final stage took {wall_time(df)} of wall time:", "",
                     _markdown(configuration_table(df)), ""]
            try:
                text += _tuning_section(grid, tuning_frame(grid, df), figures)
            except AnalysisError as e:
                text += [f"(The tuning stage's results are not readable here: {e}.)", ""]
        if is_batch_study(df):  # Wu & He's Table 2 layout, the figure and the per-batch-size table
            study = batch_size_study(df)
            figures["batch_size.png"] = _png(plot_batch_sizes(study, _title(df, "batch-size study", wrap=True)))
            text += ["## Batch size", "", "Final-epoch test error on one view (%), mean ± std over seeds, laid out "
                     "like Table 2 of Wu & He (2018); \"precise BN statistics\" recomputes BatchNorm's running "
                     "statistics on batches of 500 training images after training (`train.precise_bn`). \"*\": may "
                     "not have converged.", "", _markdown(batch_size_table(study)), "",
                     "![test error against batch size](batch_size.png)", "", "Per variant and batch size:", "",
                     _markdown(study), ""]
        text += _results_section(grid, df, figures, skipped, dataset, data_dir)
    text += ["## Not in this report", "", *[f"- {line}" for line in skipped], ""] if skipped else []
    out, files = experiments.resolve(out_dir), {**figures, "summary.md": "\n".join(text).encode()}
    for name, data in files.items():
        experiments.write_bytes(experiments.join(out, name), data)  # a one-line ExperimentError where unwritable
    print("".join(f"skipped {line}\n" for line in skipped), end="", file=sys.stderr)
    return [experiments.join(out, name) if experiments.is_uri(out) else Path(out, name) for name in files]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _results_section(grid, df, figures: dict, skipped: list, dataset, data_dir) -> list:
    """Tables, comparisons, curves and misclassified grids (into figures; what is not drawable here: into skipped)."""
    figures.update({f"{metric}.png": _png(plot_curves(df, metric)) for metric in CURVES})
    grids = misclassified_grids(grid, df, skipped, dataset, data_dir)
    names = {variant: f"misclassified_{re.sub(r'[^A-Za-z0-9]+', '_', variant).strip('_')}.png" for variant in grids}
    figures.update({names[variant]: _png(fig) for variant, fig in grids.items()})  # ASCII file names
    split = scored_on(df)
    level = f"Holm-Bonferroni correction over each family of pairs, {comparisons.ALPHA:g} family-wise level"
    intro = {"verdicts": "Verdicts per pair (docs/verdicts.md): the difference of final one-view accuracies, paired "
                         "over seeds (every variant of a seed starts from the same convolution and head weights and "
                         "sees the same data order and augmentation) and over the scored images, whose sampling noise "
                         f"more seeds do not remove; \"better\" and \"equivalent\" (two one-sided tests) at {level} "
                         "(and, under --seeds auto, the alpha its looks spent), so an unadjusted interval may exclude "
                         "0 while its pair is undecided or equivalent:",
             "mcnemar": "One seed: no verdict is possible, since one seed measures no seed noise. McNemar's exact test "
                        "on the test images one variant classifies right and the other wrong (final epoch, one view; "
                        f"{level}) measures the noise of the images only: another seed may order the variants "
                        "differently. Run 2 or more seeds (--seeds) for verdicts.",
             "tuned vs recipe": "Tuned configuration against the shared recipe, per variant, paired over seeds:"}
    compared = [line for name, table in comparison_tables(grid, df).items()
                for line in (intro[name], "", _markdown(table), "")]
    return [f"Headline: {split} accuracy at the final epoch on one view of each image (no choice made on the "
            f"{split} split), mean and sample std over seeds. Beside it, the final epoch scored with the test-time "
            "flip (each image and its mirror, on flip-trained datasets) and the best epoch's flip-averaged accuracy "
            f"(an epoch chosen on the {split} split: optimistic).", "", _markdown(summary(df)), "",
            *(convergence_warnings(df) or ["Every variant converged by the checks in `analysis.convergence`."]), "",
            "Per trial:", "", _markdown(trial_table(df)), "",
            *(compared or ["Pairwise differences: nothing to compare (fewer than two variants have results, or their "
                           "checkpoints are not here).", ""]),
            f"The {split}-accuracy figure plots the accuracy per epoch, flip-averaged on flip-trained data; each "
            "misclassified grid is of the best trial's best checkpoint.", "", "![test loss](test_loss.png)",
            "![test accuracy](test_acc.png)", "![train loss](train_loss.png)", "![train accuracy](train_acc.png)", "",
            *[f"![{printable(variant)} misclassified]({name})" for variant, name in names.items()], ""]


def tuning_choices(grid, tuning_df) -> dict:
    """tuned.choose on a tuning stage's frame, against the shared recipe of the launch of `grid` (either stage)."""
    launch = experiments.read_launch(experiment_location(grid))
    return tuned.choose(tuning_df, launch["lr"], launch["weight_decay"])


def _tuning_section(grid, tuning_df, figures: dict) -> list:
    """A tuning stage: the sensitivity table and figure, the choices (against the recipe of the launch of `grid`,
    either stage), and how early stopping would have ranked."""
    title = _title(tuning_df, "learning-rate sensitivity", wrap=True)
    figures["lr_sensitivity.png"] = _png(plot_sensitivity(tuning_df, title))
    choices = pd.DataFrame([{"variant": name, "peak lr": f"{c['lr']:g}", "weight decay": f"{c['weight_decay']:g}",
                             "evidence": c["evidence"]} for name, c in sorted(tuning_choices(grid, tuning_df).items())])
    agreement = comparisons.rank_agreement(tuning_df)
    return [f"## Tuning stage: {_title(tuning_df, 'validation accuracy')}", "",
            "Every variant trained once (seed 0) at each learning rate and weight decay below, "
            f"{int(tuning_df['epochs'].max())} epochs, on the training split less {int(tuning_df['val_size'].max()):,} "
            "validation images; accuracy on those validation images at the final epoch, one view (%). Empty: diverged. "
            f"The stage's {tuning_df['trial'].nunique()} trials took {wall_time(tuning_df)} of wall time.", "",
            _markdown(tuned.sensitivity(tuning_df)), "", "![learning-rate sensitivity](lr_sensitivity.png)", "",
            "Chosen per variant: the highest final validation accuracy (ties to the lower validation loss) where it "
            "beat the shared recipe beyond the noise of the validation images, else the recipe:", "",
            _markdown(choices), "", *(["Would early stopping have found the same configurations? Spearman's rank "
            "correlation between each configuration's validation accuracy at the rung epoch and at the final epoch, "
            "and whether an ASHA-type scheduler with that rung and reduction factor 3 would have kept the final "
            "winner:", "", _markdown(agreement), ""] if len(agreement) else [])]


def run_notebook(experiment, out_dir) -> str:
    """analysis.ipynb run headless on the experiment into out_dir/analysis.ipynb (the tracked notebook keeps no
    outputs); where it went. A one-line AnalysisError where the experiment or a cell fails (the cell's error)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    location, root = check_experiment(experiment), Path(__file__).resolve().parent  # a wrong path: no kernel started
    notebook = nbformat.read(root / "analysis.ipynb", as_version=4)
    written = experiments.join(out_dir, "analysis.ipynb")
    try:
        NotebookClient(notebook, timeout=None, resources={"metadata": {"path": str(root)}}).execute(
            env={**os.environ, "NORMSWEEP_EXPERIMENT": location}, stderr=subprocess.DEVNULL)  # the kernel's chatter
    except CellExecutionError as e:  # its message repeats the cell and the whole traceback
        raise AnalysisError(f"the notebook stopped: {e.ename}: {e.evalue}") from None
    finally:
        experiments.write_bytes(written, nbformat.writes(notebook).encode())
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the figures and a markdown summary of a normsweep experiment.")
    parser.add_argument("experiment", help="the experiment, results/<name> or a storage URI such as "
                                           "s3://bucket/results/<name>, as printed by tune_main.py")
    parser.add_argument("--out", help="output directory or URI (default: <experiment>/report)")
    parser.add_argument("--dataset", help="where the dataset directory lies now, if it moved since the sweep")
    parser.add_argument("--data-dir", help="where a named dataset's download lies now, if it moved since the sweep")
    parser.add_argument("--notebook", action="store_true", help="run analysis.ipynb headless instead, into "
                        "<out>/analysis.ipynb (the tracked notebook keeps no outputs)")
    args = parser.parse_args(argv)
    if args.notebook and (args.dataset or args.data_dir):
        parser.error("--dataset and --data-dir apply to the report; the notebook reads the data where the sweep did")
    matplotlib.use("Agg")  # files only; the notebook keeps its inline backend
    try:
        out = args.out or experiments.join(experiments.resolve(args.experiment), "report")
        written = ([run_notebook(args.experiment, out)] if args.notebook else
                   write_report(args.experiment, out, dataset=args.dataset, data_dir=args.data_dir))
    except NormsweepError as e:  # every refusal: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
