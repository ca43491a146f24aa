"""The Ray Tune layer without Ray: grid expansion, variant names, resources per trial and trials at once,
one-line refusals, the closing tables. (Real sweeps: tests/test_sweeps.py.)"""
import math
from argparse import Namespace

import pytest
from ray.tune.search.variant_generator import generate_variants

import config
import sweep
import tune_main
from conftest import blank_dataset
from errors import UsageError


def space(flags) -> dict:
    return sweep.param_space(tune_main.parse_args(flags)[0], blank_dataset())


def test_grid_expands_variants_lambdas_and_seeds():
    trials = [spec for _, spec in generate_variants(space(["--seeds", "2", "--l1", "1e-5", "1e-4"]))]
    combos = sorted((t["variant"]["name"], t["variant"]["l1"], t["seed"]) for t in trials)
    expected = sorted([(n, 0.0, s) for n in ("bn", "gn", "ln") for s in (0, 1)]
                      + [("bn+l1", lam, s) for lam in (1e-5, 1e-4) for s in (0, 1)])
    assert combos == expected  # (3 plain + 1 variant x 2 lambdas) x 2 seeds = 10 trials
    assert all(t["epochs"] == 20 and t["dataset"] == "fashion-mnist" and t["test_flip"] for t in trials)
    assert space(["--no-test-flip"])["test_flip"] is False
    assert all(t["precision"] == "auto" for t in trials)
    assert space(["--precision", "bf16"])["precision"] == "bf16"
    assert all(t["compile"] == "auto" for t in trials)
    assert space(["--compile", "on"])["compile"] == "on"


@pytest.mark.parametrize("spec, message", [
    ("bn,xn", "bad variant 'xn'; the grammar is NORM\\[\\+l1\\]"),
    ("gn+l2", "bad variant 'gn\\+l2'"),
    ("gn+ws+l2", "bad variant 'gn\\+ws\\+l2'"),
    ("gn+l1+ws", "bad variant 'gn\\+l1\\+ws'.* one of bn, gn, ln, in, gbn, bn\\+ws, gn\\+ws, none$"),
    ("ws", "bad variant 'ws'"),
    ("gn+ws,gn+ws", "lists 'gn\\+ws' twice"),
    (",", "no variants given"),
])
def test_bad_variants_are_refused(spec, message):
    with pytest.raises(UsageError, match=message):
        config.parse_variants(spec, [1e-5])


def test_variant_names_are_registry_names_which_may_hold_a_plus():
    variants = config.parse_variants("gn+ws, gn+ws+l1,bn+ws+l1,in,gbn+l1,bn", [1e-5, 1e-4])
    assert [(v["name"], v["norm"], v["l1"]) for v in variants] == [
        ("gn+ws", "gn+ws", 0.0), ("gn+ws+l1", "gn+ws", 1e-5), ("gn+ws+l1", "gn+ws", 1e-4),
        ("bn+ws+l1", "bn+ws", 1e-5), ("bn+ws+l1", "bn+ws", 1e-4), ("in", "in", 0.0),
        ("gbn+l1", "gbn", 1e-5), ("gbn+l1", "gbn", 1e-4), ("bn", "bn", 0.0)]


def _resources(cpu, gpu=0, n=4, memory=None, data_bytes=0, **flags):
    args = Namespace(max_concurrent=flags.get("max_concurrent", 0), cpus_per_trial=flags.get("cpus"),
                     gpus_per_trial=flags.get("gpus"))
    available = {"CPU": cpu, "GPU": gpu, **({"memory": memory} if memory is not None else {})}
    return sweep.trial_resources(available, n, args, data_bytes=data_bytes)


def test_trials_at_once_are_capped_by_the_clusters_memory():
    """48 tuning trials at once on a 24 GB machine got workers OOM-killed: Ray now queues what does not fit."""
    per_trial = sweep.TRIAL_MEMORY_BYTES + 2 * 55_000_000
    resources = _resources(16, gpu=2, n=48, memory=8 * per_trial, data_bytes=55_000_000)
    assert resources == {"cpu": 2.0, "gpu": 0.25, "memory": per_trial}  # 8 fit: the CPUs and GPUs are split 8 ways
    assert _resources(2, n=4, memory=100 * per_trial)["cpu"] == 0.5  # room for all: as without the cap
    with pytest.raises(UsageError, match="host memory"):
        sweep.check_resources(resources, {"CPU": 16, "GPU": 2, "memory": per_trial / 2})


def test_default_resources_run_trials_at_once():
    assert _resources(2) == {"cpu": 0.5, "gpu": 0}  # 4 trials share 2 cores
    assert _resources(16, gpu=1) == {"cpu": 4.0, "gpu": 0.25}  # fractional GPU
    assert _resources(32, gpu=8) == {"cpu": 8.0, "gpu": 1}  # one device per trial, never 2: a trial uses one
    assert _resources(2, max_concurrent=2) == {"cpu": 1.0, "gpu": 0}
    assert _resources(2, cpus=2, gpus=0.5) == {"cpu": 2, "gpu": 0.5}


@pytest.mark.parametrize("gpus, trials, share", [
    (1, 4, 0.25), (2, 4, 0.5), (3, 4, 0.5), (4, 4, 1), (6, 4, 1),  # 3 GPUs: 0.75 each would run 3 at once
    (4, 6, 0.5), (5, 12, 0.3333), (3, 7, 0.3333), (2, 3, 0.5), (8, 1, 1), (0, 4, 0),
])
def test_gpu_shares_pack_every_trial_at_once(gpus, trials, share):
    """Ray puts a fractional share on one GPU: the trials that fit at once are floor(1/share) per GPU."""
    got = _resources(16, gpu=gpus, n=trials)["gpu"]
    assert got == share
    if gpus:
        assert gpus * math.floor(1 / got + 1e-9) >= trials  # every trial has a place at once


@pytest.mark.parametrize("cpus", [2, 3, 16, 24])
@pytest.mark.parametrize("trials", [3, 6, 7, 48])
def test_cpu_shares_fit_every_trial_at_once(cpus, trials):
    """Ray counts resources in units of 1e-4: the shares of the trials at once add up to no more than the CPUs."""
    got = _resources(cpus, n=trials)["cpu"]
    assert trials * round(got * 10_000) <= cpus * 10_000 and got > cpus / trials - 1e-4


def test_unwritable_storage_path_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert tune_main.main(["--smoke-test", "--storage-path", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write results to") and "\n" not in err


def test_resume_without_experiment_is_one_line(tmp_path, capsys):
    assert tune_main.main(["--resume", "--storage-path", str(tmp_path)]) == 2
    assert "no normsweep experiment under" in capsys.readouterr().err


def test_closing_tables_show_numbers_as_the_report_does():
    """Issue 25, item 28: the CLI's closing table printed a p of 1e-16 as 0.00. Sibling: a nan as "-"."""
    import pandas as pd

    table = pd.DataFrame({"comparison": ["bn − gn", "bn − ln"], "difference (points)": [1.234, float("nan")],
                          "paired t p": [8.59e-16, float("nan")], "Holm p": [0.0123, 1.0]})
    rows = [line.split() for line in sweep.text_table(table).splitlines()[1:]]
    assert rows == [["bn", "−", "gn", "1.23", "<0.001", "0.0123"], ["bn", "−", "ln", "-", "-", "1"]]
