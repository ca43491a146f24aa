"""The tuned comparison (tune_main.py --tune, tuned.py): the tuning stage picks a learning rate that is
visibly better when another candidate is absurd, scores only validation images, and the final stage
runs the choice and the shared recipe over seeds on the test split; a resume crosses the stages; the
report shows the sensitivity figure and the paired statistics."""
import shutil

import numpy as np
import pandas as pd
import pytest

import analysis
import config
import experiments
import tune_main
import tuned
from conftest import ROOT, on_session_ray

ABSURD_LR = 1e-6  # an epoch at this peak learning rate leaves the net near chance


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """A real tuned comparison on the smoke-test subset of Fashion-MNIST: bn and gn, lr 0.05 or absurd, 1 epoch."""
    storage = tmp_path_factory.mktemp("results")
    with on_session_ray():
        code = tune_main.main(["--tune", "--smoke-test", "--variants", "bn,gn", "--tune-lrs", f"0.05,{ABSURD_LR:g}",
                               "--tune-weight-decays", "5e-4", "--seeds", "2", "--epochs", "1", "--storage-path",
                               str(storage), "--name", "cmp", "--cpus-per-trial", "1"])
    assert code == 0
    return storage


@pytest.mark.slow  # a real tuned comparison (Ray)
def test_tuning_stage_scores_validation_images_and_picks_the_sane_lr(comparison):
    grid, df = analysis.load_experiment(comparison / "cmp-tuning")
    assert len(grid) == 4 and not grid.errors  # 2 variants x 2 learning rates x 1 weight decay, one seed
    assert set(df["seed"]) == {0}
    assert (df["val_size"] == tuned.val_size_for(config.SMOKE["train_size"])).all()
    table = tuned.configurations(df).set_index(["variant", "lr"])
    for norm in ("bn", "gn"):
        assert table.loc[(norm, 0.05), "val acc (%)"] > table.loc[(norm, ABSURD_LR), "val acc (%)"] + 20
    chosen = tuned.choose(df)
    assert {name: c["lr"] for name, c in chosen.items()} == {"bn": 0.05, "gn": 0.05}
    assert "val images" in chosen["bn"]["evidence"]


@pytest.mark.slow  # a real tuned comparison (Ray)
def test_final_stage_runs_each_choice_over_seeds_on_the_test_split(comparison):
    grid, df = analysis.load_experiment(comparison / "cmp")
    launch = experiments.read_launch(str(comparison / "cmp"))
    assert launch["stage"] == "final" and launch["final_name"] == "cmp"
    # the choice is the recipe's lr and weight decay: one trial per variant and seed, counted in both arms
    assert len(grid) == 4 and not grid.errors
    assert sorted((r.config["variant"]["name"], r.config["seed"]) for r in grid) == [
        ("bn", 0), ("bn", 1), ("gn", 0), ("gn", 1)]
    assert all(r.config["variant"]["lr"] == 0.05 and r.config["variant"]["recipe_too"] for r in grid)
    assert (df["val_size"] == 0).all()  # scored on the test split
    assert set(df["variant"]) == {"bn, tuned", "bn, recipe", "gn, tuned", "gn, recipe"}
    arms = analysis.comparison_tables(grid, df)["tuned vs recipe"]
    assert (arms["verdict"] == "identical on every seed").all()


@pytest.mark.slow  # a real tuned comparison (Ray)
def test_resume_crosses_from_a_finished_tuning_stage_to_the_final_stage(comparison, tmp_path, session_ray):
    storage = tmp_path / "results"
    shutil.copytree(comparison / "cmp-tuning", storage / "cmp-tuning")  # killed after tuning, before the final stage
    before = {p: p.read_bytes() for p in (storage / "cmp-tuning").rglob("result.json")}
    assert tune_main.main(["--resume", "--storage-path", str(storage)]) == 0  # the latest: the comparison
    assert {p: p.read_bytes() for p in (storage / "cmp-tuning").rglob("result.json")} == before  # not re-run
    grid, df = analysis.load_experiment(storage / "cmp")
    assert len(grid) == 4 and df.groupby("trial")["epoch"].max().eq(1).all()
    assert tune_main.main(["--resume", "--storage-path", str(storage)]) == 2  # both stages done: nothing to resume


@pytest.mark.slow  # a real tuned comparison (Ray)
def test_report_has_the_sensitivity_figure_choices_and_paired_tests(comparison, tmp_path):
    written = analysis.write_report(str(comparison / "cmp"), tmp_path / "report")
    names = {p.name for p in written}
    assert {"lr_sensitivity.png", "summary.md", "test_acc.png"} <= names
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Tuned comparison" in summary and "## Tuning stage" in summary
    assert "paired t-test" in summary and "Holm" in summary and "Welch" not in summary
    assert "Tuned configuration against the shared recipe" in summary
    tuning_report = analysis.write_report(str(comparison / "cmp-tuning"), tmp_path / "tuning_report")
    assert {p.name for p in tuning_report} == {"lr_sensitivity.png", "summary.md"}


def tuning_frame(rows) -> pd.DataFrame:
    """A tuning stage's final epochs: (variant, lr, weight decay, val acc %, val loss, diverged)."""
    return pd.DataFrame([{"trial": f"{v}_{lr}_{wd}", "variant name": v, "peak lr": lr, "weight_decay": wd,
                          "test_acc_single": acc / 100, "test_loss": loss, "epoch": 5, "epochs": 5,
                          "diverged": bad, "health": "diverged: ..." if bad else "ok", "val_size": 800}
                         for v, lr, wd, acc, loss, bad in rows])


def test_choice_skips_diverged_configurations_and_breaks_ties_on_validation_loss():
    df = tuning_frame([("bn", 0.4, 5e-4, np.nan, np.nan, True), ("bn", 0.1, 5e-4, 88.0, 0.40, False),
                       ("bn", 0.05, 5e-4, 88.0, 0.35, False), ("gn", 0.4, 5e-4, np.nan, np.nan, True)])
    chosen = tuned.choose(df)
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


@pytest.mark.slow  # a real tuned comparison (Ray)
def test_notebook_shows_the_tuned_comparison(comparison):
    """analysis.ipynb on a final stage: the sensitivity figure, the choices and the paired tables, no error."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NORMSWEEP_EXPERIMENT", str(comparison / "cmp"))
        NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    text = "".join(str(out.get("data", {}).get("text/plain", "")) + out.get("text", "") for out in outputs)
    assert "tuned vs recipe" in text and "val images" in text  # the paired tables and the choices
    tuning_cell = next(cell for cell in notebook.cells if "analysis.plot_sensitivity" in cell.source)
    assert any("image/png" in out.get("data", {}) for out in tuning_cell.outputs)


def test_resume_finds_the_stage_to_continue_from_either_name(tmp_path, monkeypatch):
    """--resume --name takes the comparison's name or its tuning stage's: the tuning stage continues (or the
    final stage starts) until the final stage has started; then the final stage resumes as any sweep."""
    import sweep

    def experiment(name, started=True, **settings):
        (tmp_path / name).mkdir()
        experiments.write_launch(str(tmp_path / name), config.SweepConfig(name=name, variants="bn", **settings).to_launch())
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
    by the bare name and ran bn+l1 at the recipe, saying every configuration diverged (seen on the digits)."""
    df = tuning_frame([("bn+l1 (λ=1e-05)", 0.2, 5e-5, 100.0, 0.30, False), ("bn+l1 (λ=1e-05)", 0.05, 5e-4, 99.0, 0.35, False),
                       ("bn", 0.1, 5e-4, 99.5, 0.31, False), ("bn", 0.05, 5e-4, 99.0, 0.33, False)])
    chosen = tuned.choose(df)
    assert chosen["bn+l1 (λ=1e-05)"]["lr"] == 0.2
    assert "±0.12 SE on 800 val images" in chosen["bn+l1 (λ=1e-05)"]["evidence"]  # 100%: as if 1 of 800 were wrong, not ±0.00
    variants = [{"name": "bn", "norm": "bn", "l1": 0.0}, {"name": "bn+l1", "norm": "bn", "l1": 1e-5}]
    final = tuned.final_variants(variants, chosen, lr=0.05, weight_decay=5e-4)
    assert [(v["name"], v["arm"], v["lr"]) for v in final] == [
        ("bn", "tuned", 0.1), ("bn", "recipe", 0.05), ("bn+l1", "tuned", 0.2), ("bn+l1", "recipe", 0.05)]
