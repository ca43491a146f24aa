"""Shared fixtures (synthetic idx files, real Fashion-MNIST subsets, one smoke sweep, one local Ray for the
session's in-process sweeps) and how a test waits for an event without depending on how busy the machine is.

Slow tests (they start Ray or run a sweep) live in their own modules, marked as a whole by
`pytestmark = pytest.mark.slow`; `pytest -m "not slow"` leaves them out."""
import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: tests run its scripts and read its docs
sys.path.insert(0, str(ROOT))

import data as data_lib  # noqa: E402


def _without_rfc3987_syntax():
    """Keep rfc3987_syntax from being imported here and in every process the tests start.

    jsonschema, which `import ray` loads, imports rfc3987_syntax when it can (its optional checker of the
    "iri" string format; jupyter-events' jsonschema[format-nongpl] installs it with the notebook tooling),
    and that module builds an Earley parser at import: ~1.5 s of a core in every process that imports Ray,
    the driver, Ray's own processes at each start and every trial's worker, a third of a small sweep's time.
    jsonschema goes without the checker when the import fails; nothing in normsweep or its tests checks
    IRIs. The processes the tests start (tune_main.py, Ray's, the notebook kernel) inherit PYTHONPATH."""
    sys.modules.setdefault("rfc3987_syntax", None)  # this process: the import fails, jsonschema goes on
    stub = Path(tempfile.mkdtemp(prefix="normsweep-tests-"))
    (stub / "rfc3987_syntax").mkdir()
    (stub / "rfc3987_syntax" / "__init__.py").write_text(
        'raise ImportError("rfc3987_syntax is kept out of the tests\' processes: tests/conftest.py")\n')
    os.environ["PYTHONPATH"] = os.pathsep.join([str(stub), *filter(None, [os.environ.get("PYTHONPATH")])])
    atexit.register(shutil.rmtree, stub, ignore_errors=True)


_without_rfc3987_syntax()

# A test waits for events (a checkpoint on disk, a process ending), never for a span of time. This is
# only when a wait is declared a hang: far above any run on a loaded machine (load average 20+, where
# a step of seconds takes minutes). Speed is measured in benchmarks/, not asserted here.
HANG_SECONDS = 1800


def wait_for(condition, process: subprocess.Popen, what: str):
    """Return once condition() is true; fail if `process` ends first, or after HANG_SECONDS (a hang)."""
    deadline = time.monotonic() + HANG_SECONDS
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"{process.args[:3]} ended (exit {process.returncode}) before {what}:\n"
                                 f"{(out or '')[-2000:]}{(err or '')[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {HANG_SECONDS} s: a hang"
        time.sleep(0.2)


def launch_until(command, condition, what: str, **popen) -> subprocess.Popen:
    """Start `command` and wait_for(condition). (Ray's own 30 s node-startup limit, which a busy machine
    can miss, is retried by cluster.connect itself.)"""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    wait_for(condition, process, what)
    return process


def reported(experiment: Path, trials: str = "*"):
    """A condition: some trial of `experiment` matching the glob `trials` has an epoch in its result.json, which the
    driver writes once it has taken the epoch's report (and its checkpoint) in."""
    return lambda: any(p.read_text().strip() for p in experiment.glob(f"{trials}/result.json"))


def blank_dataset(n_train=4000, n_test=100):
    """A dataset of blank 28x28 images (10 classes): what a sweep's grid is built from when only its size matters."""
    zeros = [torch.zeros(n, 28, 28, dtype=torch.uint8) for n in (n_train, n_test)]
    return data_lib.Dataset("blank", zeros[0], torch.zeros(n_train, dtype=torch.long), zeros[1],
                            torch.zeros(n_test, dtype=torch.long), data_lib.SPECS["mnist"].classes)


def make_idx_dir(directory: Path, n_train=64, n_test=32, gz=True, seed=0) -> Path:
    """A directory holding MNIST's four idx files with random images and labels."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        image_stem, label_stem = data_lib.SPLIT_FILES[split]
        data_lib.write_idx(directory / (image_stem + ext), torch.randint(0, 256, (n, 28, 28), generator=g), data_lib.IMAGE_MAGIC)
        data_lib.write_idx(directory / (label_stem + ext), torch.randint(0, 10, (n,), generator=g), data_lib.LABEL_MAGIC)
    return directory


@pytest.fixture
def idx_dir(tmp_path):
    return make_idx_dir(tmp_path / "idx")


@pytest.fixture(autouse=True)
def figures_closed():
    """Close the figures a test left open: they pile up in a worker across test files, and past 20 matplotlib
    warns, which fails a later test that turns warnings into errors (the order depends on xdist's split)."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


# Starting a local Ray (its GCS, raylet and agents) and stopping it costs seconds of both cores each time, so
# in-process sweeps whose behaviour does not depend on a Ray of their own share one, started once as
# tune_main.py starts its private Ray (cluster.connect: the same quieting, options and worker PYTHONPATH).
# Tests that need their own Ray (a console checked from ray.init on, environment variables the workers must
# inherit, logical GPUs) start it as before: any ray.init in this process stops the shared one first.
_SESSION_RAY = {}  # while the shared Ray is up: "init" and "shutdown", Ray's own functions


def _stop_session_ray():
    import ray

    if _SESSION_RAY:
        ray.init = _SESSION_RAY["init"]
        _SESSION_RAY.pop("shutdown")()
        _SESSION_RAY.clear()


@contextlib.contextmanager
def on_session_ray():
    """Inside this block tune_main.main runs its sweeps on the session's local Ray (started if it is not up),
    neither starting nor stopping one of its own."""
    import ray

    import cluster
    import console

    if _SESSION_RAY and not ray.is_initialized():  # stopped by a test's own ray.shutdown: start it again
        _stop_session_ray()
    if not _SESSION_RAY:
        console.quiet_ray()  # what tune_main.run_stage does before it connects
        cluster.connect(None)
        init = ray.init

        def init_after_stopping_the_session_ray(*args, **kwargs):
            _stop_session_ray()
            return init(*args, **kwargs)

        _SESSION_RAY.update(init=init, shutdown=ray.shutdown)
        ray.init = init_after_stopping_the_session_ray
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster, "connect", lambda *args, **kwargs: None)
        patch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
        yield
    # Tune stops a sweep's trials before fit() returns; a run that failed midway may leave one holding CPUs for a
    # moment, or for good: then the next sweep starts on a fresh Ray rather than wait behind it.
    deadline = time.monotonic() + 10
    while (_SESSION_RAY and ray.is_initialized()
           and ray.available_resources().get("CPU") != ray.cluster_resources().get("CPU")):
        if time.monotonic() > deadline:
            _stop_session_ray()
        time.sleep(0.1)


@pytest.fixture
def session_ray():
    """The test's tune_main.main calls run on the session's local Ray (on_session_ray)."""
    with on_session_ray():
        yield


def pytest_sessionfinish(session, exitstatus):
    _stop_session_ray()


@pytest.fixture(scope="session")
def smoke_experiment(tmp_path_factory):
    """A real 4-variant x 2-epoch sweep on a Fashion-MNIST subset (tune_main.py --smoke-test), 1 CPU per trial
    (two trials at once: 2 CPUs each would run the four one by one; tests/test_interruptions.py's SIGTERM test checks
    that 2 CPUs train on 2 threads). One for the whole run: under pytest-xdist the first worker to need it runs it
    (holding a file lock) and the others read it; tests copy it before changing it."""
    import filelock
    import tune_main

    base = tmp_path_factory.getbasetemp()
    storage = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "smoke-results"  # this run's own
    with filelock.FileLock(f"{storage}.lock"):
        if not (storage / "complete").exists():
            shutil.rmtree(storage, ignore_errors=True)  # a worker that failed midway
            with on_session_ray():
                code = tune_main.main(["--smoke-test", "--storage-path", str(storage), "--name", "e2e",
                                       "--cpus-per-trial", "1"])
            assert code == 0
            (storage / "complete").touch()
    return storage / "e2e"


@pytest.fixture(scope="session")
def fashion():
    """The full real Fashion-MNIST (Debian's dataset-fashion-mnist, or torchvision's download)."""
    return data_lib.load_dataset("fashion-mnist", data_dir=Path(__file__).resolve().parents[1] / "data")


@pytest.fixture(scope="session")
def fashion_small(fashion):
    """5,000 training and 2,000 test images of real Fashion-MNIST."""
    return fashion.subset(5000, 2000)
