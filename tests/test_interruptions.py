"""Experiments interrupted, resumed, moved or damaged, through real sweeps (Ray on the 2-core machine):
SIGTERM to the driver or its process group treated as Ctrl-C, a full storage, a resume from a checkpoint the
driver did not take in, an experiment copied or moved (and its dataset read back from anywhere), one damaged;
and the same on cloud storage: a real S3-compatible server (moto's server mode on localhost), interrupted
with Ctrl-C, resumed and analysed from the URI.
"""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest

import analysis
import cluster
import config
import data as data_lib
import errors
import experiments
import train
import tune_main
import tuned
from conftest import HANG_SECONDS, ROOT, launch_until, make_idx_dir, reported, wait_for

pytestmark = pytest.mark.slow  # every test runs a real sweep (Ray)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """An S3 endpoint on localhost; yields the environment every S3 client (boto3, pyarrow) reads."""
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, server, "moto_server listening")
    yield env
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def bucket(s3_server, monkeypatch, request):
    """A fresh bucket, with the S3 environment set in this process (and so in the Ray it starts)."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name, client


def _keys(client, bucket: str, prefix: str = "") -> list:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Random idx files, 256 training and 64 test images: these tests are of interruptions and resumes, not learning
    (real data: the smoke sweep's tests), and an epoch of them takes a fraction of a second."""
    return make_idx_dir(tmp_path_factory.mktemp("data") / "tiny", n_train=256, n_test=64)


def sweep_command(data: Path, storage, name: str, *flags: str) -> list:
    """tune_main.py on `data`: bn and gn, 2 epochs, one trial at a time (gn waits, never started, until bn is done)
    on 1 CPU; then `flags`, which win."""
    return [sys.executable, str(ROOT / "tune_main.py"), "--dataset", str(data), "--variants", "bn,gn", "--epochs", "2",
            "--max-concurrent", "1", "--cpus-per-trial", "1", "--storage-path", str(storage), "--name", name, *flags]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 300 KB file system (as root), too small for one epoch's checkpoints; skipped where mounting is refused."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_relative_dataset_directory_is_read_back_from_anywhere(tmp_path, monkeypatch, session_ray):
    """The launch saves the directory absolute: the analysis and --resume work from another directory."""
    launch_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    make_idx_dir(launch_dir / "data" / "tiny", n_train=64, n_test=32)
    elsewhere.mkdir()
    monkeypatch.chdir(launch_dir)
    assert tune_main.main(["--dataset", "data/tiny", "--data-dir", "downloads", "--variants", "gn", "--epochs", "1",
                           "--cpus-per-trial", "1", "--storage-path", "results", "--name", "rel"]) == 0
    launch = experiments.read_launch(str(launch_dir / "results" / "rel"))
    assert launch["dataset"] == str(launch_dir / "data" / "tiny")
    assert launch["data_dir"] == str(launch_dir / "downloads")
    monkeypatch.chdir(elsewhere)
    grid, df = analysis.load_experiment(launch_dir / "results" / "rel")
    assert len(analysis.misclassified(grid, df, "gn", n=3)["indices"]) == 3  # re-reads the dataset directory
    assert tune_main.main(["--resume", "--storage-path", str(launch_dir / "results"), "--name", "rel"]) == 0


def test_sigterm_saves_state_like_ctrl_c_and_exits_143(tiny_data, tmp_path, capsys, session_ray):
    storage, name = tmp_path / "results", "terminated"
    command = sweep_command(tiny_data, storage, name)
    # the driver writes result.json once it has taken the epoch's report in, its checkpoint with it
    driver = launch_until(command, reported(storage / name), "the first reported epoch", cwd=ROOT)
    driver.send_signal(signal.SIGTERM)  # what timeout(1), docker stop, scancel and preemption send
    out, err = driver.communicate(timeout=HANG_SECONDS)
    assert driver.returncode == 143, (out, err)
    assert "Traceback" not in out + err and "SIGTERM received" not in err and "*** " not in err, err
    lines = err.strip().splitlines()
    assert re.fullmatch(r"interrupted: [12] of 2 trials unfinished; state saved in .*", lines[-2]), err
    resume = shlex.split(lines[-1].removeprefix("resume with: "))
    assert tune_main.main(resume[2:] + ["--cpus-per-trial", "2"]) == 0  # the saved state finishes the sweep
    # a seed's numbers depend on the thread count: resuming with another one says so
    assert ("warning: the unfinished trials ran with 1 torch thread(s) and resume with 2" in capsys.readouterr().err)
    resumed = str(storage / name)
    assert experiments.trials_left(resumed, config.SweepConfig().from_launch(experiments.read_launch(resumed))) == 0
    # and each epoch's result records the count it ran with: the trial's CPUs, 1 before the signal, 2 after
    threads = [[json.loads(line)["threads"] for line in path.read_text().splitlines()]
               for path in (storage / name).glob("*/result.json")]
    assert len(threads) == 2 and all(counts == sorted(counts) for counts in threads), threads
    assert {count for counts in threads for count in counts} == {1, 2}, threads


def test_a_full_storage_is_one_line_without_retries_and_resumes_once_freed(tiny_data, small_tmpfs, capfd, session_ray):
    command = sweep_command(tiny_data, small_tmpfs, "full", "--max-concurrent", "0")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert done.returncode in (1, 2), done.stdout + done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and "is full" in errors[0], done.stderr
    assert str(small_tmpfs) in errors[0] or "storage path is full" in errors[0]
    assert "Traceback" not in done.stdout + done.stderr
    failures = [(p / "error.txt").read_text().count("Failure # ") for p in (small_tmpfs / "full").iterdir()
                if (p / "error.txt").is_file() and (p / "error.txt").stat().st_size]
    assert sum(failures) <= 2 * (cluster.MAX_FAILURES + 1), failures  # Tune's bounded retries, then one line

    subprocess.run(["mount", "-o", "remount,size=100m", str(small_tmpfs)], check=True)  # space freed
    capfd.readouterr()
    code = tune_main.main(["--resume", "--storage-path", str(small_tmpfs), "--name", "full"])
    err = capfd.readouterr().err
    # what Tune managed to write decides: the experiment resumes, or its damage is named in one line
    if code:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "is cut off or corrupt" in err, err
    else:
        full = str(small_tmpfs / "full")
        assert experiments.trials_left(full, config.SweepConfig().from_launch(experiments.read_launch(full))) == 0


def test_a_damaged_experiment_is_named_in_one_line_by_resume_and_analysis(smoke_experiment, tmp_path, capsys):
    copy = tmp_path / "results" / "damaged"
    shutil.copytree(smoke_experiment, copy)
    result_file = next(copy.glob("gn_*/result.json"))
    result_file.write_text(result_file.read_text()[:-40])  # the last epoch's line cut off mid-write
    # the epoch the cut line held is still read, from progress.csv: nothing reported is lost
    assert experiments.last_results(str(copy))[result_file.parent.name]["epoch"] == 2
    with pytest.raises(experiments.ExperimentError, match=rf"cannot analyse .*: {re.escape(str(result_file))} line 2 is "
                                                     rf"cut off or corrupt"):
        analysis.load_experiment(copy)
    state = max(copy.glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[:4096])  # what a full disk left of Tune's state
    assert tune_main.main(["--resume", "--storage-path", str(copy.parent), "--name", "damaged"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: cannot resume .*damaged: {re.escape(str(state))} is cut off or corrupt \(.*\); "
                        rf"it was probably written while the storage was full\..*", err) and "\n" not in err, err
    assert analysis.main([str(copy)]) == 2
    assert "is cut off or corrupt" in capsys.readouterr().err
    # sibling: Tune's pickled search state cut off (its state file whole), which Tuner.restore unpickles
    shutil.copytree(smoke_experiment, tmp_path / "results" / "search", ignore=shutil.ignore_patterns("result.json"))
    search = max((tmp_path / "results" / "search").glob("basic-variant-state-*.json"))
    search.write_bytes(search.read_bytes()[:100])
    assert tune_main.main(["--resume", "--storage-path", str(tmp_path / "results"), "--name", "search"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{search} is cut off or corrupt (ValueError: " in err and "\n" not in err, err


def test_an_experiment_copied_or_moved_resumes_where_it_lies(tiny_data, tmp_path, session_ray):
    """Issue 25, items 9 and 10: an interrupted experiment copied under a new name resumes into the copy, the
    original untouched (Tune had not yet created gn, held back by --max-concurrent); the sibling: the whole storage
    path moved, the experiment resumes at its new place."""
    storage, name = tmp_path / "results", "int1"
    driver = launch_until(sweep_command(tiny_data, storage, name), reported(storage / name),
                          "the first reported epoch", cwd=ROOT)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=HANG_SECONDS)
    assert driver.returncode == 130, (out, err)
    shutil.copytree(storage / name, storage / "copy", symlinks=True)  # cp -a
    original = sorted(str(p.relative_to(storage)) for p in (storage / name).rglob("*"))
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "copy"]) == 0
    assert sorted(str(p.relative_to(storage)) for p in (storage / name).rglob("*")) == original
    last = experiments.last_results(str(storage / "copy"))
    assert len(last) == 2 and all(result["epoch"] == 2 for result in last.values()), last

    moved = tmp_path / "moved"
    shutil.move(storage, moved)
    assert tune_main.main(["--resume", "--storage-path", str(moved), "--name", name]) == 0
    last = experiments.last_results(str(moved / name))
    assert len(last) == 2 and all(result["epoch"] == 2 for result in last.values()), last


def _stopped_after_an_epoch(storage: Path, name: str, *flags: str) -> None:
    """Launch a --smoke-test sweep with `flags` and stop it with Ctrl-C once a trial has reported an epoch (its
    epochs take seconds: the stop lands before the trial's last)."""
    command = [sys.executable, str(ROOT / "tune_main.py"), "--smoke-test", *flags, "--cpus-per-trial", "1",
               "--storage-path", str(storage), "--name", name]
    driver = launch_until(command, lambda: storage.is_dir() and any(reported(e)() for e in storage.iterdir()),
                          "the first reported epoch", cwd=ROOT)  # a tuned comparison's: its tuning stage's
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=HANG_SECONDS)
    assert driver.returncode == 130, (out, err)


@pytest.fixture(scope="module")
def stopped_gn(tmp_path_factory) -> Path:
    """A gn sweep of 3 epochs stopped after its first; each test takes a copy (stopped_copy)."""
    storage = tmp_path_factory.mktemp("stopped")
    _stopped_after_an_epoch(storage, "stopped", "--variants", "gn", "--epochs", "3")
    return storage / "stopped"


def stopped_copy(stopped_gn: Path, storage: Path) -> Path:
    """A copy of stopped_gn under `storage` (the same name: a moved experiment, which resumes where it lies)."""
    return Path(shutil.copytree(stopped_gn, storage / stopped_gn.name, symlinks=True))


def _went_on_unseen(experiment: Path, epochs: int, logged: bool) -> tuple:
    """A trial of an interrupted experiment trained on from its newest checkpoint for `epochs` more (None: to its last)
    as its worker does: each epoch's checkpoint written (logged: and every epoch's result.json line, in order, as its
    driver logs them), none in Tune's saved state, as a driver stopped before it took them in leaves: (trial,
    reports)."""
    import trainable

    trial = min(path.parent for path in experiment.glob("*/checkpoint_*"))
    newest = Path(experiments.checkpoints(str(trial))[0])
    sweep = config.SweepConfig().from_launch(experiments.read_launch(str(experiment)))
    run = train.TrainingRun(train.load_checkpoint(newest / trainable.CHECKPOINT_FILE)["config"],
                            train.trial_data(data_lib.load_dataset(sweep.dataset, sweep.data_dir), sweep))
    run.load(newest / trainable.CHECKPOINT_FILE)
    assert run.epoch + (epochs or 0) <= sweep.epochs, "interrupted too late to test the resume"
    reports, first = json.loads((newest / experiments.EPOCHS_FILE).read_text()), int(newest.name.split("_")[1]) + 1
    for index in range(first, first + (epochs or sweep.epochs - run.epoch)):  # to the last: maybe none
        reports.append(trainable.epoch_report(run, run.run_epoch()))
        (trial / f"checkpoint_{index:06d}").mkdir()
        run.save(trial / f"checkpoint_{index:06d}" / trainable.CHECKPOINT_FILE)
        (trial / f"checkpoint_{index:06d}" / experiments.EPOCHS_FILE).write_text(json.dumps(reports))
    seen = set(experiments.history(str(trial))["epoch"])
    with (trial / experiments.RESULT_FILE).open("a") as result_file:  # as the driver logs: each epoch, in order
        result_file.writelines(json.dumps(r) + "\n" for r in reports if logged and r["epoch"] not in seen)
    return trial, reports


def test_a_resume_goes_on_from_a_checkpoint_the_interrupted_driver_did_not_take_in(stopped_gn, tmp_path, session_ray):
    """Issue 25, item 24, end to end: an interrupted sweep whose trial had written one more checkpoint than its driver
    took in: the resume reports that epoch from the checkpoint, trains on from the next, and Tune's log holds each
    epoch once."""
    storage, epochs = tmp_path / "results", 3
    name = stopped_copy(stopped_gn, storage).name
    trial, reports = _went_on_unseen(storage / name, 1, logged=False)

    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", name]) == 0
    logged = [json.loads(line) for line in (trial / experiments.RESULT_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in logged] == list(range(1, epochs + 1)), logged
    assert logged[len(reports) - 1]["epoch_seconds"] == reports[-1]["epoch_seconds"]  # from the checkpoint, not again
    final = Path(experiments.checkpoints(str(trial))[0], experiments.EPOCHS_FILE)
    assert [r["epoch"] for r in json.loads(final.read_text())] == list(range(1, epochs + 1))
    for kept in trial.glob("checkpoint_*"):  # the one it did not take in was not written over by a later epoch
        assert json.loads((kept / experiments.EPOCHS_FILE).read_text())[-1]["epoch"] == int(kept.name[11:]) + 1


def test_a_resume_of_a_trial_whose_last_epoch_the_stopped_driver_logged_but_did_not_save_ends_finished(
        stopped_gn, tmp_path, capsys, session_ray):
    """A driver stopped after a trial's last epoch was reported (its checkpoint and result.json line written) but
    before Tune saved its state with it: Tune restores the trial's older checkpoint and, with it, that epoch's result
    as the trial's last; the resume counts what the trial reported, as the analysis reads it: exit 0, no
    "interrupted", the table's accuracy the last epoch's, each epoch once."""
    storage = tmp_path / "results"
    name = stopped_copy(stopped_gn, storage).name
    trial, reports = _went_on_unseen(storage / name, None, logged=True)

    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", name]) == 0
    out, err = capsys.readouterr()
    assert "interrupted" not in err and "no epoch reported" not in out, (out, err)
    row = next(line for line in out.splitlines() if line.split()[:1] == ["gn"]).split()
    assert row[2:4] == ["3", f"{100 * reports[-1]['test_acc_single']:.2f}"], out  # epochs, final one-view acc
    grid, df = analysis.load_experiment(storage / name)
    assert df["epoch"].tolist() == [1, 2, 3] and df["test_acc"].iloc[-1] == reports[-1]["test_acc"]
    # its misclassified images: the best epoch's checkpoint, found on storage though Tune's Result lacks it
    assert analysis.misclassified(grid, df, "gn", n=2)["epoch"] == analysis.best_per_trial(df)["epoch"].iloc[0]


def test_a_tuning_stage_resumed_after_such_a_stop_goes_on_to_the_final_stage(tmp_path, capsys, session_ray):
    """The sibling in a tuned comparison: its tuning stage stopped so (one trial's last epoch logged, not saved; the
    other not started): the resume finishes the stage, says nothing is interrupted, and runs the final stage."""
    storage, name = tmp_path / "results", "tuned"
    _stopped_after_an_epoch(storage, name, "--tune", "--variants", "gn", "--tune-lrs", "0.05,0.1",
                            "--tune-weight-decays", "5e-4", "--epochs", "3", "--max-concurrent", "1")
    _went_on_unseen(storage / tuned.tuning_name(name), None, logged=True)

    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", name, "--cpus-per-trial", "1"]) == 0
    out, err = capsys.readouterr()
    assert "interrupted" not in err and "tuning stage finished; final stage:" in out, (out, err)
    assert "Empty DataFrame" not in out, out  # one variant in two arms, one seed: no pair for McNemar's test
    assert {r["epoch"] for r in experiments.last_results(str(storage / name)).values()} == {3}


def test_ctrl_c_on_s3_saves_state_prints_the_resume_command_which_finishes_it_and_it_is_analysed_from_the_uri(
        bucket, tiny_data, tmp_path, capsys):
    """Ctrl-C (SIGINT) of a sweep writing to S3 exits 130 with its state saved there and the command that resumes
    it; the partial experiment's analysis says it is partial; the printed command finishes it (saying what it
    reuses, ignores and has left), and the analysis, its misclassified images and the report read it from the URI."""
    name, client = bucket
    storage = f"s3://{name}/results"
    command = sweep_command(tiny_data, storage, "remote")
    # waits on events (the driver's line for the first epoch: it has taken the report and its checkpoint in),
    # however long a loaded machine takes
    with tempfile.TemporaryFile("w+") as stdout:  # not in tmp_path, which must stay empty
        driver = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        wait_for(lambda: stdout.seek(0) == 0 and "epoch 1/2" in stdout.read(), driver, "the first reported epoch")
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends; gn is still PENDING (Tune has not created it)
        _, err = driver.communicate(timeout=HANG_SECONDS)
        stdout.seek(0)
        out = stdout.read()
    assert driver.returncode == errors.INTERRUPTED_EXIT, (out, err)
    assert "Traceback" not in out + err and "TypeError" not in out + err
    lines = err.strip().splitlines()  # the last two, whatever Ray may have written before them
    assert re.fullmatch(rf"interrupted: [12] of 2 trials unfinished; state saved in {re.escape(storage)}/remote",
                        lines[-2]), err
    assert lines[-1].startswith("resume with: ") and f"--resume --storage-path {storage} --name remote" in lines[-1]
    resume = shlex.split(lines[-1].removeprefix("resume with: "))
    assert resume[1].endswith("tune_main.py") and resume[resume.index("--storage-path") + 1] == storage

    # nothing was written to the working directory: the URI is not a local path
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())
    keys = _keys(client, name)
    assert f"results/remote/{experiments.LAUNCH_FILE}" in keys
    assert any(re.fullmatch(r"results/remote/experiment_state-.*\.json", k) for k in keys)

    # the analysis of the partial experiment says it is partial, per variant
    location = f"{storage}/remote"
    grid, df = analysis.load_experiment(location)
    note = analysis.progress_note(analysis.progress(grid, df))
    assert note.startswith("Partial experiment") and re.search(r"\bgn [01] of 2", note), note
    assert "partial:" in analysis.plot_curves(df, "test_acc").axes[0].get_title()

    # the printed command, from this process, finishes it, saying what it reuses, what it ignores and what is left
    assert experiments.latest_started(storage) == "remote"
    assert tune_main.main(resume[2:] + ["--epochs", "5"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"resume: reusing the launch settings \(dataset tiny, variants bn,gn, 1 seed\(s\), 2 epochs\); "
                     r"CPUs and GPUs per trial from today's flags; ignoring today's --epochs 5 .*; [12] of 2 trials "
                     r"left to run", printed), printed
    last = experiments.last_results(location)
    assert len(last) == 2 and all(result["epoch"] == 2 for result in last.values())
    for trial in last:  # every epoch reported exactly once across the interruption
        lines = experiments.read_bytes(f"{location}/{trial}/result.json").decode().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    grid, df = analysis.load_experiment(location)
    assert len(grid) == 2 and not grid.errors
    assert sorted(df["variant"].unique()) == ["bn", "gn"] and df.groupby("trial")["epoch"].max().tolist() == [2, 2]
    assert analysis.progress(grid, df)["complete"].all()
    assert "Partial" not in analysis.progress_note(analysis.progress(grid, df))
    assert analysis.latest_experiment(storage) == location  # what the notebook opens by default
    sample = analysis.misclassified(grid, df, "gn", n=4)  # the best checkpoint, read back from S3
    assert len(sample["indices"]) == 4 and len(sample["images"]) == 4
    out_dir = tmp_path / "report"
    assert analysis.main([location, "--out", str(out_dir)]) == 0
    summary = (out_dir / "summary.md").read_text()
    assert f"Experiment: `{location}`" in summary and re.search(r"^\| gn +\|", summary, re.M)
    assert analysis.main([location]) == 0  # the default: the report beside the experiment, on S3
    assert "results/remote/report/summary.md" in _keys(client, name, "results/remote/report/")


def test_bad_storage_uris_are_one_line_before_ray(bucket, capsys, monkeypatch):
    name, _ = bucket
    monkeypatch.setattr(train.data_lib, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    for storage, message in [
        (f"s3://{name}-missing/results", "bucket '.*-missing' does not exist"),
        ("nosuchscheme://x/results", "cannot open storage nosuchscheme://x/results"),
    ]:
        assert tune_main.main(["--smoke-test", "--storage-path", storage]) == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(f"error: .*{message}.*", err), err
    with pytest.raises(analysis.AnalysisError, match="is not a Ray Tune experiment"):
        analysis.load_experiment(f"s3://{name}/results/none")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(experiments.ExperimentError, match="cannot reach s3://unreachable-endpoint"):
        experiments.check_storage("s3://unreachable-endpoint/results")


def test_a_resume_on_s3_continues_from_the_checkpoint_a_stopped_driver_did_not_save(bucket, tmp_path, monkeypatch):
    """Issue 25, item 24's sibling on an object store, after the experiment moved to another prefix: the trial's
    checkpoint of epoch 1 that Tune's saved state does not list is found where the experiment lies now."""
    import trainable
    from test_launches import _tune_as_a_driver, interrupted_trial

    name, client = bucket
    arguments, first = interrupted_trial(monkeypatch, tmp_path, f"s3://{name}/results/cut", 1)
    for key in _keys(client, name, "results/"):  # moved: copied, the original deleted
        client.copy_object(Bucket=name, Key=key.replace("results/", "moved/", 1), CopySource={"Bucket": name, "Key": key})
        client.delete_object(Bucket=name, Key=key)
    moved = f"s3://{name}/moved/cut"
    resumed = _tune_as_a_driver(monkeypatch, experiments.join(moved, "gn_seed0_00000"), known=-1)
    trainable.train_variant(*arguments[:2], moved)
    assert [(r["epoch"], checkpointed) for r, checkpointed in resumed] == [(1, True), (2, True), (3, True)]
    assert json.dumps(resumed[0][0]) == json.dumps(first[0][0])
    assert not _keys(client, name, "results/")  # nothing written where it was
    assert sorted(k for k in _keys(client, name, "moved/") if k.endswith(experiments.EPOCHS_FILE)) == [
        f"moved/cut/gn_seed0_00000/checkpoint_{k:06d}/{experiments.EPOCHS_FILE}" for k in range(3)]


def test_sigterm_to_the_process_group_ends_with_the_resume_command(tiny_data, tmp_path, session_ray):
    """`timeout` and `kill -TERM -- -PGID` signal the driver's whole process group, which holds the local
    Ray's processes too: the driver's last words are the resume command, exit 143 (was Ray's "Failed to connect
    to GCS within 60 seconds ... The program will terminate", exit 1), and the resume finishes the sweep."""
    import tune_main
    from conftest import launch_until

    storage, name = tmp_path / "results", "grouped"
    driver = launch_until(sweep_command(tiny_data, storage, name), reported(storage / name),
                          "the first reported epoch", cwd=ROOT, start_new_session=True)
    os.killpg(driver.pid, signal.SIGTERM)
    out, err = driver.communicate(timeout=HANG_SECONDS)
    lines = err.strip().splitlines()
    assert driver.returncode == 143 and lines[-2:] == [
        f"interrupted: the local Ray stopped; state saved in {storage / name}",
        f"resume with: {shlex.join(lines[-1].removeprefix('resume with: ').split())}"], (out, err)
    assert "Traceback" not in out + err and "GCS" not in err, err
    assert tune_main.main(shlex.split(lines[-1].removeprefix("resume with: "))[2:]) == 0
