"""One settings schema (settings.py) for both CLIs: the flags they share are the same flags, the defaults are
the trial's defaults, the range checks come from the schema, and tune_main.py takes the recipe flags
(--val-size, --label-smoothing) into its trials' config."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ray.tune.search.variant_generator import generate_variants

import checks
import data as data_lib
import settings
import train
import tune_main
from conftest import make_idx_dir

ROOT = Path(__file__).resolve().parents[1]
# The flags both CLIs must take (issue 18: ten of them were defined twice, and tune_main.py lacked the last two).
SHARED_FLAGS = {"--dataset", "--data-dir", "--model", "--groups", "--epochs", "--batch-size", "--lr", "--weight-decay",
                "--precision", "--compile", "--no-test-flip", "--train-size", "--val-size", "--label-smoothing"}
PROGRAMS = {"train.py": train.main, "tune_main.py": tune_main.parse_args}
# Same name, another meaning: train.py's one L1 lambda (0 = off), tune_main.py's lambdas for its +l1 variants.
ONE_NAME_TWO_FLAGS = {"--l1"}


def _help(main, capsys) -> dict:
    """flag -> its --help entry (whitespace normalised: argparse wraps by the flag's width)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    options = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:", 1)[1])
    return {block.split()[0].rstrip(","): " ".join(block.split()[1:]) for block in options if block.strip()}


class Parsed(Exception):
    """Raised instead of running a program once its flags have parsed."""


def _parsed(main, argv, monkeypatch) -> dict:
    """The namespace train.main's parser makes of argv (train.main does not return it)."""
    def parse_only(parser, args=None, namespace=None):
        raise Parsed(parse_args(parser, args, namespace))

    parse_args = argparse.ArgumentParser.parse_args
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with pytest.raises(Parsed) as parsed:
            main(argv)
    return vars(parsed.value.args[0])


def test_shared_flags_have_one_help_and_one_default(capsys, monkeypatch):
    helps = {name: _help(main, capsys) for name, main in PROGRAMS.items()}
    shared = set(helps["train.py"]) & set(helps["tune_main.py"]) - {"-h"} - ONE_NAME_TWO_FLAGS
    assert SHARED_FLAGS <= shared, SHARED_FLAGS - shared
    drifted = {flag: (helps["train.py"][flag], helps["tune_main.py"][flag]) for flag in shared
               if helps["train.py"][flag] != helps["tune_main.py"][flag]}
    assert not drifted, drifted
    defaults = {"train.py": _parsed(train.main, [], monkeypatch), "tune_main.py": vars(tune_main.parse_args([]))}
    dests = {setting.flag: dest for dest, setting in settings.SETTINGS.items()}
    for flag in shared:
        assert defaults["train.py"][dests[flag]] == defaults["tune_main.py"][dests[flag]], flag
    assert "(default: 0.1)" in helps["tune_main.py"]["--label-smoothing"]  # %(default)s filled in


def test_what_the_clis_run_without_flags_is_train_defaults(monkeypatch):
    """train.DEFAULTS is the schema's defaults, and each CLI without flags hands a trial exactly those."""
    assert train.DEFAULTS == {k: s.default for k, s in settings.SETTINGS.items() if s.config}
    parsed = _parsed(train.main, [], monkeypatch)
    unset = {"lr_reference_batch", "momentum"}  # no flag: the recipe's constants
    assert {k: parsed[k] for k in train.DEFAULTS if k not in unset} == \
        {k: v for k, v in train.DEFAULTS.items() if k not in unset}
    space = tune_main.param_space(tune_main.parse_args([]))
    per_trial = {"norm", "l1", "seed", "threads", "data_dir"}  # the grid's, the trial's CPUs, a resolved path
    assert {k: space[k] for k in train.DEFAULTS if k not in per_trial} == \
        {k: v for k, v in train.DEFAULTS.items() if k not in per_trial}
    assert space["data_dir"] == str(Path(train.DEFAULTS["data_dir"]).resolve())


@pytest.mark.parametrize("dest", [d for d, s in settings.SETTINGS.items() if s.range], ids=str)
def test_range_checks_come_from_the_schema(dest):
    setting = settings.SETTINGS[dest]
    allowed = setting.range
    outside = allowed.low if allowed.low_open else allowed.low - 1
    with pytest.raises(checks.UsageError) as refused:
        checks.check_settings({dest: outside})
    assert str(refused.value) == f"{setting.flag} must be {allowed.what}, got {outside:g}"
    with pytest.raises(checks.UsageError):
        checks.check_settings({dest: float("nan")})
    if allowed.high < float("inf"):
        with pytest.raises(checks.UsageError, match=re.escape(f"{setting.flag} must be {allowed.what}")):
            checks.check_settings({dest: allowed.high})
    inside = allowed.low + (0.5 if allowed.low_open else 0)
    checks.check_settings({dest: inside})  # the boundary (or just above an open one) passes


def test_val_size_and_label_smoothing_reach_the_trials_and_a_resume_keeps_them():
    args = tune_main.parse_args(["--val-size", "500", "--label-smoothing", "0", "--weight-decay", "0", "--seeds", "2"])
    trials = [spec for _, spec in generate_variants(tune_main.param_space(args))]
    assert len(trials) == 8
    assert all(t["val_size"] == 500 and t["label_smoothing"] == 0 and t["weight_decay"] == 0 for t in trials)
    # --resume takes them from the launch, and says so of today's different flags
    today = tune_main.parse_args(["--resume", "--val-size", "100", "--label-smoothing", "0.2"])
    notes = tune_main.resume_notes(today, vars(args))
    assert "ignoring today's --label-smoothing 0.2, --val-size 100" in notes, notes


def test_tune_main_val_size_reads_a_directory_without_test_files(tmp_path):
    directory = make_idx_dir(tmp_path / "train-only", n_train=48, n_test=8)
    for stem in data_lib.SPLIT_FILES["test"]:
        (directory / (stem + ".gz")).unlink()
    dataset = tune_main.load_data(tune_main.parse_args(["--dataset", str(directory), "--val-size", "16"]))
    assert len(dataset.train_labels) == 48
    with pytest.raises(data_lib.DataError, match="no test split"):
        tune_main.load_data(tune_main.parse_args(["--dataset", str(directory)]))


def test_a_val_size_that_leaves_too_few_training_images_is_one_line(idx_dir, capsys, monkeypatch):
    monkeypatch.setattr(train, "TrainingRun", lambda *a, **k: pytest.fail("a run built for a refused split"))
    assert train.main(["--dataset", str(idx_dir), "--val-size", "63"]) == 2
    assert capsys.readouterr().err == "error: --val-size 63 leaves 1 of the 64 training images to train on; " \
                                      "hold out at most 62\n"
    checks.check_val_size(62, 64)


@pytest.mark.parametrize("flags, message", [
    (["--val-size", "-1"], "error: --val-size must be 0 (evaluate on test) or more images, got -1"),
    (["--label-smoothing", "1"], "error: --label-smoothing must be in [0, 1), got 1"),
    (["--tune", "--val-size", "5000"], "error: --tune and --val-size 5000 both given; the tuning stage holds out its "
                                       "own validation split and the final stage scores on the test split, drop "
                                       "--val-size"),
], ids=["val-size", "label-smoothing", "tune"])
def test_tune_main_refuses_a_bad_recipe_flag_in_one_line(flags, message, tmp_path):
    storage = tmp_path / "results"
    done = subprocess.run([sys.executable, "tune_main.py", *flags, "--storage-path", str(storage)], cwd=ROOT,
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, message + "\n")
    assert not storage.exists()
