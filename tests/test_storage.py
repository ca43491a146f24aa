"""The results contract on cloud storage without a server: local paths and URIs joined and named, a URI one
slash short, refused credentials and a silent endpoint. (Sweeps to a real S3-compatible server:
tests/test_interruptions.py.)"""
import os
import sys

import pytest

import analysis
import experiments
import tune_main


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
