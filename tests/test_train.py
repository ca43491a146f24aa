import dataclasses
import math

import pytest
import torch

import errors
from torch import nn

import data as data_lib
import model
import train
from config import SweepConfig, TrialConfig
from conftest import make_idx_dir
from model import Net, build_model, count_parameters


def test_one_epoch_on_real_data_learns(fashion_small):
    run = train.TrainingRun({"norm": "bn", "epochs": 2, "seed": 0, "threads": 2}, fashion_small)
    run.run_epoch()
    metrics = run.run_epoch()
    # Measured for bn, seeds 0-3: 0.67-0.72 test accuracy after two epochs on 5k images; chance is 0.10.
    assert metrics["test_acc"] > 0.50
    assert set(metrics) >= {"train_loss", "train_acc", "test_loss", "test_acc", "test_acc_single", "lr", "epoch",
                            "epoch_seconds", "images_per_s", "threads"}
    assert metrics["epoch"] == 2 and metrics["threads"] == 2


def test_an_epochs_report_says_what_it_ran_in_and_on(fashion_small):
    import experiments
    import trainable

    run = train.TrainingRun({"norm": "gn", "epochs": 1, "threads": 1}, fashion_small.subset(200, 100))
    report = trainable.epoch_report(run, run.run_epoch())
    assert set(report) == set(trainable.METRICS) | {trainable.HEALTH_KEY, trainable.PRECISION_KEY, trainable.DEVICE_KEY,
                                                   trainable.PARAMETERS_KEY, experiments.CORRECT_KEY}
    correct = experiments.unpacked_correct(report[experiments.CORRECT_KEY])  # the one view, image by image
    assert len(correct) == 100 and correct.mean() == pytest.approx(report["test_acc_single"])
    assert report[trainable.PRECISION_KEY] == "fp32" and report[trainable.DEVICE_KEY] == "cpu"  # auto on the CPU
    assert math.isnan(report["peak_device_memory_mib"])  # no device memory counter on the CPU
    assert all(isinstance(report[k], (int, float)) for k in trainable.METRICS)


def _small(fashion_small, n=1000):
    return fashion_small.subset(n, 500)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_resume_continues_exactly(fashion_small, tmp_path, norm):
    config = {"norm": norm, "epochs": 3, "seed": 7, "threads": 1}
    dataset = _small(fashion_small)
    straight = train.TrainingRun(config, dataset)
    expected = [straight.run_epoch() for _ in range(3)]

    first = train.TrainingRun(config, dataset)
    first.run_epoch()
    first.save(tmp_path / "state.pt")
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint must restore it
    resumed = train.TrainingRun(config, dataset)
    resumed.load(tmp_path / "state.pt")
    assert resumed.epoch == 1
    got = [resumed.run_epoch() for _ in range(2)]
    for want, have in zip(expected[1:], got):
        assert have["epoch"] == want["epoch"]
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key


def test_checkpoint_from_another_config_is_refused(fashion_small, tmp_path):
    dataset = _small(fashion_small, 200)
    run = train.TrainingRun({"norm": "bn", "epochs": 1, "threads": 1}, dataset)
    run.save(tmp_path / "state.pt")
    other = train.TrainingRun({"norm": "gn", "epochs": 1, "threads": 1}, dataset)
    with pytest.raises(train.CheckpointError, match="from another config \\(norm: checkpoint 'bn' vs run 'gn'\\)"):
        other.load(tmp_path / "state.pt")


def test_corrupt_checkpoint_gets_one_line_error(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointError, match="unreadable .* corrupt or not a normsweep checkpoint"):
        train.load_checkpoint(path)


def test_model_rebuilds_from_checkpoint(fashion_small, tmp_path):
    run = train.TrainingRun({"norm": "ln", "epochs": 1, "threads": 1}, _small(fashion_small, 300))
    run.run_epoch()
    run.save(tmp_path / "state.pt")
    model, state = train.model_from_checkpoint(tmp_path / "state.pt")
    assert isinstance(model, Net) and {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {1}
    assert state["input_stats"] == {"mean": run.mean.tolist(), "std": run.std.tolist()} and state["epoch"] == 1
    x = torch.randn(4, 1, 28, 28)
    run.model.eval()
    assert torch.allclose(model(x), run.model(x), atol=1e-5)


def test_l1_shrinks_weights(fashion_small):
    dataset = _small(fashion_small)
    sums = {}
    for l1 in (0.0, 1e-2):
        run = train.TrainingRun({"norm": "bn", "l1": l1, "epochs": 2, "seed": 0, "threads": 1}, dataset)
        run.run_epoch()
        run.run_epoch()
        sums[l1] = train.l1_penalty(run.model).item()
    # measured 0.59 (lambda 1e-2, 2 epochs, 1k images)
    assert sums[1e-2] < 0.8 * sums[0.0]


def test_synthetic_idx_directory_trains(tmp_path):
    dataset = data_lib.load_dataset(str(make_idx_dir(tmp_path / "d", n_train=40, n_test=10)))
    metrics = train.TrainingRun({"epochs": 1, "batch_size": 16, "threads": 1}, dataset).run_epoch()
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert dataset.augment == data_lib.SPECS["mnist"].augment  # unknown folders are not flipped


def test_test_flip_averages_the_mirror_and_keeps_the_one_view_score(fashion_small):
    run = train.TrainingRun({"norm": "gn", "epochs": 1, "threads": 1}, fashion_small)
    run.run_epoch()
    x, y = fashion_small.test_images[:300], fashion_small.test_labels[:300]
    plain = train.evaluate(run.model, x, y, mean=run.mean, std=run.std)
    flipped = train.evaluate(run.model, x, y, mean=run.mean, std=run.std, flip=True)
    inputs = data_lib.to_input(x, run.mean, run.std)
    with torch.no_grad():
        probs = (run.model(inputs).softmax(1) + run.model(inputs.flip(3)).softmax(1)) / 2
    assert torch.equal(flipped["preds"], probs.argmax(1))
    assert flipped["acc_single"] == plain["acc_single"] == pytest.approx(plain["acc"])
    assert not torch.equal(flipped["confidence"], plain["confidence"])


def test_weight_decay_skips_norm_affines_and_biases():
    decayed, free = train.param_groups(build_model("bn"), 5e-4)
    assert decayed["weight_decay"] == 5e-4 and all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])
    assert free["weight_decay"] == 0.0 and all(p.ndim == 1 for p in free["params"]) and free["params"]


def test_random_draws_come_from_the_runs_generator_on_its_device(fashion_small):
    """Shuffling and augmentation use the trial's generator (made on the trial's device), nothing global."""
    run = train.TrainingRun({"epochs": 1, "threads": 1}, fashion_small.subset(500, 100))
    assert run.generator.device == run.device
    x = data_lib.to_input(run.train_x[:64], run.mean, run.std)
    state = run.generator.get_state()
    first = data_lib.augment(x, run.generator, degrees=7.0, shift=2, flip=True)
    torch.manual_seed(123)  # the global RNG plays no part
    run.generator.set_state(state)
    assert torch.equal(first, data_lib.augment(x, run.generator, degrees=7.0, shift=2, flip=True))


def output_dtypes(model) -> dict:
    """{"conv": {dtypes}, "norm": {dtypes}}, filled in by forward hooks as the model runs."""
    dtypes = {}

    def record(module, inputs, output):
        dtypes.setdefault("conv" if isinstance(module, torch.nn.Conv2d) else "norm", set()).add(output.dtype)

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            module.register_forward_hook(record)
    return dtypes


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_bf16_autocast_runs_convs_in_bf16_norms_in_float32_and_learns(fashion_small, norm):
    run = train.TrainingRun({"norm": norm, "epochs": 2, "threads": 1, "precision": "bf16"}, fashion_small.subset(2000, 1000))
    dtypes = output_dtypes(run.model)
    run.run_epoch()
    metrics = run.run_epoch()
    assert dtypes == {"conv": {torch.bfloat16}, "norm": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # master weights stay fp32
    # Measured, seeds 0-1, 2 epochs: fp32 0.56-0.75 and bf16 0.58-0.76 over the three norms; chance is 0.10.
    assert metrics["test_acc_single"] > 0.50


def test_precision_auto_is_bf16_on_gpus_with_native_bf16_only(monkeypatch):
    cuda = torch.device("cuda")
    precision = lambda config, device: train.runtime(config, device)[1]  # noqa: E731
    assert precision({"precision": "auto"}, torch.device("cpu")) == "fp32"
    assert precision({"precision": "bf16"}, torch.device("cpu")) == "bf16"
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability["now"] >= (8, 0))
    for now, auto in (((7, 5), "fp32"), ((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):  # T4, V100, A100, H100
        capability["now"] = now
        assert precision({"precision": "auto"}, cuda) == auto, now
        assert precision({"precision": "fp32"}, cuda) == "fp32"
    capability["now"] = (8, 0)
    assert precision({"precision": "bf16"}, cuda) == "bf16"
    capability["now"] = (7, 5)
    with pytest.raises(errors.UsageError, match=r"^--precision bf16 on cuda \(compute capability 7.5\): this GPU "
                                                   r"has no native bf16 .*; use --precision auto or fp32$"):
        precision({"precision": "bf16"}, cuda)


def test_train_cli_refuses_bf16_on_a_gpu_without_it_in_one_line(idx_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert train.main(["--dataset", str(idx_dir), "--precision", "bf16", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --precision bf16 on cuda (compute capability 7.5)") and err.count("\n") == 1


def test_epoch_clock_waits_for_the_device(fashion_small, monkeypatch):
    """CUDA queues kernels and returns: the epoch's clock is read only after the device has synchronised,
    at its start and at its end; on the CPU nothing is synchronised."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    train.synchronize(torch.device("cuda"))
    train.synchronize(torch.device("cpu"))
    assert synced == [torch.device("cuda")]

    run = train.TrainingRun({"epochs": 1, "threads": 1, "batch_size": 100}, fashion_small.subset(300, 100))
    events = []
    synchronize, clock = train.synchronize, train.time.perf_counter
    monkeypatch.setattr(train, "synchronize", lambda device: events.append(("sync", device)) or synchronize(device))
    monkeypatch.setattr(train.time, "perf_counter", lambda: events.append(("clock",)) or clock())
    synced.clear()
    run.train_one_epoch()
    assert events == [("sync", run.device), ("clock",), ("sync", run.device), ("clock",)]
    assert synced == []  # a CPU run: torch.cuda.synchronize is never called


def test_compiled_net_trains_and_evaluates_as_the_eager_one(fashion_small, monkeypatch):
    """compile on (torch.compile; the default on CUDA) against eager from the same seed: the same training
    trajectory and evaluation up to float rounding, BatchNorm's running statistics and the odd last batch
    included, and the checkpointed state is the plain model's.

    In contiguous (NCHW) layout: eager BatchNorm on channels-last CPU tensors is off by up to 7e-4 from a
    float64 reference (torch 2.14.1; NCHW 5e-7, compiled 2e-6), enough to move the trajectory by 1%."""
    monkeypatch.setattr(train, "MEMORY_FORMAT", torch.contiguous_format)
    subset = fashion_small.subset(544, 500)  # 8 batches of 64, then one of 32
    runs = [train.TrainingRun({"norm": "bn", "epochs": 2, "threads": 1, "batch_size": 64, "compile": choice}, subset)
            for choice in ("off", "on")]
    eager, compiled = (run.run_epoch() for run in runs)
    assert runs[1].net is not runs[1].model and runs[0].net is runs[0].model
    for key in ("train_loss", "test_loss", "test_acc"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
    eager_state, compiled_state = (run.model.state_dict() for run in runs)
    assert eager_state.keys() == compiled_state.keys()  # no "_orig_mod." prefixes in checkpoints
    for key, value in eager_state.items():
        assert torch.allclose(compiled_state[key].float(), value.float(), rtol=1e-4, atol=1e-5), key


def test_compile_auto_is_on_cuda_with_triton_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    compiles = lambda config, device: train.runtime(config, device)[2]  # noqa: E731
    assert not compiles({"compile": "auto"}, torch.device("cpu"))
    find_spec = train.importlib.util.find_spec
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: object() if name == "triton" else find_spec(name))
    assert compiles({"compile": "auto"}, torch.device("cuda"))
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name))
    # e.g. Windows without Triton: eager rather than a failed compile
    assert not compiles({"compile": "auto"}, torch.device("cuda"))
    assert compiles({"compile": "on"}, torch.device("cpu"))
    assert not compiles({"compile": "off"}, torch.device("cuda"))


@pytest.mark.parametrize("norm", ["in", "gbn", "bn+ws", "gn+ws"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_newer_norms_train_an_epoch(tmp_path, norm, precision):
    """in, gbn and the +ws variants through TrainingRun: batches of 40 (ghost batches of 16, 16, 8 and
    16, 8), bf16 convs with the norms (and WS's weight statistics) in float32, precise BN for BN's kin."""
    dataset = data_lib.load_dataset(str(make_idx_dir(tmp_path / "d", n_train=64, n_test=16)))
    run = train.TrainingRun({"norm": norm, "epochs": 1, "batch_size": 40, "threads": 1, "compile": "off",
                             "precision": precision}, dataset)
    dtypes = output_dtypes(run.model)
    metrics = run.run_epoch()
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test_loss"])
    conv_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtypes == {"conv": {conv_dtype}, "norm": {torch.float32}}
    assert math.isfinite(metrics["test_acc_precise_bn"]) == (norm in ("gbn", "bn+ws"))


# Users' nets for the pre-flight run, each a builder in its own file (plugins.py imports a file as a module of its name)
PROBES = {
    # no trainable parameters at all: with `none` the norm layer is nn.Identity; pooled to (B, 1, 1, classes)
    "probe_no_params": "return nn.Sequential(norm_layer(in_channels), nn.AdaptiveAvgPool2d((1, num_classes)), "
                       "nn.Flatten())",
    # parameters, all frozen (a feature extractor whose head the user forgot to unfreeze)
    "probe_frozen": "net = nn.Sequential(nn.Conv2d(in_channels, 8, 3), norm_layer(8), nn.ReLU(), "
                    "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
                    "    return net.requires_grad_(False)",
    # trainable, but the image never reaches the logits: a learned constant
    "probe_ignores_input": "return Ignores(norm_layer(8), num_classes)",
    # runs on a batch of 2 only, not on a training batch
    "probe_batch_of_two": "return nn.Sequential(nn.Conv2d(in_channels, 8, 3), norm_layer(8), nn.AdaptiveAvgPool2d(1), "
                          "nn.Unflatten(0, (2, -1)), nn.Flatten(), nn.Linear(8, num_classes))",
    # a zero-initialised head: the same logits for every image at init, but not after a step; it trains
    "probe_zero_head": "net = nn.Sequential(nn.Conv2d(in_channels, 8, 3), norm_layer(8), nn.ReLU(), "
                       "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
                       "    nn.init.zeros_(net[-1].weight), nn.init.zeros_(net[-1].bias)\n    return net",
    # the small net's fault in a user's net: conv -> ReLU -> a per-channel norm, then global average pooling
    "probe_norm_then_pool": "return nn.Sequential(nn.Conv2d(in_channels, 8, 3, bias=False), nn.ReLU(), norm_layer(8), "
                            "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))",
}
IGNORES = '''
class Ignores(nn.Module):
    def __init__(self, norm, num_classes):
        super().__init__()
        self.norm, self.features, self.head = norm, nn.Parameter(torch.randn(1, 8, 1, 1)), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.features.expand(len(x), -1, 2, 2)).mean(dim=(2, 3)))
'''


def probe(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(f"import torch\nfrom torch import nn\n{IGNORES}\n\ndef build(norm_layer, in_channels, num_classes):\n"
                    f"    {PROBES[name]}\n")
    return f"{path}:build"


def refused_in_one_line(capsys, argv) -> str:
    assert train.main(argv) == errors.USAGE_EXIT
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and not out, err
    return err


def test_in_on_the_small_net_is_refused_before_training_as_a_constant_function(tmp_path, idx_dir, capsys):
    """Issue 25 item 0: conv -> ReLU -> InstanceNorm, then global average pooling, pools every channel to its shift."""
    err = refused_in_one_line(capsys, ["--dataset", str(idx_dir), "--norm", "in", "--epochs", "1", "--threads", "1"])
    assert "--model small with norm in gives the same logits for every input" in err and "--model resnet20" in err
    dataset = data_lib.load_dataset(str(idx_dir))
    for norm in model.NORMS:  # nothing else is refused: every norm of both built-in nets, in on the small net
        for net in ("small", "resnet20"):  # with the norm before the ReLU too
            if (norm, net) != ("in", "small"):
                assert train.preflight(TrialConfig(norm=norm, model=net, batch_size=16), dataset) > 0
    assert train.preflight(TrialConfig(norm="in", order="norm-relu", batch_size=16), dataset) > 0
    assert train.preflight(TrialConfig(model=probe(tmp_path, "probe_zero_head"), norm="gn"), dataset) > 0


@pytest.mark.parametrize("norm, name", [("gn", "probe_ignores_input"), ("in", "probe_norm_then_pool")])
def test_a_users_net_whose_output_ignores_its_input_is_refused(tmp_path, idx_dir, capsys, norm, name):
    err = refused_in_one_line(capsys, ["--dataset", str(idx_dir), "--model", probe(tmp_path, name), "--norm", norm])
    assert f"with norm {norm} gives the same logits for every input" in err


@pytest.mark.parametrize("norm, name", [("none", "probe_no_params"), ("bn", "probe_frozen")])
def test_a_net_with_nothing_to_train_is_refused_in_one_line(tmp_path, idx_dir, capsys, norm, name):
    """Issue 25 item 18 (no parameters under `none`), and its sibling: parameters, every one frozen."""
    err = refused_in_one_line(capsys, ["--dataset", str(idx_dir), "--model", probe(tmp_path, name), "--norm", norm])
    assert "no trainable parameter shapes its logits" in err


def test_a_net_that_fails_only_in_a_training_step_is_refused_in_one_line(tmp_path, idx_dir, capsys):
    err = refused_in_one_line(capsys, ["--dataset", str(idx_dir), "--model", probe(tmp_path, "probe_batch_of_two")])
    assert "with norm bn fails in a training step on a batch of (16, 1, 28, 28) images: RuntimeError: " in err


def test_preflight_counts_the_nets_memory_and_leaves_the_rng_alone(idx_dir):
    """Issue 25 item 19: what a trial asks for grows with its net (parameters, gradients, momentum, activations)."""
    dataset = data_lib.load_dataset(str(idx_dir))
    state = torch.get_rng_state()
    small, resnet = (train.preflight(TrialConfig(norm="bn", model=net, batch_size=16), dataset)
                     for net in ("small", "resnet20"))
    assert torch.equal(torch.get_rng_state(), state)  # a trial's numbers do not depend on whether it ran
    params = {net: 4 * count_parameters(build_model("bn", model=net)) for net in ("small", "resnet20")}
    assert 3 * params["small"] < small < resnet and 3 * params["resnet20"] < resnet
    activations = resnet - 3 * params["resnet20"]
    larger = train.preflight(TrialConfig(norm="bn", model="resnet20", batch_size=32), dataset)
    assert larger - 3 * params["resnet20"] == pytest.approx(2 * activations, rel=0.2)  # activations scale with the batch
    # as a sweep calls it: its settings, one variant's norm and one batch size of a batch-size study
    study = dataclasses.replace(SweepConfig(variants="bn,gn", batch_sizes=(8, 32), lr_reference_batch=16), norm="gn")
    assert train.preflight(dataclasses.replace(study, batch_size=8), dataset) < train.preflight(
        dataclasses.replace(study, batch_size=32), dataset)
