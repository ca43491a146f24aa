"""Launching and finding experiments: names claimed once, the bare --resume's choice, Ctrl-C while Ray loads,
bugs that keep their traceback, one run per experiment, refused resumes, resuming from a checkpoint the driver
did not save (Tune's driver simulated). (Real interrupted and resumed sweeps: tests/test_interruptions.py.)"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import analysis
import cluster
import config
import data as data_lib
import experiments
import train
import tune_main
from conftest import HANG_SECONDS, ROOT, blank_dataset, make_idx_dir


def test_an_experiment_name_is_claimed_once(tmp_path, monkeypatch):
    storage = str(tmp_path / "results")
    experiment = experiments.join(storage, "same")
    assert experiments.claim(experiment, {"variants": "gn"}) is True
    assert experiments.claim(experiment, {"variants": "bn"}) is False  # the second launch of the same --name
    assert experiments.read_launch(experiment) == {"variants": "gn"}  # the first launch's settings stay

    # default names are stamped to the second: a second launch in that second gets a suffix
    import sweep

    monkeypatch.setattr(sweep.time, "strftime", lambda format: "20261129-120000")
    first = sweep.prepare(config.SweepConfig(), set(), storage).name
    assert first == "normsweep_fashion-mnist_20261129-120000"
    experiments.claim(experiments.join(storage, first), {})
    assert sweep.prepare(config.SweepConfig(), set(), storage).name == first + "-2"


def _fake_experiment(storage: Path, name: str, epochs_done: list, epochs=3, health=None, age=0):
    """A launched and started experiment whose trials reported `epochs_done` epochs each."""
    experiment = storage / name
    experiment.mkdir(parents=True)
    launch = config.SweepConfig(variants="bn,gn", epochs=epochs, name=name).to_launch()
    (experiment / experiments.LAUNCH_FILE).write_text(json.dumps(launch))
    (experiment / "experiment_state-2026.json").write_text("{}")
    for k, done in enumerate(epochs_done):
        trial = experiment / f"trial{k}"
        trial.mkdir()
        lines = [{"epoch": e, "health": health if health and e == done else "ok"} for e in range(1, done + 1)]
        (trial / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    stamp = time.time() - age
    os.utime(experiment / experiments.LAUNCH_FILE, (stamp, stamp))


def test_a_bare_resume_picks_the_latest_unfinished_experiment(tmp_path, capsys):
    storage = tmp_path / "results"
    _fake_experiment(storage, "older", [1, 0], age=100)  # interrupted: gn never reported
    _fake_experiment(storage, "newer", [3, 3], age=10)  # finished
    _fake_experiment(storage, "diverged", [3, 2], health="diverged: train loss nan", age=1)  # finished too
    assert experiments.latest_started(str(storage)) == "older"
    older = str(storage / "older")
    assert experiments.trials_left(older, config.SweepConfig().from_launch(experiments.read_launch(older))) == 2

    _fake_experiment(tmp_path / "done", "only", [3, 3])
    assert tune_main.main(["--resume", "--storage-path", str(tmp_path / "done")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --resume: every experiment under {tmp_path / 'done'} has finished (the latest is only); "
                   f"pass --name to print one's table again")


@pytest.mark.parametrize("name, message", [
    ("x" * 300, r"--name is longer than a file system allows \(300 bytes, at most 255\)"),
    ("runs/first", "--name must be one directory name, without '/'"),
    ("..", "--name must be one directory name"),
    ("", "--name must be one directory name"),  # it was the storage path itself: "experiment .../ exists"
])
def test_names_that_cannot_be_a_directory_are_refused_before_ray(name, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray raises ImportError: it must not be reached
    assert tune_main.main(["--smoke-test", "--name", name, "--storage-path", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(f"error: {message}.*", err) and "\n" not in err, err
    assert not (tmp_path / "r").exists()


def test_ctrl_c_while_torch_and_ray_load_is_one_line():
    """Ctrl-C in the first seconds, while tune_main.py imports torch and Ray: the line main() gives, exit 130,
    not a KeyboardInterrupt traceback from inside an import. The signal comes as `trainable` is imported."""
    driver = textwrap.dedent("""
        import os, runpy, signal, sys

        class InterruptAtImport:  # a meta path finder that only watches
            def find_spec(self, name, path=None, target=None):
                if name == "trainable":
                    os.kill(os.getpid(), signal.SIGINT)

        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the test runner set
        sys.meta_path.insert(0, InterruptAtImport())
        sys.argv = ["tune_main.py", "--smoke-test"]
        runpy.run_path("tune_main.py", run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_SECONDS)
    assert (done.returncode, done.stderr) == (130, "interrupted before the sweep started; nothing was saved\n"), done


def test_ctrl_c_while_ray_starts_is_held_until_it_has():
    """A Ctrl-C that comes while Ray starts its processes (cluster.connect) is raised once they are up, so that
    the driver stops Ray whole (taken halfway, it crashed at exit with SIGSEGV); one while Ray stops is dropped."""
    import cluster

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with cluster.interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # Python runs the handler between bytecodes: give it some
                time.sleep(0.001)
            reached = True  # the block ran to its end
    assert reached and signal.getsignal(signal.SIGINT) is before
    with cluster.interrupts_held(then_raise=False):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    """Only normsweep's own errors become one line and exit 2; any other ValueError is a bug."""
    def bug(*args, **kwargs):
        raise ValueError("a bug deep inside pandas")

    import sweep

    monkeypatch.setattr(sweep, "run", bug)
    with pytest.raises(ValueError, match="a bug deep inside pandas"):
        tune_main.main(["--smoke-test", "--storage-path", str(tmp_path)])
    monkeypatch.setattr(analysis, "write_report", bug)
    with pytest.raises(ValueError, match="a bug deep inside pandas"):
        analysis.main([str(tmp_path)])
    monkeypatch.setattr(train, "TrainingRun", bug)
    monkeypatch.setattr(train.data_lib, "load_dataset", lambda *a, **k: blank_dataset(10, 10))
    with pytest.raises(ValueError, match="a bug deep inside pandas"):
        train.main(["--epochs", "1"])
    assert "error:" not in capsys.readouterr().err


def _resumable(storage: Path, name: str, dataset: Path, model="small", inputs=None) -> Path:
    """A started experiment on `dataset` whose launch saved `inputs` (default: the digests of today's data/model)."""
    import sweep

    launch = config.SweepConfig(dataset=str(dataset), variants="gn", epochs=2, name=name, model=model).to_launch()
    if inputs is None:
        inputs = sweep.input_digests(data_lib.load_dataset(str(dataset)), model)
    (storage / name).mkdir(parents=True)
    (storage / name / experiments.LAUNCH_FILE).write_text(json.dumps({**launch, "inputs": inputs}))
    (storage / name / "experiment_state-2026.json").write_text("{}")
    return storage / name


@pytest.fixture
def no_ray(monkeypatch):
    """Ray is neither started nor asked: what a refusal before fit needs."""
    import ray

    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 8 * 2**30})
    monkeypatch.setattr(ray, "shutdown", lambda: None)


def test_one_run_holds_an_experiment_and_a_second_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    """Issue 25, items 11 and 22: a resume while another run (a launch or a resume) is running is refused in one
    line naming that run, before Ray starts; so is a launch of the same name, without advising --resume."""
    storage = tmp_path / "results"
    _fake_experiment(storage, "busy", [1, 0])
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray started"))
    with experiments.owned(str(storage / "busy")):  # what the running driver holds
        assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "busy"]) == 2
        out, err = capsys.readouterr()
        assert out == "", out  # nothing said of a resume that does not happen
        err = err.strip()
        assert re.fullmatch(rf"error: {re.escape(str(storage / 'busy'))} is in use by another run \(pid {os.getpid()} "
                            rf"on {re.escape(__import__('socket').gethostname())}, since .*\); wait for that run to "
                            r"end \(it prints how to resume\)", err), err
        assert tune_main.main(["--smoke-test", "--storage-path", str(storage), "--name", "busy"]) == 2
        err = capsys.readouterr().err
        assert "is running it" in err and "--resume" not in err
        assert experiments.holder(str(storage / "busy")).startswith("another run (pid")
    assert experiments.holder(str(storage / "busy")) is None  # let go when the run ends
    with experiments.owned(str(storage / "busy")):  # and so taken by the next
        pass


def test_an_object_store_experiment_is_held_by_a_marker_a_dead_run_here_leaves_stale(tmp_path):
    """The sibling on object stores (no file locks): the owner marker refuses a second run unless the run that
    wrote it has died on this host; the refusal says how to clear it."""
    experiment = f"file://{tmp_path}/exp"
    (tmp_path / "exp").mkdir()
    with experiments.owned(experiment):
        with pytest.raises(experiments.ExperimentError, match=rf"in use by another run \(pid {os.getpid()} .*, or if "
                                                              r"it has died, delete file://.*normsweep_owner.json$"):
            with experiments.owned(experiment):
                pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"host": __import__("socket").gethostname(), "pid": int(dead.stdout), "since": "then"}
    (tmp_path / "exp" / experiments.OWNER_FILE).write_text(json.dumps(owner))
    with experiments.owned(experiment):  # stale: taken over
        assert json.loads((tmp_path / "exp" / experiments.OWNER_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "exp" / experiments.OWNER_FILE).exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to act as another user")
def test_resuming_another_users_experiment_is_one_line(request):
    """Issue 25, item 12: the storage path writable, the experiment (another user's) not: one line naming the path
    and what to do, not Ray's PermissionError traceback."""
    storage = Path(tempfile.mkdtemp(prefix="normsweep-shared-"))  # not under pytest's root-only directory
    request.addfinalizer(lambda: shutil.rmtree(storage))
    _fake_experiment(storage, "theirs", [1, 0])
    os.chmod(storage, 0o777)  # the storage path is writable by all; the experiment is root's
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                           str(ROOT / "tune_main.py"), "--resume", "--storage-path", str(storage), "--name", "theirs"],
                          cwd=storage, capture_output=True, text=True, timeout=HANG_SECONDS, env={**os.environ,
                                                                                                  "HOME": str(storage)})
    assert done.returncode == 2, done
    err = done.stderr.strip()
    assert re.fullmatch(rf"error: cannot resume {re.escape(str(storage / 'theirs'))}: "
                        rf"{re.escape(str(storage / 'theirs'))} is not writable by this user; ask its owner .* copy it "
                        r"\(cp -a\) to a storage path of yours and resume the copy", err), done.stderr


def test_a_resume_on_other_data_or_another_model_file_is_refused(tmp_path, capsys, no_ray):
    """Issue 25, item 21: the dataset directory rewritten with more images since the launch: --resume refuses in
    one line naming what changed; the sibling: the --model file edited."""
    storage, directory = tmp_path / "results", make_idx_dir(tmp_path / "tiny", n_train=64, n_test=32)
    _resumable(storage, "data", directory)
    make_idx_dir(directory, n_train=80, n_test=32)  # rewritten with more images
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "data"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: the dataset's images or labels changed since {storage / 'data'} was launched, so its "
        f"trials would go on with other inputs; restore them, or launch a new experiment")

    net = tmp_path / "net.py"
    net.write_text("from torch import nn\n\n\ndef build(norm_layer, in_channels, num_classes):\n    return nn.Sequential("
                   "nn.Conv2d(in_channels, 8, 3), norm_layer(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), "
                   "nn.Linear(8, num_classes))\n")
    _resumable(storage, "model", directory, model=f"{net}:build")
    net.write_text(net.read_text().replace("nn.Conv2d(in_channels, 8, 3)", "nn.Conv2d(in_channels, 8, 5)"))
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "model"]) == 2
    assert "error: --resume: the --model file changed since" in capsys.readouterr().err


def test_a_resume_after_a_models_module_was_edited_is_refused(tmp_path, capsys, no_ray, monkeypatch):
    """--model module:build, a module on the path rather than a file: editing the file it is defined in is caught."""
    storage, directory = tmp_path / "results", make_idx_dir(tmp_path / "tiny", n_train=64, n_test=32)
    (tmp_path / "edited_net.py").write_text(
        "from torch import nn\n\n\ndef build(norm_layer, in_channels, num_classes):\n    return nn.Sequential(nn.Conv2d("
        "in_channels, 8, 3), norm_layer(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "edited_net", raising=False)
    _resumable(storage, "module", directory, model="edited_net:build")
    (tmp_path / "edited_net.py").write_text((tmp_path / "edited_net.py").read_text().replace(", 8, 3)", ", 8, 5)"))
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "module"]) == 2
    assert "error: --resume: the --model file changed since" in capsys.readouterr().err


def test_a_resume_whose_dataset_is_gone_or_damaged_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """The launch's dataset directory deleted since (or its test split): one line naming it, before Ray starts."""
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray started"))
    storage, directory = tmp_path / "results", make_idx_dir(tmp_path / "tiny", n_train=64, n_test=32)
    _resumable(storage, "gone", directory)
    shutil.rmtree(directory)
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "gone"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: no such directory: {directory};")
    make_idx_dir(directory)
    for path in directory.glob("t10k-*"):  # the sibling: its test split lost
        path.unlink()
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "gone"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {directory}: no test split")


def test_epochs_a_cut_short_result_json_lost_are_read_from_progress_csv(tmp_path):
    """Issue 25, item 24: a resume stopped before a trial reported left its result.json empty while progress.csv
    holds epoch 1: the trial's history, what it has left and the CLI's table still have that epoch."""
    storage = tmp_path / "results"
    _fake_experiment(storage, "cut", [2, 1], epochs=2)
    trial = storage / "cut" / "trial1"
    (trial / "progress.csv").write_text("epoch,health,test_acc\n1,ok,0.5\n")
    (trial / "result.json").write_text("")
    assert experiments.last_results(str(storage / "cut"))["trial1"]["epoch"] == 1
    cut = str(storage / "cut")
    assert experiments.trials_left(cut, config.SweepConfig().from_launch(experiments.read_launch(cut))) == 1
    assert experiments.history(str(trial))["test_acc"].tolist() == [0.5]  # what analysis.results_frame reads
    (trial / "progress.csv").unlink()  # the sibling: neither record: nothing is made up
    assert experiments.last_results(str(storage / "cut"))["trial1"] == {}


def test_max_concurrent_is_kept_by_memory_so_every_trial_exists_at_launch():
    """Issue 25, items 9 and 10: Tune creates a trial held back by max_concurrent_trials later, from its saved
    search state, which writes to where the experiment was launched; so --max-concurrent is each trial's share of
    memory, and Tune is not asked to hold trials back."""
    import sweep

    available = {"CPU": 2.0, "memory": 16 * 2**30}
    share = sweep.trial_resources(available, 3, config.SweepConfig(max_concurrent=1, cpus_per_trial=1))
    assert available["memory"] // share["memory"] == 1
    share = sweep.trial_resources(available, 3, config.SweepConfig(max_concurrent=2))
    assert available["memory"] // share["memory"] == 2 and share["cpu"] == 1


class _DriverStopped(Exception):
    pass


def _tune_as_a_driver(monkeypatch, trial: str, known: int, stop_after_checkpoints=None) -> list:
    """Ray Tune's side of train_variant, faked: `known` is the newest checkpoint index Tune's saved state lists (-1:
    none); each reported checkpoint is persisted as Tune does (the next index, over what is there); a driver stopped
    after `stop_after_checkpoints` of them. Returns the list the reports go to: (report, with a checkpoint)."""
    import pyarrow.fs as pafs
    from ray import tune

    fs, path = experiments.filesystem(trial)
    reports, index = [], [known]
    resources = type("Resources", (), {"required_resources": {"CPU": 1}})
    context = type("Context", (), {"get_trial_resources": lambda self: resources,
                                   "get_trial_dir": lambda self: f"/tmp/staging/{experiments.name_of(trial)}"})

    def report(metrics, checkpoint=None):
        if checkpoint:
            index[0] += 1
            fs.create_dir(f"{path}/checkpoint_{index[0]:06d}")
            pafs.copy_files(checkpoint.path, f"{path}/checkpoint_{index[0]:06d}", destination_filesystem=fs)
        reports.append((metrics, bool(checkpoint)))
        if checkpoint and index[0] - known == stop_after_checkpoints:
            raise _DriverStopped

    monkeypatch.setattr(tune, "get_context", lambda: context())
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint(f"{path}/checkpoint_{known:06d}", fs)
                        if known >= 0 else None)
    monkeypatch.setattr(tune, "report", report)
    return reports


def interrupted_trial(monkeypatch, tmp_path, experiment: str, checkpoints: int):
    """(train_variant's arguments, reports): a 3-epoch trial of `experiment` whose driver stopped after it had written
    `checkpoints` checkpoints, none of them in Tune's saved state."""
    import trainable

    arguments = ({"variant": {"norm": "gn", "l1": 0.0}, "epochs": 3, "batch_size": 16, "compile": "off"},
                 data_lib.load_dataset(str(make_idx_dir(tmp_path / "idx"))), experiment)
    reports = _tune_as_a_driver(monkeypatch, experiments.join(experiment, "gn_seed0_00000"), -1, checkpoints)
    with pytest.raises(_DriverStopped):
        trainable.train_variant(*arguments)
    return arguments, reports


@pytest.mark.parametrize("damage", ["", "newest half-written"])
def test_a_resume_continues_from_the_checkpoint_a_stopped_driver_did_not_save(damage, tmp_path, monkeypatch):
    """Issue 25, item 24: a trial's checkpoint of epoch 1 on storage that Tune's saved state does not list (its driver
    stopped first; Tune restarts the trial with an empty log): the resume reports epoch 1 again from the checkpoint
    and trains on from epoch 2, each epoch once. The sibling: the newest checkpoint (epoch 2) half-written, the
    resume goes on from the one before it."""
    import trainable

    experiment = tmp_path / "results" / "cut"
    arguments, first = interrupted_trial(monkeypatch, tmp_path, str(experiment), 2 if damage else 1)
    trial = experiment / "gn_seed0_00000"
    if damage:
        state = trial / "checkpoint_000001" / trainable.CHECKPOINT_FILE
        state.write_bytes(state.read_bytes()[:1000])  # a copy cut off mid-write
    resumed = _tune_as_a_driver(monkeypatch, str(trial), known=-1)
    trainable.train_variant(*arguments)
    # epoch 1 reported with its checkpoint, so that Tune numbers the next one 1 and writes it beside, not over, it
    assert [(r["epoch"], checkpointed) for r, checkpointed in resumed] == [(1, True), (2, True), (3, True)]
    assert json.dumps(resumed[0][0]) == json.dumps(first[0][0])  # epoch 1 as it was reported, not trained again
    assert [last_epoch(trial / f"checkpoint_{k:06d}") for k in range(3)] == [1, 2, 3]  # none written over


def last_epoch(checkpoint: Path) -> int:
    return json.loads((checkpoint / experiments.EPOCHS_FILE).read_text())[-1]["epoch"]


def test_a_resume_reports_again_only_the_epochs_tunes_log_lacks(tmp_path, monkeypatch):
    """Issue 25, item 24, Tune's state listing an older checkpoint (epoch 1, whose log it restores) than the trial's
    newest on storage (epoch 2): epoch 2 is reported again, epoch 1 not, and training goes on at epoch 3."""
    import trainable

    experiment = tmp_path / "results" / "older"
    arguments, first = interrupted_trial(monkeypatch, tmp_path, str(experiment), 2)
    trial = experiment / "gn_seed0_00000"
    (trial / experiments.RESULT_FILE).write_text(json.dumps(first[0][0]) + "\n")  # the log as far as Tune's state goes
    resumed = _tune_as_a_driver(monkeypatch, str(trial), known=0)
    trainable.train_variant(*arguments)
    assert [(r["epoch"], checkpointed) for r, checkpointed in resumed] == [(2, True), (3, True)]
    assert json.dumps(resumed[0][0]) == json.dumps(first[1][0])
    assert [last_epoch(trial / f"checkpoint_{k:06d}") for k in range(3)] == [1, 2, 3]


def test_a_resume_of_a_name_not_there_or_not_an_experiment_says_which_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray raises ImportError: it must not be reached
    storage = tmp_path / "r"
    (storage / "notes").mkdir(parents=True)
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "nosuch"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --resume: no experiment 'nosuch' under {storage}; pass the "
                                               f"--name and --storage-path it was launched with")
    assert tune_main.main(["--resume", "--storage-path", str(storage), "--name", "notes"]) == 2
    assert "is not a normsweep experiment (no normsweep_launch.json)" in capsys.readouterr().err
