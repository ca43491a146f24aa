"""The analysis reads an experiment: report files, misclassified grids, README's numbers (the notebook:
tests/test_rough_edges.py runs the README's headless command)."""
import itertools
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import analysis
import data as data_lib
import train
import trainable
from model import GhostBatchNorm2d, WSConv2d, norm_layer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(smoke_experiment):
    return analysis.load_experiment(smoke_experiment)


def test_tidy_frame_has_one_row_per_trial_and_epoch(loaded):
    grid, df = loaded
    assert len(grid) == 4 and len(df) == 8
    assert sorted(df["variant"].unique()) == ["bn", "bn+l1 (λ=1e-05)", "gn", "ln"]
    assert set(trainable.METRICS) | {"trial", "norm", "l1", "seed", "dataset", "epochs"} <= set(df.columns)
    assert df.groupby("trial")["epoch"].apply(list).tolist() == [[1, 2]] * 4


def test_cli_report_writes_every_file(smoke_experiment, tmp_path):
    out = tmp_path / "report"
    assert analysis.main([str(smoke_experiment), "--out", str(out)]) == 0
    expected = {"test_loss.png", "test_acc.png", "train_loss.png", "train_acc.png",
                "summary.md", "misclassified_bn.png", "misclassified_gn.png", "misclassified_ln.png",
                "misclassified_bn_l1_1e_05.png"}
    assert {p.name for p in out.iterdir()} == expected
    summary = (out / "summary.md").read_text()
    assert "McNemar" in summary and "![test accuracy](test_acc.png)" in summary  # one seed: McNemar's test
    assert re.search(r"^\| bn +\|", summary, re.M)  # the summary table's row


def test_not_an_experiment_is_one_line(tmp_path, capsys):
    assert analysis.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a Ray Tune experiment directory" in err and "\n" not in err


def test_misclassified_tiles_are_the_models_own_mistakes(loaded, fashion):
    grid, df = loaded
    for variant in df["variant"].unique():
        sample = analysis.misclassified(grid, df, variant, dataset=fashion)
        assert len(sample["indices"]) == 10
        assert torch.equal(sample["images"], fashion.test_images[sample["indices"]])
        assert torch.equal(sample["true"], fashion.test_labels[sample["indices"]])
        # the model's predictions, recomputed here from its best checkpoint
        result = next(r for r in grid if Path(r.path).name == sample["trial"])
        model, state = trainable.model_from_result_checkpoint(
            result.get_best_checkpoint(trainable.BEST_METRIC, trainable.BEST_MODE))
        assert train.uses_test_flip(state["config"], fashion.augment)  # scored as image + mirror
        with torch.no_grad():
            x = data_lib.to_input(sample["images"], **state["input_stats"])
            probs = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
        assert torch.equal(probs.argmax(1), sample["pred"])
        assert (sample["pred"] != sample["true"]).all()
        assert torch.allclose(probs.max(1).values, sample["confidence"], atol=1e-5)
        fig = analysis.plot_misclassified(sample)
        titles = [ax.get_title() for ax in fig.axes]
        for title, true, pred in zip(titles, sample["true"], sample["pred"]):
            assert title.startswith(f"true: {fashion.classes[true]}\npred: {fashion.classes[pred]} (")
        assert variant in fig._suptitle.get_text()


def test_summary_and_noise_tests(loaded):
    grid, df = loaded
    table = analysis.summary(df)
    assert len(table) == 4 and (table["parameters"] < 20_000).all()
    # one seed: no seed noise to measure, so McNemar's test on the test images of the final checkpoints
    tables = analysis.comparison_tables(grid, df)
    assert set(tables) == {"mcnemar"} and len(tables["mcnemar"]) == 6 and tables["mcnemar"]["McNemar p"].notna().all()
    final = analysis.final_per_trial(df).set_index("variant")["test_acc_single"]
    assert (tables["mcnemar"]["difference (points)"] >= 0).all()  # the better variant first
    # the checkpoints re-scored agree with what the trials reported (within an image of 500 each, 0.2 points:
    # the analysis runs on another thread count)
    assert sorted(tables["mcnemar"]["difference (points)"]) == pytest.approx(sorted(
        100 * abs(final[a] - final[b]) for a, b in itertools.combinations(final.index, 2)), abs=0.41)
    offsets = {variant: 0.001 * i for i, variant in enumerate(sorted(df["variant"].unique()))}
    shifted = df.assign(seed=1, trial=df["trial"] + "_copy",
                        test_acc_single=df["test_acc_single"] + df["variant"].map(offsets))
    paired = analysis.comparison_tables(grid, pd.concat([df, shifted]))["paired"]
    assert paired["paired t p"].notna().all() and len(paired) == 6


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


def test_readme_tensorboard_instruction_reads_the_experiment(smoke_experiment):
    """The README's `tensorboard --logdir results/<name>`: tensorboard (installed by requirements.txt)
    finds every trial's epochs in the experiment directory."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    assert "tensorboard --logdir results/<name>" in (ROOT / "docs/usage.md").read_text()
    runs = EventMultiplexer().AddRunsFromDirectory(str(smoke_experiment))
    runs.Reload()
    scalars = {run: runs.Scalars(run, "ray/tune/test_acc") for run in runs.Runs()}
    assert len(scalars) == 4 and all(len(points) == 2 for points in scalars.values())
