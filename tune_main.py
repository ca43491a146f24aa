"""normsweep's CLI: train every norm variant concurrently as a Ray Tune grid search.

Builds the grid (variants x L1 lambdas x seeds), sizes each trial's CPUs/GPUs from the cluster,
runs or resumes the Tuner, and prints a summary table of the finished experiment.
"""
import argparse
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

NOTHING_STARTED = "interrupted before the sweep started; nothing was saved"


def _interrupted_while_loading(signum, frame):
    """Ctrl-C while torch and Ray load (seconds): main()'s one line and exit status, not an import's traceback."""
    print(NOTHING_STARTED, file=sys.stderr)
    sys.exit(130)  # INTERRUPTED_EXIT


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import checks  # noqa: E402 (after the handler above)
import cluster  # before Ray, which reads its token mode once at import (cluster.py)
import data as data_lib
import experiments
import plugins
import settings
import train
import trainable
import tuning
from checks import UsageError, parse_variants  # noqa: F401  (part of this module's interface)
from experiments import DEFAULT_L1, SMOKE
from model import NORMS

DEFAULT_STORAGE = "results"  # relative to the working directory, made absolute
# What --resume takes from the launch file; resources, address and paths come from today's flags.
LAUNCH_KEYS = ("dataset", "data_dir", "model", "smoke_test", "train_size", "variants", "l1", "seeds", "epochs",
               "batch_size", "batch_sizes", "lr", "weight_decay", "label_smoothing", "val_size", "groups", "test_flip",
               "precision", "compile", "tune", "tune_lrs", "tune_weight_decays", "stage", "final_name", "tuning_name",
               "final_variants")
RESTORED_KEYS = ("max_concurrent",)  # Tune restores its TuneConfig from the experiment, not from today's flags
INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shell's status for Ctrl-C; 143 (128 + SIGTERM) after a SIGTERM


def param_space(args) -> dict:
    """The Tune search space: base config, grid over variant dicts and seeds (args already checked)."""
    from ray import tune

    config = {k: v for k, v in train.DEFAULTS.items() if k not in ("norm", "l1", "threads", "seed")}
    config.update({k: getattr(args, k) for k in settings.SHARED if k in config})  # the trial settings both CLIs take
    config["data_dir"] = str(Path(args.data_dir).resolve())
    config["variant"] = tune.grid_search(experiments.launch_variants(vars(args)))  # a final stage: its own list
    if args.batch_sizes:  # the batch-size study: lr scaled by train.peak_lr
        config["batch_size"] = tune.grid_search(sorted(args.batch_sizes))
    if args.stage == "tuning":  # the same grid for every variant, one seed, scored on validation images
        config.update(stage="tuning", lr=tune.grid_search(sorted(args.tune_lrs)),
                      weight_decay=tune.grid_search(sorted(args.tune_weight_decays)))
    config["seed"] = tune.grid_search(list(range(experiments.launch_seeds(vars(args)))))
    return config


# Host memory one trial's Ray worker holds besides its data: torch, Ray and the net. Workers measured 0.55-0.64
# GB each (RSS, 4,000 Fashion-MNIST images); 48 trials at once on a 24 GB machine got workers OOM-killed by Ray.
TRIAL_MEMORY_BYTES = 640 * 2**20


def trial_resources(available: dict, n_trials: int, args, data_bytes: int = 0) -> dict:
    """CPUs, GPUs and host memory per trial so that every trial runs at once where it fits.

    Memory (bytes; where the cluster reports its "memory" resource): TRIAL_MEMORY_BYTES plus twice the
    trial's copy of the data (`data_bytes`, its uint8 images), so that Ray starts no more trials at once
    than the nodes' memory holds and queues the rest, instead of OOM-killing workers. The CPUs and GPU
    shares are sized for the trials that fit at once.

    GPUs: a trial uses one device, so at most one GPU each, and a share of 1/k of a GPU when trials
    outnumber GPUs, k = ceil(trials at once / GPUs). Ray places a fractional share on one GPU, so a
    share that does not divide 1 strands the remainder: 3 GPUs and 4 trials at 0.75 each run only 3
    at once, at 1/2 each all 4 (see `gpu_share`). CPU-only: all trials share the cores (fractional
    CPUs, rounded down so that they fit), each torch process on one thread; on the 2-core machine this
    was the fastest layout measured (benchmarks/concurrency.py).
    """
    cpus, gpus = available.get("CPU", 1), available.get("GPU", 0)
    concurrent = min(n_trials, args.max_concurrent or n_trials)
    memory = TRIAL_MEMORY_BYTES + 2 * data_bytes
    if "memory" in available:
        concurrent = max(1, min(concurrent, int(available["memory"] // memory)))
    gpus_per_trial = args.gpus_per_trial
    if gpus_per_trial is None:
        gpus_per_trial = gpu_share(gpus, concurrent)
    # rounded down to Ray's resource precision (1e-4), as the GPU share: 3 trials at 0.6667 of 2 CPUs need
    # 2.0001 and run only 2 at once, at 0.6666 all 3
    cpus_per_trial = args.cpus_per_trial or max(math.floor(10_000 * cpus / concurrent) / 10_000, 0.01)
    resources = {"cpu": round(cpus_per_trial, 4), "gpu": gpus_per_trial}
    return {**resources, "memory": memory} if "memory" in available else resources


def gpu_share(gpus: float, concurrent: int) -> float:
    """GPUs per trial so that `concurrent` trials fit on `gpus` whole GPUs at once: 1 / ceil(concurrent / gpus),
    at most 1; 0 without GPUs. Rounded down to Ray's resource precision (1e-4), so k shares fit on a GPU."""
    if gpus < 1 or concurrent < 1:
        return 0 if gpus < 1 else 1
    per_gpu = math.ceil(concurrent / math.floor(gpus))  # trials that must share one GPU
    return 1 if per_gpu == 1 else math.floor(10_000 / per_gpu) / 10_000


def load_data(args) -> data_lib.Dataset:
    loaded = data_lib.load_dataset(args.dataset, args.data_dir, test_split=not args.val_size)
    return experiments.as_launched(loaded, vars(args))


def interrupt_on_sigterm() -> dict:
    """Treat SIGTERM (what `timeout`, `docker stop`, `scancel` and preemption send) as Ctrl-C: Tune's
    SIGINT handler saves the experiment's state and stops the trials. Returns a dict that holds
    {"signal": SIGTERM} once one came, for the exit status (128 + the signal)."""
    received = {}

    def handler(signum, frame):
        received["signal"] = signum
        on_sigint = signal.getsignal(signal.SIGINT)  # Tune's while it runs, else Python's KeyboardInterrupt
        if callable(on_sigint):
            on_sigint(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    return received


def warn_on_thread_change(experiment: str, resources: dict, epochs: int) -> None:
    """A seed's numbers depend on torch's thread count (README, what reproduces): say so when a resume
    gives the unfinished trials another count than they started with."""
    threads = max(1, int(resources["cpu"]))  # as trainable.train_variant sets it
    before = sorted({last["threads"] for last in experiments.last_results(experiment).values()
                     if "threads" in last and not experiments.trial_finished(last, epochs)})
    if before and before != [threads]:
        print(f"warning: the unfinished trials ran with {'/'.join(map(str, before))} torch thread(s) and resume "
              f"with {threads}; their later epochs will differ from an uninterrupted run "
              f"(pass --cpus-per-trial {before[0]} to keep them)", file=sys.stderr, flush=True)


def absolute_paths(args) -> None:
    """A dataset directory and --data-dir made absolute before they are saved with the launch, so that
    --resume and the analysis find them from any working directory."""
    args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    args.model = plugins.canonical(args.model)
    if args.dataset not in data_lib.DATASETS:  # a directory, not a dataset's name
        args.dataset = str(Path(args.dataset).expanduser().resolve())


def claim_experiment(storage: str, args, default_name: bool) -> str:
    """Claim the experiment's directory for this launch and save its settings there; returns its location.

    A default name (time-stamped to the second) that another launch took gets a suffix, -2, -3, ...;
    a name the user gave that exists is refused: --resume finishes it.
    """
    base = args.name
    for attempt in range(1, 100 if default_name else 2):
        args.name = base if attempt == 1 else f"{base}-{attempt}"
        experiment = experiments.join(storage, args.name)
        if experiments.claim(experiment, vars(args)):
            return experiment
    raise UsageError(f"experiment {experiments.join(storage, base)} exists; pass --resume to finish it or a new --name")


def load_launch(storage: str, args) -> dict:
    """The launch settings of the experiment --resume names (default: the latest)."""
    args.name = args.name or experiments.latest_started(storage)
    experiment = experiments.join(storage, args.name)
    if not experiments.exists(experiments.join(experiment, experiments.LAUNCH_FILE)):
        raise UsageError(f"--resume: {experiment} is not a normsweep experiment (no {experiments.LAUNCH_FILE})")
    if not experiments.started(experiment):
        raise UsageError(f"--resume: {experiment} was launched but Tune never saved its state; "
                         f"nothing to resume, start it again (delete the directory or pick a new --name)")
    experiments.check_intact(experiment, "resume")
    return experiments.read_launch(experiment)


def resume_notes(args, launch: dict) -> str:
    """What --resume reuses from the launch and which of today's flags it ignores."""
    defaults = vars(parse_args(["--smoke-test"] if args.smoke_test else []))
    ignored = [f"--{k.replace('_', '-')} {_flag_text(getattr(args, k))}" for k in LAUNCH_KEYS + RESTORED_KEYS
               if getattr(args, k) not in (defaults.get(k), launch.get(k, getattr(args, k)))]
    reused = (f"dataset {Path(str(launch.get('dataset'))).name}, variants {launch.get('variants')}, "
              f"{launch.get('seeds')} seed(s), {launch.get('epochs')} epochs"
              + (", smoke-test data" if launch.get("smoke_test") else ""))
    text = f"resume: reusing the launch settings ({reused}); CPUs and GPUs per trial from today's flags"
    if ignored:
        text += f"; ignoring today's {', '.join(ignored)} (a resumed experiment keeps what it was launched with)"
    return text


def _flag_text(value) -> str:
    return " ".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)


def resume_command(storage: str, args) -> str:
    script = Path(__file__).resolve()
    script = os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)
    python = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable
    command = [python, script, "--resume", "--storage-path", storage, "--name", args.name]
    if args.address:
        command += ["--address", args.address]
    if not args.ship_code:
        command.append("--no-ship-code")
    return shlex.join(command)


def trial_name(trial) -> str:
    variant, seed = trial.config["variant"], trial.config["seed"]
    l1 = f"-{variant['l1']:g}" if variant["l1"] else ""
    batch = f"_batch{trial.config['batch_size']}" if train.in_batch_study(trial.config) else ""
    return f"{variant['name']}{l1}{batch}_seed{seed}_{trial.trial_id}"


def run(args) -> int:
    """One sweep; with --tune, or when --resume names a tuned comparison not past its tuning stage, both
    stages of a tuned comparison (run_tuned)."""
    storage = experiments.resolve(args.storage_path)
    experiments.check_storage(storage)
    if args.resume:
        args.name = args.name or experiments.latest_started(storage)
        launch = experiments.read_launch(experiments.join(storage, args.name))
        if launch.get("stage") == "tuning":  # either stage's name stands for the comparison
            args.name = launch["final_name"]
        launch = unfinished_tuning(storage, args.name)
        if launch:
            for key in LAUNCH_KEYS:
                setattr(args, key, launch.get(key, getattr(args, key)))
            return run_tuned(args, storage, resuming=True)
    elif args.tune:
        return run_tuned(args, storage, resuming=False)
    return run_stage(args)


def unfinished_tuning(storage: str, name: str):
    """The tuning stage's launch settings when `name` is a tuned comparison (its final stage's name) whose
    final stage Tune has not started; None otherwise (a plain sweep, or a final stage to resume as it is)."""
    launch = experiments.read_launch(experiments.join(storage, name))
    if launch.get("stage") == "final" and experiments.started(experiments.join(storage, name)):
        return None
    if launch and launch.get("stage") != "final":  # a plain sweep
        return None
    return experiments.read_launch(experiments.join(storage, tuning.tuning_name(name))) or None


def run_tuned(args, storage: str, resuming: bool) -> int:
    """A tuned comparison (tuning.py): the tuning stage as experiment <name>-tuning, then the final stage as
    <name>, each variant at its chosen configuration and at the shared recipe. Resuming picks up the tuning
    stage where it stopped, or starts the final stage from a finished one."""
    if not resuming:
        absolute_paths(args)
        base = args.name or f"normsweep_{Path(args.dataset).name}_{time.strftime('%Y%m%d-%H%M%S')}"
        name, attempt = base, 1
        while any(experiments.exists(experiments.join(storage, n)) for n in (name, tuning.tuning_name(name))):
            if args.name:
                raise UsageError(f"experiment {experiments.join(storage, name)} (or its tuning stage) exists; pass "
                                 f"--resume to finish it or a new --name")
            attempt += 1
            name = f"{base}-{attempt}"
        args.final_name = name
    final_name = args.final_name
    tuning_experiment = experiments.join(storage, tuning.tuning_name(final_name))
    stage_args = argparse.Namespace(**{**vars(args), "stage": "tuning", "name": tuning.tuning_name(final_name),
                                       "tuning_name": None, "final_variants": None})
    if resuming and experiments.started(tuning_experiment):
        left = experiments.trials_left(tuning_experiment, experiments.read_launch(tuning_experiment))
        stage_args.resume = bool(left)
        code = run_stage(stage_args) if left else 0
    else:
        if experiments.exists(tuning_experiment):  # claimed by a launch killed before Tune saved anything
            experiments.delete(tuning_experiment)
        stage_args.resume = False
        code = run_stage(stage_args)
    if code:
        if code == 1:
            print(f"error: the tuning stage did not finish cleanly, so the final stage has not started; fix the "
                  f"failed trials' cause, then: {resume_command(storage, stage_args)}", file=sys.stderr)
        return code

    import analysis

    _, tuning_df = analysis.load_experiment(tuning_experiment)
    variants = parse_variants(args.variants, args.l1 or [DEFAULT_L1])
    final_variants = tuning.final_variants(variants, tuning.choose(tuning_df), args.lr, args.weight_decay)
    final_experiment = experiments.join(storage, final_name)
    if experiments.exists(final_experiment) and not experiments.started(final_experiment):
        experiments.delete(final_experiment)  # claimed by a launch killed before Tune saved anything
    print(f"tuning stage finished; final stage: {len(final_variants)} configurations x {args.seeds} seed(s) "
          f"on the test split", flush=True)
    return run_stage(argparse.Namespace(**{**vars(args), "stage": "final", "name": final_name, "resume": False,
                                           "tuning_name": tuning.tuning_name(final_name),
                                           "final_variants": final_variants}))


def run_stage(args) -> int:
    """One Tune experiment: a plain sweep, or one stage of a tuned comparison (args.stage)."""
    storage = experiments.resolve(args.storage_path)
    experiments.check_storage(storage)
    notes = None
    if args.resume:
        launch = load_launch(storage, args)
        notes = resume_notes(args, launch)
        for key in LAUNCH_KEYS:
            setattr(args, key, launch.get(key, getattr(args, key)))  # the experiment's own settings, not today's flags
    else:
        absolute_paths(args)
    default_name = args.name is None
    args.name = args.name or f"normsweep_{Path(args.dataset).name}_{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = experiments.join(storage, args.name)
    if not args.resume and not default_name and experiments.exists(experiment):  # claimed for good below
        raise UsageError(f"experiment {experiment} exists; pass --resume to finish it or a new --name")

    import ray  # after the checks of names and storage, which need no Ray
    from ray import tune

    import cluster
    import console

    space = param_space(args)
    n_trials = math.prod(len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v)
    if notes:
        print(f"{notes}; {experiments.trials_left(experiment, launch)} of {n_trials} trials left to run", flush=True)

    if not args.verbose:
        console.quiet_ray()
    made_here, stop_signal = False, {}
    try:
        # Before the data: a cluster that cannot be joined (a refused token) is said in seconds.
        cluster.connect(args.address, ship_code=args.ship_code, verbose=args.verbose,
                        not_shipped=[storage, args.data_dir, args.dataset], modules=[plugins.shipped_file(args.model)])
        stop_signal = interrupt_on_sigterm()  # after ray.init, which installs a SIGTERM handler of its own
        dataset = load_data(args)
        checks.check_val_size(args.val_size, len(dataset.train_labels))
        plugins.check(args.model, sorted({v["norm"] for v in experiments.launch_variants(vars(args))}), args.groups,
                      dataset)
        if args.batch_sizes:  # --lr holds at the auto batch, the recipe's; other sizes scale from it
            space["lr_reference_batch"] = train.batch_size_for(len(dataset.train_labels))
        else:  # "auto" resolved on the whole training split: the tuning stage trains at the final stage's batch
            space["batch_size"] = train.batch_size_for(len(dataset.train_labels), args.batch_size)
        if args.stage == "tuning":
            space["val_size"] = tuning.val_size_for(len(dataset.train_labels))
        resources = trial_resources(ray.cluster_resources(), n_trials, args, data_bytes=dataset.nbytes)
        checks.check_resources(resources, ray.cluster_resources())
        if args.resume:
            warn_on_thread_change(experiment, resources, args.epochs)
        else:
            experiment = claim_experiment(storage, args, default_name)
            made_here = True
        print(f"normsweep: {n_trials} trial{'s' if n_trials != 1 else ''} on {_cluster_text(ray.cluster_resources())}; "
              f"per trial {_resources_text(resources)}; {_at_once_text(resources, ray.cluster_resources(), n_trials, args)}experiment {experiment}",
              flush=True)
        fn = tune.with_resources(tune.with_parameters(trainable.train_variant, dataset=dataset), resources)
        if args.resume:
            tuner = tune.Tuner.restore(experiment, trainable=fn, resume_errored=True)
        else:
            tuner = tune.Tuner(
                fn,
                param_space=space,
                tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent or None,
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
                run_config=tune.RunConfig(
                    name=args.name, storage_path=storage,
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=1, checkpoint_score_attribute=trainable.BEST_METRIC,
                        checkpoint_score_order=trainable.BEST_MODE),  # the best; Tune always keeps the latest too
                    failure_config=tune.FailureConfig(max_failures=cluster.MAX_FAILURES),
                    callbacks=[console.Progress(args.epochs, n_trials)],
                    verbose=2 if args.verbose else 0),
            )
        try:
            results = tuner.fit()
        except KeyboardInterrupt:  # a second Ctrl-C: Tune's own handler took the first
            results = None
        except Exception as e:  # Tune reading back files it could not write: say why, not where it broke
            if experiments.nearly_full(storage) or experiments.FULL_STORAGE.search(repr(e)):
                raise experiments.ExperimentError(f"the storage path {storage} is full; free space there, then "
                                                  f"resume with: {resume_command(storage, args)}") from None
            raise
    except BaseException:
        if made_here and not experiments.started(experiment):  # nothing a --resume could use
            experiments.delete(experiment)
        raise
    finally:
        with cluster.interrupts_held(then_raise=False):
            ray.shutdown()
    # counted against the grid: under --max-concurrent Tune has not yet created the pending trials
    unfinished = n_trials - (0 if results is None else sum(bool(r.error) or experiments.trial_finished(r.metrics or {}, args.epochs)
                                                                for r in results))
    if unfinished:  # Tune stops on Ctrl-C (SIGINT) and saves the experiment's state
        if results is not None:
            print(summary_table(results, args.stage))
        print(f"interrupted: {unfinished} of {n_trials} trials unfinished; state saved in {experiment}\n"
              f"resume with: {resume_command(storage, args)}", file=sys.stderr, flush=True)
        return 128 + stop_signal.get("signal", signal.SIGINT)
    print(summary_table(results, args.stage))
    print(f"experiment: {experiment}")
    if console.STATE_SAVE_FAILURE["error"]:
        print(f"error: Tune could not save the experiment's state to {storage} "
              f"({console.STATE_SAVE_FAILURE['error']}); a --resume may not find every epoch", file=sys.stderr)
    failed = [r for r in results if r.error]
    for line in cluster.failure_lines(failed, ship_code=args.ship_code):
        print(f"error: {line}", file=sys.stderr)
    diverged = [r for r in results if (r.metrics or {}).get(trainable.HEALTH_KEY, "ok") != "ok"]
    for r in diverged:  # in a tuning stage an lr too large for a variant is a finding, not a failure
        print(f"{'note' if args.stage == 'tuning' else 'error'}: trial {Path(r.path).name} stopped, "
              f"{r.metrics[trainable.HEALTH_KEY]}", file=sys.stderr)
    return 1 if failed or (diverged and args.stage != "tuning") else 0


def _cluster_text(available: dict) -> str:
    gpus = f", {available['GPU']:g} GPUs" if available.get("GPU") else ""
    memory = f", {available['memory'] / 2**30:.1f} GiB of memory" if "memory" in available else ""
    return f"{available.get('CPU', 0):g} CPUs{gpus}{memory}"


def _resources_text(resources: dict) -> str:
    text = f"{resources['cpu']:g} CPU, {resources['gpu']:g} GPU"
    return text + (f", {resources['memory'] / 2**30:.2f} GiB" if "memory" in resources else "")


def _at_once_text(resources: dict, available: dict, n_trials: int, args) -> str:
    """'at most K at once (memory); ' when the cluster's memory, not the trial count, caps the trials running."""
    memory = available.get("memory")
    fit = int(memory // resources["memory"]) if memory and "memory" in resources else n_trials
    cap = min(n_trials, args.max_concurrent or n_trials)
    return f"at most {fit} at once (host memory; the rest queue); " if fit < cap else ""


def summary_table(results, stage: str = "") -> str:
    """Per trial final-epoch and best-epoch accuracies, the mean over seeds, the paired differences over
    seeds, and convergence warnings; for a tuning stage, the validation accuracy per learning rate and
    weight decay, and each variant's choice."""
    import analysis
    import comparisons

    df = analysis.results_frame(results)
    reported = set(df["trial"]) if not df.empty else set()
    pending = [Path(r.path).name for r in results if Path(r.path).name not in reported]
    lines = []
    if not df.empty and stage == "tuning":
        lines += ["validation accuracy (%), final epoch, one view, by peak learning rate (empty: diverged):",
                  _text_table(tuning.sensitivity(df)), "", "chosen:"]
        lines += [f"  {name}: lr {c['lr']:g}, weight decay {c['weight_decay']:g} ({c['evidence']})"
                  for name, c in sorted(tuning.choose(df).items())]
    elif not df.empty:
        lines += [_text_table(table) for table in [analysis.trial_table(df)] if len(table)]  # none: every trial diverged
        if stage == "final":
            lines += ["", "configurations:", _text_table(analysis.configuration_table(df))]
        means = analysis.summary(df)
        if means["seeds"].max() > 1:
            lines += ["", "mean over seeds:", _text_table(means[["variant", "seeds", "final one-view acc mean (%)",
                                                                 "std (%)", "final acc mean (%)", "best acc mean (%)"]])]
            lines += ["", f"paired differences over seeds (Holm-corrected, {comparisons.ALPHA:g} level):",
                      _text_table(comparisons.paired_tests(df))]
            if stage == "final":
                lines += ["", "tuned against the shared recipe, per variant:", _text_table(
                    comparisons.paired_tests(df, compare="arm", within=("variant name", "batch_size")))]
        lines += analysis.convergence_warnings(df)
        lines += [note for note in [analysis.diverged_note(df), analysis.validation_note(df)] if note]
    lines += [f"{name}: no epoch reported" for name in pending]
    return "\n".join(lines)


def _text_table(table) -> str:
    cells = [list(table.columns)] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
                                     for row in table.itertuples(index=False)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def batch_sizes_arg(text: str) -> list:
    """argparse type of --batch-sizes: '2,4,8' -> [2, 4, 8] (checked by checks.check_settings)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers of images, e.g. 2,4,8, "
                                         f"got {text!r}") from None


def numbers_arg(text: str) -> list:
    """argparse type of --tune-lrs and --tune-weight-decays: '0.05,0.1' -> [0.05, 0.1] (checked by checks)."""
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.025,0.05,0.1, got {text!r}") from None


def parse_args(argv=None):
    parser = checks.ArgumentParser(description=__doc__.splitlines()[0])
    # the flags train.py takes too (settings.py: one default, help and range each), then this CLI's own
    settings.add_arguments(parser, settings.SHARED + ("seeds", "cpus_per_trial", "gpus_per_trial", "max_concurrent"))
    parser.add_argument("--batch-sizes", type=batch_sizes_arg, default=None,
                        help="the batch-size study: run every variant at each of these batch sizes, e.g. "
                             "2,4,8,16,32, for the same epochs, with the peak lr scaled linearly from --lr at "
                             "the auto batch (README, 'Batch size')")
    parser.add_argument("--tune", action="store_true",
                        help="a tuned comparison (README, 'Tuned comparison'): first every variant at every "
                             "--tune-lrs x --tune-weight-decays point, scored on a validation split of the training "
                             f"images ({tuning.VAL_FRACTION:.0%}%), one seed; then each variant at its best point and "
                             "at the shared recipe (--lr, --weight-decay), --seeds seeds, scored on the test split; "
                             "not with --val-size")
    parser.add_argument("--tune-lrs", type=numbers_arg, default=list(tuning.TUNE_LRS),
                        help="with --tune: the peak learning rates every variant tries (default: "
                             f"{','.join(f'{v:g}' for v in tuning.TUNE_LRS)})")
    parser.add_argument("--tune-weight-decays", type=numbers_arg, default=list(tuning.TUNE_WEIGHT_DECAYS),
                        help="with --tune: the weight decays every variant tries (default: "
                             f"{','.join(f'{v:g}' for v in tuning.TUNE_WEIGHT_DECAYS)})")
    parser.add_argument("--variants", default="bn,gn,ln,bn+l1",
                        help=f"comma-separated NORM[+l1], NORM one of {', '.join(NORMS)}, e.g. gn+ws+l1 "
                             f"(README: the table of norms; default: %(default)s)")
    parser.add_argument("--l1", type=float, nargs="+", default=None,
                        help=f"L1 lambdas; every +l1 variant runs once per lambda (default: {DEFAULT_L1:g})")
    parser.add_argument("--storage-path", default=DEFAULT_STORAGE,
                        help="results root: a local directory (made absolute) or a URI such as s3://bucket/prefix; "
                             "on a multi-node cluster, storage every node can write (default: ./results)")
    parser.add_argument("--name", default=None, help="experiment name (default: normsweep_<dataset>_<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted experiment (--name, default: the latest under --storage-path)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: 'auto' for one started on this machine with `ray start --head`, "
                             "else the head's host:port; sends the token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                             "(default: a private local Ray for this run)")
    parser.add_argument("--no-ship-code", dest="ship_code", action="store_false",
                        help="with --address: don't ship this directory's code to the cluster's nodes (Ray's "
                             "runtime environment), for clusters with normsweep installed on every node; "
                             "a local run ships nothing")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"{SMOKE['train']} training and {SMOKE['test']} test images, {SMOKE['epochs']} epochs "
                             f"unless --epochs: check an install in a minute")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output and logs (default: one line per trial report)")
    # a tuned comparison's stages (run_tuned) set these; a plain sweep has none
    parser.set_defaults(stage=None, final_name=None, tuning_name=None, final_variants=None)
    args = parser.parse_args(argv, argparse.Namespace(epochs=None))  # None: no --epochs given (argparse keeps it)
    if args.epochs is None:
        args.epochs = SMOKE["epochs"] if args.smoke_test else settings.DEFAULTS["epochs"]
    return args


def main(argv=None) -> int:
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:  # loaded: Ctrl-C is KeyboardInterrupt again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    try:
        checks.check_settings(vars(args))  # before Ray, data or directories
        return run(args)
    except checks.NormsweepError as e:  # UsageError, DataError, ExperimentError, ClusterError, ...
        print(f"error: {e}", file=sys.stderr)
        return checks.USAGE_EXIT
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before Tune started: nothing to save
        print(NOTHING_STARTED, file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
