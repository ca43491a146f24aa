"""Bad input is refused up front: one line, exit 2, no Ray, no data loading, no directories."""
import re
import sys
from pathlib import Path

import pytest

import checks
import experiments
import train
import tune_main
from model import NORMS

ROOT = Path(__file__).resolve().parents[1]

# (flags, what the one-line message must say); each was accepted, or failed late inside Ray, before.
REFUSED = [
    (["--batch-size", "0", "--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "-5"], "--batch-size must be 'auto' or a number of images"),
    (["--batch-size", "1"], "a batch of 1 image gives BatchNorm no batch statistics"),
    (["--variants", "gn,bn+l1", "--batch-sizes", "1,2"], "--batch-sizes: a batch of 1 image gives BatchNorm no"),
    (["--batch-sizes", "2,0"], "--batch-sizes must list distinct whole numbers of images, 1 or more"),
    (["--batch-sizes", "4,2,4"], "--batch-sizes must list distinct whole numbers"),
    (["--batch-sizes", "2,x"], "argument --batch-sizes: expected comma-separated whole numbers of images"),
    (["--batch-size", "8", "--batch-sizes", "2,4"], "--batch-size 8 and --batch-sizes both given"),
    (["--max-concurrent", "-1"], "--max-concurrent must be 0 (no cap) or more"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be more than 0"),
    (["--cpus-per-trial", "-1"], "--cpus-per-trial must be more than 0"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial must be 0 or more"),
    (["--train-size", "-5"], "--train-size must be 0 (all images) or at least 2 images"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--l1", "0"], "--l1 lambdas must be > 0"),
    (["--variants", "bn,gn", "--l1", "1e-5", "1e-4"], "given but no variant uses it; add a +l1 variant"),
    (["--variants", "bn,gn,bn"], "lists 'bn' twice"),
    (["--l1", "1e-5", "1e-5"], "--l1 lists a lambda twice"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--groups", "3"], "groups=3 does not divide"),
    (["--variants", "bn,xn"], "bad variant 'xn'"),
    (["--variants", "gn+ws+l2"], "bad variant 'gn+ws+l2'; the grammar is NORM[+l1] with NORM one of bn, gn, ln, in, gbn"),
    (["--variants", "gn+ws", "--groups", "3"], "groups=3 does not divide"),
    (["--variants", "in,gbn,bn+ws+l1", "--batch-size", "1"], "or drop the bn+ws/gbn variants"),
    (["--smoke-test", "--train-size", "100"], "--train-size has no effect with --smoke-test"),
    (["--no-ship-code"], "--no-ship-code has no effect without --address"),
    (["--tune", "--val-size", "1000"], "--tune and --val-size 1000 both given"),
    (["--val-size", "-1"], "--val-size must be 0 (evaluate on test) or more images, got -1"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1"),
    (["--batch-size", "x"], "argument --batch-size: expected 'auto' or a whole number of images, got 'x'"),  # argparse's own errors are one line too
]


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_tune_main_refuses_before_anything_starts(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune_main.data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the checks"))
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray raises ImportError: it must not be reached
    storage = tmp_path / "results"
    assert _exit_code(tune_main.main, flags + ["--storage-path", str(storage)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert message in err, err
    assert not storage.exists()  # no directory made for a refused launch


TRAIN_REFUSED = [
    (["--batch-size", "0", "--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "1"], "a batch of 1 image gives BatchNorm no batch statistics"),
    (["--batch-size", "-5"], "--batch-size must be 'auto' or a number of images"),
    (["--l1", "-1"], "--l1 must be 0 (off) or a positive lambda"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--train-size", "-5"], "--train-size must be 0"),
    (["--norm", "xn"], "unknown norm 'xn'"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--model", "nonet"], "unknown model 'nonet'"),
]


@pytest.mark.parametrize("flags, message", TRAIN_REFUSED, ids=[" ".join(f) for f, _ in TRAIN_REFUSED])
def test_train_py_shares_the_checks_and_the_exit_status(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(train.data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the checks"))
    assert train.main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message in err, err


def _readme_rows():
    text = (ROOT / "docs/guarantees.md").read_text()
    table = text.split("## Bad input and the message it gets", 1)[1]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        flags, message = (re.fullmatch(r"`([^`]+)`", c) for c in cells[:2]) if len(cells) >= 2 else (None, None)
        if flags and message and message.group(1).startswith("error: ") and "<" not in message.group(1):
            yield flags.group(1), message.group(1)


def test_readme_bad_input_table_is_what_users_see(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    rows = list(_readme_rows())
    assert len(rows) >= 12
    for flags, message in rows:
        assert _exit_code(tune_main.main, flags.split() + ["--storage-path", str(tmp_path / "r")]) == 2, flags
        assert capsys.readouterr().err.strip() == message, flags


def test_auto_and_sensible_values_pass():
    checks.check_settings(vars(tune_main.parse_args([])))
    checks.check_settings(vars(tune_main.parse_args(["--batch-size", "auto", "--train-size", "2", "--batch-size", "2",
                                                      "--variants", "bn,bn+l1", "--l1", "1e-5", "1e-4",
                                                      "--cpus-per-trial", "0.25", "--gpus-per-trial", "0"])))
    assert tune_main.parse_args(["--batch-size", "auto"]).batch_size == 0
    # GroupNorm and LayerNorm normalise each image on its own: a batch of 1 is theirs to take
    checks.check_settings(vars(tune_main.parse_args(["--variants", "gn,ln", "--batch-sizes", "1,2,4"])))
    checks.check_settings({"norm": "ln", "batch_size": 1})  # train.py's keys
    checks.check_settings(vars(tune_main.parse_args(["--variants", "in,gn+ws,gn+ws+l1", "--batch-size", "1"])))
    checks.check_settings(vars(tune_main.parse_args(["--variants", ",".join(NORMS)])))


@pytest.mark.parametrize("main", [tune_main.parse_args, train.main], ids=["tune_main", "train"])
def test_help_lists_every_norm(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"one of {', '.join(NORMS)}" in text


@pytest.mark.parametrize("per_trial, cluster, message", [
    ({"cpu": 0.5, "gpu": 1}, {"CPU": 2}, "the Ray cluster has no GPUs"),
    ({"cpu": 1, "gpu": 2}, {"CPU": 8, "GPU": 1}, "the Ray cluster has 1 GPUs"),
    ({"cpu": 4, "gpu": 0}, {"CPU": 2}, "the Ray cluster has 2 CPUs"),
])
def test_resources_the_cluster_cannot_give_are_refused(per_trial, cluster, message):
    with pytest.raises(checks.UsageError, match=message):
        checks.check_resources(per_trial, cluster)
    checks.check_resources({"cpu": 0.5, "gpu": 0.25}, {"CPU": 2, "GPU": 1})


def test_half_made_experiment_is_not_the_latest(tmp_path, capsys):
    """A launch that died before Tune saved state is skipped by a bare --resume, and named plainly."""
    good, half = tmp_path / "good", tmp_path / "half"
    for experiment in (good, half):
        experiment.mkdir()
        (experiment / experiments.LAUNCH_FILE).write_text('{"variants": "bn", "seeds": 1, "epochs": 2}')
    (good / "experiment_state-2025.json").write_text("{}")
    assert experiments.latest_started(str(tmp_path)) == "good"
    assert tune_main.main(["--resume", "--storage-path", str(tmp_path), "--name", "half"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was launched but Tune never saved its state" in err and "\n" not in err
