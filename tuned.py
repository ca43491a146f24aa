"""The tuned comparison's protocol (`tune_main.py --tune`): stage 1, tuning, trains every variant at every point of
one grid of peak learning rates x weight decays, one seed, scored on VAL_FRACTION of the training split held out;
stage 2, final, trains each variant at its best configuration and at the shared recipe, N seeds, on the test split.
Per variant, because BatchNorm's main effect is to allow larger learning rates (Bjorck et al. 2018); equal budgets
on a validation split after Choi et al. 2019 and Dodge et al. 2019. Frames are analysis.results_frame's.
"""
import math

import pandas as pd

import experiments

VAL_FRACTION = 0.2  # of the training images held out to score the tuning stage
SUFFIX = "-tuning"  # the tuning stage's experiment: <name>-tuning beside the final stage's <name>
TUNED, RECIPE = "tuned", "recipe"  # the final stage's arms


def tuning_name(final_name: str) -> str:
    return final_name + SUFFIX


def val_size_for(n_train: int) -> int:
    """Validation images held out of n_train for the tuning stage (at least 1, at most n_train - 2)."""
    return min(max(1, round(VAL_FRACTION * n_train)), n_train - 2)


def configurations(df) -> pd.DataFrame:
    """Per tuning trial at its final epoch: variant, lr (peak), weight decay, one-view val acc (%), val loss; nan
    where it diverged, so it is never chosen."""
    last = df.loc[df.groupby("trial")["epoch"].idxmax()]
    return pd.DataFrame({"variant": last["variant name"], "lr": last["peak lr"], "weight decay": last["weight_decay"],
                         "val acc (%)": (100 * last["test_acc_single"]).where(~last["diverged"]),
                         "val loss": last["test_loss"].where(~last["diverged"])}).reset_index(drop=True)


def choose(df) -> dict:
    """Per variant label ("bn+l1 (λ=1e-05)") the configuration a tuning stage chose: the highest final one-view
    val accuracy, ties to the lower val loss, then the smaller lr: {"lr", "weight_decay", "val_acc", "evidence"}
    (winner, runner-up, the split's binomial SE). A variant whose every configuration diverged is left out."""
    table = configurations(df).sort_values(["val acc (%)", "val loss", "lr"], ascending=[False, True, True])
    n_val, chosen = int(df["val_size"].max()), {}
    for name, rows in table.groupby("variant"):
        ok = rows.dropna(subset=["val acc (%)"])  # groupby keeps the sorted order within each variant
        if ok.empty:
            continue
        best = ok.iloc[0]
        evidence = [f"val {best['val acc (%)']:.2f}% at lr {best['lr']:g}, wd {best['weight decay']:g}"]
        if len(ok) > 1:
            second = ok.iloc[1]
            evidence.append(f"next {second['val acc (%)']:.2f}% (lr {second['lr']:g}, wd {second['weight decay']:g})")
        if n_val:  # binomial standard error; at 0% or 100% that of one image right or wrong, not 0
            p = min(max(best["val acc (%)"] / 100, 1 / n_val), 1 - 1 / n_val)
            evidence.append(f"±{100 * math.sqrt(p * (1 - p) / n_val):.2f} SE on {n_val} val images")
        evidence.append(f"{len(ok)} of {len(rows)} configurations trained without diverging")
        chosen[name] = {"lr": float(best["lr"]), "weight_decay": float(best["weight decay"]),
                        "val_acc": float(best["val acc (%)"]), "evidence": "; ".join(evidence)}
    return chosen


def final_variants(variants: list, chosen: dict, lr: float, weight_decay: float) -> list:
    """The final stage's variant dicts: per variant its tuned configuration (arm TUNED) and the shared recipe (arm
    RECIPE); one trial, TUNED with "recipe_too", where they coincide; the recipe only where nothing was chosen."""
    out = []
    for variant in variants:
        pick = chosen.get(experiments.variant_label({"variant": variant}))  # choose's keys: "bn+l1 (λ=1e-05)"
        recipe = {**variant, "lr": lr, "weight_decay": weight_decay, "arm": RECIPE,
                  "evidence": "the shared recipe (--lr, --weight-decay)"}
        if pick is None:
            out.append({**recipe, "evidence": "the shared recipe: every tuning configuration diverged"})
            continue
        same = math.isclose(pick["lr"], lr) and math.isclose(pick["weight_decay"], weight_decay)
        out += [{**variant, "lr": pick["lr"], "weight_decay": pick["weight_decay"], "arm": TUNED,
                 "evidence": pick["evidence"], "recipe_too": same}] + ([] if same else [recipe])
    return out


def sensitivity(df) -> pd.DataFrame:
    """Validation accuracy (%), a row per variant and weight decay, a column per lr (nan: diverged)."""
    wide = configurations(df).pivot_table(index=["variant", "weight decay"], columns="lr", values="val acc (%)",
                                          aggfunc="first", dropna=False)
    wide.columns = [f"lr {lr:g}" for lr in wide.columns]
    wide = wide.reset_index()
    return wide.assign(**{"weight decay": wide["weight decay"].map("{:g}".format)})  # 5e-05, not a rounded 0.00
