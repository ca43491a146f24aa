"""The tuned comparison (tune_main.py --tune, tuned.py) without Ray: the choice of a learning rate, the stage a
resume continues from, the tuning flags' help, an l1 variant's own choice. (The real comparison:
tests/test_sweeps.py.)"""

import numpy as np
import pandas as pd
import pytest

import config
import experiments
import tune_main
import tuned


def tuning_frame(rows, n_val: int = 800) -> pd.DataFrame:
    """A tuning stage's final epochs: (variant, lr, weight decay, val acc %, val loss, diverged); a trial at acc %
    gets the first round(acc% of n_val) val images right, so a better configuration's right images hold a worse
    one's."""
    return pd.DataFrame([{"trial": f"{v}_{lr}_{wd}", "variant name": v, "peak lr": lr, "weight_decay": wd,
                          "test_acc_single": acc / 100, "test_loss": loss, "epoch": 5, "epochs": 5,
                          "diverged": bad, "health": "diverged: ..." if bad else "ok", "val_size": n_val,
                          experiments.CORRECT_KEY: experiments.packed_correct(
                              np.arange(n_val) < (0 if bad else round(acc / 100 * n_val)))}
                         for v, lr, wd, acc, loss, bad in rows])


def test_choice_skips_diverged_configurations_and_breaks_ties_on_validation_loss():
    df = tuning_frame([("bn", 0.4, 5e-4, np.nan, np.nan, True), ("bn", 0.1, 5e-4, 88.0, 0.40, False),
                       ("bn", 0.05, 5e-4, 88.0, 0.35, False), ("gn", 0.4, 5e-4, np.nan, np.nan, True)])
    chosen = tuned.choose(df, lr=0.05, weight_decay=5e-4)
    assert chosen["bn"]["lr"] == 0.05  # tie at 88.0%: the lower validation loss
    assert "2 of 3 configurations" in chosen["bn"]["evidence"]
    assert "gn" not in chosen  # every configuration diverged: the final stage runs gn at the recipe only
    variants = [{"name": "bn", "norm": "bn", "l1": 0.0}, {"name": "gn", "norm": "gn", "l1": 0.0}]
    final = tuned.final_variants(variants, chosen, lr=0.05, weight_decay=5e-4)
    assert [(v["name"], v["arm"], v.get("recipe_too", False)) for v in final] == [
        ("bn", "tuned", True), ("gn", "recipe", False)]
    other = tuned.final_variants(variants[:1], chosen, lr=0.1, weight_decay=5e-4)
    assert [(v["arm"], v["lr"]) for v in other] == [("tuned", 0.05), ("recipe", 0.1)]
    sensitivity = tuned.sensitivity(df).set_index("variant")
    assert np.isnan(sensitivity.loc["gn", "lr 0.4"]) and sensitivity.loc["bn", "lr 0.05"] == 88.0


def test_resume_finds_the_stage_to_continue_from_either_name(tmp_path, monkeypatch):
    """--resume --name takes the comparison's name or its tuning stage's: the tuning stage continues (or the
    final stage starts) until the final stage has started; then the final stage resumes as any sweep."""
    import sweep

    def experiment(name, started=True, **settings):
        experiments.claim(str(tmp_path / name), config.SweepConfig(name=name, variants="bn", **settings).to_launch())
        if started:
            (tmp_path / name / "experiment_state-2026.json").write_text("{}")

    ran = []
    monkeypatch.setattr(sweep, "run_stage", lambda stage, storage: ran.append((stage.stage, stage.name, stage.resume)) or 2)

    def resumed(name):
        ran.clear()
        tune_main.main(["--resume", "--storage-path", str(tmp_path), "--name", name])
        return ran[0]

    experiment("cmp-tuning", stage="tuning", final_name="cmp")
    assert resumed("cmp") == resumed("cmp-tuning") == ("tuning", "cmp-tuning", True)  # its trials are left
    experiment("cmp", stage="final", final_name="cmp", started=False)  # killed as it began
    assert resumed("cmp") == ("tuning", "cmp-tuning", True)
    (tmp_path / "cmp" / "experiment_state-2026.json").write_text("{}")
    assert resumed("cmp-tuning") == resumed("cmp") == ("final", "cmp", True)  # resumed as a plain sweep
    experiment("plain")
    assert resumed("plain") == ("", "plain", True)


def test_help_renders_and_names_the_tuning_flags(capsys):
    """argparse %-formats help strings: a bare '%' in one (the validation share) made --help raise."""
    with pytest.raises(SystemExit) as exit_:
        tune_main.main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--tune " in out and "(20% of the training images)" in out and "default: 0.0125,0.025,0.05,0.1,0.2,0.4" in out


def test_an_l1_variant_gets_its_own_choice_and_a_saturated_split_an_honest_error():
    """choose keys a variant by its label with the lambda ("bn+l1 (λ=1e-05)"): final_variants once looked it up
    by the bare name and ran bn+l1 at the recipe, saying every configuration diverged (seen on the digits). And a
    configuration leaves the recipe only where it beat it beyond the val images' noise: bn+l1's 8 images more do
    (McNemar, Holm over the two), bn's 4 do not (the digits' tuned GroupNorm was chosen by one image)."""
    df = tuning_frame([("bn+l1 (λ=1e-05)", 0.2, 5e-5, 100.0, 0.30, False), ("bn+l1 (λ=1e-05)", 0.05, 5e-4, 99.0, 0.35, False),
                       ("bn", 0.1, 5e-4, 99.5, 0.31, False), ("bn", 0.05, 5e-4, 99.0, 0.33, False)])
    chosen = tuned.choose(df, lr=0.05, weight_decay=5e-4)
    l1 = chosen["bn+l1 (λ=1e-05)"]
    assert l1["lr"] == 0.2 and "beat the recipe's 99.00%" in l1["evidence"]
    assert chosen["bn"]["lr"] == 0.05 and "kept the recipe (99.00%)" in chosen["bn"]["evidence"]
    assert "±0.12 SE on 800 val images" in chosen["bn+l1 (λ=1e-05)"]["evidence"]  # 100%: as if 1 of 800 were wrong, not ±0.00
    variants = [{"name": "bn", "norm": "bn", "l1": 0.0}, {"name": "bn+l1", "norm": "bn", "l1": 1e-5}]
    final = tuned.final_variants(variants, chosen, lr=0.05, weight_decay=5e-4)
    assert [(v["name"], v["arm"], v["lr"]) for v in final] == [
        ("bn", "tuned", 0.05), ("bn+l1", "tuned", 0.2), ("bn+l1", "recipe", 0.05)]
