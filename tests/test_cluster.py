"""A two-node Ray cluster on one machine, with token authentication on, as a cloud cluster is.

The head (`ray start --head --num-cpus 0`) runs nothing; the worker node runs in a private mount
namespace (`unshare -m`, as root) where the repository and the dataset directory are hidden under
empty directories, so it has only the virtual environment: Python and the requirements. A smoke
sweep joined by the head's explicit address must finish there with the code shipped by Ray's runtime
environment; without shipping, or without the token, it must fail in one line.
"""
import contextlib
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
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import cluster
from conftest import HANG_SECONDS, ROOT

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist, used when present
RAY = Path(sys.executable).with_name("ray")
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def clean_env(home: Path, **extra) -> dict:
    """This machine's environment with its own HOME (where ~/.ray/auth_token lives) and no Ray auth settings."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES}
    return {**env, "HOME": str(home), **extra}


def namespaces_refused(scratch: Path):
    """Why a private mount namespace with bind mounts cannot be made here, or None."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare(1) to hide the repository from the worker node"
    (scratch / "a").mkdir()
    (scratch / "b").mkdir()
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "--bind",
                            str(scratch / "a"), str(scratch / "b")], capture_output=True, text=True)
    return f"unshare -m / mount --bind refused: {probe.stderr.strip()}" if probe.returncode else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray's own fixed limit on a node's start-up (not this test's), which a loaded machine can miss
NODE_START_TIMEOUT = "timed out during startup"


def start_node(command, log: Path, env, tries=3) -> subprocess.Popen:
    """`ray start ... --block` (command() gives its arguments), once "Ray runtime started" is in its log;
    a start that missed Ray's start-up limit is tried again, as cluster.connect does for a local Ray."""
    for attempt in range(1, tries + 1):
        with log.open("w") as out:
            process = subprocess.Popen(command(), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(log, "Ray runtime started", process)
            return process
        except AssertionError:
            if attempt == tries or NODE_START_TIMEOUT not in log.read_text():
                raise


def wait_for(log: Path, text: str, process, seconds=HANG_SECONDS):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if text in log.read_text():
            return
        assert process.poll() is None, f"{process.args[:3]} ended:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} in {log} after {seconds} s:\n{log.read_text()[-3000:]}")


def worker_node_script(root: Path, token: str, port: int) -> str:
    """Bash for the worker node's namespace: hide the repository and the dataset, keep the Python environment
    (the venv and any venv layered over it, where they lie inside the repository: bound out and back), join."""
    python_dirs = [Path(p).resolve() for p in [sys.prefix, *sys.path] if p == sys.prefix or "site-packages" in p]
    kept = sorted({ROOT / p.relative_to(ROOT).parts[0] for p in python_dirs if p.is_relative_to(ROOT) and p != ROOT})
    steps = [f"mkdir -p {root / 'kept' / d.name} && mount --bind {d} {root / 'kept' / d.name}" for d in kept]
    steps.append(f"mount --bind {root / 'empty'} {ROOT}")
    steps += [f"mkdir -p {d} && mount --bind {root / 'kept' / d.name} {d}" for d in kept]
    if DATASET_DIR.is_dir():
        steps.append(f"mount --bind {root / 'empty'} {DATASET_DIR}")
    steps += [f"test ! -e {ROOT / 'tune_main.py'}", f"test ! -e {DATASET_DIR / 'train-images-idx3-ubyte.gz'}",
              f"test -x {sys.executable}",
              # a worker node joins with an explicit address: token mode must be asked for, the token given
              f"exec env RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token} {RAY} start --address 127.0.0.1:{port} "
              f"--num-cpus 2 --disable-usage-stats --block"]
    return " && ".join(steps)


@pytest.fixture(scope="module")
def two_nodes():
    """(address, HOME holding the token) of a running head with 0 CPUs and a 2-CPU worker node that
    sees neither the repository nor the dataset."""
    root = Path(tempfile.mkdtemp(prefix="normsweep-cluster-"))  # short: Ray's socket paths live under it
    refused = namespaces_refused(root)
    if refused:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(refused)
    home, worker_home = root / "home", root / "worker-home"
    for directory in (home, worker_home, root / "empty"):
        directory.mkdir()
    # token authentication as Ray documents it: RAY_AUTH_MODE=token on every node, a token made with Ray's CLI
    head_env = clean_env(home, RAY_AUTH_MODE="token")
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=head_env, check=True, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    processes = []
    try:
        head_log = root / "head.log"
        port = None

        def head_command():
            nonlocal port
            port = free_port()  # a fresh port per try: a failed start may hold the last one
            return [str(RAY), "start", "--head", "--num-cpus", "0", "--port", str(port), "--temp-dir", str(root / "ray"),
                    "--include-dashboard=false", "--disable-usage-stats", "--block"]

        processes.append(start_node(head_command, head_log, head_env))

        worker_log = root / "worker.log"
        processes.append(start_node(
            lambda: ["unshare", "-m", "--propagation", "private", "bash", "-c", worker_node_script(root, token, port)],
            worker_log, clean_env(worker_home)))
        yield SimpleNamespace(address=f"127.0.0.1:{port}", home=home, root=root)
    finally:
        for process in reversed(processes):  # only the `ray start --block` processes started here
            process.send_signal(signal.SIGTERM)  # they drain, then stop the node's Ray processes
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the node's processes only
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


def sweep(nodes, *flags, env=None, timeout=HANG_SECONDS):
    """tune_main.py --smoke-test joined to the cluster by its explicit address, from the repository."""
    command = [sys.executable, "tune_main.py", "--smoke-test", "--address", nodes.address,
               "--storage-path", str(nodes.root / "results"), *flags]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env or clean_env(nodes.home), capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


def test_without_the_code_shipped_the_sweep_fails_fast_in_one_line(two_nodes):
    done, seconds = sweep(two_nodes, "--name", "unshipped", "--no-ship-code", "--variants", "bn,gn")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: 2 trials failed: normsweep's code is not on the worker node (ModuleNotFoundError: No module named "
        "'trainable'); drop --no-ship-code, or install normsweep on every node"], done.stderr
    assert "Traceback" not in done.stdout, done.stdout
    # each trial failed, retried at most as often as Tune is told (an import failure fails each try at once)
    failures = [(p / "error.txt").read_text().count("Failure # ")
                for p in (two_nodes.root / "results" / "unshipped").iterdir() if (p / "error.txt").is_file()]
    assert len(failures) == 2 and max(failures) <= cluster.MAX_FAILURES + 1, failures
    print(f"failed in {seconds:.0f} s, failures per trial {failures}")


def test_a_missing_or_wrong_token_gets_one_line(two_nodes, tmp_path):
    """Both refusals wait out Ray's own retries (about 20 s), so the two drivers run at once."""
    messages = {
        None: "requires an authentication token and none was found here; copy the output of `ray get-auth-token` on "
              "the head node into ~/.ray/auth_token here, or set RAY_AUTH_TOKEN to it",
        "not-the-token": "refused the authentication token from RAY_AUTH_TOKEN; replace it with the output of "
                         "`ray get-auth-token` on the head node"}
    command = [sys.executable, "tune_main.py", "--smoke-test", "--address", two_nodes.address,
               "--storage-path", str(two_nodes.root / "results")]
    drivers = {token: subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=clean_env(tmp_path, **({"RAY_AUTH_TOKEN": token} if token else {})))
               for token in messages}  # a HOME without ~/.ray/auth_token
    for token, driver in drivers.items():
        out, err = driver.communicate(timeout=HANG_SECONDS)
        assert driver.returncode == 2, out + err
        assert err.strip().splitlines() == [f"error: the Ray cluster at {two_nodes.address} {messages[token]}"]
    assert not (two_nodes.root / "results").exists() or not any(
        p.name.startswith("normsweep_") for p in (two_nodes.root / "results").iterdir())


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
        cluster.resolve(address)
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


@pytest.mark.slow
def test_sigterm_to_the_process_group_ends_with_the_resume_command(tmp_path, session_ray):
    """`timeout` and `kill -TERM -- -PGID` signal the driver's whole process group, which holds the local
    Ray's processes too: the driver's last words are the resume command, exit 143 (was Ray's "Failed to connect
    to GCS within 60 seconds ... The program will terminate", exit 1), and the resume finishes the sweep."""
    import tune_main
    from conftest import launch_until

    storage, name = tmp_path / "results", "grouped"
    command = [sys.executable, "tune_main.py", "--smoke-test", "--variants", "bn,gn", "--epochs", "2",
               "--max-concurrent", "1", "--cpus-per-trial", "1", "--storage-path", str(storage), "--name", name]
    driver = launch_until(command, lambda: any(p.read_text().strip() for p in (storage / name).glob("*/result.json")),
                          "the first reported epoch", cwd=ROOT, start_new_session=True)
    os.killpg(driver.pid, signal.SIGTERM)
    out, err = driver.communicate(timeout=HANG_SECONDS)
    lines = err.strip().splitlines()
    assert driver.returncode == 143 and lines[-2:] == [
        f"interrupted: the local Ray stopped; state saved in {storage / name}",
        f"resume with: {shlex.join(lines[-1].removeprefix('resume with: ').split())}"], (out, err)
    assert "Traceback" not in out + err and "GCS" not in err, err
    assert tune_main.main(shlex.split(lines[-1].removeprefix("resume with: "))[2:]) == 0


SHIPPED_FILES = """
import json, sys
from pathlib import Path
import cluster, ray
cluster.connect(sys.argv[1], not_shipped=sys.argv[2:])
files = ray.remote(lambda: {str(p): p.stat().st_size for p in Path(".").rglob("*") if p.is_file()})
print(json.dumps(ray.get(files.remote())))
"""


def test_the_shipped_package_is_the_code_without_results_data_docs_or_environments(two_nodes):
    """What Ray ships in the runtime environment: on the worker node, a task's working directory holds the code
    and nothing else."""
    not_shipped = [str(ROOT / "results"), str(ROOT / "data"), "fashion-mnist", "s3://bucket/results"]
    done = subprocess.run([sys.executable, "-c", SHIPPED_FILES, two_nodes.address, *not_shipped], cwd=ROOT,
                          env=clean_env(two_nodes.home), capture_output=True, text=True, timeout=HANG_SECONDS)
    assert done.returncode == 0, done.stdout + done.stderr
    files = json.loads(done.stdout.strip().splitlines()[-1])
    tops = {name.split("/")[0] for name in files}
    assert {"tune_main.py", "trainable.py", "train.py", "model.py", "data.py", "cluster.py", "requirements.txt"} <= tops
    assert not tops & {"results", "data", "docs", ".git", ".venv", "__pycache__", ".pytest_cache"}, tops
    assert not [name for name in files if name.endswith(".pyc")]
    assert sum(files.values()) < 5 * 2**20  # Ray's limit is 512 MiB; the code is a few hundred KB


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


def plugged_net(log: Path) -> str:
    """A user's model file whose builder appends where its file lies to `log` at every build."""
    return f"""from torch import nn


def build(norm_layer, in_channels, num_classes):
    with open({str(log)!r}, "a") as log:
        log.write(__file__ + "\\n")
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False), norm_layer(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""


def test_a_node_without_the_repository_runs_the_sweep_with_the_code_and_a_model_file_only_the_driver_sees_shipped(
        two_nodes, tmp_path):
    """The head has no CPUs, so every trial runs on the worker node, which has neither the code nor the data: the
    code arrives in Ray's runtime environment (working_dir), and --model FILE.py:build, FILE where only the driver
    sees it (a tmpfs in the driver's own mount namespace), in its py_modules: the trials build the net from that copy."""
    hidden, log = tmp_path / "hidden", tmp_path / "builds.txt"
    hidden.mkdir()  # empty for the worker node; the driver mounts its own over it and writes the file there
    model_file = hidden / "tinynet.py"
    script = (f"mount -t tmpfs tmpfs {hidden} && cat > {model_file} && exec {sys.executable} tune_main.py --smoke-test "
              f"--address {two_nodes.address} --storage-path {two_nodes.root / 'results'} --name shipped "
              f"--variants bn,gn --model {model_file}:build")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], input=plugged_net(log),
                          cwd=ROOT, env=clean_env(two_nodes.home), capture_output=True, text=True, timeout=HANG_SECONDS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not model_file.exists()  # the file was the driver's alone
    assert re.search(r"normsweep: 2 trials on 2 CPUs, [\d.]+ GiB of memory; per trial 1 CPU, 0 GPU, [\d.]+ GiB;",
                     done.stdout), done.stdout
    trial_dirs = [p for p in (two_nodes.root / "results" / "shipped").iterdir() if (p / "result.json").is_file()]
    assert len(trial_dirs) == 2
    assert all(len((p / "result.json").read_text().splitlines()) == 2 for p in trial_dirs)  # both epochs reported
    # the driver built each norm's net from the file once before the trials (train.preflight); the trials, from Ray's copy
    builds = log.read_text().splitlines()
    assert builds.count(str(model_file)) == 2, builds
    shipped = [path for path in builds if path != str(model_file)]
    assert len(shipped) >= 2 and all(path.endswith("/tinynet.py") and "runtime_resources" in path
                                     for path in shipped), builds
