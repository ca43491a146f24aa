"""Experiments on cloud storage: a smoke sweep to a real S3-compatible server (moto's server mode on
localhost), interrupted with Ctrl-C, resumed and analysed from the URI; the results contract's paths and errors."""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest

import analysis
import experiments
import errors
import train
import tune_main
from conftest import HANG_SECONDS, ROOT, wait_for



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


def test_ctrl_c_on_s3_saves_state_prints_the_resume_command_which_finishes_it_and_it_is_analysed_from_the_uri(
        bucket, tmp_path, capsys):
    """Ctrl-C (SIGINT) of a sweep writing to S3 exits 130 with its state saved there and the command that resumes
    it; the partial experiment's analysis says it is partial; the printed command finishes it (saying what it
    reuses, ignores and has left), and the analysis, its misclassified images and the report read it from the URI."""
    name, client = bucket
    storage = f"s3://{name}/results"
    command = [sys.executable, str(ROOT / "tune_main.py"), "--smoke-test", "--variants", "bn,gn", "--epochs", "2",
               "--max-concurrent", "1", "--cpus-per-trial", "1", "--storage-path", storage, "--name", "remote"]
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
    assert re.search(r"resume: reusing the launch settings \(dataset fashion-mnist, variants bn,gn, 1 seed\(s\), "
                     r"2 epochs, smoke-test data\); CPUs and GPUs per trial from today's flags; ignoring today's --epochs 5 "
                     r".*; [12] of 2 trials left to run", printed), printed
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


def test_locations_join_and_name_local_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiments.resolve("results") == str(tmp_path / "results")
    assert experiments.resolve("s3://b/results") == "s3://b/results"
    assert experiments.join("s3://b/results/", "x", "result.json") == "s3://b/results/x/result.json"
    assert experiments.join("s3://b/r?region=eu-west-1", "x") == "s3://b/r/x?region=eu-west-1"
    assert experiments.name_of("s3://b/results/exp?region=eu-west-1") == "exp"
    assert experiments.shown(str(tmp_path / "results" / "exp")) == os.path.join("results", "exp")
    assert experiments.shown("/elsewhere/exp") == "exp" and experiments.shown("s3://b/r/exp") == "s3://b/r/exp"
    experiments.write_bytes(experiments.join(str(tmp_path), "a", "b.txt"), b"x")
    assert experiments.read_bytes(str(tmp_path / "a" / "b.txt")) == b"x"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / experiments.LAUNCH_FILE).write_text('{"dataset": ')
    with pytest.raises(experiments.ExperimentError, match="normsweep_launch.json is damaged"):
        experiments.read_launch(str(tmp_path / "bad"))


def test_a_uri_one_slash_short_is_refused_not_made_a_local_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # refused before Ray
    assert tune_main.main(["--smoke-test", "--storage-path", "s3:/bucket/results"]) == 2
    assert capsys.readouterr().err.strip() == ("error: 's3:/bucket/results' looks like a URI with a slash missing; "
                                               "did you mean s3://bucket/results?")
    with pytest.raises(experiments.ExperimentError, match="did you mean gs://bucket/r/exp"):
        analysis.load_experiment("gs:/bucket/r/exp")
    assert not any(tmp_path.iterdir())


class _Store:
    """A pyarrow-like file system whose first request fails or never answers."""
    type_name = "s3"

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def get_file_info(self, path):
        return self.behaviour()


def test_refused_credentials_and_a_silent_endpoint_are_one_line(monkeypatch):
    def denied():
        raise OSError("When getting information for bucket 'b': AWS Error ACCESS_DENIED during HeadBucket operation")

    monkeypatch.setattr(experiments, "filesystem", lambda location: (_Store(denied), "b/results"))
    with pytest.raises(experiments.ExperimentError, match=r"s3://b: the store refused these credentials .*"
                                                          r"check AWS_ACCESS_KEY_ID"):
        experiments.check_storage("s3://b/results")
    release = __import__("threading").Event()
    monkeypatch.setattr(experiments, "filesystem", lambda location: (_Store(release.wait), "b/results"))
    monkeypatch.setattr(experiments, "PROBE_SECONDS", 0.5)
    with pytest.raises(experiments.ExperimentError, match=r"no answer from s3://b within 0.5 s"):
        experiments.check_storage("s3://b/results")  # an offline gs:// kept pyarrow retrying for 13+ minutes
    release.set()


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
    assert [(r["epoch"], checkpointed) for r, checkpointed in resumed] == [(1, False), (2, True), (3, True)]
    assert json.dumps(resumed[0][0]) == json.dumps(first[0][0])
    assert not _keys(client, name, "results/")  # nothing written where it was
