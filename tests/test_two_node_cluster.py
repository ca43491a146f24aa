"""A two-node Ray cluster on one machine, with token authentication on, as a cloud cluster is.

The head (`ray start --head --num-cpus 0`) runs nothing; the worker node runs in a private mount
namespace (`unshare -m`, as root) where the repository and the dataset directory are hidden under
empty directories, so it has only the virtual environment: Python and the requirements. A smoke
sweep joined by the head's explicit address must finish there with the code shipped by Ray's runtime
environment; without shipping, or without the token, it must fail in one line.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import cluster
from conftest import HANG_SECONDS, ROOT
from test_cluster import clean_env, free_port

pytestmark = pytest.mark.slow  # every test runs on a real two-node Ray cluster

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist, used when present
RAY = Path(sys.executable).with_name("ray")


def namespaces_refused(scratch: Path):
    """Why a private mount namespace with bind mounts cannot be made here, or None."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare(1) to hide the repository from the worker node"
    (scratch / "a").mkdir()
    (scratch / "b").mkdir()
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "--bind",
                            str(scratch / "a"), str(scratch / "b")], capture_output=True, text=True)
    return f"unshare -m / mount --bind refused: {probe.stderr.strip()}" if probe.returncode else None


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


def sweep(nodes, *flags, env=None, timeout=HANG_SECONDS):
    """tune_main.py --smoke-test joined to the cluster by its explicit address, from the repository."""
    command = [sys.executable, "tune_main.py", "--smoke-test", "--address", nodes.address,
               "--storage-path", str(nodes.root / "results"), *flags]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env or clean_env(nodes.home), capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


SHIPPED_FILES = """
import json, sys
from pathlib import Path
import cluster, ray
cluster.connect(sys.argv[1], not_shipped=sys.argv[2:])
files = ray.remote(lambda: {str(p): p.stat().st_size for p in Path(".").rglob("*") if p.is_file()})
print(json.dumps(ray.get(files.remote())))
"""


def plugged_net(log: Path) -> str:
    """A user's model file whose builder appends where its file lies to `log` at every build."""
    return f"""from torch import nn


def build(norm_layer, in_channels, num_classes):
    with open({str(log)!r}, "a") as log:
        log.write(__file__ + "\\n")
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False), norm_layer(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""


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
