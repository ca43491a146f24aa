"""One sweep as a Ray Tune experiment: settle its settings (a launch, or a resume reading them back), size each
trial's share of the cluster, fit or restore the Tuner, report with an exit status; a tuned comparison is two."""
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import cluster  # noqa: I001 (first: it sets Ray's token mode, which Ray reads once, at its import)
import ray
from ray import tune

import config as config_lib
import console
import data as data_lib
import experiments
import plugins
import rounds
import train
import trainable
import tuned
from config import SweepConfig
from errors import ExperimentError, UsageError

# Host memory a trial's worker holds besides its data (torch, Ray): 0.55-0.64 GB measured on 4,000 Fashion-MNIST images
TRIAL_MEMORY_BYTES = 640 * 2**20


def prepare(sweep: SweepConfig, given: set, storage: str) -> SweepConfig:
    """The sweep to run: a resume's launch settings (today's flags only for what is not saved; those ignored are
    said), or a launch's with its paths absolute (a resume and the analysis find them from anywhere)."""
    if not sweep.resume:
        dataset = (sweep.dataset if sweep.dataset in data_lib.DATASETS
                   else str(Path(sweep.dataset).expanduser().resolve()))
        name = sweep.name
        if name is None:  # stamped to the second: a second launch in that second gets a suffix, -2, -3, ...
            base = f"normsweep_{Path(dataset).name}_{time.strftime('%Y%m%d-%H%M%S')}"
            name = next(n for n in (base if k == 1 else f"{base}-{k}" for k in range(1, 100))
                        if not experiments.exists(experiments.join(storage, n)))
        return dataclasses.replace(sweep, dataset=dataset, name=name, model=plugins.canonical(sweep.model),
                                   data_dir=str(Path(sweep.data_dir).expanduser().resolve()))
    name = sweep.name or experiments.latest_started(storage)
    experiment = experiments.join(storage, name)
    if not experiments.exists(experiment):
        raise UsageError(f"--resume: no experiment {name!r} under {storage}; pass the --name and --storage-path it "
                         f"was launched with")
    if not experiments.exists(experiments.join(experiment, experiments.LAUNCH_FILE)):
        raise UsageError(f"--resume: {experiment} is not a normsweep experiment (no {experiments.LAUNCH_FILE})")
    with experiments.owned(experiment):  # refused before anything is said if another run holds it
        launch = experiments.read_launch(experiment)
    resumed = dataclasses.replace(sweep.from_launch(launch), name=name)
    data_lib.check_dataset(resumed.dataset, test_split=not resumed.val_size)  # gone or damaged: said before Ray
    ignored = ", ".join(f"--{k.replace('_', '-')} {getattr(sweep, k)}" for k in sorted(set(launch) & given - {"name"})
                        if getattr(sweep, k) != getattr(resumed, k))
    auto = resumed.seeds == config_lib.AUTO_SEEDS  # trials left: at most those said, until its searcher stops
    up_to = "up to " if auto and not experiments.searcher_state(experiment).get("stopped") else ""
    print(f"resume: reusing the launch settings (dataset {Path(resumed.dataset).name}, variants {resumed.variants}, "
          + (f"seeds auto up to {resumed.max_seeds}" if auto else f"{resumed.seeds} seed(s)")
          + f", {resumed.epochs} epochs{', smoke-test data' if resumed.smoke_test else ''}); CPUs and GPUs per trial "
          "from today's flags" + (f"; ignoring today's {ignored} (a resumed experiment keeps what it was launched "
                                  "with)" if ignored else "")
          + f"; {up_to}{experiments.trials_left(experiment, resumed)} of {experiments.planned(resumed)} trials left to "
          "run", flush=True)
    return resumed


def resume_command(storage: str, sweep: SweepConfig) -> str:
    """The command that finishes this experiment, as a user would type it here."""
    def shown(path):
        return os.path.relpath(path) if Path(path).is_relative_to(Path.cwd()) else str(path)
    command = [shown(sys.executable), shown(Path(__file__).with_name("tune_main.py").resolve()), "--resume",
               "--storage-path", storage, "--name", sweep.final_name or sweep.name]
    command += ["--address", sweep.address] if sweep.address else []
    return shlex.join(command + ([] if sweep.ship_code else ["--no-ship-code"]))


def trial_resources(available: dict, n_trials: int, sweep: SweepConfig, data_bytes: int = 0,
                    model_bytes: int = 0) -> dict:
    """CPUs, GPUs and host memory (bytes) per trial, so that every trial runs at once where it fits. Memory: what a
    worker, twice the data and the net need, so Ray queues trials that do not fit; under --max-concurrent k, 1/k of
    the cluster's, which keeps k (a trial Tune holds back is created later from its search state, which writes where
    the experiment was launched, not where it lies). GPUs: 1 / ceil(concurrent / gpus), at most 1 (a share not
    dividing 1 strands the rest: 3 GPUs, 4 trials at 0.75 run 3 at once). CPUs: shared. Both rounded down to Ray's
    1e-4."""
    cpus, gpus = available.get("CPU", 1), available.get("GPU", 0)
    concurrent = min(n_trials, sweep.max_concurrent or n_trials)
    memory = trial_memory(data_bytes, model_bytes)
    if "memory" in available:
        concurrent = max(1, min(concurrent, int(available["memory"] // memory)))
        memory = max(memory, int(available["memory"] // concurrent) if sweep.max_concurrent else 0)
    per_gpu = math.ceil(concurrent / math.floor(gpus)) if gpus >= 1 else 0
    gpu = 0 if gpus < 1 else 1 if per_gpu <= 1 else math.floor(10_000 / per_gpu) / 10_000
    gpu = gpu if sweep.gpus_per_trial is None else sweep.gpus_per_trial
    cpu = sweep.cpus_per_trial or max(math.floor(10_000 * cpus / concurrent) / 10_000, 0.01)
    resources = {"cpu": round(cpu, 4), "gpu": gpu}
    return {**resources, "memory": memory} if "memory" in available else resources


def trial_memory(data_bytes: int, model_bytes: int) -> int:
    """Host memory (bytes) a trial's worker needs: the worker, twice the data and the net."""
    return TRIAL_MEMORY_BYTES + 2 * data_bytes + model_bytes


def round_seeds(available: dict, sweep: SweepConfig, n_variants: int, memory: int) -> int:
    """--seeds auto: the seeds of a round after the first, as many as run at once on the cluster (a trial a CPU, or
    --cpus-per-trial; within its memory, --gpus-per-trial's GPUs and --max-concurrent), every variant of a seed."""
    slots = [math.floor(available.get("CPU", 1) / (sweep.cpus_per_trial or 1))]
    slots += [math.floor(available.get("GPU", 0) / sweep.gpus_per_trial)] if sweep.gpus_per_trial else []
    slots += [int(available["memory"] // memory)] if "memory" in available else []
    slots += [sweep.max_concurrent] if sweep.max_concurrent else []
    return max(1, min(sweep.max_seeds, max(1, min(slots)) // n_variants))


def check_resources(per_trial: dict, cluster_has: dict) -> None:
    """Refuse per-trial resources the Ray cluster can never give (its trials would stay PENDING)."""
    cpus, gpus = cluster_has.get("CPU", 0), cluster_has.get("GPU", 0)
    if per_trial["gpu"] > 0 and not gpus:
        raise UsageError(f"--gpus-per-trial {per_trial['gpu']:g}: the Ray cluster has no GPUs ({cpus:g} CPUs only); "
                         f"drop the flag or join a cluster with GPUs (--address)")
    if per_trial["gpu"] > gpus:
        raise UsageError(f"--gpus-per-trial {per_trial['gpu']:g}: the Ray cluster has {gpus:g} GPUs; "
                         f"ask for at most that")
    if per_trial.get("memory", 0) > cluster_has.get("memory", math.inf):
        raise UsageError(f"each trial needs about {per_trial['memory'] / 2**30:.2f} GiB of host memory and the Ray "
                         f"cluster has {cluster_has['memory'] / 2**30:.2f} GiB free for tasks; free memory on the "
                         f"nodes or join a larger cluster (--address)")
    if per_trial["cpu"] > cpus:
        raise UsageError(f"--cpus-per-trial {per_trial['cpu']:g}: the Ray cluster has {cpus:g} CPUs; ask for at most "
                         f"that (fractions share a core)")


def describe(resources: dict, available: dict, n_trials: int, experiment: str, plan: dict = None) -> str:
    """The sweep's first line: trials, the cluster, each trial's share, and where the results go. plan: --seeds
    auto's searcher state (rounds.Rounds)."""
    gpus = f", {available['GPU']:g} GPU{'s' if available['GPU'] != 1 else ''}" if available.get("GPU") else ""
    memory, share = available.get("memory"), f"{resources['cpu']:g} CPU, {resources['gpu']:g} GPU"
    at_most = len(plan["variants"]) * plan["first_round"] if plan else n_trials  # trials asked for at once
    fit = int(memory // resources["memory"]) if memory and "memory" in resources else at_most
    share += f", {resources['memory'] / 2**30:.2f} GiB" if "memory" in resources else ""
    memory = f", {memory / 2**30:.1f} GiB of memory" if memory else ""
    at_once = f"at most {fit} at once (the rest queue); " if fit < at_most else ""
    trials = (f"up to {n_trials} trials in rounds of seeds (the first {plan['first_round']}, then "
              f"{plan['round_seeds']}) x {len(plan['variants'])} variants" if plan
              else f"{n_trials} trial{'s' if n_trials != 1 else ''}")
    return (f"normsweep: {trials} on {available.get('CPU', 0):g} CPUs{gpus}"
            f"{memory}; per trial {share}; {at_once}experiment {experiment}")


def param_space(sweep: SweepConfig, dataset: data_lib.Dataset) -> dict:
    """Tune's search space: the trial settings ("auto" resolved on the data), a grid over config.grid_axes."""
    space = {k: v for k, v in config_lib.TrialConfig.of(sweep.as_dict()).as_dict().items()
             if k not in ("norm", "l1", "threads")}
    n_train = len(dataset.train_labels)
    if sweep.batch_sizes:  # --lr holds at the auto batch, the recipe's; other sizes scale from it
        space["lr_reference_batch"] = config_lib.batch_size_for(n_train)
    else:  # resolved on the whole training split: a tuning stage trains at the final stage's batch
        space["batch_size"] = config_lib.batch_size_for(n_train, sweep.batch_size)
    if sweep.stage == "tuning":
        space.update(stage="tuning", val_size=tuned.val_size_for(n_train))
    if sweep.seeds == config_lib.AUTO_SEEDS:  # its searcher (rounds.Rounds) picks each trial's variant and seed
        return space
    return {**space, **{axis: tune.grid_search(values) for axis, values in config_lib.grid_axes(sweep).items()}}


def trial_name(trial) -> str:
    """A trial's directory: its label made a file name, and Tune's trial id."""
    label = re.sub(r"[^A-Za-z0-9+.-]+", "_", experiments.variant_label(trial.config)).strip("_")  # "bn+l1_1e-05"
    return f"{label}_seed{trial.config['seed']}_{trial.trial_id}"


def interrupt_on_sigterm() -> dict:
    """Treat SIGTERM (`timeout`, `docker stop`, `scancel`, preemption) as Ctrl-C, whose handler Tune owns while it
    runs (it saves the experiment and stops the trials). Returns a dict holding {"signal": SIGTERM} once one came."""
    received = {}

    def handler(signum, frame):
        received["signal"] = signum
        on_sigint = signal.getsignal(signal.SIGINT)
        if not callable(on_sigint):
            raise KeyboardInterrupt
        on_sigint(signal.SIGINT, frame)

    signal.signal(signal.SIGTERM, handler)
    return received


def tuner(sweep: SweepConfig, storage: str, fn, space: dict, n_trials: int, searcher=None) -> tune.Tuner:
    """A new Tuner for the sweep, or the saved one it resumes (Tuner.restore, errored trials retried, a searcher's
    state restored with it). searcher: --seeds auto's (seed_rounds), which picks the trials, at most n_trials."""
    if sweep.resume:
        return tune.Tuner.restore(experiments.join(storage, sweep.name), trainable=fn, resume_errored=True)
    checkpoints = tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=trainable.BEST_METRIC,
                                        checkpoint_score_order=trainable.BEST_MODE)  # Tune also keeps the latest
    search = dict(search_alg=searcher, num_samples=n_trials) if searcher else {}
    return tune.Tuner(fn, param_space=space, tune_config=tune.TuneConfig(  # no max_concurrent_trials: trial_resources
        trial_name_creator=trial_name, trial_dirname_creator=trial_name, **search), run_config=tune.RunConfig(
        name=sweep.name, storage_path=storage, checkpoint_config=checkpoints,
        failure_config=tune.FailureConfig(max_failures=cluster.MAX_FAILURES), verbose=2 if sweep.verbose else 0,
        callbacks=[console.Progress(sweep.epochs, n_trials, up_to=searcher is not None)]))


def run_stage(sweep: SweepConfig, storage: str) -> int:
    """One Tune experiment, held by this run while it runs: a plain sweep, or one stage of a tuned comparison.
    Returns the exit status."""
    experiment = experiments.join(storage, sweep.name)
    n_trials = experiments.planned(sweep)
    held, stop_signal, results = contextlib.ExitStack(), {}, None
    with held:
        if sweep.resume:
            held.enter_context(experiments.owned(experiment))  # before anything reads it: a run may be writing it
            if not experiments.started(experiment):
                raise UsageError(f"--resume: {experiment} was launched but Tune never saved its state; nothing to "
                                 f"resume, start it again (delete the directory or pick a new --name)")
            experiments.check_intact(experiment, "resume")
        elif experiments.exists(experiment):
            refuse_existing(experiment)
        if not sweep.verbose:
            console.quiet_ray()
            held.enter_context(console.native_ray_logs_dropped())
        try:  # the cluster before the data: one that cannot be joined is said in seconds
            cluster.connect(sweep.address, ship_code=sweep.ship_code, verbose=sweep.verbose, modules=[
                plugins.shipped_file(sweep.model)], not_shipped=[storage, sweep.data_dir, sweep.dataset])
            stop_signal = interrupt_on_sigterm()  # after ray.init, which installs a SIGTERM handler of its own
            dataset = train.trial_data(data_lib.load_dataset(sweep.dataset, sweep.data_dir,
                                                             test_split=not sweep.val_size), sweep)
            config_lib.check_val_size(sweep.val_size, len(dataset.train_labels))
            net_bytes = preflight(sweep, dataset)
            space, inputs = param_space(sweep, dataset), input_digests(dataset, sweep.model)
            searcher = seed_rounds(sweep, experiment, trial_memory(dataset.nbytes, net_bytes))
            plan = searcher.state if searcher else {}
            at_once = len(plan["variants"]) * plan["round_seeds"] if plan else n_trials
            resources = trial_resources(ray.cluster_resources(), at_once, sweep, data_bytes=dataset.nbytes,
                                        model_bytes=net_bytes)
            check_resources(resources, ray.cluster_resources())
            if sweep.resume:
                experiments.check_inputs(experiment, inputs)
                warn_on_thread_change(experiment, max(1, int(resources["cpu"])), sweep.epochs)
            elif experiments.claim(experiment, {**sweep.to_launch(), "inputs": inputs}):
                held.callback(discard_unstarted, experiment)  # on the way out, after the lock is let go
                held.enter_context(experiments.owned(experiment))
            else:
                refuse_existing(experiment)
            print(describe(resources, ray.cluster_resources(), n_trials, experiment, plan), flush=True)
            fn = tune.with_resources(tune.with_parameters(trainable.train_variant, dataset=dataset,
                                                          experiment=experiment), resources)
            results = fit(tuner(sweep, storage, fn, space, n_trials, searcher), storage, sweep, plan)
        finally:
            with cluster.interrupts_held(then_raise=False):
                ray.shutdown()
    return finish(results, sweep, storage, n_trials, stop_signal.get("signal", signal.SIGINT))


def preflight(sweep: SweepConfig, dataset: data_lib.Dataset) -> int:
    """Run every net of the sweep once here (never retried as a trial, train.preflight); its most bytes."""
    axes = config_lib.grid_axes(sweep)
    return max(train.preflight(dataclasses.replace(sweep, norm=norm, batch_size=batch), dataset)
               for norm in sorted({v["norm"] for v in axes["variant"]})
               for batch in axes.get("batch_size", [sweep.batch_size]))


def seed_rounds(sweep: SweepConfig, experiment: str, memory: int):
    """--seeds auto's searcher (rounds.Rounds), a resume's in the state it saved (Tune restores it); None for a grid."""
    if sweep.seeds != config_lib.AUTO_SEEDS:
        return None
    variants = config_lib.grid_axes(sweep)["variant"]
    searcher = rounds.Rounds(variants, sweep.epochs, sweep.max_seeds,
                             round_seeds(ray.cluster_resources(), sweep, len(variants), memory), sweep.margin)
    searcher.state = (experiments.searcher_state(experiment) if sweep.resume else {}) or searcher.state
    return searcher


def refuse_existing(experiment: str):
    """A launch's refusal of an existing --name, which does not advise --resume while another run holds it."""
    holder = experiments.holder(experiment)
    raise UsageError(f"experiment {experiment} exists; " + (f"{holder} is running it: wait for it to end, or pick a "
                     f"new --name" if holder else "pass --resume to finish it or a new --name"))


def discard_unstarted(experiment: str) -> None:
    """Delete an experiment a launch claimed and left before Tune saved anything, unless a run holds it."""
    if experiments.exists(experiment) and not experiments.started(experiment):
        with experiments.owned(experiment):
            experiments.delete(experiment)


def input_digests(dataset: data_lib.Dataset, model: str) -> dict:
    """sha256 (hex) of what the trials train and score on (Dataset.fingerprint) and of a --model's Python file."""
    file = plugins.source_file(model)
    return {"data": dataset.fingerprint(),
            **({"model": hashlib.sha256(Path(file).read_bytes()).hexdigest()} if file else {})}


def fit(made: tune.Tuner, storage: str, sweep: SweepConfig, plan: dict = None):
    """Tuner.fit, or None after a second Ctrl-C (Tune's own handler took the first); a full storage path, or a local
    Ray stopped under Tune (a SIGTERM to the process group), is one line saying how to resume. plan: --seeds auto's
    searcher state, whose first round's trials Tune may queue at once."""
    stopped = (f"interrupted: the local Ray stopped; state saved in {experiments.join(storage, sweep.name)}\n"
               f"resume with: {resume_command(storage, sweep)}")
    # With a searcher Tune queues one trial (TUNE_MAX_PENDING_TRIALS_PG, read as fit starts), and a round's trials
    # would start one by one, each after the worker of the one before it is up; a value the user set is kept
    pending = plan and "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ
    if pending:
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(len(plan["variants"]) * plan["first_round"])
    try:
        with cluster.exit_if_ray_stops(None if sweep.address else stopped):
            return made.fit()
    except KeyboardInterrupt:
        return None
    except Exception as e:
        if experiments.nearly_full(storage) or experiments.FULL_STORAGE.search(repr(e)):
            raise ExperimentError(f"the storage path {storage} is full; free space there, then resume with: "
                                  f"{resume_command(storage, sweep)}") from None
        raise
    finally:
        if pending:
            os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)


def warn_on_thread_change(experiment: str, threads: int, epochs: int) -> None:
    """Say so when a resume gives unfinished trials another torch thread count (a seed's numbers depend on it)."""
    before = sorted({last["threads"] for last in experiments.last_results(experiment).values()
                     if "threads" in last and not experiments.trial_finished(last, epochs)})
    if before and before != [threads]:
        print(f"warning: the unfinished trials ran with {'/'.join(map(str, before))} torch thread(s) and resume "
              f"with {threads}; their later epochs will differ from an uninterrupted run "
              f"(pass --cpus-per-trial {before[0]} to keep them)", file=sys.stderr, flush=True)


def summary_text(results, sweep: SweepConfig = SweepConfig(), looks=None) -> str:
    """The CLI's closing tables: per trial, means over seeds and the verdict per pair (with one seed, McNemar's test
    and why no verdict), convergence warnings; for a tuning stage the validation accuracy per lr and weight decay and
    each choice."""
    import analysis
    import comparisons

    df, stage, margin = analysis.results_frame(results), sweep.stage, sweep.margin
    reported = set(df["trial"]) if not df.empty else set()
    lines = []
    if not df.empty and stage == "tuning":
        lines += ["validation accuracy (%), final epoch, one view, by peak learning rate (empty: diverged):",
                  text_table(tuned.sensitivity(df)), "", "chosen:"]
        lines += [f"  {name}: lr {c['lr']:g}, weight decay {c['weight_decay']:g} ({c['evidence']})"
                  for name, c in sorted(tuned.choose(df, sweep.lr, sweep.weight_decay).items())]
    elif not df.empty:
        lines += [text_table(table) for table in [analysis.trial_table(df)] if len(table)]  # none: all diverged
        if stage == "final":
            lines += ["", "configurations:", text_table(analysis.configuration_table(df))]
        means, level = analysis.summary(df), f"Holm over the pairs, {comparisons.ALPHA:g} family-wise"
        if means["seeds"].max() > 1:
            lines += ["", "mean over seeds:", text_table(means[["variant", "seeds", "final one-view acc mean (%)",
                                                                "std (%)", "final acc mean (%)", "best acc mean (%)"]])]
            lines += ["", f"verdicts, paired over seeds and images ({level}, so an unadjusted interval may exclude 0 "
                      f"while its pair is undecided; equivalent: within ±{margin:g} points, --margin):",
                      text_table(comparisons.verdict_table(df, margin, looks=looks))]
            if stage == "final":
                lines += ["", "tuned against the shared recipe, per variant:", text_table(comparisons.verdict_table(
                    df, margin, compare="arm", within=("variant name", "batch_size")))]
        elif len(means) > 1 and len(tests := comparisons.mcnemar_tests(df)):  # none: one variant in two arms
            lines += ["", "one seed: no verdict (a verdict needs the seed noise, which takes 2+ seeds, --seeds); "
                      f"McNemar's exact test measures the test images' noise only ({level}):", text_table(tests)]
        lines += analysis.convergence_warnings(df)
        lines += [note for note in [analysis.diverged_note(df), analysis.validation_note(df), analysis.ghost_note(df)]
                  if note]
    lines += [f"{Path(r.path).name}: no epoch reported" for r in results if Path(r.path).name not in reported]
    return "\n".join(lines)


def text_table(table) -> str:
    import analysis

    return analysis.formatted(table).to_string(index=False)  # as the report: p "<0.001", nan "-"


def finish(results, sweep: SweepConfig, storage: str, n_trials: int, stop_signal: int) -> int:
    """Print the summary, and what was interrupted, failed or diverged; the exit status."""
    experiment = experiments.join(storage, sweep.name)
    # what each trial reported, as the analysis reads it: Tune's last result of a trial it restored is its checkpoint's
    reported = experiments.last_results(experiment)
    last = {r.path: reported.get(Path(r.path).name, {}) for r in results or []}
    done = sum(bool(r.error) or experiments.trial_finished(last[r.path], sweep.epochs) for r in results or [])
    auto = sweep.seeds == config_lib.AUTO_SEEDS  # n_trials: the most it may run; done once its searcher stopped
    state = experiments.searcher_state(experiment) if auto else {}
    stopped = rounds.stop_line(state)
    if results is not None:
        print(summary_text(results, sweep, looks=state.get("looks")))
    if results is None or (not stopped if auto else done < n_trials):  # Tune stops on Ctrl-C, saving its state
        left = (f"{done} of up to {n_trials} trials finished" if auto
                else f"{n_trials - done} of {n_trials} trials unfinished")
        print(f"interrupted: {left}; state saved in {experiment}\n"
              f"resume with: {resume_command(storage, sweep)}", file=sys.stderr, flush=True)
        return 128 + stop_signal
    print(f"experiment: {experiment}")
    if stopped:
        print(stopped)
    if console.STATE_SAVE_FAILURE["error"]:
        print(f"error: Tune could not save the experiment's state to {storage} "
              f"({console.STATE_SAVE_FAILURE['error']}); a --resume may not find every epoch", file=sys.stderr)
    failed = [r for r in results if r.error]
    for line in cluster.failure_lines(failed, ship_code=sweep.ship_code):
        print(f"error: {line}", file=sys.stderr)
    diverged = [r for r in results if last[r.path].get(trainable.HEALTH_KEY, "ok") != "ok"]
    for r in diverged:  # in a tuning stage an lr too large for a variant is a finding, not a failure
        print(f"{'note' if sweep.stage == 'tuning' else 'error'}: trial {Path(r.path).name} stopped, "
              f"{last[r.path][trainable.HEALTH_KEY]}", file=sys.stderr)
    return 1 if failed or (diverged and sweep.stage != "tuning") else 0


def run(sweep: SweepConfig, given: set, storage: str) -> int:
    """The sweep the flags ask for under `storage` (checked): launched, resumed, or a tuned comparison; exit status."""
    if sweep.resume:
        sweep = dataclasses.replace(sweep, name=sweep.name or experiments.latest_started(storage))
        launch = (experiments.read_launch(experiments.join(storage, sweep.name))  # a comparison not past tuning: its
                  or experiments.read_launch(experiments.join(storage, tuned.tuning_name(sweep.name))))  # stage's
        if launch.get("stage"):  # either stage's name stands for the comparison
            return run_tuned(dataclasses.replace(sweep.from_launch(launch), resume=True,
                                                 name=launch.get("final_name") or sweep.name), storage)
    return (run_tuned if sweep.tune and not sweep.resume else run_stage)(prepare(sweep, given, storage), storage)


def run_tuned(sweep: SweepConfig, storage: str) -> int:
    """A tuned comparison (tuned.py): the tuning stage as <name>-tuning, then the final stage as <name>. A resume
    continues the tuning stage, or starts the final stage from a finished one, or resumes the final stage."""
    final, tuning = experiments.join(storage, sweep.name), experiments.join(storage, tuned.tuning_name(sweep.name))
    if sweep.resume and experiments.started(final):
        return run_stage(dataclasses.replace(sweep.from_launch(experiments.read_launch(final)), resume=True), storage)
    if not sweep.resume and (experiments.exists(final) or experiments.exists(tuning)):
        raise UsageError(f"experiment {final} (or its tuning stage) exists; pass --resume to finish it or a new --name")
    discard_unstarted(tuning)  # claimed by a launch killed before Tune saved anything
    stage = dataclasses.replace(sweep, stage="tuning", name=tuned.tuning_name(sweep.name), final_name=sweep.name,
                                final_variants=(), resume=experiments.started(tuning))
    code = run_stage(stage, storage) if not stage.resume or experiments.trials_left(tuning, stage) else 0
    if code:
        if code == 1:
            print(f"error: the tuning stage did not finish cleanly, so the final stage has not started; fix the failed "
                  f"trials' cause, then: {resume_command(storage, stage)}", file=sys.stderr)
        return code
    import analysis

    chosen = tuned.choose(analysis.load_experiment(tuning)[1], sweep.lr, sweep.weight_decay)
    final_variants = tuned.final_variants(config_lib.grid_axes(stage)["variant"], chosen, sweep.lr, sweep.weight_decay)
    discard_unstarted(final)
    print(f"tuning stage finished; final stage: {len(final_variants)} configurations x {sweep.seeds} seed(s) on the "
          f"test split", flush=True)
    return run_stage(dataclasses.replace(sweep, stage="final", resume=False, final_name=sweep.name,
                                         final_variants=tuple(final_variants)), storage)
