"""The training loop, without Ray: a run built from a TrialConfig, an epoch, evaluation, checkpoints, and the
pre-flight run of a net. `python train.py --norm bn` trains one variant; trainable.py wraps the same TrainingRun."""
import importlib.util
import math
import sys
import time
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

import config as config_lib
import data as data_lib
import plugins
from config import TrialConfig
from errors import USAGE_EXIT, CheckpointError, ModelError, NormsweepError, UsageError, first_line
from model import NetConfig, count_parameters

CHECKPOINT_FORMAT = 2  # a checkpoint of another format is refused in one line, never guessed at
# Precise BN (Wu & He 2018, section 6): BatchNorm's running statistics recomputed after training as the plain average
# over batches of this many training images (un-augmented, in train mode), from at most PRECISE_BN_IMAGES.
PRECISE_BN_BATCH, PRECISE_BN_IMAGES = 500, 10_000
MEMORY_FORMAT = torch.channels_last  # NHWC: oneDNN's CPU convolutions ran 1.23-1.41x faster (docs/benchmarks.md)
# Logits of two random batches closer than this, relative to their size, are rounding apart (the small net with in:
# 4e-7; every built-in variant that learns: 4e-3 or more at init)
CONSTANT_OUTPUT = 1e-5


def trial_data(dataset: data_lib.Dataset, config: TrialConfig) -> data_lib.Dataset:
    """The first train_size / test_size images of `dataset` (0: all) that a trial trains and scores on."""
    if not (config.train_size or config.test_size):
        return dataset
    return dataset.subset(config.train_size or None, config.test_size or None)


def peak_lr(config: dict) -> float:
    """The OneCycle peak lr: `lr`, times batch_size / lr_reference_batch in a batch-size study (reference > 0)."""
    reference = config.get("lr_reference_batch") or 0
    return config["lr"] * config["batch_size"] / reference if reference > 0 else config["lr"]


def batchnorms(model: nn.Module) -> list:
    """The model's BatchNorm layers (the layers with running statistics)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def runtime(config: dict, device: torch.device | None = None) -> tuple:
    """(device, precision, compile): `device`, else CUDA where there is one, else the CPU; "bf16" or "fp32" (auto: bf16
    on CUDA with native bf16, 8.0+; bf16 asked of an older GPU: UsageError); compile: "on", or "auto" on CUDA+Triton."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, compile_choice = config.get("precision", "auto"), config.get("compile", "auto")
    native = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" and not native:
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(f"--precision bf16 on {device} (compute capability {major}.{minor}): this GPU has no native "
                         f"bf16 (needs 8.0+, Ampere or newer); use --precision auto or fp32")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and native else "fp32"
    return device, precision, compile_choice == "on" or (compile_choice == "auto" and device.type == "cuda"
                                                         and bool(importlib.util.find_spec("triton")))


def describe_device(device: torch.device) -> str:
    """The device as a trial reports it: "cpu", or e.g. "cuda:0 NVIDIA H200 (sm_90)"."""
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = torch.cuda.get_device_capability(index)
    return f"cuda:{index} {torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued kernels: a clock read without it times their launch, not their work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def uses_test_flip(config: dict, augment: dict) -> bool:
    """Test-time flips only where training flipped too (clothes, not digits)."""
    return bool(config.get("test_flip")) and bool(augment.get("flip"))


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum(|w|) over conv and linear weights (not biases, not norm affines)."""
    return sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def train_epoch(model, optimizer, scheduler, images, labels, *, generator, batch_size, mean, std,
                augment: dict, l1: float = 0.0, label_smoothing: float = 0.0, bf16: bool = False) -> dict:
    """One pass over images (N, C, H, W) uint8 and labels (N,) in a seeded order, the scheduler stepped per batch:
    train_loss (mean cross-entropy, nats, no L1), train_acc (0-1, augmented batches), epoch_seconds, images_per_s."""
    model.train()
    skip_single = bool(batchnorms(model))
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
    synchronize(images.device)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss.item() / seen, "train_acc": correct.item() / seen,
            "epoch_seconds": seconds, "images_per_s": seen / seconds}


@torch.no_grad()
def evaluate(model, images, labels, *, mean, std, flip=False, batch_size=1000, bf16=False) -> dict:
    """Loss (nats), acc (0-1), preds (N,) int64 and confidence (N,) float32 (max softmax) over uint8 images (N, C, H,
    W). flip: the softmax averaged over each image and its mirror; acc_single: the unflipped view's accuracy, and
    correct_single (N,) bool: which images that view classified right."""
    model.eval()
    total_loss = torch.zeros((), device=images.device)  # sums stay on the device: one host sync at the end
    preds, confidence, single_correct = [], [], []
    for x, y in data_lib.batches(images, labels, batch_size):
        x = data_lib.to_input(x, mean, std).contiguous(memory_format=MEMORY_FORMAT)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).float()
            probs = logits.softmax(1)
            if flip:
                probs = (probs + model(x.flip(3)).float().softmax(1)) / 2
        single_correct.append(logits.argmax(1) == y)
        total_loss += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum")
        prob, pred = probs.max(1)
        preds.append(pred)
        confidence.append(prob)
    preds, single_correct = torch.cat(preds), torch.cat(single_correct).cpu()
    n = len(labels)
    return {"loss": total_loss.item() / n, "acc": (preds == labels).sum().item() / n,
            "acc_single": single_correct.sum().item() / n, "correct_single": single_correct, "preds": preds.cpu(),
            "confidence": torch.cat(confidence).cpu()}


@torch.no_grad()
def precise_bn(model: nn.Module, images, *, mean, std, batch_size=PRECISE_BN_BATCH, bf16=False) -> nn.Module:
    """A copy of `model` whose BatchNorm statistics are the plain average over batches of `images` (torch's update_bn),
    not training's exponential one: it separates what small batches do to the weights from the statistics."""
    copy = deepcopy(model)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        torch.optim.swa_utils.update_bn((data_lib.to_input(x, mean, std).contiguous(memory_format=MEMORY_FORMAT)
                                         for x in images.split(batch_size)), copy)
    return copy.eval()


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Weight decay on conv/linear weights; none on 1-d tensors (norm affines, biases)."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def optimizer_for(model: nn.Module, config: dict) -> torch.optim.SGD:
    """SGD with Nesterov momentum at the peak lr, weight decay as param_groups sets it."""
    return torch.optim.SGD(param_groups(model, config["weight_decay"]), lr=peak_lr(config),
                           momentum=config["momentum"], nesterov=True)


def preflight(config: TrialConfig, dataset: data_lib.Dataset) -> int:
    """Run the net `config` describes on the CPU as its trial will (a training step on random images (B, C, H, W) at
    its batch size, then two random batches in eval mode), the global RNG left as it was. Returns the bytes a trial
    holds for the net: parameters, buffers, gradients, optimizer state, one batch's saved activations. ModelError
    (one line, plugins.build's too): nothing to train, a failing step, no (batch, classes) logits, constant logits."""
    n_train, classes = len(dataset.train_labels) - config.val_size, len(dataset.classes)
    batch = max(1, min(n_train, config_lib.batch_size_for(n_train, config.batch_size)))
    shape, what = (batch, dataset.channels, *dataset.image_size), f"--model {config.model} with norm {config.norm}"
    # torch's own failures inside our layers and the loss; anything a user's net raises is theirs to fix
    failures = (RuntimeError, ValueError) if plugins.is_builtin(config.model) else Exception
    saved = {}  # storage address -> bytes, of the tensors autograd keeps for backward

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    images = lambda: torch.randn(shape).contiguous(memory_format=MEMORY_FORMAT)  # noqa: E731
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        torch.manual_seed(config.seed)
        model = plugins.build(NetConfig(model=config.model, norm=config.norm, groups=config.groups, order=config.order,
                                        in_channels=dataset.channels, num_classes=classes))
        try:
            logits = model.to(memory_format=MEMORY_FORMAT).train()(images())
            if not torch.is_tensor(logits) or logits.shape != (batch, classes):  # e.g. a tuple (logits, aux)
                got = tuple(logits.shape) if torch.is_tensor(logits) else f"a {type(logits).__name__}"
                raise ModelError(f"--model {config.model} returns {got} for a batch "
                                 f"of {shape} images; a net must return (batch, {classes}) logits")
            loss = F.cross_entropy(logits, torch.randint(classes, (batch,)))
            if not loss.requires_grad:
                raise ModelError(f"{what}: no trainable parameter shapes its logits (it has none, or they are frozen, "
                                 f"detached or under no_grad), so training cannot change it")
            optimizer = optimizer_for(model, {**config.as_dict(), "batch_size": batch})  # peak_lr scales with it
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                first, second = (model.eval()(images()) for _ in range(2))
        except ModelError:
            raise
        except failures as e:
            raise ModelError(f"{what} fails in a training step on a batch of {shape} images: {type(e).__name__}: "
                             f"{first_line(e)}") from None
    apart = (first - second).abs().max().item()
    if not apart > CONSTANT_OUTPUT * first.abs().max().item():
        raise ModelError(f"{what} gives the same logits for every input ({apart:.1g} apart on two random batches), so "
                         f"it cannot learn, e.g. a norm that zeroes each channel's mean (in) right before global "
                         f"average pooling, as in the small net; use another norm or net (--model resnet20)")
    held = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None),
            *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))]
    ours = {t.untyped_storage().data_ptr() for t in held}
    return sum(t.nbytes for t in held) + sum(n for address, n in saved.items() if address not in ours)


class TrainingRun:
    """Everything one trial owns: data on its device, model, optimizer, schedule, RNG, epoch. `config`: a TrialConfig
    or a dict of its fields; `dataset`: trial_data's. UsageError: bf16 on a GPU without it, BN at batch 1."""

    def __init__(self, config, dataset: data_lib.Dataset, device=None):
        config = self.config = TrialConfig.of(config if isinstance(config, dict) else config.as_dict()).as_dict()
        self.device, self.precision, compiled = runtime(config, device)  # before any data moves: a refusal is instant
        if self.device.type == "cpu" and config["threads"]:
            torch.set_num_threads(config["threads"])
        self.bf16 = self.precision == "bf16"
        if self.device.type == "cuda":  # the peak device memory counts from here
            torch.cuda.reset_peak_memory_stats(self.device)
        if config["val_size"]:  # the held-out images are the evaluation split: the same for every trial
            dataset = dataset.held_out(config["val_size"])
        config["batch_size"] = config_lib.batch_size_for(len(dataset.train_labels), config["batch_size"])
        # per channel (C,): what the dataset declares, else measured on this run's own training images
        stats = (dataset.mean, dataset.std) if dataset.mean is not None else data_lib.image_stats(dataset.train_images)
        self.mean, self.std = (torch.as_tensor(v, dtype=torch.float32).to(self.device) for v in stats)
        self.augment = dataset.augment
        self.train_x, self.train_y = dataset.train_images.to(self.device), dataset.train_labels.to(self.device)
        self.eval_x, self.eval_y = dataset.test_images.to(self.device), dataset.test_labels.to(self.device)
        torch.manual_seed(config["seed"])
        # on the trial's device: shuffling and augmentation draw there, with no per-step host copies
        self.generator = torch.Generator(device=self.device).manual_seed(config["seed"])
        self.net_config = NetConfig(model=config["model"], norm=config["norm"], groups=config["groups"],
                                    order=config["order"], in_channels=dataset.channels,
                                    num_classes=len(dataset.classes))
        self.model = plugins.build(self.net_config).to(self.device, memory_format=MEMORY_FORMAT)
        # what the steps call: the model itself, or its compiled wrapper (same parameters and state)
        self.net = torch.compile(self.model) if compiled else self.model
        if config["batch_size"] < 2 and batchnorms(self.model):
            raise UsageError(f"batch size {config['batch_size']} with BatchNorm: training-mode BN needs 2+ images per "
                             f"batch for its statistics; use a batch size of 2 or more, or gn/ln")
        self.optimizer = optimizer_for(self.model, config)
        steps_per_epoch = -(-len(self.train_y) // config["batch_size"])  # the last batch may be short
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=peak_lr(config),
                                                             epochs=config["epochs"], steps_per_epoch=steps_per_epoch)
        self.epoch = 0  # epochs completed
        self.parameters = count_parameters(self.model)

    def run_epoch(self) -> dict:
        """Train one epoch and evaluate; returns the metrics a trial reports (trainable.METRICS)."""
        lr = self.scheduler.get_last_lr()[0]
        metrics = self.train_one_epoch()
        result = evaluate(self.net, self.eval_x, self.eval_y, mean=self.mean, std=self.std,
                          flip=uses_test_flip(self.config, self.augment), bf16=self.bf16)
        self.epoch += 1
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else math.nan
        return {**metrics, "test_loss": result["loss"], "test_acc": result["acc"],
                "test_acc_single": result["acc_single"], "test_correct": result["correct_single"],
                "test_acc_precise_bn": self.precise_bn_acc(), "lr": lr,
                "epoch": self.epoch, "threads": torch.get_num_threads(), "peak_device_memory_mib": peak}

    def train_one_epoch(self) -> dict:
        """The training half of an epoch (no evaluation, epoch count unchanged): train_epoch's metrics."""
        return train_epoch(self.net, self.optimizer, self.scheduler, self.train_x, self.train_y,
                           generator=self.generator, batch_size=self.config["batch_size"],
                           mean=self.mean, std=self.std, augment=self.augment,
                           l1=self.config["l1"], label_smoothing=self.config["label_smoothing"], bf16=self.bf16)

    def precise_bn_acc(self) -> float:
        """One-view accuracy with precise BN statistics after the final epoch of a net with BatchNorm; else nan."""
        if self.epoch < self.config["epochs"] or not batchnorms(self.model):
            return math.nan
        stride = max(1, len(self.train_x) // PRECISE_BN_IMAGES)  # spread over the whole training split
        model = precise_bn(self.model, self.train_x[::stride][:PRECISE_BN_IMAGES], mean=self.mean, std=self.std,
                           bf16=self.bf16)
        return evaluate(model, self.eval_x, self.eval_y, mean=self.mean, std=self.std, bf16=self.bf16)["acc_single"]

    def save(self, path):
        torch.save({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "epoch": self.epoch, "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "config": self.config, "net_config": self.net_config.to_dict(),
                    # per-channel normalisation the net was trained with (lists of C floats)
                    "input_stats": {"mean": self.mean.tolist(), "std": self.std.tolist()}}, path)

    def load(self, path):
        """Continue from a checkpoint written by `save` with the same trajectory settings (CheckpointError)."""
        state = load_checkpoint(path)
        saved, ours = TrialConfig.of(state["config"]).trajectory(), TrialConfig.of(self.config).trajectory()
        diff = ", ".join(f"{k}: checkpoint {saved[k]!r} vs run {ours[k]!r}" for k in ours if saved[k] != ours[k])
        if diff:
            raise CheckpointError(f"checkpoint {path} is from another config ({diff}); "
                                  f"start a new experiment name or use the checkpoint's settings")
        for part in ("model", "optimizer", "scheduler"):
            getattr(self, part).load_state_dict(state[part])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = state["epoch"]


def load_checkpoint(path) -> dict:
    """A checkpoint's dict, loaded (weights_only) onto the CPU; CheckpointError: missing, unreadable, another format."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                              f"it is corrupt or not a normsweep checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} was written by another version of normsweep (format "
                              f"{state.get('format', 1) if isinstance(state, dict) else '?'}, this one reads "
                              f"{CHECKPOINT_FORMAT}); use that version, or train again")
    return state


def model_from_checkpoint(path):
    """(model, state): the net rebuilt from a checkpoint (CPU, eval mode) and the checkpoint's dict."""
    state = load_checkpoint(path)
    model = plugins.build(NetConfig.from_dict(state["net_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def main(argv=None) -> int:
    try:
        config, _ = config_lib.parse("train", TrialConfig, argv, "Train one normsweep variant without Ray.")
        config_lib.check(config)  # the same checks, wording and exit status as tune_main.py
        dataset = trial_data(data_lib.load_dataset(config.dataset, config.data_dir, test_split=not config.val_size),
                             config)
        config_lib.check_val_size(config.val_size, len(dataset.train_labels))
        preflight(config, dataset)  # a net that cannot train is refused before the run starts
        run = TrainingRun(config, dataset)
    except NormsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT
    split = "val" if config.val_size else "test"
    print(f"{config.norm} l1={config.l1}: {run.parameters} parameters on {describe_device(run.device)}, "
          f"{run.precision}, {len(run.train_y)} train / {len(run.eval_y)} {split} images", flush=True)
    best = (0.0, 0)
    for _ in range(config.epochs):
        m = run.run_epoch()
        best = max(best, (m["test_acc"], m["epoch"]))
        # the thread count because a seed's numbers depend on it (docs/usage.md: what reproduces where)
        print(f"epoch {m['epoch']:2d}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%}  "
              f"{split} loss {m['test_loss']:.4f} acc {m['test_acc']:.2%} (one view {m['test_acc_single']:.2%})  "
              f"lr {m['lr']:.4f}  {m['images_per_s']:,.0f} img/s  threads {m['threads']}", flush=True)
    print(f"best {split} acc {best[0]:.2%} at epoch {best[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
