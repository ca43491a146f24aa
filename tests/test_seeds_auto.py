"""--seeds auto (rounds.py): the searcher's rounds, looks, stops and saved state on simulated correctness, without
Ray training; and real sweeps stopped inside a round (SIGINT) and between rounds (SIGKILL), then resumed (slow)."""
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ray.tune.search import Searcher

import analysis
import config
import experiments
import rounds
import tune_main
from conftest import HANG_SECONDS, ROOT, launch_until, make_idx_dir

VARIANTS = [{"name": name, "norm": name, "l1": 0.0} for name in ("bn", "gn", "ln")]
IMAGES = 2000


def simulated(accuracy: list, seed_spread: float, rng):
    """(variant index, seed) -> packed correctness: images of fixed difficulty, each variant's accuracy plus a
    per-trial shift (sd seed_spread) and per-image noise."""
    difficulty = rng.random(IMAGES)

    def correct(variant: int, seed: int) -> str:
        shift = rng.normal(0, seed_spread)
        return experiments.packed_correct(difficulty < accuracy[variant] + shift + rng.normal(0, 0.05, IMAGES))
    return correct


def handed_out(searcher, first_id: int) -> tuple:
    """(trial id -> config, what suggest said last) of the suggestions until it says None or FINISHED."""
    handed, trial_id = {}, first_id
    while (suggestion := searcher.suggest(f"t{trial_id}")) not in (None, Searcher.FINISHED):
        handed[f"t{trial_id}"] = suggestion
        trial_id += 1
    return handed, suggestion


def run_rounds(searcher, correct, first_id=0) -> list:
    """Drive the searcher as Tune does, a round at a time; the rounds' (variant name, seed) lists."""
    rounds_run, names = [], [v["name"] for v in VARIANTS]
    while True:
        handed, said = handed_out(searcher, first_id + sum(map(len, rounds_run)))
        if said == Searcher.FINISHED:
            assert not handed
            return rounds_run
        assert handed, "suggest said None with nothing running"
        rounds_run.append(sorted((c["variant"]["name"], c["seed"]) for c in handed.values()))
        for trial_id, c in handed.items():
            result = {"epoch": 2, experiments.HEALTH_KEY: "ok",
                      experiments.CORRECT_KEY: correct(names.index(c["variant"]["name"]), c["seed"])}
            searcher.on_trial_complete(trial_id, result)


def test_clearly_better_variants_stop_early():
    """Long before --max-seeds; not at the first look, 2 seeds: its t has 1 degree of freedom and the look spends
    1.2e-5 of alpha (O'Brien-Fleming-type), so a clear case stops at the first look with 3 df."""
    searcher = rounds.Rounds(VARIANTS, epochs=2, max_seeds=10, round_seeds=1)
    rounds_run = run_rounds(searcher, simulated([0.9, 0.6, 0.3], 0.005, np.random.default_rng(0)))
    assert rounds_run[0] == sorted((v["name"], seed) for v in VARIANTS for seed in (0, 1))  # the first round: 2 seeds
    assert [len(r) for r in rounds_run] == [6, 3, 3]  # then a seed of every variant a round
    assert {verdict for verdict, *_ in searcher.state["verdicts"].values()} == {"better"}
    assert rounds.stop_line(searcher.state) == "seeds auto: stopped after 4 seed(s): every pair decided"
    assert searcher.suggest("again") == Searcher.FINISHED


def test_equal_variants_are_found_equivalent_and_noisy_ones_run_to_max_seeds():
    equal = rounds.Rounds(VARIANTS, epochs=2, max_seeds=10, round_seeds=1)
    rounds_run = run_rounds(equal, simulated([0.8, 0.8, 0.8], 0.002, np.random.default_rng(1)))
    assert [len(r) for r in rounds_run[:2]] == [6, 3]  # 2 seeds, then 1, of every variant still undecided
    assert {verdict for verdict, *_ in equal.state["verdicts"].values()} == {"equivalent"}
    assert equal.state["seeds"] < 10 and equal.state["stopped"] == "every pair decided"
    noisy = rounds.Rounds(VARIANTS, epochs=2, max_seeds=6, round_seeds=2)
    rounds_run = run_rounds(noisy, simulated([0.8, 0.805, 0.81], 0.03, np.random.default_rng(2)))
    assert [sorted({seed for _, seed in r}) for r in rounds_run] == [[0, 1], [2, 3], [4, 5]]
    assert rounds.stop_line(noisy.state) == ("seeds auto: stopped after 6 seed(s): --max-seeds 6 spent, 3 pair(s) "
                                             "undecided")
    assert [seeds for seeds, _ in noisy.state["looks"]] == [2, 4, 6]
    assert sum(level for _, level in noisy.state["looks"]) == pytest.approx(0.05)  # the whole alpha, spent by t = 1


def test_a_state_saved_mid_round_restores_to_the_same_next_suggestions(tmp_path):
    correct = simulated([0.8, 0.8, 0.79], 0.01, np.random.default_rng(3))
    answers = {(v, seed): correct(v, seed) for v in range(3) for seed in range(10)}  # the same for both runs
    names = [v["name"] for v in VARIANTS]

    def result(c):
        return {"epoch": 2, experiments.CORRECT_KEY: answers[names.index(c["variant"]["name"]), c["seed"]]}

    searcher = rounds.Rounds(VARIANTS, epochs=2, max_seeds=10, round_seeds=2)
    handed = list(handed_out(searcher, 0)[0].items())
    for trial_id, c in handed[:3]:  # the driver is stopped with half the round in
        searcher.on_trial_complete(trial_id, result(c))
    searcher.save(str(tmp_path / "searcher-state-x.pkl"))
    restored = rounds.Rounds(VARIANTS, epochs=2, max_seeds=10, round_seeds=2)
    restored.restore(str(tmp_path / "searcher-state-x.pkl"))
    assert experiments.searcher_state(str(tmp_path)) == searcher.state  # what the CLI reads back
    for run in (searcher, restored):
        assert run.suggest("waiting") is None  # the round's other trials still run
        for trial_id, c in handed[3:]:
            run.on_trial_complete(trial_id, result(c))
    assert searcher.state == restored.state
    later = [run_rounds(run, lambda v, seed: answers[v, seed], first_id=100) for run in (searcher, restored)]
    assert later[0] == later[1] and later[0][0] == [(n, seed) for n in names for seed in (2, 3)]
    assert searcher.state == restored.state and searcher.state["stopped"]


def test_a_failed_or_diverged_trial_drops_its_variant_and_the_others_go_on():
    searcher = rounds.Rounds(VARIANTS, epochs=2, max_seeds=6, round_seeds=1)
    correct = simulated([0.8, 0.805, 0.81], 0.03, np.random.default_rng(4))
    handed, _ = handed_out(searcher, 0)
    for trial_id, c in handed.items():
        if c["variant"]["name"] == "ln" and c["seed"] == 1:
            searcher.on_trial_complete(trial_id, error=True)  # no retries left
        elif c["variant"]["name"] == "gn" and c["seed"] == 0:
            searcher.on_trial_complete(trial_id, {"epoch": 1, experiments.HEALTH_KEY: "diverged: train loss nan"})
        else:
            v = [x["name"] for x in VARIANTS].index(c["variant"]["name"])
            searcher.on_trial_complete(trial_id, {"epoch": 2, experiments.CORRECT_KEY: correct(v, c["seed"])})
    assert searcher.suggest("next") == Searcher.FINISHED  # bn's pairs were with the two dropped variants
    assert searcher.state["dropped"] == [1, 2]
    assert rounds.stop_line(searcher.state) == ("seeds auto: stopped after 2 seed(s): every pair decided but those of "
                                                "gn, ln (a trial failed or diverged: no more seeds for it)")
    four = [dict(v, name=n, norm="bn") for v, n in zip(VARIANTS * 2, ("a", "b", "c", "d"))]
    searcher = rounds.Rounds(four, epochs=2, max_seeds=4, round_seeds=1)
    handed, _ = handed_out(searcher, 0)
    for trial_id, c in handed.items():
        v = "abcd".index(c["variant"]["name"])
        searcher.on_trial_complete(trial_id, {"epoch": 2, experiments.CORRECT_KEY: correct(v % 3, c["seed"])}
                                   if v != 3 else None, error=v == 3)
    names = sorted({c["variant"]["name"] for c in handed_out(searcher, 100)[0].values()})
    assert "d" not in names and names  # a, b, c undecided among themselves go on without d


def test_a_trial_restored_from_an_older_checkpoint_keeps_the_last_epoch_it_reported():
    """A trial the driver was stopped in before it took in the trial's end completes, after --resume, with the
    result of the checkpoint Tune restores it from (an epoch before its last, whose report is logged already)."""
    searcher = rounds.Rounds(VARIANTS[:2], epochs=2, max_seeds=4, round_seeds=1)
    handed, _ = handed_out(searcher, 0)
    correct = simulated([0.8, 0.8], 0.002, np.random.default_rng(5))
    for trial_id, c in handed.items():
        last = {"epoch": 2, experiments.CORRECT_KEY: correct(c["variant"]["name"] == "gn", c["seed"])}
        searcher.on_trial_result(trial_id, last)
        searcher.on_trial_complete(trial_id, dict(last, epoch=1) if trial_id == "t0" else last)
    assert not searcher.state["broken"] and searcher.state["looks"]


def test_flags(capsys):
    sweep, _ = tune_main.parse_args(["--seeds", "auto", "--max-seeds", "4", "--variants", "bn,gn"])
    assert (sweep.seeds, sweep.max_seeds) == ("auto", 4)
    config.check(sweep)
    assert experiments.planned(sweep) == 8
    assert config.SweepConfig().from_launch(sweep.to_launch()).seeds == "auto"
    for flags, said in [(["--seeds", "auto", "--tune"], "--seeds auto and --tune both given"),
                        (["--seeds", "auto", "--batch-sizes", "2,4"], "--seeds auto and --batch-sizes both given"),
                        (["--max-seeds", "4"], "--max-seeds 4 has no effect without --seeds auto"),
                        (["--seeds", "auto", "--max-seeds", "1"], "--max-seeds must be at least 2"),
                        (["--seeds", "auto", "--variants", "gn"], "--seeds auto decides pairs of variants"),
                        (["--seeds", "0"], "--seeds must be at least 1 (seeds 0..N-1) or 'auto', got 0")]:
        assert tune_main.main(flags) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        tune_main.parse_args(["--seeds", "many"])
    assert "expected 'auto' or a whole number of seeds" in capsys.readouterr().err


def auto_sweep(tmp_path, name: str, *flags) -> list:
    """tune_main.py's command for a tiny sweep under tmp_path / "results": bn and gn, 2 epochs, --seeds auto up to 3,
    a CPU a trial (on 2 CPUs a first round of 2 seeds x 2 variants, then rounds of 1 seed)."""
    data = make_idx_dir(tmp_path / "idx", n_train=64, n_test=32)
    return [sys.executable, str(ROOT / "tune_main.py"), "--dataset", str(data), "--variants", "bn,gn", "--epochs", "2",
            "--seeds", "auto", "--max-seeds", "3", "--cpus-per-trial", "1", "--storage-path", str(tmp_path / "results"),
            "--name", name, *flags]


def resumed_to_the_end(experiment: Path, capsys) -> tuple:
    """--resume the experiment here; (what it printed, its trials' variant, seed and epochs, the searcher's state),
    checked finished: the analysis reads every trial complete, no trial is left, and the stop line is printed."""
    assert tune_main.main(["--resume", "--storage-path", str(experiment.parent), "--name", experiment.name]) == 0
    printed, state = capsys.readouterr().out, experiments.searcher_state(str(experiment))
    assert f"seeds auto: stopped after {state['seeds']} seed(s)" in printed, printed
    grid, df = analysis.load_experiment(experiment)
    assert analysis.progress(grid, df)["complete"].all()  # the trials it ran are all it planned, once stopped
    launch = config.SweepConfig().from_launch(experiments.read_launch(str(experiment)))
    assert experiments.trials_left(str(experiment), launch) == 0
    trials = df.groupby("trial").agg(variant=("variant", "first"), seed=("seed", "first"), epochs=("epoch", list))
    assert all(sorted(epochs) == [1, 2] for epochs in trials["epochs"]), trials  # each epoch reported once
    return printed, trials, state


@pytest.mark.slow
def test_a_sweep_interrupted_inside_a_round_resumes_without_running_a_seed_twice(tmp_path, capsys, session_ray):
    storage, name = tmp_path / "results", "auto"
    # stopped inside the first round (the driver writes result.json once it has taken an epoch in), so that the
    # resume finishes it, looks, and goes on
    driver = launch_until(auto_sweep(tmp_path, name),
                          lambda: any(p.read_text().strip() for p in (storage / name).glob("*/result.json")),
                          "the first reported epoch", cwd=ROOT)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=HANG_SECONDS)
    assert driver.returncode == 130, (out, err)
    assert "up to 6 trials in rounds of seeds (the first 2, then 1) x 2 variants" in out, out
    assert re.search(r"interrupted: [0-3] of up to 6 trials finished; state saved in", err), err
    printed, trials, state = resumed_to_the_end(storage / name, capsys)
    assert "seeds auto up to 3" in printed and not trials.duplicated(["variant", "seed"]).any(), trials
    for variant, seeds in trials.groupby("variant")["seed"]:
        assert sorted(seeds) == list(range(len(seeds))) and len(seeds) >= 2, (variant, sorted(seeds))
    assert state["seeds"] == trials["seed"].max() + 1


# A user's net whose trials of seed 2 on (the second round) say they started, then wait for a gate file before they
# are built: the sweep is held between its rounds until the test has killed it. The builder sees the trial's seed as
# torch's (train.TrainingRun seeds torch before it builds the net).
GATED_NET = """
import os
import time
from pathlib import Path

import torch
from torch import nn


def build(norm_layer, in_channels, num_classes):
    with open({built!r}, "a") as log:
        log.write(f"{{torch.initial_seed()}} {{os.getpid()}}\\n")
    if torch.initial_seed() >= 2:
        Path({waiting!r}).touch()
        while not Path({gate!r}).exists():
            time.sleep(0.1)
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), norm_layer(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), norm_layer(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
"""


def processes_mentioning(text: str) -> list:
    """Pids of the live processes whose command line holds `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_sweep_killed_between_rounds_resumes_with_the_next_round(tmp_path, capsys, session_ray):
    """SIGKILL to the driver's process group (its local Ray with it: nothing saved on the way out) once the first
    round has finished, its look is saved, and the second round's trials wait to be built; the resume runs the second
    round only."""
    storage, name, gate = tmp_path / "results", "killed", tmp_path / "gate"
    built, waiting = tmp_path / "built.log", tmp_path / "waiting"
    (tmp_path / "gated_net.py").write_text(GATED_NET.format(built=str(built), waiting=str(waiting), gate=str(gate)))
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # the driver's Ray alone (a socket's path is short)
    try:
        driver = launch_until(
            auto_sweep(tmp_path, name, "--model", f"{tmp_path / 'gated_net.py'}:build"),
            lambda: waiting.exists() and experiments.searcher_state(str(storage / name)).get("looks"),
            "the second round waiting with the first round's look saved", cwd=ROOT, start_new_session=True,
            env=dict(os.environ, RAY_TMPDIR=ray_dir))
        os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate()
        for pid in processes_mentioning(ray_dir):  # a Ray process that left the driver's group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    first_round = {p.parent.name: p.read_text() for p in (storage / name).glob("*_seed[01]_*/result.json")}
    second_round = [p.read_text().strip() for p in (storage / name).glob("*_seed2_*/result.json")]
    assert len(first_round) == 4 and not any(second_round), (first_round, second_round)  # killed between the rounds
    builds_before = len(built.read_text().splitlines())
    gate.touch()
    try:
        printed, trials, state = resumed_to_the_end(storage / name, capsys)
    finally:
        sys.modules.pop("gated_net", None)
    rebuilt = [line.split() for line in built.read_text().splitlines()[builds_before:]]
    assert all(seed == "2" or pid == str(os.getpid()) for seed, pid in rebuilt), rebuilt  # only the checks here
    assert {p.parent.name: p.read_text() for p in (storage / name).glob("*_seed[01]_*/result.json")} == first_round
    assert sorted(zip(trials["variant"], trials["seed"])) == [(v, s) for v in ("bn", "gn") for s in range(3)], trials
    assert state["seeds"] == 3 and [seeds for seeds, _ in state["looks"]][:1] == [2], state
