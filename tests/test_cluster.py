"""Joining a cluster, in one line when it cannot be: nothing listening, --address auto, an address that cannot
be joined named with its source, a temporary directory too long for Ray's sockets; what is shipped and how
failures are grouped. (A real two-node cluster: tests/test_two_node_cluster.py.)"""
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import cluster
from conftest import HANG_SECONDS, ROOT

AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def clean_env(home: Path, **extra) -> dict:
    """This machine's environment with its own HOME (where ~/.ray/auth_token lives) and no Ray auth settings."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES}
    return {**env, "HOME": str(home), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_gets_one_line(tmp_path):
    port = free_port()  # closed again: nothing listens there
    done = subprocess.run([sys.executable, "tune_main.py", "--smoke-test", "--address", f"127.0.0.1:{port}",
                           "--storage-path", str(tmp_path / "results")], cwd=ROOT, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=HANG_SECONDS)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: cannot reach a Ray cluster at 127.0.0.1:{port} (Connection refused); start one there with "
        f"`ray start --head`, or pass the address it printed"]


def run_cli(*flags, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tune_main.py", "--smoke-test", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_SECONDS)


def test_address_auto_names_where_it_read_the_address_and_a_dead_one_is_refused_in_one_line(tmp_path):
    """RAY_ADDRESS pointing where nothing listens, with --address auto: refused at once, naming the address and
    RAY_ADDRESS (was: no output for 835 s, Ctrl-C ignored, then "cannot join the Ray cluster at auto: ... GCS")."""
    port = free_port()
    done = run_cli("--address", "auto", "--storage-path", str(tmp_path / "results"),
                   env=clean_env(tmp_path, RAY_ADDRESS=f"127.0.0.1:{port}"))
    assert (done.returncode, done.stderr) == (2, f"error: cannot reach a Ray cluster at 127.0.0.1:{port} (Connection "
                                                 f"refused; --address auto read it from RAY_ADDRESS); start one there "
                                                 f"with `ray start --head`, or pass the address it printed\n"), done
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("address, env, message", [
    ("auto", {"RAY_ADDRESS": "127.0.0.1:{port}"}, "cannot reach a Ray cluster at 127.0.0.1:{port} (Connection refused; "
     "--address auto read it from RAY_ADDRESS)"),
    # the file a `ray start` whose processes were killed leaves behind, in Ray's temporary directory
    ("auto", {"RAY_TMPDIR": "{tmp}"}, "cannot reach a Ray cluster at 127.0.0.1:{port} (Connection refused; --address "
     "auto read it from {tmp}/ray/ray_current_cluster, left by `ray start`)"),
    ("10.0.0.1:notaport", {}, "--address: 10.0.0.1:notaport is not HOST:PORT; pass the address `ray start --head` "
     "printed, e.g. 10.0.0.1:6379"),  # was a ValueError traceback from inside ray.init
    ("auto", {"RAY_ADDRESS": "127.0.0.1:99999"}, "--address: 127.0.0.1:99999 is not HOST:PORT; --address auto read "
     "it from RAY_ADDRESS"),
    # Ray Client's address: was said only after its 30 s connection timeout
    ("ray://127.0.0.1:{port}", {}, "cannot reach a Ray cluster at ray://127.0.0.1:{port} (Connection refused)"),
    ("auto", {"RAY_ADDRESS": "ray://127.0.0.1:{port}"}, "cannot reach a Ray cluster at ray://127.0.0.1:{port} "
     "(Connection refused; --address auto read it from RAY_ADDRESS)"),
])
def test_an_address_that_cannot_be_joined_is_named_with_its_source(tmp_path, monkeypatch, address, env, message):
    port = free_port()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    for name in ("RAY_ADDRESS", "RAY_TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(port=port, tmp=tmp_path))
    with pytest.raises(cluster.ClusterError) as refused:
        cluster.resolve(address.format(port=port))
    assert str(refused.value).startswith(message.format(port=port, tmp=tmp_path)), str(refused.value)


@pytest.fixture
def listener():
    """(port, answer): a TCP server on every interface that takes connections and sends each `answer[0]` (bytes, b""
    for nothing), as a Ray GCS sends its HTTP/2 SETTINGS frame."""
    answer = [b""]
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen(16)

        def serve():
            with contextlib.suppress(OSError):  # the server closed
                while True:
                    connection = server.accept()[0]
                    connection.sendall(answer[0])
                    accepted.append(connection)

        accepted = []
        threading.Thread(target=serve, daemon=True).start()
        yield server.getsockname()[1], answer
        for connection in accepted:
            connection.close()


def test_a_ray_address_is_named_with_its_source_and_anything_else_listening_is_refused_in_seconds(listener,
                                                                                                  monkeypatch):
    """A port that takes connections but is no Ray GCS (another service, a wrong port): Ray's client waited there
    for minutes, running no Python signal handler (Ctrl-C held, then ignored); refused once nothing a GCS sends
    at once came in 5 s, or something else did."""
    port, answer = listener
    address = f"127.0.0.1:{port}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    for sent, why in ((b"", "timed out"), (b"SSH-2.0-OpenSSH_9.2\r\n", "something else listens there")):
        answer[0] = sent
        with pytest.raises(cluster.ClusterError, match=re.escape(
                f"cannot reach a Ray cluster at {address} ({why}; --address auto read it from RAY_ADDRESS)")):
            cluster.resolve("auto")
    answer[0] = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty HTTP/2 SETTINGS frame
    assert cluster.resolve("auto") == (address, f"{address} (--address auto read it from RAY_ADDRESS)")
    assert cluster.resolve(address) == (address, address)
    assert cluster.resolve(f"ray://{address}") == (f"ray://{address}", f"ray://{address}")  # Ray Client's gRPC too


def test_a_temporary_directory_too_long_for_rays_sockets_is_one_line(tmp_path):
    """Batch schedulers set TMPDIR to long paths; Ray's socket paths under it must fit Unix's 107 bytes (was a
    32-line traceback)."""
    long = tmp_path / ("x" * max(1, 75 - len(str(tmp_path))))
    long.mkdir()
    done = run_cli("--storage-path", str(tmp_path / "results"), env=clean_env(tmp_path, TMPDIR=str(long)))
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(rf"error: Ray cannot start here: its socket path {re.escape(str(long))}/ray/\S+ is longer than "
                        r"Unix allows \(107 bytes\); set RAY_TMPDIR to a shorter directory, e.g. RAY_TMPDIR=/tmp\n",
                        done.stderr), done.stderr


def test_an_outside_storage_path_and_uris_are_not_excluded(tmp_path):
    env = cluster.runtime_env([tmp_path, "s3://bucket/x", "mnist"])
    assert not [e for e in env["excludes"] if "bucket" in e or "mnist" in e or str(tmp_path) in e]


def fake_result(name: str, error) -> SimpleNamespace:
    return SimpleNamespace(path=f"/results/e/{name}", error=error)


IMPORT_FAILURE = ("The actor died unexpectedly before finishing this task.\n"
                  "RuntimeError: The actor with name ImplicitFunc failed to import on the worker. This may be because "
                  "needed library dependencies are not installed in the worker environment:\n\nTraceback (most recent "
                  "call last):\n  File \"function_manager.py\", line 696, in _load_actor_class_from_gcs\n"
                  "ModuleNotFoundError: No module named 'trainable'\n")


def test_failures_are_grouped_by_cause_one_line_each():
    failed = [fake_result(f"{v}_seed0_1", RuntimeError(IMPORT_FAILURE)) for v in ("bn", "gn", "ln")]
    assert cluster.failure_lines(failed, ship_code=False) == [
        "3 trials failed: normsweep's code is not on the worker node (ModuleNotFoundError: No module named "
        "'trainable'); drop --no-ship-code, or install normsweep on every node"]
    torch_missing = RuntimeError(IMPORT_FAILURE.replace("'trainable'", "'torch'"))
    lines = cluster.failure_lines(failed[:2] + [fake_result("ln_seed0_1", torch_missing)])
    assert lines == [
        "2 trials failed (bn_seed0_1, gn_seed0_1): a worker node could not import normsweep's code although it was "
        "shipped (ModuleNotFoundError: No module named 'trainable'); --verbose shows Ray's output",
        "trial ln_seed0_1 failed: a worker node lacks a package normsweep needs (ModuleNotFoundError: No module "
        "named 'torch'); install requirements.txt there, in the Python that `ray start` runs"]
    # any other error: its last line, as before
    assert cluster.failure_lines([fake_result("bn_seed0_1", ValueError("first\nlast"))]) == [
        "trial bn_seed0_1 failed: last"]
