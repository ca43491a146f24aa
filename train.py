"""The training loop, without Ray: build a run from a config, train an epoch, evaluate, checkpoint.

`python train.py --norm bn` trains one variant and prints a line per epoch; the Ray Tune
trainable (trainable.py) wraps the same `TrainingRun`.
"""
import importlib.util
import math
import sys
import time
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

import checks
from errors import CheckpointError, UsageError
import data as data_lib
import plugins
import settings
from model import NetConfig, count_parameters
from settings import COMPILE_CHOICES, MAX_BATCH, MIN_BATCH, MIN_STEPS_PER_EPOCH, PRECISIONS

# The single source of truth for a trial's settings, from the schema (settings.py, where each key's units,
# flag and help are); every entry point starts from a copy.
DEFAULTS = settings.DEFAULTS
# Keys that must match for a checkpoint to continue a run: they shape the model or its trajectory.
RUN_KEYS = ("dataset", "model", "norm", "groups", "order", "l1", "epochs", "batch_size", "lr", "lr_reference_batch",
            "momentum", "weight_decay", "label_smoothing", "seed", "val_size", "precision")


def batch_size_for(n_train: int, batch_size: int = 0) -> int:
    """`batch_size` if set (> 0), else the auto batch size for n_train training images: the largest batch up
    to MAX_BATCH that gives MIN_STEPS_PER_EPOCH steps per epoch, at least MIN_BATCH (settings.py, why)."""
    if batch_size > 0:
        return batch_size
    return max(MIN_BATCH, min(MAX_BATCH, n_train // MIN_STEPS_PER_EPOCH))


# What checkpoints written before a key existed ran with, so that older experiments resume and
# rebuild as they trained: the net was conv -> norm -> ReLU, and nothing ran under autocast.
BEFORE_KEY = {"order": "norm-relu", "precision": "fp32", "lr_reference_batch": 0, "model": "small"}
# Precise BN (Wu & He 2018, section 6): after training, BatchNorm's running statistics recomputed as the
# plain average over batches of this many training images (un-augmented, in train mode, weights frozen),
# from at most PRECISE_BN_IMAGES of them.
PRECISE_BN_BATCH, PRECISE_BN_IMAGES = 500, 10_000


# Activations and conv weights in channels-last (NHWC) layout: oneDNN's convolutions are faster in it,
# 1.23-1.41x per training step on the CPU here (benchmarks/levers.py, BENCHMARKS.md).
MEMORY_FORMAT = torch.channels_last




def in_batch_study(config: dict) -> bool:
    """A trial of a batch-size study (tune_main.py --batch-sizes): its lr scales with its batch size."""
    return (config.get("lr_reference_batch") or 0) > 0


def peak_lr(config: dict) -> float:
    """The OneCycle peak learning rate of a run: `lr`, scaled linearly with the batch size in a
    batch-size study (a batch of 8 against a reference of 32 gets a quarter of `lr`)."""
    if in_batch_study(config):
        return config["lr"] * config["batch_size"] / config["lr_reference_batch"]
    return config["lr"]


def batchnorms(model: nn.Module) -> list:
    """The model's BatchNorm layers (the layers with running statistics)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorms(model))


def choose_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# bf16 tensor cores arrived with Ampere (A100 is sm_80). Older GPUs (T4 sm_75, V100 sm_70) emulate bf16
# slowly or refuse some kernels; torch.cuda.is_bf16_supported() says True on them unless asked
# including_emulation=False, so the capability is read directly.
BF16_MIN_CAPABILITY = (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU of compute capability 8.0 or newer, or any
    non-CUDA device (the CPU's bf16 autocast always runs; whether it pays there is in BENCHMARKS.md).

    Reads torch.cuda.get_device_capability(device) for a CUDA device (no index: the current one).
    """
    return device.type != "cuda" or tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def resolve_precision(config: dict, device: torch.device) -> str:
    """"bf16" or "fp32": what a run on `device` computes in, from config["precision"].

    auto: bf16 on a CUDA GPU with native bf16 (compute capability 8.0+, `native_bf16`), fp32 on older GPUs
    and on the CPU. (fp16 with a gradient scaler, the usual choice on a T4 or V100, is not offered: it
    has not been measured.) An explicit bf16 is kept on the CPU and on Ampere or newer, and refused on an
    older GPU rather than silently run in fp32, so a run never reports a precision it was not asked for.

    Raises ValueError on an unknown precision, PrecisionError (a ValueError) on bf16 without native support.
    """
    precision = config.get("precision", "auto")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if precision == "auto":
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(f"--precision bf16 on {device} (compute capability {major}.{minor}): this GPU has no "
                             f"native bf16 (needs {BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}+, Ampere or "
                             f"newer); use --precision auto or fp32")
    return "bf16"


def uses_bf16(config: dict, device: torch.device) -> bool:
    """Whether a run computes under bf16 autocast (resolve_precision is "bf16"); raises as it does."""
    return resolve_precision(config, device) == "bf16"


def describe_device(device: torch.device) -> str:
    """The device as a trial reports it: "cpu", or e.g. "cuda:0 NVIDIA H200 (sm_90)"."""
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = torch.cuda.get_device_capability(index)
    return f"cuda:{index} {torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished its queued work: CUDA kernels run asynchronously, so a clock read
    without this times their launch, not their work. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """The most memory this process's tensors have held on `device` since the last reset
    (torch.cuda.max_memory_allocated, MiB; the CUDA context and the allocator's cache are not counted);
    nan on the CPU, which has no such counter."""
    if device.type != "cuda":
        return math.nan
    return torch.cuda.max_memory_allocated(device) / 2**20


def uses_compile(config: dict, device: torch.device) -> bool:
    """Whether a run trains and evaluates a torch.compile'd net: `compile` on, or auto on a CUDA device
    where Triton (the compiler torch.compile generates CUDA kernels with) is installed."""
    choice = config.get("compile", "auto")
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"unknown compile setting {choice!r}; use one of {', '.join(COMPILE_CHOICES)}")
    return choice == "on" or (choice == "auto" and device.type == "cuda" and has_triton())


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def net_config(config: dict, dataset: data_lib.Dataset) -> NetConfig:
    """The net a run's config asks for, sized for `dataset`'s channels and classes."""
    return NetConfig(model=config["model"], norm=config["norm"], groups=config["groups"], order=config["order"],
                     in_channels=dataset.channels, num_classes=len(dataset.classes))


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum(|w|) over conv and linear weights (not biases, not norm affines)."""
    return sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def train_epoch(model, optimizer, scheduler, images, labels, *, generator, batch_size, mean, std,
                augment: dict, l1: float = 0.0, label_smoothing: float = 0.0, bf16: bool = False) -> dict:
    """One pass over (images, labels) in a fresh seeded order, stepping the scheduler per batch.

    Returns train_loss (mean cross-entropy, nats, without the L1 term), train_acc (0-1, on the augmented
    batches), epoch_seconds (wall seconds of the pass, device work included) and images_per_s.
    """
    model.train()
    skip_single = has_batchnorm(model)
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    seen = 0
    synchronize(images.device)  # work queued before this epoch is not this epoch's
    start = time.perf_counter()
    for x, y in data_lib.batches(images, labels, batch_size, generator):
        if len(y) < 2 and skip_single:  # a last batch of one image: BatchNorm has no batch statistics of it
            continue
        x = data_lib.augment(data_lib.to_input(x, mean, std), generator, **augment)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x.contiguous(memory_format=MEMORY_FORMAT)).float()
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        objective = loss + l1 * l1_penalty(model) if l1 > 0 else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    synchronize(images.device)  # on CUDA the loop above only queued the kernels
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss.item() / seen, "train_acc": correct.item() / seen,
            "epoch_seconds": seconds, "images_per_s": seen / seconds}


def uses_test_flip(config: dict, augment: dict) -> bool:
    """Test-time flips only where training flipped too (clothes, not digits)."""
    return bool(config.get("test_flip")) and bool(augment.get("flip"))


@torch.no_grad()
def evaluate(model, images, labels, *, mean, std, flip=False, batch_size=1000, bf16=False) -> dict:
    """Loss, accuracy and per-sample predictions and confidences (max softmax) over a split.

    flip: average the softmax of each image and its horizontal mirror. "acc_single" is always the
    accuracy of the unflipped view alone.
    """
    model.eval()
    # Sums stay on the device; the one host sync is at the end, not one per batch.
    total_loss = torch.zeros((), device=images.device)
    single_correct = torch.zeros((), dtype=torch.long, device=images.device)
    preds, confidence = [], []
    for x, y in data_lib.batches(images, labels, batch_size):
        x = data_lib.to_input(x, mean, std).contiguous(memory_format=MEMORY_FORMAT)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).float()
            probs = logits.softmax(1)
            if flip:
                probs = (probs + model(x.flip(3)).float().softmax(1)) / 2
        single_correct += (logits.argmax(1) == y).sum()
        total_loss += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum")
        prob, pred = probs.max(1)
        preds.append(pred)
        confidence.append(prob)
    preds = torch.cat(preds)
    n = len(labels)
    return {"loss": total_loss.item() / n, "acc": (preds == labels).sum().item() / n,
            "acc_single": single_correct.item() / n, "preds": preds.cpu(), "confidence": torch.cat(confidence).cpu()}


@torch.no_grad()
def precise_bn(model: nn.Module, images, *, mean, std, batch_size=PRECISE_BN_BATCH, bf16=False) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are recomputed on large batches of `images`.

    Training leaves BN's running mean and variance as an exponential average over training batches;
    with tiny batches those are noisy. Here they become the plain average over batches of
    `batch_size` images (momentum None), so evaluating the copy separates the damage in the weights
    from the damage in the statistics. The model itself is left as it was.
    """
    copy = deepcopy(model)
    norms = batchnorms(copy)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    copy.train()
    for x, _ in data_lib.batches(images, images.new_zeros(len(images)), batch_size):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            copy(data_lib.to_input(x, mean, std).contiguous(memory_format=MEMORY_FORMAT))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return copy.eval()


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Weight decay on conv/linear weights; none on 1-d tensors (norm affines, biases)."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


class TrainingRun:
    """Everything one trial owns: data on its device, model, optimizer, schedule, RNG, epoch."""

    def __init__(self, config: dict, dataset: data_lib.Dataset, device=None):
        self.config = {**DEFAULTS, **config}
        config = self.config
        self.device = device or choose_device()
        if self.device.type == "cpu" and config["threads"]:
            torch.set_num_threads(config["threads"])
        self.precision = resolve_precision(config, self.device)  # before any data moves: a refusal is instant
        self.bf16 = self.precision == "bf16"
        if self.device.type == "cuda":  # peak_memory_mib counts from here: this run's data, model and steps
            torch.cuda.reset_peak_memory_stats(self.device)
        if config["val_size"]:  # the held-out images are the evaluation split: the same for every trial
            dataset = dataset.held_out(config["val_size"])
        train_x, train_y = dataset.train_images, dataset.train_labels
        eval_x, eval_y = dataset.test_images, dataset.test_labels
        config["batch_size"] = batch_size_for(len(train_y), config["batch_size"])
        # Per channel (C,): what the dataset declares, else measured on this run's own training images.
        stats = ((dataset.mean, dataset.std) if dataset.mean is not None else data_lib.image_stats(train_x))
        self.mean, self.std = (torch.as_tensor(v, dtype=torch.float32).to(self.device) for v in stats)
        self.augment = dataset.augment
        self.train_x, self.train_y = train_x.to(self.device), train_y.to(self.device)
        self.eval_x, self.eval_y = eval_x.to(self.device), eval_y.to(self.device)

        torch.manual_seed(config["seed"])
        # On the trial's device: shuffling and augmentation draw there, with no per-step host copies.
        self.generator = torch.Generator(device=self.device).manual_seed(config["seed"])
        self.net_config = net_config(config, dataset)
        self.model = plugins.build(self.net_config).to(self.device, memory_format=MEMORY_FORMAT)
        # What the steps call: the model itself, or its compiled wrapper (same parameters and state).
        self.net = torch.compile(self.model) if uses_compile(config, self.device) else self.model
        if config["batch_size"] < 2 and has_batchnorm(self.model):
            raise ValueError(f"batch size {config['batch_size']} with BatchNorm: training-mode BN needs 2+ images "
                             f"per batch for its statistics; use a batch size of 2 or more, or gn/ln")
        self.peak_lr = peak_lr(config)
        self.optimizer = torch.optim.SGD(param_groups(self.model, config["weight_decay"]), lr=self.peak_lr,
                                         momentum=config["momentum"], nesterov=True)
        steps_per_epoch = -(-len(self.train_y) // config["batch_size"])
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=self.peak_lr, epochs=config["epochs"], steps_per_epoch=steps_per_epoch)
        self.epoch = 0  # epochs completed
        self.parameters = count_parameters(self.model)

    def run_epoch(self) -> dict:
        """Train one epoch and evaluate; returns the metrics Tune reports (trainable.METRICS).

        peak_device_memory_mib: the run's peak device memory so far (`peak_memory_mib`; nan on the CPU).
        """
        lr = self.scheduler.get_last_lr()[0]
        metrics = self.train_one_epoch()
        result = evaluate(self.net, self.eval_x, self.eval_y, mean=self.mean, std=self.std,
                          flip=uses_test_flip(self.config, self.augment), bf16=self.bf16)
        self.epoch += 1
        return {**metrics, "test_loss": result["loss"], "test_acc": result["acc"],
                "test_acc_single": result["acc_single"], "test_acc_precise_bn": self.precise_bn_acc(), "lr": lr,
                "epoch": self.epoch, "threads": torch.get_num_threads(),
                "peak_device_memory_mib": peak_memory_mib(self.device)}

    def train_one_epoch(self) -> dict:
        """The training half of an epoch (no evaluation, epoch count unchanged): train_epoch's metrics."""
        return train_epoch(self.net, self.optimizer, self.scheduler, self.train_x, self.train_y,
                           generator=self.generator, batch_size=self.config["batch_size"],
                           mean=self.mean, std=self.std, augment=self.augment,
                           l1=self.config["l1"], label_smoothing=self.config["label_smoothing"], bf16=self.bf16)

    def precise_bn_acc(self) -> float:
        """One-view accuracy with precise BN statistics (see `precise_bn`), after the final epoch of a net
        with BatchNorm; nan otherwise (GN and LN have no running statistics)."""
        if self.epoch < self.config["epochs"] or not has_batchnorm(self.model):
            return math.nan
        stride = max(1, len(self.train_x) // PRECISE_BN_IMAGES)  # spread over the whole training split
        model = precise_bn(self.model, self.train_x[::stride][:PRECISE_BN_IMAGES], mean=self.mean, std=self.std,
                           bf16=self.bf16)
        return evaluate(model, self.eval_x, self.eval_y, mean=self.mean, std=self.std, bf16=self.bf16)["acc_single"]

    def save(self, path):
        torch.save({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": self.config,
            "net_config": self.net_config.to_dict(),
            # per-channel normalisation the net was trained with (lists of C floats)
            "input_stats": {"mean": self.mean.tolist(), "std": self.std.tolist()},
        }, path)

    def load(self, path):
        """Continue from a checkpoint written by `save` with the same run settings."""
        state = load_checkpoint(path)
        saved = {k: state["config"].get(k, BEFORE_KEY.get(k)) for k in RUN_KEYS}
        mismatched = {k: (saved[k], self.config[k]) for k in RUN_KEYS if saved[k] != self.config[k]}
        if mismatched:
            diff = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in mismatched.items())
            raise CheckpointError(f"checkpoint {path} is from another config ({diff}); "
                                  f"start a new experiment name or use the checkpoint's settings")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = state["epoch"]


def load_checkpoint(path) -> dict:
    """A checkpoint's dict, loaded safely (weights_only) onto the CPU, with a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                              f"it is corrupt or not a normsweep checkpoint") from None


def model_from_checkpoint(path):
    """Rebuild the net from a checkpoint's saved config (CPU, eval mode).

    Returns (model, state): state holds the run's config and the input normalisation stats.
    """
    state = load_checkpoint(path)
    model = plugins.build(NetConfig.from_dict(state["net_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def main(argv=None) -> int:
    parser = checks.ArgumentParser(description="Train one normsweep variant without Ray.")
    # the flags tune_main.py takes too, then this CLI's own: one variant (--norm, one --l1 lambda), one seed
    settings.add_arguments(parser, settings.SHARED + ("norm", "l1", "seed", "threads", "order"))
    args = parser.parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    try:
        checks.check_settings(vars(args))  # the same checks, wording and exit status as tune_main.py
        dataset = data_lib.load_dataset(args.dataset, args.data_dir, test_split=not args.val_size)
        if args.train_size:
            dataset = dataset.subset(args.train_size)
        if args.val_size:
            checks.check_val_size(args.val_size, len(dataset.train_labels))
        if not plugins.is_builtin(args.model):  # a user's net: built and run once on the data's shape
            plugins.check(args.model, [args.norm], args.groups, dataset)
        run = TrainingRun(config, dataset)
    except checks.NormsweepError as e:  # UsageError, DataError, CheckpointError, PrecisionError
        print(f"error: {e}", file=sys.stderr)
        return checks.USAGE_EXIT
    split = "val" if args.val_size else "test"
    print(f"{args.norm} l1={args.l1}: {run.parameters} parameters on {describe_device(run.device)}, "
          f"{run.precision}, {len(run.train_y)} train / {len(run.eval_y)} {split} images", flush=True)
    best = (0.0, 0)
    for _ in range(run.config["epochs"]):
        m = run.run_epoch()
        best = max(best, (m["test_acc"], m["epoch"]))
        # accuracies in percent, as tune_main.py and the analysis print them; the thread count because
        # a seed's numbers depend on it (README: what reproduces where)
        print(f"epoch {m['epoch']:2d}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%}  "
              f"{split} loss {m['test_loss']:.4f} acc {m['test_acc']:.2%} (one view {m['test_acc_single']:.2%})  "
              f"lr {m['lr']:.4f}  {m['images_per_s']:,.0f} img/s  threads {m['threads']}", flush=True)
    print(f"best {split} acc {best[0]:.2%} at epoch {best[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
