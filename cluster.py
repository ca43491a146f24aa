"""Connecting to Ray (a private one, or a cluster joined with this directory's code shipped to every node), and
what a sweep's failed trials mean. Import it before Ray, which reads the environment it sets once, at import."""
import contextlib
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path


def token_source():
    """Where Ray reads this machine's token from, in Ray's order; None without one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    default = Path.home() / ".ray" / "auth_token"
    return "~/.ray/auth_token" if default.is_file() and default.read_text().strip() else None


# With an explicit address Ray sends this machine's token only in token mode (a cluster without authentication
# ignores it). Not once Ray is imported: its processes would start in token mode, its driver would not.
if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules and token_source():
    os.environ["RAY_AUTH_MODE"] = "token"
# Errors nodes push to the driver are printed by a thread of Ray's (console.quiet_ray keeps them off stdout), but
# not repeats, which Ray holds back to print from the main thread as it stops.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
from ray.exceptions import AuthenticationError, RayTaskError, RuntimeEnvSetupError  # noqa: E402

from errors import ClusterError  # noqa: E402
import experiments  # noqa: E402

ROOT = Path(__file__).resolve().parent  # the working directory shipped to the nodes
MAX_FAILURES = 3  # Tune's retries of a failed trial, each from the trial's latest checkpoint
LOCAL_START_TRIES = 3
# Never shipped (gitignore patterns under ROOT), nor venvs, storage and data inside ROOT; Ray honours .gitignore too
NOT_SHIPPED = ["/results", "/data", "/docs", ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache",
               ".ipynb_checkpoints"]


@contextlib.contextmanager
def interrupts_held(then_raise: bool = True):
    """Hold Ctrl-C (and a SIGTERM forwarded to it) while Ray starts or stops: taken halfway, the driver crashed at exit
    (SIGSEGV). Raised as KeyboardInterrupt when the block ends (`then_raise`), else dropped. Main thread only."""
    if threading.current_thread() is not threading.main_thread():  # no signals there
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
    """ray.init: a private local Ray without `address` (or with 'local'), whose workers import ROOT, else the cluster
    there (`resolve`), shipping ROOT less `not_shipped` (e.g. the storage path) unless `ship_code` is off, and `modules`
    (a user's .py files, e.g. a --model builder, importable by file name on every node; None entries skipped). Raises
    ClusterError; a Ctrl-C while Ray starts or joins is raised as KeyboardInterrupt once it has (`interrupts_held`)."""
    options = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)
    if not address or address == "local":
        with interrupts_held():  # Ray puts the driver's script directory on its workers' paths: not ROOT for a notebook
            paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
            return _start_local(runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}, **options)
    address, shown = resolve(address)
    env = runtime_env(not_shipped) if ship_code else {}
    if any(modules):
        env["py_modules"] = [str(Path(m).resolve()) for m in modules if m]
    try:
        with interrupts_held():
            ray.init(address=address, runtime_env=env or None, **options)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as e:  # ValueError: a bad address, ...
        raise ClusterError(_connection_failure(shown, e)) from None


def resolve(address: str):
    """(address, how to name it: with where `auto` found it, in Ray's order: RAY_ADDRESS, then the file the last
    `ray start` here left). Raises ClusterError within seconds unless it is [ray://]HOST:PORT where a Ray GCS (or Ray
    Client server) answers."""
    source, current = "", Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray",
                               "ray_current_cluster")  # Ray's temporary directory on Linux
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "; --address auto read it from RAY_ADDRESS"
    elif address == "auto" and current.is_file():
        address, source = current.read_text().strip(), f"; --address auto read it from {current}, left by `ray start`"
    if address == "auto" or "://" in address.removeprefix("ray://"):  # none found, or another scheme: Ray's to check
        return address, address
    host, _, port = address.removeprefix("ray://").rpartition(":")  # Ray Client's server is gRPC too
    if not (host and port.isdigit() and int(port) < 65536):
        raise ClusterError(f"--address: {address} is not HOST:PORT{source}; pass the address `ray start --head` "
                           f"printed, e.g. 10.0.0.1:6379")
    refused = _refused(host.strip("[]"), int(port))
    if refused:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({refused}{source}); start one there with "
                           f"`ray start --head`, or pass the address it printed")
    return address, f"{address} ({source[2:]})" if source else address


def _start_local(**options) -> None:
    """ray.init of a private Ray, tried again when its raylet misses Ray's 30 s to register (all cores busy)."""
    for _ in range(LOCAL_START_TRIES):
        try:
            ray.init(address="local", **options)
            return
        except Exception as e:  # Ray raises a bare Exception for a slow start, OSError for a long TMPDIR
            if "AF_UNIX path length" in str(e):
                raise ClusterError(f"Ray cannot start here: its socket path {str(e).rsplit(': ', 1)[-1]} is longer "
                                   f"than Unix allows (107 bytes); set RAY_TMPDIR to a shorter directory, e.g. "
                                   f"RAY_TMPDIR=/tmp") from None
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
    raise ClusterError(f"Ray could not start on this machine: its raylet did not register within Ray's 30 s, "
                       f"{LOCAL_START_TRIES} times (are all cores busy?); try again when the machine is less "
                       f"loaded, or pass --verbose to see Ray's logs")


def _refused(host: str, port: int):
    """Why host:port is no Ray GCS within 5 s (e.g. 'Connection refused'), or None. A GCS, a gRPC server, sends an
    HTTP/2 SETTINGS frame as it takes a connection (with TLS on, RAY_USE_TLS, it waits for the client's hello)."""
    try:
        with socket.create_connection((host, port), timeout=5) as connection:
            if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true") and connection.recv(9)[3:4] != b"\x04":
                return "something else listens there"
    except OSError as e:  # TimeoutError too: nothing listening, or not answering
        return e.strerror or str(e)


@contextlib.contextmanager
def exit_if_ray_stops(words):
    """While the block runs, print `words` and exit 143 once the local Ray's GCS refuses connections (each second): a
    SIGTERM to the process group stops Ray too, and Ray would end the driver 60 s later in its own words. No `words`:
    a no-op."""
    host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    done = threading.Event()

    def watch():
        while words and not done.wait(1):
            try:  # the kernel takes a connection for a live process however busy: refused means gone
                socket.create_connection((host, int(port)), timeout=5).close()
            except ConnectionRefusedError:
                if not done.is_set():
                    print(words, file=sys.stderr, flush=True)
                    os._exit(128 + signal.SIGTERM)
            except OSError:  # a full backlog's timeout: alive
                pass

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        done.set()


def runtime_env(not_shipped=()) -> dict:
    """Ray's runtime environment that ships ROOT to every node: trials there import it from Ray's copy."""
    excludes = set(NOT_SHIPPED) | {p.name for p in ROOT.iterdir() if (p / "pyvenv.cfg").is_file()}  # any venv
    for path in [sys.prefix, *not_shipped]:
        if path and "://" not in str(path):  # URIs and dataset names are not paths below ROOT
            resolved = Path(path).expanduser().resolve()
            if resolved != ROOT and resolved.is_relative_to(ROOT) and resolved.exists():
                excludes.add(f"/{resolved.relative_to(ROOT).as_posix()}")
    return {"working_dir": str(ROOT), "excludes": sorted(excludes)}


def _connection_failure(address: str, error: BaseException) -> str:
    """The token's hint when the cluster refused it, else the last line of Ray's own error."""
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:  # ray.init wraps the cause in ConnectionError
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    source, cluster = token_source(), f"the Ray cluster at {address}"
    if not any(isinstance(e, AuthenticationError) or "InvalidAuthToken" in str(e) for e in chain):
        return f"cannot join {cluster}: {_last_line(chain[-1])}; " + (  # ValueError: a package too large to ship
            f"list large files in a .rayignore in {ROOT}, or install normsweep on every node and pass --no-ship-code"
            if "Package size" in str(error) else "--verbose shows Ray's output")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return (f"{cluster} requires token authentication, but RAY_AUTH_MODE=disabled here; unset it (normsweep "
                f"then sends the token from ~/.ray/auth_token or RAY_AUTH_TOKEN)")
    if source is None:
        return (f"{cluster} requires an authentication token and none was found here; copy the output of "
                f"`ray get-auth-token` on the head node into ~/.ray/auth_token here, or set RAY_AUTH_TOKEN to it")
    return (f"{cluster} refused the authentication token from {source}; replace it with the output of "
            f"`ray get-auth-token` on the head node")


def failure_cause(error, ship_code: bool = True) -> str:
    """What a failed trial's error (an exception or its text) means for the user, in one line."""
    text = str(error)
    missing = re.search(r"^(?:ModuleNotFoundError|ImportError): .*$", text, re.M)
    module = missing and re.search(r"No module named '(\w+)", missing[0])
    if module and (ROOT / f"{module[1]}.py").is_file():  # one of normsweep's own modules
        if ship_code:
            return (f"a worker node could not import normsweep's code although it was shipped ({missing[0]}); "
                    f"--verbose shows Ray's output")
        return (f"normsweep's code is not on the worker node ({missing[0]}); drop --no-ship-code, or install "
                f"normsweep on every node")
    if missing:
        return (f"a worker node lacks a package normsweep needs ({missing[0]}); install requirements.txt there, "
                f"in the Python that `ray start` runs")
    full = experiments.FULL_STORAGE.search(text)
    if full:
        return f"the storage path is full ({full[0]}); free space there or pass another --storage-path, then --resume"
    if "failed to import on the worker" in text:
        return (f"a worker node could not load normsweep's trainable ({_last_line(text)}); give every node "
                f"the driver's Python and requirements.txt")
    if isinstance(error, RuntimeEnvSetupError) or "Failed to set up runtime environment" in text:
        return f"a worker node could not set up the shipped code ({_last_line(text)}); --verbose shows Ray's output"
    if isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        return f"{type(error.cause).__name__}: {(str(error.cause).strip().splitlines() or [''])[0]}"
    died = re.search(r"Worker exit detail: (.*?)(?:\n|$)", text)
    return f"its worker died ({died[1].strip()})" if died else _last_line(error)


def failure_lines(failed, ship_code: bool = True) -> list:
    """One line per distinct cause among the failed results (ray.tune.Result), naming the trials it hit
    unless it hit them all: '4 trials failed: <cause>' rather than the same traceback four times."""
    by_cause = {}
    for result in failed:
        by_cause.setdefault(failure_cause(result.error, ship_code), []).append(Path(result.path).name)
    return [f"trial {names[0]} failed: {cause}" if len(names) == 1
            else f"{len(names)} trials failed: {cause}" if len(by_cause) == 1
            else f"{len(names)} trials failed ({', '.join(names)}): {cause}" for cause, names in by_cause.items()]


def _last_line(error) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__
