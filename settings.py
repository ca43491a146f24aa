"""The settings schema: every trial setting and every numeric flag, with its flag, default, type, choices,
help and allowed range, defined once.

Both CLIs add their flags from here (`add_arguments`), `train.DEFAULTS` is `DEFAULTS` (a trial's config
dict), and checks.check_settings refuses a value outside its setting's `Range`. Flags that only one CLI
has and that are switches, names, paths or lists (tune_main.py's --variants, --l1 lambdas, --storage-path,
...) stay in that CLI.
"""
import argparse
import math
from dataclasses import dataclass

from model import MODELS, NORMS

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_CHOICES = ("auto", "on", "off")
ORDERS = ("relu-norm", "norm-relu")

# The auto batch size (train.batch_size_for): the largest batch, up to MAX_BATCH, that still gives
# MIN_STEPS_PER_EPOCH optimizer steps per epoch, and never below MIN_BATCH (BatchNorm's batch statistics get
# noisy). On 60,000 images that is 128 (469 steps); on 4,000 images 32 (125 steps). With a fixed batch of
# 128, small training sets get too few steps for GroupNorm and LayerNorm, which start slowly, to
# converge in 20 epochs (docs/validation.md, "small training sets").
MAX_BATCH, MIN_BATCH, MIN_STEPS_PER_EPOCH = 128, 16, 125


def batch_size_arg(text: str) -> int:
    """argparse type of --batch-size: 'auto' (0) or a whole number of images."""
    if text == "auto":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of images, got {text!r}") from None


@dataclass(frozen=True)
class Range:
    """A number's allowed values: from `low` to `high`, each bound included unless it is `open`; nan is in none.
    `what` is how a refusal words it: "--epochs must be {what}, got 0"."""
    what: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclass(frozen=True)
class Setting:
    """One setting: its flag and argparse options, its default, and what values checks.check_settings allows."""
    flag: str | None  # None: a trial setting no CLI sets (the config dict's default only)
    default: object
    help: str = ""  # argparse's help; %(default)s is the default
    type: object = None  # argparse's type function (None: a string, or a switch)
    choices: tuple | None = None
    range: Range | None = None  # checked by checks.check_settings
    action: str | None = None  # "store_false" for a --no-... switch
    metavar: str | None = None
    config: bool = True  # a key of a trial's config dict (DEFAULTS); False: a launch setting only


# Keyed by argparse dest, the config dict's key where `config` is true.
SETTINGS = {
    "dataset": Setting("--dataset", "fashion-mnist",
                       "mnist, fashion-mnist, cifar10, or a directory: MNIST-format idx files, CIFAR-10 batches, "
                       "or images in train/<class>/ and test/<class>/ folders; README, Data (default: %(default)s)"),
    "data_dir": Setting("--data-dir", "data", "where downloads go (default: %(default)s)"),
    # a built-in net (model.MODELS) or a user's builder, path/to/file.py:build (plugins.py)
    "model": Setting("--model", "small",
                     f"the net: {', '.join(MODELS)}, or your own builder as path/to/file.py:build or module:build, "
                     f"called as build(norm_layer=..., in_channels=..., num_classes=...) (README, 'Your own net'; "
                     f"default: %(default)s)"),
    "norm": Setting("--norm", "bn", f"one of {', '.join(NORMS)} (default: %(default)s)"),
    "groups": Setting("--groups", 4, "GroupNorm groups (default: %(default)s)", type=int,
                      range=Range("at least 1 (a count of channel groups)", low=1)),
    # lambda of the L1 penalty lambda * sum(|w|) over conv/linear weights; 0 = off. (tune_main.py's --l1 is
    # a list of lambdas for its +l1 variants, defined there.)
    "l1": Setting("--l1", 0.0, "L1 penalty lambda (default: %(default)s = off)", type=float,
                  range=Range("0 (off) or a positive lambda", low=0, high=math.inf, high_open=True)),
    # tune_main.py --smoke-test trains SMOKE["epochs"] unless --epochs is given
    "epochs": Setting("--epochs", 20, "epochs to train (default: %(default)s)", type=int,
                      range=Range("at least 1", low=1)),
    # images per step; 0 = auto, derived from the training-set size (train.batch_size_for)
    "batch_size": Setting("--batch-size", 0,
                          f"images per step, or 'auto' (default): {MAX_BATCH}, or fewer on a small training set so "
                          f"that an epoch has at least {MIN_STEPS_PER_EPOCH} steps (never fewer than {MIN_BATCH})",
                          type=batch_size_arg, range=Range("'auto' or a number of images", low=0)),
    # OneCycle peak learning rate for SGD, at any batch size (unless lr_reference_batch)
    "lr": Setting("--lr", 0.05, "OneCycle peak learning rate (default: %(default)s)", type=float,
                  range=Range("a positive number (the OneCycle peak learning rate)", low=0, low_open=True,
                              high=math.inf, high_open=True)),
    # >0: `lr` is the peak at this batch size and a run with batch B uses lr * B / lr_reference_batch
    # (the linear scaling rule, Goyal et al. 2017). tune_main.py --batch-sizes sets it to the auto batch.
    "lr_reference_batch": Setting(None, 0),
    "momentum": Setting(None, 0.9),
    # on conv/linear weights only; norm affines and biases are not decayed
    "weight_decay": Setting("--weight-decay", 5e-4,
                            "SGD weight decay on conv and linear weights (default: %(default)s)", type=float,
                            range=Range("0 or more", low=0)),
    "label_smoothing": Setting("--label-smoothing", 0.1, "cross-entropy label smoothing (default: %(default)s)",
                               type=float, range=Range("in [0, 1)", low=0, high=1, high_open=True)),
    "seed": Setting("--seed", 0, "seeds init, order and augmentation (default: %(default)s)", type=int,
                    range=Range("0 or more", low=0)),
    # torch CPU threads; 0 = torch's default
    "threads": Setting("--threads", 0, "CPU threads; a seed's numbers differ between thread counts "
                                       "(default: %(default)s = torch's own count)", type=int,
                       range=Range("0 (torch's default) or more", low=0)),
    # >0: hold out this many training images and evaluate on them, not on test
    "val_size": Setting("--val-size", 0, "hold out N training images and evaluate on them instead of the test "
                                         "split; a directory may then lack its test files (default: %(default)s "
                                         "= none)",
                        type=int, metavar="N", range=Range("0 (evaluate on test) or more images", low=0)),
    # Evaluate each image and its mirror (mean of the two softmaxes) on datasets trained with flips.
    # test_acc_single reports the plain one-view accuracy alongside.
    "test_flip": Setting("--no-test-flip", True, "score test images in one view only (default: also the mirror, "
                                                 "on flip-trained datasets)", action="store_false"),
    "order": Setting("--order", "relu-norm", "block order: conv -> ReLU -> norm (default) or conv -> norm -> ReLU "
                                             "(model.NetConfig.order)", choices=ORDERS),
    # "bf16": convolutions and the head under bf16 autocast, norms in float32 (model._Float32Norm);
    # "fp32": everything in float32; "auto": bf16 on a CUDA GPU with native bf16 (compute capability
    # 8.0+), fp32 elsewhere: on older GPUs and on the CPU (where every reported result was measured).
    # See train.resolve_precision.
    "precision": Setting("--precision", "auto",
                         "bf16: convolutions under bf16 autocast, norms in float32; fp32; auto (default): bf16 on GPUs "
                         "with native bf16 (compute capability 8.0+, Ampere or newer), else fp32", choices=PRECISIONS),
    # torch.compile the net for training and evaluation: "on", "off", or "auto" = on CUDA (with Triton).
    # On this CPU it measured 0.79-0.99x eager in fp32 and cost 14-35 s of compiling per trial
    # (BENCHMARKS.md); on a GPU it fuses the small norm and activation kernels. Checkpoints are the
    # same either way.
    "compile": Setting("--compile", "auto", "torch.compile the net: on, off, auto (default): on CUDA only (on this "
                                            "project's CPU it did not pay back its compile time)",
                       choices=COMPILE_CHOICES),
    # Launch settings, not a trial's config.
    "train_size": Setting("--train-size", 0, "train on the first N training images only (default: %(default)s = all)",
                          type=int, metavar="N", config=False),  # 0 or 2+: checks.check_settings
    "seeds": Setting("--seeds", 1, "seeds per variant, 0..N-1 (default: %(default)s)", type=int,
                     range=Range("at least 1 (seeds 0..N-1)", low=1), config=False),
    "max_concurrent": Setting("--max-concurrent", 0, "cap on trials running at once (default: no cap)", type=int,
                              range=Range("0 (no cap) or more", low=0), config=False),
    "cpus_per_trial": Setting("--cpus-per-trial", None, "CPUs per trial (default: the cluster's CPUs shared by all "
                                                        "trials at once)", type=float,
                              range=Range("more than 0 (fractions share a core)", low=0, low_open=True), config=False),
    "gpus_per_trial": Setting("--gpus-per-trial", None, "GPUs per trial (default: 1, or 1/k of a GPU when trials "
                                                        "outnumber GPUs, k = ceil(trials / GPUs), so that every trial "
                                                        "runs at once)", type=float,
                              range=Range("0 or more", low=0), config=False),
}

# The single source of truth for a trial's settings (train.DEFAULTS); every entry point starts from a copy.
DEFAULTS = {dest: setting.default for dest, setting in SETTINGS.items() if setting.config}

# The flags both CLIs take, in their --help's order.
SHARED = ("dataset", "data_dir", "train_size", "model", "groups", "epochs", "batch_size", "lr", "weight_decay",
          "label_smoothing", "val_size", "test_flip", "precision", "compile")


def add_arguments(parser: argparse.ArgumentParser, dests) -> None:
    """Add the flags of these settings (SETTINGS keys) to `parser`, as the schema defines them."""
    for dest in dests:
        setting = SETTINGS[dest]
        options = {"type": setting.type, "choices": setting.choices, "metavar": setting.metavar}
        options = {k: v for k, v in options.items() if v is not None}
        if setting.action:
            options = {"action": setting.action}
        parser.add_argument(setting.flag, dest=dest, default=setting.default, help=setting.help, **options)
