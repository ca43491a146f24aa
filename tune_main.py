"""normsweep's CLI: train every norm variant concurrently as a Ray Tune grid search (sweep.py runs it).

    python tune_main.py --smoke-test              # check an install in a minute
    python tune_main.py --seeds 3                 # bn, gn, ln, bn+l1 on Fashion-MNIST, 3 seeds each
    python tune_main.py --resume                  # finish the latest interrupted experiment
"""
import os
import signal
import sys

NOTHING_STARTED = "interrupted before the sweep started; nothing was saved"


def _interrupted_while_loading(signum, frame):
    """Ctrl-C while torch and Ray load: main's one line and exit status, at once (an exception raised inside an
    import can be swallowed by the module imported, which the sweep then runs with half loaded)."""
    os.write(2, f"{NOTHING_STARTED}\n".encode())
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import config  # noqa: E402 (after the handler above)
import data  # noqa: E402
import experiments  # noqa: E402
from errors import INTERRUPTED_EXIT, USAGE_EXIT, NormsweepError  # noqa: E402


def parse_args(argv=None):
    """(SweepConfig, the names of the flags given)."""
    return config.parse("tune", config.SweepConfig, argv, __doc__.splitlines()[0])


def main(argv=None) -> int:
    sweep, given = parse_args(argv)
    try:
        config.check(sweep)  # before Ray, data or directories
        if not sweep.resume:  # a resume reads the dataset its launch saved
            data.check_dataset(sweep.dataset, test_split=not sweep.val_size)
        storage = experiments.resolve(sweep.storage_path)
        experiments.check_storage(storage)
        import sweep as sweep_lib  # Ray: only for settings and storage that passed

        if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:  # loaded: Ctrl-C is KeyboardInterrupt again
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return sweep_lib.run(sweep, given, storage)
    except NormsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before Tune started: nothing to save
        print(NOTHING_STARTED, file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
