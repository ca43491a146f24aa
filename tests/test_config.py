"""Settings (config.py): bad input is refused up front in one line (exit 2, no Ray, no data, no directories),
defaults are defined once, and a launch's settings file reads back as the sweep it launched."""
import json
import re
import sys

import pytest

import config
import experiments
import train
import tune_main
from conftest import ROOT, make_idx_dir
from model import NORMS

# (program, flags, what its one-line message must say); each was accepted, or failed late inside Ray, before.
REFUSED = [
    ("tune", ["--batch-size", "0", "--epochs", "0"], "--epochs must be at least 1"),
    ("tune", ["--batch-size", "-5"], "--batch-size must be 'auto' or a number of images"),
    ("tune", ["--batch-size", "1"], "a batch of 1 image gives BatchNorm no batch statistics"),
    ("tune", ["--variants", "gn,bn+l1", "--batch-sizes", "1,2"], "--batch-sizes: a batch of 1 image gives BatchNorm no"),
    ("tune", ["--batch-sizes", "2,0"], "--batch-sizes must list whole numbers of images, e.g. 2,4,8,16,32, each once, got 2,0"),
    ("tune", ["--batch-sizes", "4,2,4"], "--batch-sizes must list whole numbers of images, e.g. 2,4,8,16,32, each once, got 4,2,4"),
    ("tune", ["--batch-sizes", "2,x"], "argument --batch-sizes: expected comma-separated whole numbers of images"),
    ("tune", ["--batch-size", "8", "--batch-sizes", "2,4"], "--batch-size 8 and --batch-sizes both given"),
    ("tune", ["--max-concurrent", "-1"], "--max-concurrent must be 0 (no cap) or more"),
    ("tune", ["--cpus-per-trial", "0"], "--cpus-per-trial must be more than 0"),
    ("tune", ["--gpus-per-trial", "-1"], "--gpus-per-trial must be 0 or more"),
    ("tune", ["--train-size", "-5"], "--train-size must be 0 (all images) or at least 2 images"),
    ("tune", ["--lr", "0"], "--lr must be a positive number"),
    ("tune", ["--lr", "nan"], "--lr must be a positive number"),
    ("tune", ["--l1", "0"], "--l1 must list lambdas above 0, each once, got 0"),
    ("tune", ["--variants", "bn,gn", "--l1", "1e-5", "1e-4"], "given but no variant uses it; add a +l1 variant"),
    ("tune", ["--variants", "bn,gn,bn"], "lists 'bn' twice"),
    ("tune", ["--l1", "1e-5", "1e-5"], "--l1 must list lambdas above 0, each once, got 1e-05,1e-05"),
    ("tune", ["--seeds", "0"], "--seeds must be at least 1"),
    ("tune", ["--groups", "3"], "groups=3 does not divide"),
    ("tune", ["--groups", "0"], "--groups must be at least 1"),
    ("tune", ["--variants", "gn+ws+l2"], "bad variant 'gn+ws+l2'; the grammar is NORM[+l1] with NORM one of bn, gn"),
    ("tune", ["--variants", "gn+ws", "--groups", "3"], "groups=3 does not divide"),
    ("tune", ["--variants", "in,gbn,bn+ws+l1", "--batch-size", "1"], "or drop the bn+ws/gbn variants"),
    ("tune", ["--smoke-test", "--train-size", "100"], "--train-size has no effect with --smoke-test"),
    ("tune", ["--no-ship-code"], "--no-ship-code has no effect without --address"),
    ("tune", ["--tune", "--val-size", "1000"], "--tune and --val-size 1000 both given"),
    ("tune", ["--tune", "--batch-sizes", "2,4"], "--tune and --batch-sizes both given"),
    ("tune", ["--tune-lrs", "0.1,-1"], "--tune-lrs must list positive learning rates"),
    ("tune", ["--tune-lrs", "0.1,0.1"], "--tune-lrs must list positive learning rates, e.g. 0.025,0.05, each once, got"),
    ("tune", ["--tune-weight-decays=-1e-4"], "--tune-weight-decays must list weight decays of 0 or more, each once"),
    ("tune", ["--tune-weight-decays", ","], "--tune-weight-decays must list weight decays of 0 or more, each once, got "
                                             "nothing"),
    ("tune", ["--val-size", "-1"], "--val-size must be 0 (evaluate on test) or more images, got -1"),
    ("tune", ["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1"),
    ("tune", ["--name", "a/b"], "--name must be one directory name"),
    ("tune", ["--margin", "100"], "--margin must be a number of points in (0, 100), got 100"),
    ("tune", ["--batch-size", "x"], "argument --batch-size: expected 'auto' or a whole number of images, got 'x'"),
    ("train", ["--batch-size", "1"], "a batch of 1 image gives BatchNorm no batch statistics"),
    ("train", ["--l1", "-1"], "--l1 must be 0 (off) or a positive lambda"),
    ("train", ["--norm", "xn"], "unknown norm 'xn'"),
    ("train", ["--model", "nonet"], "unknown model 'nonet'"),
    ("train", ["--order", "sideways"], "argument --order: invalid choice: 'sideways'"),
]
MAINS = {"tune": tune_main.main, "train": train.main}


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("program, flags, message", REFUSED, ids=[f"{p} {' '.join(f)}" for p, f, _ in REFUSED])
def test_bad_input_is_one_line_before_anything_starts(program, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the checks"))
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray raises ImportError: it must not be reached
    storage = tmp_path / "results"
    extra = ["--storage-path", str(storage)] if program == "tune" else []
    assert _exit_code(MAINS[program], flags + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert message in err, err
    assert not storage.exists()  # no directory made for a refused launch


def _documented_rows():
    """(flags, message) of the bad-input table, on whichever page of the docs holds it."""
    page = next(p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                if "# Bad input and the message it gets" in p.read_text())
    table = page.read_text().split("# Bad input and the message it gets", 1)[1]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        flags, message = (re.fullmatch(r"`([^`]+)`", c) for c in cells[:2]) if len(cells) >= 2 else (None, None)
        if flags and message and message.group(1).startswith("error: ") and "<" not in message.group(1):
            yield flags.group(1), message.group(1)


def test_the_documented_bad_input_table_is_what_users_see(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    rows = list(_documented_rows())
    assert len(rows) >= 12
    for flags, message in rows:
        assert _exit_code(tune_main.main, flags.split() + ["--storage-path", str(tmp_path / "r")]) == 2, flags
        assert capsys.readouterr().err.strip() == message, flags


def test_auto_and_sensible_values_pass():
    for flags in ([], ["--batch-size", "auto", "--train-size", "2", "--batch-size", "2", "--variants", "bn,bn+l1",
                       "--l1", "1e-5", "1e-4", "--cpus-per-trial", "0.25", "--gpus-per-trial", "0"],
                  ["--variants", "gn,ln", "--batch-sizes", "1,2,4"],  # GN and LN normalise each image on its own
                  ["--variants", "in,gn+ws,gn+ws+l1", "--batch-size", "1"], ["--variants", ",".join(NORMS)]):
        config.check(tune_main.parse_args(flags)[0])
    config.check(config.TrialConfig(norm="ln", batch_size=1))
    assert tune_main.parse_args(["--batch-size", "auto"])[0].batch_size == 0


@pytest.mark.parametrize("main", [tune_main.parse_args, train.main], ids=["tune_main", "train"])
def test_help_groups_the_flags_and_lists_every_norm(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert {"everyday:", "the training recipe (shared by every variant):"} <= set(out.splitlines())
    assert f"one of {', '.join(NORMS)}" in " ".join(out.split())  # argparse wraps lines
    assert "at least 16 (default: auto)" in " ".join(out.split())  # --batch-size's default, 0, is 'auto'


def test_both_clis_default_to_the_trial_defaults():
    """What a sweep hands its trials without flags is TrialConfig's defaults (the grid's own keys aside)."""
    import sweep  # Ray

    dataset = train.data_lib.Dataset("x", *[train.torch.zeros(4000, 28, 28, dtype=train.torch.uint8),
                                            train.torch.zeros(4000, dtype=train.torch.long)] * 2, tuple("0123456789"))
    space = sweep.param_space(tune_main.parse_args([])[0], dataset)
    defaults = config.TrialConfig().as_dict()
    assert {k: space[k] for k in defaults if k not in ("norm", "l1", "threads", "seed", "batch_size")} == \
        {k: v for k, v in defaults.items() if k not in ("norm", "l1", "threads", "seed", "batch_size")}
    assert space["batch_size"] == config.batch_size_for(4000) == 32


def test_a_launch_file_reads_back_as_the_sweep_and_a_resume_ignores_todays_recipe(tmp_path, capsys):
    launched, _ = tune_main.parse_args(["--val-size", "500", "--label-smoothing", "0", "--seeds", "2",
                                        "--batch-sizes", "8,16", "--l1", "1e-4", "--cpus-per-trial", "1"])
    launch = json.loads(json.dumps(launched.to_launch()))  # as the file holds it
    assert config.SweepConfig().from_launch(launch) == config.SweepConfig(**{**launched.as_dict(), "cpus_per_trial": None})
    axes = config.grid_axes(launched)
    assert [len(v) for v in axes.values()] == [4, 2, 2]  # bn, gn, ln, bn+l1 at 1e-4; two batch sizes; two seeds
    with pytest.raises(config.UsageError, match="another version of normsweep"):
        config.SweepConfig().from_launch({k: v for k, v in launch.items() if k != "format"})

    import sweep  # Ray

    experiment = tmp_path / "old"
    experiments.claim(str(experiment), launch)
    today, given = tune_main.parse_args(["--resume", "--name", "old", "--val-size", "100", "--label-smoothing", "0.2"])
    resumed = sweep.prepare(today, given, str(tmp_path))
    assert (resumed.val_size, resumed.label_smoothing, resumed.seeds) == (500, 0, 2)
    assert "ignoring today's --label-smoothing 0.2, --val-size 100" in capsys.readouterr().out


def test_a_val_size_that_leaves_too_few_training_images_is_one_line(tmp_path, capsys, monkeypatch):
    directory = make_idx_dir(tmp_path / "idx", n_train=64)
    monkeypatch.setattr(train, "TrainingRun", lambda *a, **k: pytest.fail("a run built for a refused split"))
    assert train.main(["--dataset", str(directory), "--val-size", "63"]) == 2
    assert capsys.readouterr().err == "error: --val-size 63 leaves 1 of the 64 training images to train on; " \
                                      "hold out at most 62\n"


@pytest.mark.parametrize("per_trial, cluster, message", [
    ({"cpu": 0.5, "gpu": 1}, {"CPU": 2}, "the Ray cluster has no GPUs"),
    ({"cpu": 1, "gpu": 2}, {"CPU": 8, "GPU": 1}, "the Ray cluster has 1 GPUs"),
    ({"cpu": 4, "gpu": 0}, {"CPU": 2}, "the Ray cluster has 2 CPUs"),
])
def test_resources_the_cluster_cannot_give_are_refused(per_trial, cluster, message):
    import sweep  # Ray

    with pytest.raises(config.UsageError, match=message):
        sweep.check_resources(per_trial, cluster)
    sweep.check_resources({"cpu": 0.5, "gpu": 0.25}, {"CPU": 2, "GPU": 1})


def test_half_made_experiment_is_not_the_latest(tmp_path, capsys):
    """A launch that died before Tune saved state is skipped by a bare --resume, and named plainly."""
    good, half = tmp_path / "good", tmp_path / "half"
    for experiment in (good, half):
        experiment.mkdir()
        (experiment / experiments.LAUNCH_FILE).write_text(json.dumps(config.SweepConfig(variants="bn").to_launch()))
    (good / "experiment_state-2025.json").write_text("{}")
    assert experiments.latest_started(str(tmp_path)) == "good"
    assert tune_main.main(["--resume", "--storage-path", str(tmp_path), "--name", "half"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was launched but Tune never saved its state" in err and "\n" not in err
