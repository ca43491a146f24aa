"""The tuned comparison's protocol: an equal tuning budget per variant, then seeds at the chosen setting.

Stage 1, tuning (`tune_main.py --tune`): every variant trains at every point of the same grid of peak
learning rates (log-spaced) x weight decays, for the same epochs, on the training split less a
validation split (VAL_FRACTION of it, the same images for every trial), one seed; each configuration
is scored on the validation images only. Stage 2, final: each variant at the configuration with its
best final-epoch validation accuracy, and at the shared recipe (--lr, --weight-decay) beside it, N
seeds on the whole training split, scored on the test split. Nothing is chosen on the test split.

Why tune per variant: BatchNorm's main effect is to allow larger learning rates (Bjorck et al.,
NeurIPS 2018), so one shared learning rate confounds a comparison of norms; equal budgets on a
validation split follow Choi et al. 2019, Sivaprasad et al. 2020 and Dodge et al. 2019.
Why a grid, not early stopping: under a OneCycle schedule the early epochs run at a warming-up
learning rate; `comparisons.rank_agreement` measures how far early ranks agree with final ones
(README, "Tuned comparison").

Frames here are analysis.results_frame's (one row per trial and epoch, accuracies as fractions).
"""
import math

import numpy as np
import pandas as pd

import experiments

TUNE_LRS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4)  # peak learning rates tried per variant, x2 apart
TUNE_WEIGHT_DECAYS = (5e-5, 5e-4)  # weight decays tried per variant (conv/linear weights only)
VAL_FRACTION = 0.2  # of the training images held out to score the tuning stage
SUFFIX = "-tuning"  # the tuning stage's experiment: <name>-tuning beside the final stage's <name>
TUNED, RECIPE = "tuned", "recipe"  # the final stage's arms


def tuning_name(final_name: str) -> str:
    return final_name + SUFFIX


def val_size_for(n_train: int) -> int:
    """Validation images held out of n_train for the tuning stage (at least 1, at most n_train - 2)."""
    return min(max(1, round(VAL_FRACTION * n_train)), n_train - 2)


def configurations(df) -> pd.DataFrame:
    """Per tuning trial at its final epoch: variant name, lr, weight decay, validation accuracy (one view, %),
    validation loss, and health ("ok" or why it stopped); diverged trials score nan and are never chosen."""
    last = df.loc[df.groupby("trial")["epoch"].idxmax()]
    ok = ~last["diverged"] if "diverged" in last else True
    return pd.DataFrame({
        "variant": last["variant name"], "lr": last["peak lr"], "weight decay": last["weight_decay"],
        "val acc (%)": np.where(ok, 100 * last["test_acc_single"], np.nan),
        "val loss": np.where(ok, last["test_loss"], np.nan), "epochs": last["epoch"].astype(int),
        "health": last["health"]}).reset_index(drop=True)


def choose(df) -> dict:
    """Per variant (its label without lr or weight decay, e.g. "bn+l1 (λ=1e-05)"), its chosen configuration
    from a tuning stage's frame.

    The highest final-epoch one-view validation accuracy wins; ties go to the lower validation loss, then
    the smaller learning rate. Returns name -> {"lr", "weight_decay", "val_acc", "evidence"}: the evidence is
    one line with the winner's and the runner-up's accuracy and the validation split's binomial standard
    error, so a reader sees when the choice is within noise. A variant whose every configuration diverged
    is left out.
    """
    table = configurations(df)
    n_val = int(df["val_size"].iloc[0]) if "val_size" in df and df["val_size"].iloc[0] else 0
    chosen = {}
    for name, rows in table.groupby("variant"):
        rows = rows.dropna(subset=["val acc (%)"]).sort_values(["val acc (%)", "val loss", "lr"],
                                                              ascending=[False, True, True])
        if rows.empty:
            continue
        best = rows.iloc[0]
        evidence = f"val {best['val acc (%)']:.2f}% at lr {best['lr']:g}, wd {best['weight decay']:g}"
        if len(rows) > 1:
            second = rows.iloc[1]
            evidence += (f"; next {second['val acc (%)']:.2f}% (lr {second['lr']:g}, wd {second['weight decay']:g})")
        if n_val:  # binomial standard error; at 0% or 100% that of one image right or wrong, not 0
            p = min(max(best["val acc (%)"] / 100, 1 / n_val), 1 - 1 / n_val)
            evidence += f"; ±{100 * math.sqrt(p * (1 - p) / n_val):.2f} SE on {n_val} val images"
        evidence += f"; {len(rows)} of {len(table[table['variant'] == name])} configurations trained without diverging"
        chosen[name] = {"lr": float(best["lr"]), "weight_decay": float(best["weight decay"]),
                        "val_acc": float(best["val acc (%)"]), "evidence": evidence}
    return chosen


def final_variants(variants: list, chosen: dict, lr: float, weight_decay: float) -> list:
    """The final stage's variant dicts: per variant its tuned configuration (arm TUNED) and the shared
    recipe (arm RECIPE). Where the two are the same configuration it runs once, as TUNED with
    "recipe_too": the analysis counts that trial in both arms. A variant with nothing chosen (every
    tuning configuration diverged) runs the recipe only."""
    out = []
    for variant in variants:
        pick = chosen.get(experiments.variant_label({"variant": variant}))  # choose's keys: "bn+l1 (λ=1e-05)"
        recipe = {**variant, "lr": lr, "weight_decay": weight_decay, "arm": RECIPE,
                  "evidence": "the shared recipe (--lr, --weight-decay)"}
        if pick is None:
            out.append({**recipe, "evidence": "the shared recipe: every tuning configuration diverged"})
            continue
        same = math.isclose(pick["lr"], lr) and math.isclose(pick["weight_decay"], weight_decay)
        out.append({**variant, "lr": pick["lr"], "weight_decay": pick["weight_decay"], "arm": TUNED,
                    "evidence": pick["evidence"], "recipe_too": same})
        if not same:
            out.append(recipe)
    return out


def sensitivity(df) -> pd.DataFrame:
    """Validation accuracy (%) against learning rate: one row per variant and weight decay, one column per lr
    (nan where the trial diverged). The learning-rate sensitivity table."""
    table = configurations(df)
    wide = table.pivot_table(index=["variant", "weight decay"], columns="lr", values="val acc (%)",
                             aggfunc="first", dropna=False)
    wide.columns = [f"lr {lr:g}" for lr in wide.columns]
    wide = wide.reset_index()
    wide["weight decay"] = [f"{v:g}" for v in wide["weight decay"]]  # 5e-05, not a rounded 0.00
    return wide


def plot_sensitivity(df, title: str = "learning-rate sensitivity"):
    """Validation accuracy against peak learning rate (log axis), one line per variant, one panel per weight
    decay; a diverged configuration is an x at the bottom of the axis."""
    import matplotlib.pyplot as plt

    table = configurations(df)
    decays = sorted(table["weight decay"].unique())
    fig, axes = plt.subplots(1, len(decays), figsize=(5.2 * len(decays), 4.2), sharey=True, squeeze=False)
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")
    finite = table["val acc (%)"].dropna()
    floor = (finite.min() - 2) if len(finite) else 0
    for ax, decay in zip(axes[0], decays):
        for i, (name, rows) in enumerate(table[table["weight decay"] == decay].groupby("variant")):
            rows = rows.sort_values("lr")
            line, = ax.plot(rows["lr"], rows["val acc (%)"], marker=markers[i % len(markers)], label=name)
            bad = rows[rows["val acc (%)"].isna()]
            ax.plot(bad["lr"], [floor] * len(bad), "x", color=line.get_color(), markersize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(table["lr"].unique()), [f"{v:g}" for v in sorted(table["lr"].unique())])
        ax.set_xlabel("peak learning rate (OneCycle)")
        ax.set_title(f"weight decay {decay:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy, final epoch, one view (%)")
    axes[0][-1].legend(fontsize=8, title="x: diverged", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

