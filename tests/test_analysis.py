"""The analysis without a sweep: one-line refusals, the README's worked example against torch, figures and
tables of synthetic results, the tracked notebook. (Reading a real experiment: tests/test_reports.py.)"""
import io
import json
import re
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
from torch import nn

import analysis
from model import GhostBatchNorm2d, WSConv2d, norm_layer
from conftest import ROOT

matplotlib.use("Agg")


def test_not_an_experiment_is_one_line(tmp_path, capsys):
    assert analysis.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a Ray Tune experiment directory" in err and "\n" not in err


def _readme_example():
    text = (ROOT / "docs/norms.md").read_text()
    block = re.search(r"<!-- worked-example -->(.*?)<!-- /worked-example -->", text, re.S).group(1)
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        numbers = [[float(v) for v in cell.split(",")] for cell in cells[2:]]
        rows[cells[0]] = dict(zip(("means", "variances", "normalised", "parameters"), numbers))
    return rows


def test_readme_worked_example_matches_torch():
    x = torch.arange(32.0).reshape(2, 4, 2, 2)
    ws_conv = WSConv2d(4, 2, 2, bias=False)  # x read as its weight: 2 output channels, 4 input, 2x2
    with torch.no_grad():
        ws_conv.weight.copy_(x)
    layers = {"bn": nn.BatchNorm2d(4).train(), "ln": nn.GroupNorm(1, 4), "gn": nn.GroupNorm(2, 4),
              "in": norm_layer("in")(4), "gbn": GhostBatchNorm2d(4, virtual_batch=1).train()}
    pooled = {"bn": x.transpose(0, 1).reshape(4, -1), "ln": x.reshape(2, -1), "gn": x.reshape(4, -1),
              "in": x.reshape(8, -1), "gbn": x.reshape(8, -1), "ws": x.reshape(2, -1)}
    normalised = {norm: layer(x)[0, 0] for norm, layer in layers.items()}
    normalised["ws"] = ws_conv.standardized_weight()[0, 0]
    parameters = {norm: sum(p.numel() for p in layer.parameters()) for norm, layer in layers.items()}
    parameters["ws"] = 0  # the conv's own weight, standardised: WS adds no parameter
    readme = _readme_example()
    assert set(readme) == set(pooled)
    for norm, row in readme.items():
        assert torch.allclose(pooled[norm].mean(1), torch.tensor(row["means"]))
        assert torch.allclose(pooled[norm].var(1, unbiased=False), torch.tensor(row["variances"]))
        assert torch.allclose(normalised[norm].flatten(), torch.tensor(row["normalised"]), atol=1e-3)
        assert parameters[norm] == row["parameters"][0]
    # and the layer norm our `ln` stands for: same output as nn.LayerNorm over (C, H, W)
    assert torch.allclose(layers["ln"](x), nn.LayerNorm([4, 2, 2])(x), atol=1e-5)
    assert sum(p.numel() for p in nn.LayerNorm([4, 2, 2]).parameters()) == 32


# --- names, numbers and figures as a user reads them (fast: no Ray) ---

@pytest.mark.parametrize("name, shown", [
    ("caf\udce9", r"caf\xe9"),  # a latin-1 folder name as os.listdir decodes it (surrogateescape)
    (r"caf\xe9", r"caf\xe9"),  # data.py's printable form of the same name stays as it is
    ("price $5", r"price \$5"),  # sibling: mathtext's dollar
    ("a$b$c_^", r"a\$b\$c_^"),
    ("$x^$", r"\$x^\$"),  # unescaped, an unparsable formula: matplotlib raised at draw time
    ("two\nlines\x07", r"two\nlines\x07"),
])
def test_any_class_name_reaches_a_figure_and_a_table_verbatim(name, shown):
    assert analysis.printable(name) == shown
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    sample = {"classes": [name, "ok"], "indices": [0, 1], "images": images, "true": [0, 1], "pred": [1, 0],
              "confidence": [0.5, 0.5], "variant": name, "epoch": 1, "acc": 0.5}
    fig = analysis.plot_misclassified(sample)
    fig.savefig(io.BytesIO(), format="png")  # drawing is where matplotlib raised
    assert fig.axes[0].get_title().startswith(f"true: {shown}\n")
    table = analysis._markdown(pd.DataFrame({"class": pd.Series([name + "|"], dtype=object), "n": [1]}))
    assert f"| {shown}\\| " in table and "\n" not in table.splitlines()[-1]


def test_a_grayscale_tile_is_drawn_as_stored_and_a_perfect_variant_says_none_misclassified():
    """An image folder's bright strokes on black were drawn dark on white (gray_r), each image stretched to its own
    range; a variant with nothing misclassified got a blank figure."""
    images = torch.tensor([[[[0, 64], [128, 192]]]], dtype=torch.uint8)
    sample = {"classes": ["a", "b"], "indices": [0], "images": images, "true": [0], "pred": [1], "confidence": [0.5],
              "variant": "gn", "epoch": 1, "acc": 0.5}
    drawn = analysis.plot_misclassified(sample).axes[0].images[0]
    assert drawn.get_cmap().name == "gray" and drawn.get_clim() == (0, 255)
    perfect = analysis.plot_misclassified({**sample, "indices": [], "images": images[:0], "true": [], "pred": [],
                                           "confidence": [], "acc": 1.0})
    assert [t.get_text() for t in perfect.axes[0].texts] == ["no test image misclassified"]


def test_report_numbers_are_formatted_as_read():
    table = pd.DataFrame({"comparison": ["a − b", "a − c", "b − c"], "difference (points)": [1.234, float("nan"), 0.5],
                          "McNemar p": [8.59e-16, 0.012345, float("nan")], "Holm p": [0.0009999, 0.037, 1.0]})
    shown = analysis.formatted(table)
    assert shown["McNemar p"].tolist() == ["<0.001", "0.0123", "-"]  # was "0.00": a tie with a p of 1e-3
    assert shown["Holm p"].tolist() == ["<0.001", "0.037", "1"]
    assert shown["difference (points)"].tolist() == ["1.23", "-", "0.50"]
    assert "0.00 " not in analysis._markdown(table)


def curve_frame(epochs=1, variants=("bn", "gn", "a long variant name that once sat over the curves")):
    """A results_frame of one seed per variant, `epochs` epochs."""
    rows = [{"trial": f"{v}_seed0", "variant": v, "seed": 0, "epoch": e, "epochs": epochs, "data": "", "model": "small",
             "dataset": "fashion-mnist", "val_size": 0, "diverged": False, "health": "ok", "test_acc": 0.5 + i / 10,
             "test_acc_single": 0.5 + i / 10, "test_loss": 1.0 - i / 10, "train_acc": 0.5, "train_loss": 1.0}
            for i, v in enumerate(variants) for e in range(1, epochs + 1)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("epochs", [1, 3])
def test_curves_tick_whole_epochs_and_their_legend_covers_no_curve(epochs):
    fig = analysis.plot_curves(curve_frame(epochs), "test_acc")
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks  # --epochs 1 ticked 0.945 ... 1.050
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1 and fig.bbox.contains(legend.x1 - 1, legend.y0 + 1)  # beside the axes, in the figure


def test_the_pooling_figure_shows_every_built_in_norm(tmp_path):
    """Documentation, drawn by a script: every norm of model.REGISTRY (it showed 3 of the 8)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import norm_pooling
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from model import NORMS

    assert list(norm_pooling.LAYOUTS) == list(NORMS)
    norm_pooling.main(tmp_path / "pooling.png")
    assert (tmp_path / "pooling.png").stat().st_size > 10_000
    assert not hasattr(analysis, "plot_norm_pooling")  # not part of reading results


def test_the_tracked_notebook_holds_no_outputs_and_shows_tables_as_the_report():
    notebook = json.loads((ROOT / "analysis.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    assert ".ipynb_checkpoints/" in (ROOT / ".gitignore").read_text().split()  # what jupyter lab leaves
    for cell in code:  # every table through analysis.formatted: "<0.001" and "-", not 8.59e-16 and NaN
        source = "".join(cell["source"])
        for call in ("summary(", "comparison_tables(", "sensitivity(", "rank_agreement(", "batch_size_table("):
            assert call not in source or "analysis.formatted(" in source, source


def test_headless_notebook_of_a_mistyped_experiment_is_one_line(tmp_path, capsys):
    assert analysis.main([str(tmp_path / "typo"), "--notebook"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a Ray Tune experiment directory" in err, err
    assert not (tmp_path / "typo").exists()
    with pytest.raises(SystemExit) as refused:  # the data flags are the report's
        analysis.main([str(tmp_path), "--notebook", "--dataset", str(tmp_path)])
    assert refused.value.code == 2 and "apply to the report" in capsys.readouterr().err


def _experiment_on_disk(root: Path, trials: dict) -> Path:
    """An experiment as Tune and normsweep leave it: trials = {name: (result.json text, progress.csv text)}."""
    import config
    import experiments

    root.mkdir(parents=True)
    (root / experiments.LAUNCH_FILE).write_text(json.dumps(config.SweepConfig(variants="bn", epochs=2).to_launch()))
    (root / "experiment_state-2026.json").write_text("{}")
    for name, (result, progress) in trials.items():
        (root / name).mkdir()
        (root / name / "result.json").write_text(result)
        if progress:
            (root / name / "progress.csv").write_text(progress)
    return root


def test_an_experiment_with_no_epoch_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """Issue 25, item 28: Ray's "Failed to fetch metrics" (7 lines) came before the one line. Sibling: a trial whose
    result.json was emptied while progress.csv holds its epoch has an epoch, so it is read (with Ray)."""
    monkeypatch.setitem(sys.modules, "ray.tune", None)  # importing Ray's Tune raises ImportError
    none = _experiment_on_disk(tmp_path / "none", {"bn_seed0_1": ("", ""), "gn_seed0_2": ("", "")})
    assert analysis.main([str(none)]) == 2
    assert capsys.readouterr().err == (f"error: {none} holds no reported epochs yet; wait for the first epoch or check "
                                       f"the trials' errors\n")
    cut = _experiment_on_disk(tmp_path / "cut", {"bn_seed0_1": ("", "epoch,health,test_acc\n1,ok,0.5\n")})
    with pytest.raises(ImportError):
        analysis.load_experiment(cut)


def _result(trial: Path):
    from ray.tune import Result

    config = {"variant": {"name": "bn", "norm": "bn", "l1": 0.0}, "seed": 0, "lr": 0.05, "batch_size": 32,
              "epochs": 2, "dataset": "fashion-mnist", "val_size": 0}
    return Result(metrics={"config": config}, checkpoint=None, error=None, path=str(trial), metrics_dataframe=None)


def test_results_frame_reads_every_epoch_reported(tmp_path):
    """Issue 25, item 24: a result.json emptied by an interrupted resume while progress.csv holds epoch 1: the
    analysis (and the CLI's table, which reads the same frame) has that epoch. Sibling: result.json holding more
    epochs than progress.csv is what is read."""
    experiment = _experiment_on_disk(tmp_path / "cut", {
        "bn_seed0_1": ("", "epoch,health,test_acc\n1,ok,0.5\n"),
        "bn_seed1_2": ("".join(json.dumps({"epoch": e, "health": "ok", "test_acc": e / 4}) + "\n" for e in (1, 2)),
                       "epoch,health,test_acc\n1,ok,0.25\n")})
    grid = type("Grid", (list,), {"experiment_path": str(experiment)})(map(_result, sorted(experiment.glob("bn_*"))))
    df = analysis.results_frame(grid)
    assert df.groupby("trial")["test_acc"].apply(list).to_dict() == {"bn_seed0_1": [0.5], "bn_seed1_2": [0.25, 0.5]}


def test_a_partial_report_of_a_running_experiment_does_not_say_resume():
    """Issue 25, item 22: a running sweep's partial report said "Resume it with tune_main.py --resume", and a
    resume then broke the experiment. Sibling: once no run holds it, it says how to resume."""
    table = pd.DataFrame([{"variant": "bn", "epochs in": "1", "planned epochs": 2, "complete": False}])
    holder = "another run (pid 42 on host, since 2026-12-04 05:00:00)"
    running = analysis.progress_note(table, running=holder)
    assert running.endswith(f"(epochs in, per variant: bn 1 of 2). It is still running ({holder}).")
    assert "--resume" not in running
    assert analysis.progress_note(table).endswith("Resume it with tune_main.py --resume.")
    # with the experiment's place: a bare --resume finds only the latest experiment under ./results
    assert analysis.progress_note(table, experiment="/data/my runs/int1").endswith(
        "Resume it with tune_main.py --resume --storage-path '/data/my runs' --name int1.")
    assert analysis.progress_note(table, experiment="s3://b/r/int1?region=eu-west-1").endswith(
        "Resume it with tune_main.py --resume --storage-path 's3://b/r?region=eu-west-1' --name int1.")
    assert analysis.progress_note(table.assign(complete=True), running=holder) == ""


@pytest.mark.parametrize("seconds, shown", [(159, "159 s"), (599, "599 s"), (600, "10 min"), (1930, "32 min")])
def test_wall_time_of_a_short_stage_is_not_0_min(seconds, shown):
    """Issue 25, item 28: "this final stage took 0 min" for a 159 s run."""
    df = pd.DataFrame({"timestamp": [1000.0 + seconds / 2, 1000.0 + seconds], "time_this_iter_s": [seconds / 2] * 2})
    assert analysis.wall_time(df) == shown


def test_a_tuning_stage_is_headed_with_its_validation_images():
    """Issue 25, item 28: a validation-scored tuning stage was headed "1,000 train / 500 test". Sibling: a
    --train-size tuning stage said "every test image"."""
    smoke = {"smoke_test": True, "train_size": 1000, "test_size": 500}
    assert analysis.data_subset({**smoke, "stage": "tuning"}) == (
        "smoke-test subset: 1,000 train images, 200 of them held out for validation")
    assert analysis.data_subset({**smoke, "stage": "final"}) == "smoke-test subset: 1,000 train images, 500 test images"
    assert analysis.data_subset({"train_size": 4000, "stage": "tuning"}) == (
        "--train-size subset: 4,000 train images, 800 of them held out for validation")
    assert analysis.data_subset({"train_size": 4000, "val_size": 500}) == (
        "--train-size subset: 4,000 train images, 500 of them held out for validation")


def test_gbn_at_a_batch_no_larger_than_its_ghost_batch_is_said_to_be_bn():
    """Issue 25, item 28: gbn at a batch of 16 or less is bn trained twice. Sibling: gbn at 32, or bn at 16, says
    nothing."""
    df = pd.DataFrame({"norm": ["gbn", "gbn", "gbn", "bn"], "batch_size": [16, 8, 32, 16]})
    assert analysis.ghost_note(df) == ("gbn at batch 8, 16 is bn: its ghost batches of 16 images need a larger batch "
                                       "to differ from it.")
    assert analysis.ghost_note(df[df["batch_size"] > 16]) == analysis.ghost_note(df[df["norm"] == "bn"]) == ""
