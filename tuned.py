"""The tuned comparison's protocol (`tune_main.py --tune`): stage 1, tuning, trains every variant at every point of
one grid of peak learning rates x weight decays, one seed, scored on VAL_FRACTION of the training split held out;
stage 2, final, trains each variant at its best configuration and at the shared recipe, N seeds, on the test split.
Per variant, because BatchNorm's main effect is to allow larger learning rates (Bjorck et al. 2018); equal budgets
on a validation split after Choi et al. 2019 and Dodge et al. 2019. Frames are analysis.results_frame's.
"""
import math

import pandas as pd

import comparisons
import experiments
import verdicts

VAL_FRACTION = 0.2  # of the training images held out to score the tuning stage
SUFFIX = "-tuning"  # the tuning stage's experiment: <name>-tuning beside the final stage's <name>
TUNED, RECIPE = "tuned", "recipe"  # the final stage's arms


def tuning_name(final_name: str) -> str:
    return final_name + SUFFIX


def val_size_for(n_train: int) -> int:
    """Validation images held out of n_train for the tuning stage (at least 1, at most n_train - 2)."""
    return min(max(1, round(VAL_FRACTION * n_train)), n_train - 2)


def configurations(df) -> pd.DataFrame:
    """Per tuning trial at its final epoch: variant, lr (peak), weight decay, one-view val acc (%), val loss, and the
    val images it got right (experiments.packed_correct); nan where it diverged, so it is never chosen."""
    last = df.loc[df.groupby("trial")["epoch"].idxmax()]
    return pd.DataFrame({"variant": last["variant name"], "lr": last["peak lr"], "weight decay": last["weight_decay"],
                         "val acc (%)": (100 * last["test_acc_single"]).where(~last["diverged"]),
                         "val loss": last["test_loss"].where(~last["diverged"]),
                         "correct": last[experiments.CORRECT_KEY]}).reset_index(drop=True)


def choose(df, lr: float, weight_decay: float) -> dict:
    """Per variant label ("bn+l1 (λ=1e-05)") the configuration its tuned arm runs: the best on validation (highest
    final one-view val accuracy, ties to the lower val loss, then the smaller lr) if it beat the shared recipe (lr,
    weight_decay) beyond the noise of the val images (McNemar's exact test, Holm over the variants, at
    comparisons.ALPHA), else the recipe: {"lr", "weight_decay", "val_acc", "evidence"}, the evidence saying which
    and why. One seed measures no seed noise, so a choice that passes can still be the seed's luck. A variant
    whose every configuration diverged is left out."""
    table = configurations(df).sort_values(["val acc (%)", "val loss", "lr"], ascending=[False, True, True])
    n_val, found, tested = int(df["val_size"].max()), {}, {}
    for name, rows in table.groupby("variant"):
        ok = rows.dropna(subset=["val acc (%)"])  # groupby keeps the sorted order within each variant
        if ok.empty:
            continue
        at_recipe = [math.isclose(r, lr) and math.isclose(w, weight_decay)
                     for r, w in zip(ok["lr"], ok["weight decay"])]
        found[name] = (ok, len(rows), ok[at_recipe].iloc[0] if any(at_recipe) else None)
        if any(at_recipe) and not at_recipe[0]:
            tested[name] = comparisons.mcnemar_exact(*(experiments.unpacked_correct(row["correct"])
                                                      for row in (ok.iloc[0], found[name][2])))
    holm = dict(zip(tested, verdicts.holm([t[2] for t in tested.values()])[1]))
    chosen = {}
    for name, (ok, n_configurations, recipe) in found.items():
        top = ok.iloc[0]
        evidence = [f"val {top['val acc (%)']:.2f}% at lr {top['lr']:g}, wd {top['weight decay']:g}"]
        if len(ok) > 1:
            second = ok.iloc[1]
            evidence.append(f"next {second['val acc (%)']:.2f}% (lr {second['lr']:g}, wd {second['weight decay']:g})")
        if n_val:  # binomial standard error; at 0% or 100% that of one image right or wrong, not 0
            p = min(max(top["val acc (%)"] / 100, 1 / n_val), 1 - 1 / n_val)
            evidence.append(f"±{100 * math.sqrt(p * (1 - p) / n_val):.2f} SE on {n_val} val images")
        evidence.append(f"{len(ok)} of {n_configurations} configurations trained without diverging")
        if recipe is None:
            evidence.append("the recipe's point is not in the grid (or diverged): the best is taken untested")
        elif name not in tested:
            evidence.append("the recipe scored best")
        elif holm[name] < comparisons.ALPHA:
            evidence.append(f"beat the recipe's {recipe['val acc (%)']:.2f}% (McNemar, Holm p {holm[name]:.2g})")
        else:
            evidence.append(f"kept the recipe ({recipe['val acc (%)']:.2f}%): the best was not better beyond the "
                            f"noise of the val images ({tested[name][0]} vs {tested[name][1]} images only one got "
                            f"right; McNemar, Holm p {holm[name]:.2g})")
            top = recipe
        chosen[name] = {"lr": float(top["lr"]), "weight_decay": float(top["weight decay"]),
                        "val_acc": float(top["val acc (%)"]), "evidence": "; ".join(evidence)}
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
