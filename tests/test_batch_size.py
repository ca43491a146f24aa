"""The batch-size study: grid expansion, the lr scaling rule, batch size 1, precise BN. (The study's sweep and
report: tests/test_sweeps.py.)"""
import math

import pytest
import torch
from ray.tune.search.variant_generator import generate_variants

import config
import sweep
import train
import tune_main
from model import build_model
from conftest import blank_dataset, make_idx_dir


def test_batch_size_grid_expands_variants_batches_and_seeds():
    args = tune_main.parse_args(["--variants", "bn,gn", "--batch-sizes", "8,2,4", "--seeds", "2"])[0]
    trials = [spec for _, spec in generate_variants(sweep.param_space(args, blank_dataset()))]
    combos = sorted((t["variant"]["name"], t["batch_size"], t["seed"]) for t in trials)
    assert combos == sorted((n, b, s) for n in ("bn", "gn") for b in (2, 4, 8) for s in (0, 1))
    assert all(t["lr"] == config.TrialConfig.lr for t in trials)  # the flag's lr; each run scales it
    # without the flag there is no batch axis
    assert "grid_search" not in str(sweep.param_space(tune_main.parse_args([])[0], blank_dataset())["batch_size"])


def test_linear_scaling_rule():
    config = {"lr": 0.05, "batch_size": 8, "lr_reference_batch": 32}
    assert train.peak_lr(config) == pytest.approx(0.0125)
    assert train.peak_lr({**config, "batch_size": 64}) == pytest.approx(0.1)
    assert train.peak_lr({**config, "lr_reference_batch": 0}) == 0.05  # no study: lr at any batch


def test_batch_of_one_is_refused_for_batchnorm_and_trains_groupnorm(tmp_path):
    dataset = train.data_lib.load_dataset(str(make_idx_dir(tmp_path / "idx", n_train=9, n_test=4)))
    with pytest.raises(config.UsageError, match="batch size 1 with BatchNorm: .* use a batch size of 2 or more, or gn/ln"):
        train.TrainingRun({"norm": "bn", "batch_size": 1, "epochs": 1, "threads": 1}, dataset)
    run = train.TrainingRun({"norm": "gn", "batch_size": 1, "epochs": 1, "threads": 1}, dataset)
    metrics = run.run_epoch()
    assert math.isfinite(metrics["train_loss"]) and metrics["images_per_s"] > 0
    assert math.isnan(metrics["test_acc_precise_bn"])  # no BatchNorm, no running statistics
    # BatchNorm at batch 2 on 9 images: the last batch of one is skipped, not a crash inside torch
    run = train.TrainingRun({"norm": "bn", "batch_size": 2, "epochs": 1, "threads": 1}, dataset)
    assert math.isfinite(run.run_epoch()["train_loss"])


def test_precise_bn_recomputes_the_statistics_on_a_copy():
    torch.manual_seed(0)
    model = build_model("bn")
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []  # the first BN's inputs; deepcopy carries the hook over, so these are the copy's
    first_bn.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    precise = train.precise_bn(model, images, mean=100.0, std=80.0, batch_size=20)  # two batches of 20
    copy_bn = next(m for m in precise.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the plain average of the two batches' statistics, not an exponential average
    assert len(seen) == 2
    want_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    want_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen]).mean(0)
    torch.testing.assert_close(copy_bn.running_mean, want_mean)
    torch.testing.assert_close(copy_bn.running_var, want_var)
    assert copy_bn.momentum == first_bn.momentum == 0.1 and not precise.training
    for key, value in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(value, before[key]), key
