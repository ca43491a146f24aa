"""What a new user hits: unsafe checkpoints, a notebook with no results, Ray's internals hidden, the README's
commands, machine paths and stray files in the repository, Ctrl-C while loading. (Figures and the report of
a smoke experiment: tests/test_reports.py.)"""
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import matplotlib
import nbformat
import pytest
import torch
from ray import tune

import analysis
import config
import experiments
import train
import trainable
from conftest import HANG_SECONDS, ROOT

matplotlib.use("Agg")


class Payload:
    """Unpickling this calls open(path, "w"): a file appears if the loader runs pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path):
    live = tmp_path / "live"
    torch.save({"model": Payload(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)["model"].close()  # the payload is real: an unsafe load runs it
    assert live.exists()

    marker = tmp_path / "pwned"
    directory = tmp_path / "checkpoint_000000"
    directory.mkdir()
    torch.save({"model": Payload(marker), "net_config": {}, "config": {}}, directory / trainable.CHECKPOINT_FILE)
    for load in (lambda: train.load_checkpoint(directory / trainable.CHECKPOINT_FILE),
                 lambda: train.model_from_checkpoint(directory / trainable.CHECKPOINT_FILE),
                 lambda: trainable.model_from_result_checkpoint(tune.Checkpoint.from_directory(directory))):
        with pytest.raises(train.CheckpointError) as refused:
            load()
        assert "\n" not in str(refused.value) and "not a normsweep checkpoint" in str(refused.value)
        assert not marker.exists()


def test_notebook_without_results_says_so_in_one_sentence(tmp_path):
    with pytest.raises(experiments.ExperimentError, match="no experiment under .*; run `python tune_main.py --smoke-test` first"):
        analysis.latest_experiment(tmp_path / "results")
    notebook = nbformat.read(ROOT / "analysis.ipynb", as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code").source
    assert "analysis.latest_experiment(" in first and "max(" not in first


def _tracked():
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_repository_holds_no_machine_paths_duplicates_or_ignored_files():
    tracked = _tracked()
    if not tracked:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert not ignored, f".gitignore matches tracked files: {ignored}"
    digests = {}
    for name in tracked:
        path = ROOT / name
        if path.is_file():
            digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(name)
    assert not [names for names in digests.values() if len(names) > 1]
    assert "/work/" not in (ROOT / "docs/results/summary.md").read_text()


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_internals_are_hidden_unless_verbose(verbose, tmp_path, monkeypatch, capfd):
    """From ray.init on: the default quiets Ray's loggers, keeps workers' output off the console and drops the log
    lines Ray's C++ core writes to the driver's stderr (under Ray 2.52 on a loaded machine, a metrics agent it could
    not reach broke a one-line error); our messages and other native output still show."""
    import ray

    import console
    import tune_main
    from conftest import make_idx_dir

    calls = []

    class Stop(Exception):
        pass

    def init(**kwargs):
        calls.append(kwargs)
        os.write(2, METRICS_AGENT_LINE)
        os.write(2, b"a line another library wrote\n")
        print("ours", file=sys.stderr)
        raise Stop

    monkeypatch.setattr(console, "quiet_ray", lambda: calls.append("quiet"))
    monkeypatch.setattr(ray, "init", init)
    flags = ["--dataset", str(make_idx_dir(tmp_path / "idx")), "--variants", "bn", "--epochs", "1",
             "--storage-path", str(tmp_path / "results")] + (["--verbose"] if verbose else [])
    with pytest.raises(Stop):
        tune_main.main(flags)
    assert ("quiet" in calls) is not verbose
    assert calls[-1]["log_to_driver"] is verbose
    err = capfd.readouterr().err
    # pytest's capture writes "ours" and its newline apart, on its own descriptor: the forwarded line may land between
    assert "a line another library wrote\n" in err.replace("ours", "") and "ours" in err, err
    assert (METRICS_AGENT_LINE.decode() in err) is verbose, err


METRICS_AGENT_LINE = (b"[2026-12-04 12:32:31,266 E 24215 24331] core_worker_process.cc:837: Failed to establish "
                      b"connection to the metrics exporter agent. Metrics will not be exported.\n")


@pytest.mark.parametrize("line, shown", [
    (METRICS_AGENT_LINE, False),
    (b"[2026-12-04 12:32:31,866 W 2200 2200] rpc_client.h:153: Failed to connect to GCS at address 10.0.0.1:6379 "
     b"within 5 seconds.\n", False),  # each refused try to join a cluster
    (b"[2026-12-04 12:32:31,866 F 2200 2200] core_worker.cc:90: Check failed: a fatal line\n", True),
    (b"1/0: no newline", True),
])
def test_only_rays_native_log_lines_are_dropped(line, shown, capfd):
    import console

    with console.native_ray_logs_dropped():
        os.write(2, line)
        sys.stderr.write("ours\n")  # straight to the terminal: it may come first
    os.write(2, b"[2026-12-04 12:33:00,000 E 1 1] after.cc:1: after the block\n")
    err = capfd.readouterr().err
    assert (line.decode() in err) is shown and "ours\n" in err and err.endswith("after the block\n"), err


def _bash_blocks(text):
    return [block.split("```", 1)[0] for block in text.split("```bash")[1:]]


class Parsed(Exception):
    """Raised instead of running a program once its flags have parsed."""


def test_readme_leads_with_the_smoke_test_and_its_commands_are_the_clis(monkeypatch, capsys):
    """The README's first commands: the smoke test before the 80-minute sweep; and every tune_main.py,
    train.py and analysis.py command in its bash blocks parses with that program's own parser."""
    import argparse

    import tune_main

    blocks = _bash_blocks("".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]))
    commands = [line for line in blocks[0].splitlines() if "tune_main.py" in line]
    assert "--smoke-test" in commands[0] and "--dataset fashion-mnist" in commands[1]

    def parse_only(parser, argv=None, namespace=None):
        raise Parsed(parse_args(parser, argv, namespace))

    parse_args = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    programs = {"tune_main.py": tune_main.main, "train.py": train.main, "analysis.py": analysis.main}
    checked = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #", 1)[0])
            if len(words) >= 2 and words[0] == ".venv/bin/python" and words[1] in programs:
                argv = [w.replace("<", "").replace(">", "") for w in words[2:]]  # results/<name>: a placeholder
                with pytest.raises(Parsed):
                    programs[words[1]](argv)
                checked.append(line)
    assert len(checked) >= 10, checked
    assert "error" not in capsys.readouterr().err


def test_train_py_help_shows_every_default_and_the_run_prints_percentages(idx_dir, capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    options = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:", 1)[1])
    helps = {block.split()[0].rstrip(","): " ".join(block.split()) for block in options if block.strip()}
    for flag, key in (("--norm", "norm"), ("--epochs", "epochs"), ("--lr", "lr"), ("--seed", "seed"),
                      ("--dataset", "dataset"), ("--groups", "groups"), ("--weight-decay", "weight_decay"),
                      ("--label-smoothing", "label_smoothing"), ("--threads", "threads"), ("--l1", "l1")):
        default = getattr(config.TrialConfig, key)
        assert (f"(default: {default:g}" if isinstance(default, float) else f"(default: {default}") in helps[flag], helps[flag]
    assert train.main(["--dataset", str(idx_dir), "--epochs", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    # percentages, as tune_main.py prints them (was "acc 0.1094"); and the thread count the numbers depend on
    assert re.fullmatch(r"epoch  1  train loss \d+\.\d{4} acc \d+\.\d\d%  test loss \d+\.\d{4} acc \d+\.\d\d% "
                        r"\(one view \d+\.\d\d%\)  lr \d\.\d{4}  [\d,]+ img/s  threads 1", out[1]), out
    assert re.fullmatch(r"best test acc \d+\.\d\d% at epoch 1", out[2]), out


def test_notebook_cells_have_ids():
    """nbformat warned (MissingIDFieldWarning) on every read of a notebook with id-less cells."""
    raw = json.loads((ROOT / "analysis.ipynb").read_text())
    assert (raw["nbformat"], raw["nbformat_minor"]) >= (4, 5) and all("id" in cell for cell in raw["cells"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbformat.validate(nbformat.read(ROOT / "analysis.ipynb", as_version=4))


INTERRUPT_AT_IMPORT = """
import os, runpy, signal, sys

class InterruptAtImport:  # a meta path finder that only watches: SIGINT once, as {module!r} starts to load
    fired = False

    def find_spec(self, name, path=None, target=None):
        if name == {module!r} and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the test runner set
sys.meta_path.insert(0, InterruptAtImport())
sys.argv = ["tune_main.py", "--resume", "--storage-path", {storage!r}]
runpy.run_path("tune_main.py", run_name="__main__")
"""


@pytest.mark.parametrize("module", ["numpy", "ray"])
def test_ctrl_c_while_loading_ends_the_process_with_its_one_line(module, tmp_path):
    """A Ctrl-C as numpy loads comes inside torch's C code, which swallows the exception raised: the line was
    printed, then the sweep ran on a half-loaded numpy and its summary crashed. The line now ends the process,
    until main has imported Ray too (`ray`). Had the process gone on, --resume would have found nothing (exit 2)."""
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT.format(module=module, storage=str(tmp_path))],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert (done.returncode, done.stderr) == (130, "interrupted before the sweep started; nothing was saved\n"), done
