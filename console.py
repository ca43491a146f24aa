"""What the driver prints while a sweep runs: a line per reported epoch (`Progress`), not Ray's logs, warnings,
pushed errors (`quiet_ray`) and its C++ core's log lines (`native_ray_logs_dropped`), both skipped under --verbose."""
import contextlib
import logging
import os
import re
import sys
import threading
import time
import warnings

from ray import tune

import experiments
import trainable

# A line Ray's C++ core logs to file descriptor 2 below FATAL, e.g. "[2026-12-04 12:32:31,266 E 24215 24331]
# core_worker_process.cc:837: Failed to establish connection to the metrics exporter agent ..."; Ray's log files
# hold it too
RAY_NATIVE_LOG_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] ")
# Why Tune could not save the experiment's state this run (the last line of its exception, said at the end), or None
STATE_SAVE_FAILURE = {"error": None}


def quiet_ray():
    """Ray's own output is for --verbose: the CLI names each failed trial and its cause in one line at the end."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's newer output prints a configuration box even at verbose=0
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"  # a failed trial's traceback, at every failure
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):  # e.g. Tune's closing "Trials did not complete"
        logging.getLogger(name).setLevel(logging.CRITICAL)
    state = logging.getLogger("ray.tune.execution.experiment_state")
    state.setLevel(logging.ERROR)
    state.addFilter(_state_save_failures)  # once: the same function each call
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    if not isinstance(sys.stdout, _MainThreadOnly):
        sys.stdout = _MainThreadOnly(sys.stdout)


@contextlib.contextmanager
def native_ray_logs_dropped():
    """While the block runs, file descriptor 2 (where this process's Ray core worker and C++ client log: a metrics agent
    they could not reach, each refused try to join a cluster) passes everything but RAY_NATIVE_LOG_LINE lines, and
    a sys.stderr on descriptor 2 writes straight to the terminal, so that a message printed just before os._exit is
    not lost."""
    sys.stderr.flush()
    terminal, (pipe_out, pipe_in) = os.dup(2), os.pipe()
    os.dup2(pipe_in, 2)
    os.close(pipe_in)

    def forward():
        with open(pipe_out, "rb") as lines:
            for line in lines:
                if not RAY_NATIVE_LOG_LINE.match(line):
                    os.write(terminal, line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    previous = sys.stderr
    try:  # a stream of another file (pytest's capture, say) goes on as it was
        direct = previous.fileno() == 2
    except (AttributeError, OSError, ValueError):
        direct = False
    if direct:
        sys.stderr = open(terminal, "w", buffering=1, encoding=previous.encoding, errors="backslashreplace",
                          closefd=False)
    try:
        yield
    finally:
        if direct:
            sys.stderr.close()
            sys.stderr = previous
        os.dup2(terminal, 2)  # the pipe's last writer here: the reader drains it and ends
        reader.join(timeout=10)
        if not reader.is_alive():  # else a process started in the block holds the pipe: the reader still writes
            os.close(terminal)


class _MainThreadOnly:
    """stdout less other threads' prints: one of ray.init's prints the errors nodes push, whatever log_to_driver."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        return self.stream.write(text) if threading.current_thread() is threading.main_thread() else len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _state_save_failures(record) -> bool:
    if not record.getMessage().startswith("Saving experiment state to storage"):
        return True
    error = record.exc_info[1] if record.exc_info else None
    STATE_SAVE_FAILURE["error"] = str(error).strip().splitlines()[-1] if error else record.getMessage()
    return False


def trial_label(config: dict) -> str:
    return f"{experiments.variant_label(config)} seed {config['seed']}"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress(tune.Callback):
    """Per reported epoch: the trial, epoch/epochs, its one-view accuracy (the tables' headline; validation under
    --val-size), images/s, and the time left: the epochs still to run over this session's rate."""

    up_to = False  # n_trials is the most that may run (--seeds auto): the epochs left are at most those said

    def __init__(self, epochs: int, n_trials: int, up_to: bool = False):
        self.epochs, self.n_trials, self.up_to = epochs, n_trials, up_to
        self.setup()

    def setup(self, **info):  # every run, also after Tuner.restore (which unpickles this object)
        self.start, self.baseline = time.monotonic(), None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        done = {t.trial_id: t.last_result.get("epoch", 0) for t in trials} | {trial.trial_id: result.get("epoch", 0)}
        health = result.get(trainable.HEALTH_KEY, "ok")
        stopped = {t.trial_id for t in trials if t.status == "TERMINATED"}
        stopped |= {trial.trial_id} if health != "ok" else set()
        epochs_done = sum(done.values())
        if self.baseline is None:  # epochs finished before this session (a resume) don't count toward the rate
            self.baseline = epochs_done - 1
        # trials Tune has not created yet (it makes 200 at a time) are still to run
        left = (sum(self.epochs - e for tid, e in done.items() if tid not in stopped)
                + self.epochs * max(0, self.n_trials - len(trials)))
        rate = (epochs_done - self.baseline) / max(time.monotonic() - self.start, 1e-9)
        status = "" if health == "ok" else f"  STOPPED, {health}"
        split = "val" if trial.config.get("val_size") else "test"  # --val-size: scored on held-out training images
        print(f"{trial_label(trial.config):<22} epoch {result['epoch']}/{self.epochs}  one-view {split} acc "
              f"{100 * result['test_acc_single']:5.2f}%  {result['images_per_s']:,.0f} img/s  "
              f"| sweep {epochs_done}/{'up to ' * self.up_to}{epochs_done + left} epochs, "
              f"~{duration(left / rate)} left{' at most' * self.up_to}{status}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"{trial_label(trial.config):<22} failed; Tune retries it from its last checkpoint", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):  # no retries left: the cause is printed at the end
        print(f"{trial_label(trial.config):<22} failed", flush=True)
