"""normsweep's error types: what a user can fix, said in one line. Every entry point catches `NormsweepError` once,
prints `error: <message>` and exits with USAGE_EXIT; anything else is a bug and keeps its traceback. They do not
subclass ValueError (an `except ValueError` never swallows a refusal) and import nothing of the project."""

USAGE_EXIT = 2  # argparse's exit status for bad usage; every refusal uses it
INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shell's status for Ctrl-C; 143 (128 + SIGTERM) after a SIGTERM


class NormsweepError(Exception):
    """Something the user can fix; the message is one line that says what to do."""


class UsageError(NormsweepError):
    """Bad command-line input, or settings the machine cannot run (bf16 on a GPU without it)."""


class DataError(NormsweepError):
    """Bad or missing data."""


class ModelError(NormsweepError):
    """A --model that cannot be loaded, or builds a net that cannot train on the data."""


class ExperimentError(NormsweepError):
    """Storage, or an experiment that cannot be read, written or analysed."""


class CheckpointError(ExperimentError):
    """A checkpoint that is missing, unreadable or from another configuration."""


class ClusterError(NormsweepError):
    """A Ray cluster that cannot be started or joined."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type's name where it has none: how a user's error is quoted."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
