"""A real tuned comparison (Ray on the 2-core machine): its tuning stage scored on validation images, the final
stage over seeds on the test split, a resume from between the stages, its report and the notebook. (Plain sweeps:
tests/test_sweeps.py; the tuning stage's choices without Ray: tests/test_tuning.py.)"""
import shutil

import pytest

import analysis
import config
import experiments
import tune_main
import tuned
from conftest import ROOT, on_session_ray

pytestmark = pytest.mark.slow  # every test reads or resumes a real tuned comparison (Ray)

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


def test_tuning_stage_scores_validation_images_and_picks_the_sane_lr(comparison):
    grid, df = analysis.load_experiment(comparison / "cmp-tuning")
    assert len(grid) == 4 and not grid.errors  # 2 variants x 2 learning rates x 1 weight decay, one seed
    assert set(df["seed"]) == {0}
    assert (df["val_size"] == tuned.val_size_for(config.SMOKE["train_size"])).all()
    table = tuned.configurations(df).set_index(["variant", "lr"])
    for norm in ("bn", "gn"):
        assert table.loc[(norm, 0.05), "val acc (%)"] > table.loc[(norm, ABSURD_LR), "val acc (%)"] + 20
    chosen = tuned.choose(df, lr=0.05, weight_decay=5e-4)  # the recipe: --lr and --weight-decay's defaults
    assert {name: c["lr"] for name, c in chosen.items()} == {"bn": 0.05, "gn": 0.05}
    assert "val images" in chosen["bn"]["evidence"]


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
    assert arms["verdict"].str.startswith("equivalent").all()  # the same trials: identical on every image


def test_resume_crosses_from_a_finished_tuning_stage_to_the_final_stage(comparison, tmp_path, session_ray):
    storage = tmp_path / "results"
    shutil.copytree(comparison / "cmp-tuning", storage / "cmp-tuning")  # killed after tuning, before the final stage
    before = {p: p.read_bytes() for p in (storage / "cmp-tuning").rglob("result.json")}
    assert tune_main.main(["--resume", "--storage-path", str(storage)]) == 0  # the latest: the comparison
    assert {p: p.read_bytes() for p in (storage / "cmp-tuning").rglob("result.json")} == before  # not re-run
    grid, df = analysis.load_experiment(storage / "cmp")
    assert len(grid) == 4 and df.groupby("trial")["epoch"].max().eq(1).all()
    assert tune_main.main(["--resume", "--storage-path", str(storage)]) == 2  # both stages done: nothing to resume


def test_report_has_the_sensitivity_figure_choices_and_verdicts(comparison, tmp_path):
    written = analysis.write_report(str(comparison / "cmp"), tmp_path / "report")
    names = {p.name for p in written}
    assert {"lr_sensitivity.png", "summary.md", "test_acc.png"} <= names
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Tuned comparison" in summary and "## Tuning stage" in summary
    assert "Verdicts per pair" in summary and "Holm" in summary and "Welch" not in summary
    assert "Tuned configuration against the shared recipe" in summary
    tuning_report = analysis.write_report(str(comparison / "cmp-tuning"), tmp_path / "tuning_report")
    assert {p.name for p in tuning_report} == {"lr_sensitivity.png", "summary.md"}


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
