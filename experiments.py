"""Where an experiment lives and what a reader may rely on in it (no Ray): every read and write of the CLI, the
analysis and the notebook goes through here. An experiment, `<storage path>/<name>/`, is self-contained: it resumes
and is analysed wherever it is moved or copied. The storage path is a local directory or a URI pyarrow.fs resolves
(`s3://bucket/prefix`, `gs://`); S3 reads AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as every S3 client does.
    <name>/normsweep_launch.json (LAUNCH_FILE), normsweep_owner.json (OWNER_FILE), experiment_state-*.json (Tune's)
    <name>/<trial>/result.json, progress.csv, checkpoint_NNNNNN/state.pt, epochs.json (the best and the latest)
"""
import base64
import contextlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.fs as pafs
from filelock import FileLock, Timeout

import config
from errors import ExperimentError, NormsweepError, UsageError

LAUNCH_FILE = "normsweep_launch.json"
OWNER_FILE, LOCK_FILE = "normsweep_owner.json", ".normsweep.lock"
STATE_PREFIX, SEARCH_STATE_PREFIX = "experiment_state-", "basic-variant-state-"  # Tune's (the search's is a pickle)
SEARCHER_STATE_PREFIX = "searcher-state-"  # --seeds auto: Tune's <prefix><session>.pkl of rounds.Rounds.save
RESULT_FILE, PROGRESS_FILE = "result.json", "progress.csv"
EPOCHS_FILE = "epochs.json"  # in each checkpoint_*: a JSON list of the trial's reports (dicts) up to that epoch
CORRECT_KEY = "test_correct"  # each epoch's result: packed_correct of the one view's right answers on the scored split
HEALTH_KEY = "health"  # each epoch's result: "ok", or why the trial stopped early ("diverged: ...")
# What an operating system or object store says when storage ran out (ENOSPC, EDQUOT, S3 quota).
FULL_STORAGE = re.compile(r"No space left on device|Disk quota exceeded|\[Errno 28\]|\[Errno 122\]|QuotaExceeded")
REFUSED_CREDENTIALS = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|"
                                 r"\b403\b|PERMISSION_DENIED")
PROBE_SECONDS = 60  # the first request to a store; some clients retry an unreachable endpoint for many minutes
INPUTS = {"data": "the dataset's images or labels", "model": "the --model file"}  # launch file's "inputs" keys
_FILESYSTEMS = {}  # "scheme://bucket" -> its file system, resolved once per process (credentials are not free)


def is_uri(location) -> bool:
    return "://" in str(location)


def resolve(location) -> str:
    """A location as every reader takes it: a URI as given, a local path absolute with `~` expanded."""
    location = str(location)
    typo = re.match(r"(s3|gs|gcs|hdfs|file|abfs|az):/(.*)", location, re.IGNORECASE)
    if typo and not is_uri(location):
        raise ExperimentError(f"{location!r} looks like a URI with a slash missing; "
                              f"did you mean {typo[1]}://{typo[2]}?")
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *names: str) -> str:
    """location/name/... for a local path or a URI (a URI's query string, e.g. `?region=...`, stays last)."""
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


def sibling(location: str, name: str) -> str:
    """The experiment `name` beside `location` under the same storage path."""
    base, sep, query = str(location).partition("?")
    return join(base.rstrip("/").rsplit("/", 1)[0] + sep + query, name)


def filesystem(location: str):
    """(pyarrow FileSystem, path on it) of a local path or URI; ExperimentError if it cannot be resolved."""
    location = resolve(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    base = location.partition("?")[0]
    if (root := "/".join(base.split("/", 3)[:3])) in _FILESYSTEMS:  # "scheme://bucket"
        return _FILESYSTEMS[root], base.split("://", 1)[1].rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as e:  # unknown scheme, bad URI, no credentials
        raise ExperimentError(f"cannot open storage {location} ({_reason(e)}); check the URI, and for s3:// "
                              f"the endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    _FILESYSTEMS[f"{base.split('://', 1)[0]}://{path.split('/', 1)[0]}"] = fs
    return fs, path


def location_of(fs, path: str) -> str:
    """The location of `path` on `fs` (a Tune result's): the local path, or a URI `filesystem` maps to this fs."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = {"gcs": "gs"}.get(fs.type_name, fs.type_name)
    _FILESYSTEMS.setdefault(f"{scheme}://{path.split('/', 1)[0]}", fs)
    return f"{scheme}://{path}"


def _reason(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _on(location: str, action, doing: str):
    """action(fs, path) on location's store, its OSError one ExperimentError saying what could not be done."""
    fs, path = filesystem(location)
    try:
        return action(fs, path)
    except FileNotFoundError:
        raise ExperimentError(f"{location} not found") from None
    except OSError as e:
        if REFUSED_CREDENTIALS.search(str(e)):
            raise ExperimentError(f"{location}: the store refused these credentials ({_reason(e)}); check "
                                  f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE (for gs://, Google's "
                                  f"application default credentials) and the bucket's permissions") from None
        raise ExperimentError(f"cannot {doing} {location} ({_reason(e)}); check the storage path, its permissions "
                              f"and for s3:// the endpoint and credentials") from None


def info(location: str):
    return _on(location, lambda fs, path: fs.get_file_info(path), "reach")


def exists(location: str) -> bool:
    return info(location).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    return _on(location, lambda fs, path: fs.open_input_stream(path).readall(), "read")


def write_bytes(location: str, data: bytes) -> None:
    def write(fs, path):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
    _on(location, write, "write")


def _children(location: str) -> list:
    """FileInfo of the entries directly under location (none if it does not exist)."""
    return _on(location, lambda fs, path: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), "list")


def _probe(location: str):
    """info(location), given up after PROBE_SECONDS (the request runs on in a daemon thread until the process ends)."""
    outcome = []

    def ask():
        try:
            outcome.append(info(location))
        except ExperimentError as e:
            outcome.append(e)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(PROBE_SECONDS)
    if not outcome:
        raise ExperimentError(f"no answer from {location} within {PROBE_SECONDS} s; check the network and the "
                              f"endpoint (AWS_ENDPOINT_URL for S3-compatible stores)")
    if isinstance(outcome[0], ExperimentError):
        raise outcome[0]
    return outcome[0]


def check_storage(storage: str) -> None:
    """Refuse a storage path that cannot hold experiments, making nothing: a local path must lead to a writable
    directory; a URI's bucket must exist and the path must not be a file."""
    if is_uri(storage):
        fs, path = filesystem(storage)
        bucket = path.split("/", 1)[0]
        root = f"{storage.split('://', 1)[0]}://{bucket}"
        if fs.type_name in ("s3", "gcs") and _probe(root).type == pafs.FileType.NotFound:
            raise ExperimentError(f"storage path {storage}: bucket {bucket!r} does not exist (or these credentials "
                                  f"cannot see it); create it or pass another --storage-path")
        if info(storage).type == pafs.FileType.File:
            raise ExperimentError(f"storage path {storage} is a file; pass a directory prefix as --storage-path")
        return
    existing = _nearest(storage)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write results to {storage} ({existing} is not a writable directory); "
                         f"pass a writable --storage-path")


def state_files(experiment: str) -> list:
    """FileInfo of Tune's experiment_state-*.json files (none: Tune never saved its state there)."""
    return [f for f in _children(experiment) if f.is_file and f.base_name.startswith(STATE_PREFIX)]


def is_experiment(location: str) -> bool:
    return bool(state_files(location))


def started(experiment: str) -> bool:
    """Launched by normsweep and started by Tune (a launch killed before Tune saved its state is not)."""
    return exists(join(experiment, LAUNCH_FILE)) and is_experiment(experiment)


def read_launch(experiment: str) -> dict:
    """The launch settings saved in an experiment; {} for an experiment without them."""
    launch_file = join(experiment, LAUNCH_FILE)
    try:
        return json.loads(read_bytes(launch_file)) if exists(launch_file) else {}
    except json.JSONDecodeError as e:
        raise ExperimentError(f"{launch_file} is damaged ({e.msg} at line {e.lineno}); "
                              f"restore it or start a new experiment") from None


def claim(experiment: str, settings: dict) -> bool:
    """Make the experiment's directory and write its launch settings, unless it exists (False). Atomic on a local
    file system (one mkdir); on an object store the check and the write are two requests."""
    if is_uri(experiment) and exists(experiment):
        return False
    if not is_uri(experiment):
        try:
            Path(experiment).mkdir(parents=True)
        except FileExistsError:
            return False
        except OSError as e:
            raise ExperimentError(f"cannot make {experiment} ({e.strerror}); pass a writable --storage-path") from None
    write_bytes(join(experiment, LAUNCH_FILE), json.dumps(settings, indent=1).encode())
    return True


def check_inputs(experiment: str, digests: dict) -> None:
    """Refuse to resume on inputs (`digests`: INPUTS -> sha256) other than those the experiment launched with."""
    saved = read_launch(experiment).get("inputs", {})
    changed = [INPUTS[what] for what, digest in digests.items() if what in saved and saved[what] != digest]
    if changed:
        raise UsageError(f"--resume: {' and '.join(changed)} changed since {experiment} was launched, so its trials "
                         f"would go on with other inputs; restore them, or launch a new experiment")


@contextlib.contextmanager
def owned(experiment: str):
    """Hold the experiment while this run writes it: ExperimentError in one line if another run holds it (a file lock
    the system frees when a run dies; on an object store OWNER_FILE) or this user cannot write it."""
    owner_file, local = join(experiment, OWNER_FILE), not is_uri(experiment)
    lock = FileLock(join(experiment, LOCK_FILE), timeout=0) if local else None
    try:
        if local:
            unwritable = [p for p in [Path(experiment), *Path(experiment).rglob("*")] if not os.access(p, os.W_OK)]
            if unwritable:
                raise PermissionError(f"{unwritable[0]} is not writable by this user")
            lock.acquire()
        elif exists(owner_file):  # stale only if its run has died on this host
            owner = json.loads(read_bytes(owner_file))
            if owner.get("host") != socket.gethostname() or psutil.pid_exists(owner.get("pid", 0)):
                raise Timeout(owner_file)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_bytes(owner_file, json.dumps(me).encode())
    except Timeout:
        stale = "" if local else f", or if it has died, delete {owner_file}"
        raise ExperimentError(f"{experiment} is in use by {holder(experiment) or 'another run'}; wait for that run to "
                              f"end (it prints how to resume){stale}") from None
    except PermissionError as e:
        raise ExperimentError(f"cannot resume {experiment}: {_reason(e)}; ask its owner to resume it, or copy it "
                              f"(cp -a) to a storage path of yours and resume the copy") from None
    try:
        yield
    finally:
        with contextlib.suppress(ExperimentError):
            _on(owner_file, lambda fs, path: fs.delete_file(path), "delete")
        if local:
            lock.release()


def holder(experiment: str):
    """Who holds an experiment, in words ("another run (pid 42 on host, since ...)"), or None."""
    owner_file = join(experiment, OWNER_FILE)
    if not exists(owner_file):
        return None
    if not is_uri(experiment):  # a file a run that died left: nothing holds the lock
        with contextlib.suppress(Timeout, OSError), FileLock(join(experiment, LOCK_FILE), timeout=0):
            return None
    with contextlib.suppress(ExperimentError, ValueError, KeyError):
        owner = json.loads(read_bytes(owner_file))
        return f"another run (pid {owner['pid']} on {owner['host']}, since {owner['since']})"
    return "another run"


def history(trial: str):
    """A trial's reported epochs, a DataFrame row each, Tune's columns (METRICS, `health`, `config/...`): from
    result.json, or progress.csv where it holds more (result.json cut short mid-write): nothing reported is lost."""
    import pandas as pd

    results = map(_json_or_none, _text(join(trial, RESULT_FILE)).splitlines())
    frame = pd.json_normalize([result for result in results if isinstance(result, dict)], sep="/")
    csv = _text(join(trial, PROGRESS_FILE))
    progress = pd.read_csv(io.StringIO(csv), dtype={"trial_id": str}) if csv.strip() else pd.DataFrame()
    frame = progress if len(progress) > len(frame) else frame
    return frame.drop_duplicates("epoch", keep="last") if "epoch" in frame else frame  # an epoch reported twice


def checkpoints(trial: str, epoch: int | None = None) -> list:
    """A trial's checkpoint_* directories with a readable EPOCHS_FILE, latest epoch first, in Tune's state or not (a
    stopped driver's state may lack the newest, and a restored trial's Result names only those it has); `epoch`: only
    the ones whose last reported epoch is that one."""
    found = []
    for location in (c for c in _subdirs(trial) if name_of(c).startswith("checkpoint_")):
        reports = _json_or_none(_text(join(location, EPOCHS_FILE)))
        if (isinstance(reports, list) and reports and isinstance(reports[-1], dict)  # else cut off mid-write
                and epoch in (None, reports[-1].get("epoch"))):
            found.append((reports[-1].get("epoch", 0), name_of(location), location))
    return [location for *_, location in sorted(found, reverse=True)]


def _text(location: str) -> str:
    return read_bytes(location).decode() if exists(location) else ""


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:  # a line cut off mid-write, or blank
        return None


def _subdirs(location: str) -> list:
    """The directories under location: a storage path's experiments, an experiment's trials."""
    return [join(location, f.base_name) for f in _children(location) if f.type == pafs.FileType.Directory]


def name_of(location: str) -> str:
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def last_results(experiment: str) -> dict:
    """Per trial directory name, its last reported result ({} if none yet; history's reading)."""
    last = {}
    for trial in _subdirs(experiment):
        frame = history(trial)
        if len(frame) or exists(join(trial, RESULT_FILE)):
            row = frame.iloc[-1].to_dict() if len(frame) else {}
            last[name_of(trial)] = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
    return last


def trial_finished(last: dict, epochs: int) -> bool:
    """A trial's last result says it ran all its epochs or stopped on its own (diverged)."""
    return last.get("epoch", 0) >= epochs or last.get(HEALTH_KEY, "ok") != "ok"


def planned(sweep) -> int:
    """The trials a config.SweepConfig's grid holds; under --seeds auto, the most it may run (variants x max seeds)."""
    return math.prod(len(values) for values in config.grid_axes(sweep).values())


def trials_left(experiment: str, sweep) -> int:
    """Trials of an experiment (its config.SweepConfig) still to run, those not started counted too; under --seeds
    auto at most that many until its searcher has stopped, then those that failed."""
    lasts = last_results(experiment).values()
    finished = sum(trial_finished(last, sweep.epochs) for last in lasts)
    if sweep.seeds == config.AUTO_SEEDS and searcher_state(experiment).get("stopped"):
        return len(lasts) - finished
    return max(0, planned(sweep) - finished)


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module, name):  # a searcher's state is dicts, lists, strings and numbers: nothing runs
        raise pickle.UnpicklingError(f"{module}.{name} in a searcher's state, which holds builtins only")


def unpickled_state(data: bytes) -> dict:
    """A searcher's state (rounds.Rounds.save: a pickled dict of builtins), refusing anything that would run code."""
    return _BuiltinsOnly(io.BytesIO(data)).load()


def searcher_state(experiment: str) -> dict:
    """The state a --seeds auto experiment's searcher saved last ({} if none: another sweep, or not saved yet)."""
    saved = sorted(f.base_name for f in _children(experiment)
                   if f.is_file and f.base_name.startswith(SEARCHER_STATE_PREFIX) and f.base_name.endswith(".pkl"))
    if not saved:
        return {}
    try:  # session stamps sort as times: the newest last, as Tune picks it
        return unpickled_state(read_bytes(join(experiment, saved[-1])))
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ExperimentError(f"{join(experiment, saved[-1])} is cut off or corrupt ({_reason(e)}); start the sweep "
                              f"again under a new --name") from None


def latest_started(storage: str) -> str:
    """The newest (by its launch file) unfinished experiment under storage that Tune started, for a bare --resume;
    UsageError if there is none. One whose launch file is damaged or of another version is passed over."""
    launched, finished = [], []
    for experiment in _subdirs(storage):
        launch = info(join(experiment, LAUNCH_FILE))
        if launch.type != pafs.FileType.File or not is_experiment(experiment):
            continue
        try:
            sweep = config.SweepConfig().from_launch(read_launch(experiment))
            left = trials_left(experiment, sweep) or (  # a tuning stage is, until its final stage is claimed
                sweep.stage == "tuning" and not exists(join(storage, sweep.final_name, LAUNCH_FILE)))
        except NormsweepError:
            continue
        (launched if left else finished).append((launch.mtime_ns or 0, name_of(experiment)))
    if launched:
        return max(launched)[1]
    if finished:
        raise UsageError(f"--resume: every experiment under {storage} has finished (the latest is "
                         f"{max(finished)[1]}); pass --name to print one's table again")
    raise UsageError(f"--resume: no normsweep experiment under {storage}; pass --storage-path and --name")


def latest(storage: str) -> str:
    """The newest experiment under storage by Tune's state file (what the notebook opens by default)."""
    found = [(f.mtime_ns or 0, experiment) for experiment in _subdirs(storage) for f in state_files(experiment)]
    if not found:
        raise ExperimentError(f"no experiment under {storage}; run `python tune_main.py --smoke-test` first, "
                              f"or set NORMSWEEP_EXPERIMENT to an experiment directory")
    return max(found)[1]


def nearly_full(storage: str) -> bool:
    """A local storage path with under 1 MiB free (an object store's quota cannot be asked this way)."""
    return not is_uri(storage) and shutil.disk_usage(_nearest(storage)).free < 2**20


def _nearest(storage: str) -> Path:
    """A local storage path, or its nearest parent that exists."""
    return next(path for path in [Path(storage), *Path(storage).parents] if path.exists())


def check_intact(experiment: str, what: str) -> None:
    """Refuse to `what` ("resume", "analyse") an experiment, in one line naming its first file cut off (by a full
    disk, typically): Tune's newest state file, the launch file, Tune's pickles, a result.json line."""
    files = sorted(f.base_name for f in _children(experiment) if f.is_file)
    newest = [f for f in files if f.startswith(STATE_PREFIX)][-1:] + [f for f in files if f == LAUNCH_FILE]
    pickles = [f for f in files if f.endswith(".pkl")] + [f for f in files if f.startswith(SEARCH_STATE_PREFIX)][-1:]
    damaged = []
    for name in newest + pickles:
        data = read_bytes(join(experiment, name))
        try:
            if name in newest:
                json.loads(data)
            elif not any(op.name == "STOP" for op, _, _ in pickletools.genops(data)):
                raise ValueError("no end marker")
        except Exception as e:  # json and pickletools raise ValueError and others on cut-off or garbled data
            damaged.append(f"{join(experiment, name)} is cut off or corrupt ({type(e).__name__}: {_reason(e)})")
    for trial in _subdirs(experiment):
        for number, line in enumerate(_text(join(trial, RESULT_FILE)).splitlines(), 1):
            if line.strip() and not isinstance(_json_or_none(line), dict):
                damaged.append(f"{join(trial, RESULT_FILE)} line {number} is cut off or corrupt")
    remedy = {"resume": "Tune cannot restore it: start the sweep again under a new --name (the trials' "
                        "checkpoints stay in their directories)",
              "analyse": "delete a result.json's cut-off last line (that epoch is lost), or analyse another experiment"}
    if damaged:
        raise ExperimentError(f"cannot {what} {experiment}: {damaged[0]}; it was probably written while the storage "
                              f"was full. {remedy[what]}")


def delete(location: str) -> None:
    """Remove a directory tree (a launch that Tune never started); quiet if it is already gone."""
    with contextlib.suppress(ExperimentError):
        _on(location, lambda fs, path: fs.delete_dir(path), "delete")


def variant_label(config: dict) -> str:
    """A trial's label less its seed, unique but for the seed: the variant (an L1 lambda in brackets) and, where they
    vary, a tuning stage's lr and weight decay, a final stage's arm and a batch-size study's batch size."""
    variant = config["variant"]
    label = f"{variant['name']} (λ={variant['l1']:g})" if variant["l1"] else variant["name"]
    if config.get("stage") == "tuning":
        label += f", lr {config['lr']:g}, wd {config['weight_decay']:g}"
    if variant.get("arm"):
        label += f", {variant['arm']}"
    if (config.get("lr_reference_batch") or 0) > 0:  # a batch-size study
        label += f", batch {config['batch_size']}"
    return label


def shown(location: str) -> str:
    """How a report names an experiment: a URI as it is; a local path relative to the working directory when
    inside it, else its name (no machine paths in a report)."""
    if is_uri(location):
        return location
    path = Path(location).resolve()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else path.name


def packed_correct(correct) -> str:
    """bool (N,) -> "N:" and the base64 text of its bits (1.7 KB for 10,000 images), which a result can hold."""
    correct = np.asarray(correct, dtype=bool)
    return f"{len(correct)}:{base64.b64encode(np.packbits(correct).tobytes()).decode()}"


def unpacked_correct(text: str) -> np.ndarray:
    """packed_correct's inverse: bool (N,)."""
    n, bits = text.split(":", 1)
    return np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=int(n)).astype(bool)
