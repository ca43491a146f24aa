"""Connecting to Ray, and what a sweep's failures on a cluster mean.

`connect` starts a private Ray for a local run, or joins the cluster at `--address`: with the
token authentication a `ray start --head` cluster uses, and with this directory's code shipped to
every node in Ray's runtime environment, so that a node needs only Python and the requirements.
A connection that fails raises ClusterError, one line that says what to do.
`StopRetrying` keeps Tune from retrying trials after a failure a retry cannot fix, and
`failure_lines` turns the failed trials into one line per distinct cause.
"""
import contextlib
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

import ray
from ray import tune
from ray.exceptions import AuthenticationError, RayTaskError, RuntimeEnvSetupError

from errors import ClusterError
import experiments

ROOT = Path(__file__).resolve().parent  # the working directory shipped to the nodes
MAX_FAILURES = 3  # Tune's retries of a trial whose worker died, each from the trial's latest checkpoint
# Never shipped (gitignore patterns, relative to ROOT): results, data, docs, git and tooling caches. Virtual
# environments, the storage path and the data directories are added where they lie inside ROOT.
# Ray also honours ROOT's .gitignore and a .rayignore, unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1.
NOT_SHIPPED = ["/results", "/data", "/docs", ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache",
               ".ipynb_checkpoints"]
GET_TOKEN = "copy the output of `ray get-auth-token` on the head node"
# A trial failure that fails every retry the same way: the trial's code or a package missing on a node
# (Ray: "The actor with name ImplicitFunc failed to import on the worker ... ModuleNotFoundError: ..."),
# or a runtime environment that cannot be set up there.
# normsweep's own errors raised in a trial say what to change (bf16 asked of a GPU without it, a checkpoint
# of another config, unreadable data): a retry meets them again.
UNRETRYABLE = re.compile(r"failed to import on the worker|^(ModuleNotFoundError|ImportError): "
                         r"|Failed to set up runtime environment"
                         r"|^(?:\w+\.)*(?:UsageError|CheckpointError|DataError): "
                         r"|" + experiments.FULL_STORAGE.pattern, re.M)



@contextlib.contextmanager
def interrupts_held(then_raise: bool = True):
    """Hold Ctrl-C (SIGINT, and a SIGTERM the driver forwards to it) while Ray starts or stops its processes:
    taken halfway, the driver crashed at exit (SIGSEGV, exit 139) instead of saying it was interrupted. One that
    came is raised as KeyboardInterrupt when the block ends (`then_raise`), else dropped (Ray is stopping anyway).
    Outside the main thread, where Python delivers no signals, a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received and then_raise:
        raise KeyboardInterrupt


def connect(address, ship_code: bool = True, verbose: bool = False, not_shipped=(), modules=()) -> None:
    """ray.init for this run: a private local Ray without `address`, else the cluster there.

    A local Ray runs its workers on this machine, where they import the code from this directory
    (on their PYTHONPATH, whatever the driver's working directory), so nothing is shipped. Joining a cluster ships ROOT (`runtime_env`, leaving out `not_shipped`:
    paths that may lie inside it, such as the storage path) unless `ship_code` is off, for nodes
    where normsweep is installed already. `modules`: a user's Python files (a --model builder) that
    every node imports by file name; shipped to a cluster even with `ship_code` off (None entries are skipped).
    Ctrl-C while Ray starts is raised as KeyboardInterrupt once it has (`interrupts_held`).
    """
    with interrupts_held():
        _connect(address, ship_code, verbose, not_shipped, modules)


def _connect(address, ship_code, verbose, not_shipped, modules) -> None:
    modules = [str(Path(m).resolve()) for m in modules if m]
    options = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)
    if not address or address == "local":
        # Ray puts the driver's script directory and working directory on its workers' paths; a driver
        # that imported normsweep from elsewhere (a notebook, the tests) needs ROOT there too.
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        _start_local(runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}, **options)
        return
    if ship_code:
        options["runtime_env"] = runtime_env(not_shipped)
    if modules:  # Ray's py_modules: each .py file importable by its name on every node
        options["runtime_env"] = {**options.get("runtime_env", {}), "py_modules": modules}
    _use_token_if_available()
    _check_joinable(address, verbose)
    try:
        # quiet: Ray's C++ client logs each refused attempt to file descriptor 2 (the one line below says why)
        with contextlib.nullcontext() if verbose else _native_stderr_silenced():
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, AuthenticationError) as e:
        raise ClusterError(_connection_failure(address, e)) from None
    except ValueError as e:
        if ship_code and "Package size" in str(e):
            raise ClusterError(f"the code in {ROOT} is too large to ship to the cluster ({_first_line(e)}); "
                               f"list large files in a .rayignore there, or install normsweep on every node "
                               f"and pass --no-ship-code") from None
        raise


LOCAL_START_TRIES = 3


def _start_local(**options) -> None:
    """ray.init of a private local Ray, tried again when its raylet misses Ray's fixed 30 s to register
    (it does on a machine whose cores are all busy)."""
    for attempt in range(1, LOCAL_START_TRIES + 1):
        try:
            ray.init(address="local", **options)
            return
        except Exception as e:  # Ray raises a bare Exception for this one
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
    raise ClusterError(f"Ray could not start on this machine: its raylet did not register within Ray's 30 s, "
                       f"{LOCAL_START_TRIES} times (are all cores busy?); try again when the machine is less "
                       f"loaded, or pass --verbose to see Ray's logs")


def runtime_env(not_shipped=()) -> dict:
    """Ray's runtime environment that ships ROOT to every node: trials there import it from Ray's copy."""
    excludes = set(NOT_SHIPPED)
    excludes.update(p.name for p in ROOT.iterdir() if (p / "pyvenv.cfg").is_file())  # venvs, whatever their names
    for path in [sys.prefix, *not_shipped]:
        inside = _path_inside_root(path)
        if inside:
            excludes.add(f"/{inside}")
    return {"working_dir": str(ROOT), "excludes": sorted(excludes)}


def _path_inside_root(path):
    """`path` relative to ROOT, if it is a local path that exists below ROOT (URIs and names are not)."""
    if not path or "://" in str(path):
        return None
    resolved = Path(path).expanduser().resolve()
    if resolved == ROOT or not resolved.is_relative_to(ROOT) or not resolved.exists():
        return None
    return resolved.relative_to(ROOT).as_posix()


def _use_token_if_available():
    """Send the authentication token with an explicit address too, as ray.init does for 'auto'.

    Ray turns on token mode by itself only for a cluster it finds on this machine (address 'auto'):
    with an explicit address it would connect without the token and be refused. Token mode on a
    cluster without authentication is harmless; an explicit RAY_AUTH_MODE is left as it is.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH is {os.environ.get('RAY_AUTH_TOKEN_PATH')}, a missing or empty "
                           f"file; {GET_TOKEN} into it") from None


def _check_joinable(address: str, verbose: bool):
    """Fail in seconds, not Ray's minute of retries, when nothing listens or the token is refused."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return  # Ray finds 'auto' itself; ray:// is Ray Client
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one there with "
                           f"`ray start --head`, or pass the address it printed") from None
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return
    with contextlib.nullcontext() if verbose else _native_stderr_silenced():
        try:
            GcsClient(address=address)  # one attempt; ray.init would retry a refused token for 20 s
        except AuthenticationError:
            raise ClusterError(_auth_failure(address)) from None
        except Exception:  # anything else: ray.init tries again and reports it
            pass


@contextlib.contextmanager
def _native_stderr_silenced():
    """Ray's C++ client logs each refused attempt straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def token_source():
    """Where Ray reads this machine's token from, in Ray's order; None without one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    default = Path.home() / ".ray" / "auth_token"
    return "~/.ray/auth_token" if default.is_file() and default.read_text().strip() else None


def _auth_failure(address: str) -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return (f"the Ray cluster at {address} requires token authentication, but RAY_AUTH_MODE=disabled here; "
                f"unset it (normsweep then sends the token from ~/.ray/auth_token or RAY_AUTH_TOKEN)")
    source = token_source()
    if source is None:
        return (f"the Ray cluster at {address} requires an authentication token and none was found here; "
                f"{GET_TOKEN} into ~/.ray/auth_token here, or set RAY_AUTH_TOKEN to it")
    return (f"the Ray cluster at {address} refused the authentication token from {source}; replace it with "
            f"the output of `ray get-auth-token` on the head node")


def _connection_failure(address: str, error: BaseException) -> str:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:  # ray.init wraps the cause in ConnectionError
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, AuthenticationError) or "AuthenticationError" in str(e) or "InvalidAuthToken" in str(e)
           for e in chain):
        return _auth_failure(address)
    return f"cannot join the Ray cluster at {address}: {_last_line(chain[-1])}; --verbose shows Ray's output"


class StopRetrying(tune.Callback):
    """No more retries once a trial failed in a way no retry can fix.

    Tune retries a failed trial up to `max_failures` times, which helps when a worker died. Code or a
    package missing on a node fails every retry the same way (and fast), so after the first such
    failure every trial gets 0 retries: the trial that hit it runs once more, the others not at all.
    """

    def __init__(self, max_failures: int = MAX_FAILURES):
        self.max_failures = max_failures
        self.unretryable = False

    def setup(self, **info):  # every run, also after Tuner.restore (which unpickles this object)
        self.unretryable = False

    def on_step_begin(self, iteration, trials, **info):
        # Also the trials Tune creates later, and restored ones that were set to 0 by an earlier run.
        for trial in trials:
            trial.max_failures = 0 if self.unretryable else self.max_failures

    def on_trial_recover(self, iteration, trials, trial, **info):
        if not self.unretryable and unretryable(_latest_error(trial)):
            self.unretryable = True
            self.on_step_begin(iteration, trials)


def _latest_error(trial) -> str:
    """The text of the trial's latest failure, from the error file Tune has just written."""
    path = trial.error_file
    if not path or not Path(path).is_file():
        return ""
    return Path(path).read_text().rpartition("Failure # ")[2]


def unretryable(error) -> bool:
    """A trial failure (an exception or its text) that a retry cannot fix."""
    return isinstance(error, RuntimeEnvSetupError) or bool(UNRETRYABLE.search(str(error)))


def failure_cause(error, ship_code: bool = True) -> str:
    """What a failed trial's error means for the user, in one line."""
    text = str(error)
    missing = re.search(r"^(?:ModuleNotFoundError|ImportError): .*$", text, re.M)
    if missing:
        module = re.search(r"No module named '([\w.]+)'", missing[0])
        if module and _is_project_module(module[1]):
            if ship_code:
                return (f"a worker node could not import normsweep's code although it was shipped ({missing[0]}); "
                        f"--verbose shows Ray's output")
            return (f"normsweep's code is not on the worker node ({missing[0]}); drop --no-ship-code, or install "
                    f"normsweep on every node")
        return (f"a worker node lacks a package normsweep needs ({missing[0]}); install requirements.txt there, "
                f"in the Python that `ray start` runs")
    full = experiments.FULL_STORAGE.search(text)
    if full:
        return (f"the storage path is full ({full[0]}); free space there or pass another --storage-path, "
                f"then --resume")
    if "failed to import on the worker" in text:
        return (f"a worker node could not load normsweep's trainable ({_last_line(text)}); give every node "
                f"the driver's Python and requirements.txt")
    if isinstance(error, RuntimeEnvSetupError) or "Failed to set up runtime environment" in text:
        return f"a worker node could not set up the shipped code ({_last_line(text)}); --verbose shows Ray's output"
    if isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        return f"{type(error.cause).__name__}: {_first_line(error.cause)}"
    died = re.search(r"Worker exit detail: (.*?)(?:\n|$)", text)
    if died:
        return f"its worker died ({died[1].strip()})"
    return _last_line(text) or type(error).__name__


def failure_lines(failed, ship_code: bool = True) -> list:
    """One line per distinct cause among the failed results (ray.tune.Result), naming the trials it hit
    unless it hit them all: '4 trials failed: <cause>' rather than the same traceback four times."""
    by_cause = {}
    for result in failed:
        by_cause.setdefault(failure_cause(result.error, ship_code), []).append(Path(result.path).name)
    lines = []
    for cause, names in by_cause.items():
        if len(names) == 1:
            lines.append(f"trial {names[0]} failed: {cause}")
        elif len(by_cause) == 1:
            lines.append(f"{len(names)} trials failed: {cause}")
        else:
            lines.append(f"{len(names)} trials failed ({', '.join(names)}): {cause}")
    return lines


def _is_project_module(name: str) -> bool:
    return (ROOT / f"{name.split('.')[0]}.py").is_file()


def _first_line(error) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _last_line(error) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__
