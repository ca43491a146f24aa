"""The results contract: where normsweep experiments live and what a reader may rely on in them.

An experiment is `<storage path>/<name>/`, Ray Tune's experiment directory plus normsweep's launch
file. The storage path is a local directory or any URI `pyarrow.fs` resolves (`s3://bucket/prefix`,
`gs://...`, `file:///...`); S3 takes its endpoint and credentials the way every S3 client does
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, an instance role).
Every read and write of an experiment by the CLI, the analysis and the notebook goes through here;
Ray Tune writes its own files to the same place. Layout (docs/usage.md, "The results directory"):
    <name>/normsweep_launch.json              the CLI settings of the launch (LAUNCH_FILE)
    <name>/experiment_state-*.json            Tune's state: an experiment Tune started has one
    <name>/<trial>/result.json                one JSON line per reported epoch
    <name>/<trial>/checkpoint_NNNNNN/state.pt the best and the latest checkpoint
No Ray here: the analysis reads experiments without starting Ray.
"""
import json
import math
import os
import pickletools
import re
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

import config
from errors import ExperimentError, NormsweepError, UsageError

LAUNCH_FILE = "normsweep_launch.json"  # the CLI settings an experiment was started with (for --resume)
STATE_PREFIX = "experiment_state-"  # Tune's experiment state files: experiment_state-<time>.json
RESULT_FILE = "result.json"
HEALTH_KEY = "health"  # each epoch's result: "ok", or why the trial stopped early ("diverged: ...")
# What an operating system or object store says when storage ran out (ENOSPC, EDQUOT, S3 quota).
FULL_STORAGE = re.compile(r"No space left on device|Disk quota exceeded|\[Errno 28\]|\[Errno 122\]|QuotaExceeded")


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location) -> str:
    """A storage path or experiment as Ray Tune and every reader take it: a URI as given, a local
    path with `~` expanded and made absolute (so it means the same from any working directory)."""
    location = str(location)
    if is_uri(location):
        return location
    typo = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/+(?!/)(.*)", location)
    if typo and typo[1].lower() in ("s3", "gs", "gcs", "hdfs", "file", "abfs", "az"):  # s3:/bucket: one slash short
        raise ExperimentError(f"{location!r} looks like a URI with a slash missing; did you mean "
                              f"{typo[1]}://{typo[2]}?")
    return str(Path(location).expanduser().resolve())


def join(location: str, *names: str) -> str:
    """location/name/... for a local path or a URI (a URI's query string, e.g. `?region=...`, stays last)."""
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


def sibling(location: str, name: str) -> str:
    """The experiment `name` beside `location` under the same storage path (a URI's query string kept)."""
    base, sep, query = str(location).partition("?")
    return join(base.rstrip("/").rsplit("/", 1)[0] + sep + query, name)


def name_of(location: str) -> str:
    """The last component: an experiment's name, or a trial directory's name."""
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


# URI -> its file system, resolved once per process (resolving S3 credentials is not free), and the one
# a Ray Tune ResultGrid was read with (location_of), so that both name the same store.
_FILESYSTEMS = {}
_SCHEMES = {"s3": "s3", "gcs": "gs"}  # pyarrow's type_name -> URI scheme


def filesystem(location: str):
    """(pyarrow FileSystem, path on it) of a local path or URI; a one-line ExperimentError if unresolvable."""
    location = resolve(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    base = location.partition("?")[0]
    for known, fs in _FILESYSTEMS.items():  # a URI below one already resolved: the same store
        if base == known or base.startswith(known.rstrip("/") + "/"):
            return fs, base.split("://", 1)[1].rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as e:  # unknown scheme, bad URI, no credentials
        raise ExperimentError(f"cannot open storage {location} ({_reason(e)}); check the URI, and for s3:// "
                              f"the endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    _FILESYSTEMS[f"{base.split('://', 1)[0]}://{path.split('/', 1)[0]}"] = fs  # the bucket
    return fs, path


def location_of(fs, path: str) -> str:
    """The location string of `path` on `fs` (a Ray Tune result's filesystem and path): the local path,
    or a URI that `filesystem` maps back to this very fs."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = _SCHEMES.get(fs.type_name, fs.type_name)
    root = f"{scheme}://{path.split('/', 1)[0]}"
    _FILESYSTEMS.setdefault(root, fs)
    return f"{scheme}://{path}"


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


REFUSED_CREDENTIALS = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|"
                                 r"\b403\b|PERMISSION_DENIED")
PROBE_SECONDS = 60  # the first request to a store; some clients retry an unreachable endpoint for many minutes


def _info(location: str):
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:  # an unreachable endpoint, refused credentials, a missing bucket
        if REFUSED_CREDENTIALS.search(str(e)):
            raise ExperimentError(f"{location}: the store refused these credentials ({_reason(e)}); check "
                                  f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE (for gs://, Google's "
                                  f"application default credentials) and the bucket's permissions") from None
        raise ExperimentError(f"cannot reach {location} ({_reason(e)}); check the storage path, the network "
                              f"and for s3:// the endpoint and credentials") from None


def _probe(location: str):
    """_info, given up after PROBE_SECONDS with a one-line ExperimentError (the request runs on, in a daemon
    thread, and ends with the process)."""
    outcome = {}

    def ask():
        try:
            outcome["info"] = _info(location)
        except ExperimentError as e:
            outcome["error"] = e

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(PROBE_SECONDS)
    if asker.is_alive():
        raise ExperimentError(f"no answer from {location} within {PROBE_SECONDS} s; check the network and the "
                              f"endpoint (AWS_ENDPOINT_URL for S3-compatible stores)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["info"]


def exists(location: str) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError:
        raise ExperimentError(f"{location} not found") from None
    except OSError as e:
        raise ExperimentError(f"cannot read {location} ({_reason(e)})") from None


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise ExperimentError(f"cannot write {location} ({_reason(e)}); check the storage path is writable") from None


def _children(location: str) -> list:
    """FileInfo of the entries directly under location (none if it does not exist)."""
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise ExperimentError(f"cannot list {location} ({_reason(e)}); check the storage path and its credentials") from None


def check_storage(storage: str) -> None:
    """Refuse a storage path that cannot hold experiments, without making anything (a refused launch
    leaves no directory behind): a local path must lead to a writable directory; a URI must be reachable."""
    if is_uri(storage):
        fs, path = filesystem(storage)
        bucket = path.split("/", 1)[0]
        if fs.type_name in ("s3", "gcs") and _probe(storage.split("://", 1)[0] + "://" + bucket).type == pafs.FileType.NotFound:
            raise ExperimentError(f"storage path {storage}: bucket {bucket!r} does not exist (or these credentials "
                                  f"cannot see it); create it or pass another --storage-path")
        if _info(storage).type == pafs.FileType.File:
            raise ExperimentError(f"storage path {storage} is a file; pass a directory prefix as --storage-path")
        return
    path = Path(storage)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write results to {path} ({existing} is not a writable directory); "
                                f"pass a writable --storage-path")


def state_files(experiment: str) -> list:
    """FileInfo of Tune's experiment_state-*.json files of an experiment (none: Tune never saved its state)."""
    return [info for info in _children(experiment) if info.is_file and info.base_name.startswith(STATE_PREFIX)]


def is_experiment(location: str) -> bool:
    """A Ray Tune experiment directory (Tune saved its state there)."""
    return bool(state_files(location))


def started(experiment: str) -> bool:
    """Launched by normsweep and started by Tune (a launch killed before Tune saved state is not)."""
    return exists(join(experiment, LAUNCH_FILE)) and is_experiment(experiment)


def read_launch(experiment: str) -> dict:
    """The launch settings saved in an experiment; {} for an experiment without them."""
    launch_file = join(experiment, LAUNCH_FILE)
    if not exists(launch_file):
        return {}
    try:
        return json.loads(read_text(launch_file))
    except json.JSONDecodeError as e:
        raise ExperimentError(f"{launch_file} is damaged ({e.msg} at line {e.lineno}); "
                              f"restore it or start a new experiment") from None


def read_sweep(experiment: str):
    """The config.SweepConfig an experiment was launched with (UsageError if another version wrote it)."""
    return config.SweepConfig().from_launch(read_launch(experiment))


def write_launch(experiment: str, settings: dict) -> None:
    write_bytes(join(experiment, LAUNCH_FILE), json.dumps(settings, indent=1).encode())


def claim(experiment: str, settings: dict) -> bool:
    """Make the experiment's directory and write its launch settings, unless it exists; False if it does.

    On a local file system the claim is atomic (one mkdir), so two launches given the same --name
    cannot both run into one directory. Object stores have no atomic create: there the check and the
    write are two requests, and two launches within that moment could both pass.
    """
    if is_uri(experiment):
        if exists(experiment):
            return False
    else:
        path = Path(experiment)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except FileExistsError:
            return False
        except OSError as e:
            raise ExperimentError(f"cannot make {path} ({e.strerror}); pass a writable --storage-path") from None
    write_launch(experiment, settings)
    return True


def trial_finished(last: dict, epochs: int) -> bool:
    """A trial's last result says it ran all its epochs or stopped on its own (diverged)."""
    return last.get("epoch", 0) >= epochs or last.get(HEALTH_KEY, "ok") != "ok"


def trials_left(experiment: str, sweep) -> int:
    """Trials of an experiment (its config.SweepConfig) still to run, none started counted too, from the trials'
    result.json."""
    done = sum(trial_finished(last, sweep.epochs) for last in last_results(experiment).values())
    return max(0, math.prod(len(values) for values in config.grid_axes(sweep).values()) - done)


def _experiments(storage: str):
    """(name, location, launch file's or Tune state's newest mtime) per experiment directory under storage."""
    for entry in _children(storage):
        if entry.type == pafs.FileType.Directory:
            yield entry.base_name, join(storage, entry.base_name)


def latest_started(storage: str) -> str:
    """The newest (by its launch file) unfinished experiment under storage that Tune started, for a bare --resume;
    UsageError if there is none. One whose launch file is damaged or of another version is passed over."""
    launched, finished = [], []
    for name, experiment in _experiments(storage):
        info = _info(join(experiment, LAUNCH_FILE))
        if info.type != pafs.FileType.File or not is_experiment(experiment):
            continue
        try:
            sweep = read_sweep(experiment)  # a tuning stage whose final stage was never claimed is unfinished too
            left = trials_left(experiment, sweep) or (sweep.stage == "tuning" and not exists(
                join(storage, sweep.final_name, LAUNCH_FILE)))
        except NormsweepError:
            continue
        (launched if left else finished).append((info.mtime_ns or 0, name))
    if launched:
        return max(launched)[1]
    if finished:
        raise UsageError(f"--resume: every experiment under {storage} has finished (the latest is "
                         f"{max(finished)[1]}); pass --name to print one's table again")
    raise UsageError(f"--resume: no normsweep experiment under {storage}; pass --storage-path and --name")


def latest(storage: str) -> str:
    """The newest experiment under storage by Tune's state file (what the notebook opens by default)."""
    found = [(info.mtime_ns or 0, experiment) for _, experiment in _experiments(storage)
             for info in state_files(experiment)]
    if not found:
        raise ExperimentError(f"no experiment under {storage}; run `python tune_main.py --smoke-test` first, "
                              f"or set NORMSWEEP_EXPERIMENT to an experiment directory")
    return max(found)[1]


def _results(experiment: str):
    """(trial directory name, result.json location, its text) per trial that has a result.json."""
    for name, trial in _experiments(experiment):
        if exists(join(trial, RESULT_FILE)):
            yield name, join(trial, RESULT_FILE), read_text(join(trial, RESULT_FILE))


def last_results(experiment: str) -> dict:
    """Per trial directory name, its last reported result (the last line of result.json; {} if none yet).
    A last line cut off mid-write is not a result: the one before it is the last (see `damage`)."""
    last = {}
    for name, _, text in _results(experiment):
        complete = [p for p in map(_json_or_none, text.splitlines()) if isinstance(p, dict)]
        last[name] = complete[-1] if complete else {}
    return last


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:  # a line cut off mid-write, or blank
        return None


SEARCH_STATE_PREFIX = "basic-variant-state-"  # Tune's grid-search state, the newest one restored


def _pickle_problem(data: bytes):
    """Why `data` is not a whole pickle, read opcode by opcode without running any of it; None if it is."""
    try:
        last = None
        for last, _, _ in pickletools.genops(data):
            pass
    except Exception as e:  # pickletools raises ValueError and others on truncated or garbled data
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
    return None if last is not None and last.name == "STOP" else "no end marker"


def damage(experiment: str):
    """A one-line description of the first damaged file of an experiment (Tune's newest state file, the launch
    file, Tune's pickled tuner and search state, a trial's result.json with a line that is not JSON: a write cut
    off, typically by a full disk), or None when every one of them reads."""
    files = sorted(info.base_name for info in _children(experiment) if info.is_file)
    newest = [f for f in files if f.startswith(STATE_PREFIX)][-1:] + [f for f in files if f == LAUNCH_FILE]
    for location in (join(experiment, name) for name in newest):
        try:
            json.loads(read_text(location))
        except json.JSONDecodeError as e:
            return f"{location} is cut off or corrupt ({e.msg} at character {e.pos} of {len(e.doc)})"
    # Tune's pickled state: tuner.pkl and its newest search state (basic-variant-state-*.json is a pickle too)
    pickles = [f for f in files if f.endswith(".pkl")] + [f for f in files if f.startswith(SEARCH_STATE_PREFIX)][-1:]
    for location in (join(experiment, name) for name in pickles):
        problem = _pickle_problem(read_bytes(location))
        if problem:
            return f"{location} is cut off or corrupt ({problem})"
    for _, result_file, text in _results(experiment):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not isinstance(_json_or_none(line), dict):
                return f"{result_file} line {number} is cut off or corrupt"
    return None


def nearly_full(storage: str) -> bool:
    """A local storage path with under 1 MiB free (an object store's quota cannot be asked this way)."""
    if is_uri(storage):
        return False
    path = Path(storage)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free < 2**20


def check_intact(experiment: str, what: str) -> None:
    """Refuse, in one line, to `what` (resume, analyse) an experiment with a damaged file."""
    damaged = damage(experiment)
    if not damaged:
        return
    remedy = {"resume": "Tune cannot restore it: start the sweep again under a new --name (the trials' "
                        "checkpoints stay in their directories)",
              "analyse": "delete a result.json's cut-off last line (that epoch is lost), or analyse another "
                         "experiment"}[what]
    raise ExperimentError(f"cannot {what} {experiment}: {damaged}; it was probably written while the storage "
                          f"was full. {remedy}")


def delete(location: str) -> None:
    """Remove a directory tree (a launch that Tune never started); quiet if it is already gone."""
    fs, path = filesystem(location)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def variant_label(config: dict) -> str:
    """A trial's label less its seed, from its Tune config: the variant (an L1 lambda in brackets), and where
    they vary, the learning rate and weight decay of a tuning stage, the arm of a tuned comparison's final
    stage (tuned or recipe) and the batch size of a batch-size study. Trials that differ in anything but
    the seed never share a label, so every table and curve keeps them apart."""
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
    """How a report names an experiment: a URI as it is; a local path relative to the working
    directory when inside it, else its name (no machine paths in a report)."""
    if is_uri(location):
        return location
    path = Path(location).resolve()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else path.name
