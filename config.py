"""Settings, defined once: a trial's (`TrialConfig`) and a sweep's (`SweepConfig`), frozen dataclasses whose fields
carry their flag's help, group and check. Both CLIs' flags, the launch file `--resume` reads back and `check` (one
line, before Ray, data or directories) follow from them: a new setting is one field here."""
import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field

from errors import USAGE_EXIT, UsageError
import plugins
import verdicts
from model import MODELS, NORMS, REGISTRY, build_model, norm_entry

LAUNCH_FORMAT = 3  # the launch file's layout; an experiment written with another is refused, not guessed at (3: results
# hold each epoch's per-image correctness, experiments.CORRECT_KEY)
# The auto batch size (`batch_size_for`): the largest up to MAX_BATCH giving MIN_STEPS_PER_EPOCH optimizer steps an
# epoch, at least MIN_BATCH (BN's statistics get noisy); a fixed 128 gave small sets too few steps for GN and LN.
MAX_BATCH, MIN_BATCH, MIN_STEPS_PER_EPOCH = 128, 16, 125
SMOKE = {"train_size": 1000, "test_size": 500, "epochs": 2}  # --smoke-test: check an install in a minute
DEFAULT_L1 = 1e-5  # lambda of "+l1" variants: the L1 penalty lambda * sum(|w|) over conv and linear weights
AUTO_SEEDS = "auto"  # --seeds auto: rounds of seeds until every pair of variants is decided (rounds.py)
GROUPS = {"everyday": "everyday", "recipe": "the training recipe (shared by every variant)",
          "studies": "studies", "resources": "resources and cluster"}


def setting(default, help="", group=None, *, programs=("train", "tune"), check=None, saved=True,
            trajectory=True, shown=None, **argparse_options):
    """A field with its flag (group None: none). programs: the CLIs with the flag (SweepConfig's own fields: only
    tune_main.py's). check: (what a refusal says, predicate). saved: in the launch file (False: today's flags decide
    on --resume). trajectory: a checkpoint continues a run only under the same value. shown: the default as --help
    writes it, where that is not the value's own form."""
    return field(default=default, metadata=dict(help=help, group=group, programs=programs, check=check, saved=saved,
                                                trajectory=trajectory, shown=shown, argparse=argparse_options))


def at_least(low, what):
    return what, lambda v: v >= low


def each(rule, what):
    """A check of a list flag: every value passes `rule`, none is listed twice, the list is not empty."""
    return f"{what}, each once", lambda values: len(set(values)) == len(values) > 0 and all(map(rule, values))


def batch_size_arg(text: str) -> int:
    """--batch-size: 'auto' (0) or a whole number of images."""
    try:
        return 0 if text == "auto" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of images, got {text!r}") from None


def seeds_arg(text: str):
    """--seeds: AUTO_SEEDS ('auto') or a whole number of seeds."""
    try:
        return AUTO_SEEDS if text == AUTO_SEEDS else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of seeds, got {text!r}") from None


def list_arg(kind, what):
    """A comma-separated list flag ('2,4,8'), a tuple of `kind`."""
    def parse(text):
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    return parse


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial trains with: train.py's flags, a checkpoint's config, a Tune trial's settings."""
    dataset: str = setting("fashion-mnist", "mnist, fashion-mnist, cifar10, or a directory: idx files, CIFAR-10 batches"
                           " or train/<class>/ and test/<class>/ image folders (docs/data.md)", "everyday")
    data_dir: str = setting("data", "where downloads go", "everyday", trajectory=False)
    model: str = setting("small", f"the net: {', '.join(MODELS)}, or your builder, file.py:build or module:build "
                         "(docs/usage.md)", "everyday")
    norm: str = setting("bn", f"one of {', '.join(NORMS)}", "everyday", programs=("train",))
    epochs: int = setting(20, "epochs to train", "everyday", check=at_least(1, "at least 1"))
    train_size: int = setting(0, "train on the first N training images only (0: all)", "everyday", metavar="N",
                              check=("0 (all images) or at least 2 images", lambda v: v == 0 or v >= 2))
    test_size: int = 0  # score on the first N test images only (0: all); --smoke-test's subset
    groups: int = setting(4, "GroupNorm groups", "recipe", check=at_least(1, "at least 1 (a count of channel groups)"))
    l1: float = setting(0.0, "L1 penalty lambda (0: off)", "recipe", programs=("train",),
                        check=("0 (off) or a positive lambda", lambda v: 0 <= v < math.inf))
    batch_size: int = setting(0, f"images per step, or 'auto': {MAX_BATCH}, fewer for {MIN_STEPS_PER_EPOCH}+ steps an "
                              f"epoch, at least {MIN_BATCH}", "recipe", type=batch_size_arg, shown="auto",
                              check=at_least(0, "'auto' or a number of images"))
    lr: float = setting(0.05, "OneCycle peak learning rate", "recipe",
                        check=("a positive number (the OneCycle peak learning rate)", lambda v: 0 < v < math.inf))
    # > 0: lr is the peak at this batch size; a batch B runs lr * B / lr_reference_batch (Goyal et al. 2017)
    lr_reference_batch: int = 0
    momentum: float = 0.9  # SGD with Nesterov momentum
    weight_decay: float = setting(5e-4, "SGD weight decay of conv and linear weights", "recipe",
                                  check=at_least(0, "0 or more"))
    label_smoothing: float = setting(0.1, "label smoothing", "recipe", check=("in [0, 1)", lambda v: 0 <= v < 1))
    val_size: int = setting(0, "hold out N training images and score on them instead of the test split", "recipe",
                            metavar="N", check=at_least(0, "0 (evaluate on test) or more images"))
    test_flip: bool = setting(True, "score test images in one view only (default: also their mirror, on flip-trained "
                              "datasets)", "recipe", flag="--no-test-flip", action="store_false", trajectory=False)
    order: str = setting("relu-norm", "block order of the small net", "recipe", programs=("train",),
                         choices=("relu-norm", "norm-relu"))
    seed: int = setting(0, "seeds init, data order and augmentation", "everyday", programs=("train",),
                        check=at_least(0, "0 or more"))
    precision: str = setting("auto", "bf16, fp32, or auto: bf16 on GPUs with native bf16 (Ampere or newer), else fp32",
                             "resources", choices=("auto", "fp32", "bf16"))
    compile: str = setting("auto", "torch.compile the net: on, off, or auto: on CUDA only", "resources",
                           choices=("auto", "on", "off"), trajectory=False)
    threads: int = setting(0, "CPU threads (0: torch's count); a seed's numbers depend on it", "resources",
                           programs=("train",), check=at_least(0, "0 (torch's default) or more"), trajectory=False)

    as_dict = dataclasses.asdict

    @classmethod
    def of(cls, config: dict) -> "TrialConfig":
        """The TrialConfig of a dict holding its fields among others (a Tune trial's config)."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

    def trajectory(self) -> dict:
        """The settings a checkpoint must share to continue this run: they shape the net or its training."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrialConfig)
                if f.metadata.get("trajectory", True)}


@dataclass(frozen=True)
class SweepConfig(TrialConfig):
    """A sweep: the recipe every trial shares (its TrialConfig fields) and what varies over the grid."""
    variants: str = setting("bn,gn,ln,bn+l1", f"comma-separated NORM[+l1], NORM one of {', '.join(NORMS)} "
                            "(docs/norms.md)", "everyday")
    seeds: int | str = setting(1, "seeds per variant, 0..N-1; or 'auto': rounds of seeds, each as many as the cluster "
                               "runs at once, until every pair of variants is decided better or equivalent or "
                               "--max-seeds are spent (docs/usage.md)", "everyday", type=seeds_arg,
                               check=("at least 1 (seeds 0..N-1) or 'auto'", lambda v: v == AUTO_SEEDS or v >= 1))
    max_seeds: int = setting(10, "with --seeds auto: the most seeds a variant runs", "everyday",
                             check=at_least(2, "at least 2 (a verdict needs 2 seeds)"))
    margin: float = setting(verdicts.MARGIN, "accuracy points: two variants closer than this count as equivalent "
                            "(docs/verdicts.md)", "everyday",
                            check=("a number of points in (0, 100)", lambda v: 0 < v < 100))
    l1_lambdas: tuple = setting((), f"L1 lambdas: each +l1 variant runs once per lambda (default: {DEFAULT_L1:g})",
                                "recipe", flag="--l1", type=float, nargs="+",
                                check=each(lambda v: 0 < v < math.inf, "lambdas above 0"))
    smoke_test: bool = setting(False, f"{SMOKE['train_size']} training and {SMOKE['test_size']} test images, "
                               f"{SMOKE['epochs']} epochs unless --epochs: check an install in a minute", "everyday",
                               action="store_true")
    name: str | None = setting(None, "experiment name (default: normsweep_<dataset>_<time>)", "everyday")
    resume: bool = setting(False, "finish an interrupted experiment (--name, default: the latest under "
                           "--storage-path) with its launch settings", "everyday", action="store_true", saved=False)
    storage_path: str = setting("results", "results root: a directory or a URI such as s3://bucket/prefix (on a "
                                "cluster, one every node can write)", "everyday", saved=False)
    batch_sizes: tuple = setting((), "the batch-size study: every variant at each batch size, e.g. 2,4,8,16,32, "
                                 "peak lr scaled linearly from --lr at the auto batch", "studies",
                                 type=list_arg(int, "whole numbers of images, e.g. 2,4,8"),
                                 check=each(lambda v: v >= 1, "whole numbers of images, e.g. 2,4,8,16,32"))
    tune: bool = setting(False, "a tuned comparison: every --tune-lrs x --tune-weight-decays point on a validation "
                         "split (20%% of the training images), one seed; then each variant at its best point and at "
                         "the recipe on the test split, --seeds seeds (docs/usage.md)", "studies", action="store_true")
    tune_lrs: tuple = setting((0.0125, 0.025, 0.05, 0.1, 0.2, 0.4), "with --tune: the peak learning rates tried",
                              "studies", type=list_arg(float, "numbers, e.g. 0.025,0.05,0.1"),
                              check=each(lambda v: 0 < v < math.inf, "positive learning rates, e.g. 0.025,0.05"))
    tune_weight_decays: tuple = setting((5e-5, 5e-4), "with --tune: the weight decays tried", "studies",
                                        type=list_arg(float, "numbers, e.g. 5e-5,5e-4"),
                                        check=each(lambda v: 0 <= v < math.inf, "weight decays of 0 or more"))
    max_concurrent: int = setting(0, "most trials at once (0: no cap)", "resources",
                                  check=at_least(0, "0 (no cap) or more"))
    cpus_per_trial: float | None = setting(None, "CPUs per trial (default: the cluster's, shared by the trials at "
                                           "once)", "resources", type=float, saved=False,
                                           check=("more than 0 (fractions share a core)", lambda v: v > 0))
    gpus_per_trial: float | None = setting(None, "GPUs per trial (default: 1, or 1/k of one when trials "
                                           "outnumber GPUs)", "resources", type=float, saved=False,
                                           check=at_least(0, "0 or more"))
    address: str | None = setting(None, "the Ray cluster to join: 'auto' (`ray start --head` here) or host:port "
                                  "(default: a private local Ray)", "resources", saved=False)
    ship_code: bool = setting(True, "with --address: don't ship this directory's code (normsweep installed on every "
                              "node)", "resources", flag="--no-ship-code", action="store_false", saved=False)
    verbose: bool = setting(False, "show Ray's own output and logs", "resources", action="store_true", saved=False)
    # a tuned comparison's stages (tuned.py): "tuning" or "final"; the final stage's name and variant dicts
    stage: str = ""
    final_name: str = ""
    final_variants: tuple = ()

    def to_launch(self) -> dict:
        """The launch settings file's contents: every saved field, and LAUNCH_FORMAT."""
        saved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("saved", True)}
        return {"format": LAUNCH_FORMAT, **saved}

    def from_launch(self, launch: dict) -> "SweepConfig":
        """This sweep with a launch file's settings (today's flags keep only what is not saved)."""
        if launch.get("format") != LAUNCH_FORMAT:
            raise UsageError(f"this experiment was written by another version of normsweep (launch format "
                             f"{launch.get('format', 1)}, this one reads {LAUNCH_FORMAT}); finish it with that "
                             f"version, or start it again")
        known = {f.name for f in dataclasses.fields(self)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in launch.items() if k in known}
        return dataclasses.replace(self, **values)


def _flag(f) -> str:
    return f.metadata["argparse"].get("flag") or "--" + f.name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (its own print the usage block first)."""

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(USAGE_EXIT)


def parse(program: str, cls, argv, description: str):
    """(config, the names of the flags given): `cls` with the flags of argv over its defaults. The flags are the
    fields of `cls` with a group and `program` ("train" or "tune"), in GROUPS, each defaulting to argparse.SUPPRESS."""
    parser = ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("group") or program not in meta["programs"]:
            continue
        options = {k: v for k, v in meta["argparse"].items() if k != "flag"}
        if "action" not in options:
            options.setdefault("type", type(f.default) if f.default is not None else str)
        default = meta["shown"] or (f"{f.default:g}" if isinstance(f.default, float) else ",".join(
            f"{v:g}" for v in f.default) if isinstance(f.default, tuple) else f.default)
        shown = "" if isinstance(f.default, bool) or f.default in (None, ()) else f" (default: {default})"
        groups[meta["group"]].add_argument(_flag(f), dest=f.name, help=meta["help"] + shown, **options)
    given = vars(parser.parse_args(argv))
    if given.get("smoke_test"):  # its subset, and its epochs unless --epochs
        given = {**SMOKE, **given}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}), set(given)


def batch_size_for(n_train: int, batch_size: int = 0) -> int:
    """`batch_size` if set (> 0), else the auto batch size for n_train training images (see MAX_BATCH)."""
    return batch_size if batch_size > 0 else max(MIN_BATCH, min(MAX_BATCH, n_train // MIN_STEPS_PER_EPOCH))


def parse_variants(spec: str, lambdas=(DEFAULT_L1,)) -> list:
    """'bn,gn,ln,bn+l1' -> one dict {"name", "norm", "l1"} per trial variant; each '+l1' one once per lambda."""
    variants, names = [], []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        norm, l1 = token.removesuffix("+l1"), token.endswith("+l1") and token not in NORMS
        if (token if not l1 else norm) not in NORMS:
            raise UsageError(f"bad variant {token!r}; the grammar is NORM[+l1] with NORM one of {', '.join(NORMS)}")
        if token in names:  # a repeat would run as extra trials that look like extra seeds
            raise UsageError(f"--variants lists {token!r} twice; list each variant once (use --seeds for repeats)")
        names.append(token)
        variants += ([{"name": token, "norm": norm, "l1": lam} for lam in lambdas] if l1
                     else [{"name": token, "norm": token, "l1": 0.0}])
    if not variants:
        raise UsageError("no variants given; e.g. --variants bn,gn,ln,bn+l1")
    return variants


def grid_axes(sweep: SweepConfig) -> dict:
    """Axis -> values over a sweep's trials (variant dicts, seeds, a study's batch sizes, a tuning stage's lrs and
    weight decays): the trials are their product, for Tune's grid, the trial count and the analysis alike."""
    axes = {"variant": list(sweep.final_variants) or parse_variants(sweep.variants, sweep.l1_lambdas or (DEFAULT_L1,))}
    if sweep.batch_sizes:
        axes["batch_size"] = sorted(sweep.batch_sizes)
    if sweep.stage == "tuning":
        axes.update(lr=sorted(sweep.tune_lrs), weight_decay=sorted(sweep.tune_weight_decays))
    seeds = sweep.max_seeds if sweep.seeds == AUTO_SEEDS else 1 if sweep.stage == "tuning" else sweep.seeds
    axes["seed"] = list(range(seeds))  # --seeds auto: the seeds it may run (rounds.py picks them)
    return axes


def check(config: TrialConfig) -> None:
    """Refuse bad settings of either CLI in one line (UsageError); nothing runs before this."""
    for f in dataclasses.fields(config):
        value, rule = getattr(config, f.name), f.metadata.get("check")
        if rule and value not in (None, f.default) and not (value == value and rule[1](value)):  # nan != nan
            shown = ",".join(f"{v:g}" for v in value) or "nothing" if isinstance(value, tuple) else f"{value:g}"
            raise UsageError(f"{_flag(f)} must {'list' if isinstance(value, tuple) else 'be'} {rule[0]}, got {shown}")
    norms = sorted({v["norm"] for v in _check_sweep(config)}) if isinstance(config, SweepConfig) else [config.norm]
    batch = min(getattr(config, "batch_sizes", ()) or [config.batch_size or MIN_BATCH])
    batch_normed = [n for n in norms if n in REGISTRY and REGISTRY[n].batch_statistics]
    if batch < 2 and batch_normed:  # training-mode BN takes its statistics over the batch
        flag = "--batch-sizes" if getattr(config, "batch_sizes", ()) else "--batch-size"
        raise UsageError(f"{flag}: a batch of 1 image gives BatchNorm no batch statistics; use 2 or more, "
                         f"or drop the {'/'.join(batch_normed)} variants (gn and ln train on single images)")
    for norm in norms:  # an unknown norm, or a group count that does not divide a built-in net's widths
        try:
            build_model(norm, groups=config.groups, model=config.model) if config.model in MODELS else norm_entry(norm)
        except ValueError as e:
            raise UsageError(str(e)) from None
    plugins.canonical(config.model)  # a user's builder: TARGET:NAME, its file here (run on the data later)


def _check_sweep(sweep: SweepConfig) -> list:
    """The checks that involve a sweep's own flags; its variant dicts (parse_variants)."""
    if sweep.batch_sizes and sweep.batch_size:
        raise UsageError(f"--batch-size {sweep.batch_size} and --batch-sizes both given; drop --batch-size "
                         f"(--batch-sizes runs every listed size)")
    if sweep.smoke_test and sweep.train_size != SMOKE["train_size"]:
        raise UsageError("--train-size has no effect with --smoke-test (which trains on its own subset); drop one")
    if not sweep.ship_code and not sweep.address:
        raise UsageError("--no-ship-code has no effect without --address (a local Ray ships nothing); drop it")
    name = "x" if sweep.name is None else sweep.name
    size = len(name.encode("utf-8", "surrogateescape"))  # 255 bytes: what ext4, XFS, APFS, NTFS and S3 keys hold
    shown = name if len(name) <= 40 else f"{name[:40]}... ({size} bytes)"
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise UsageError(f"--name must be one directory name, without '/' or '\\' and not '.' or '..', "
                         f"got {shown!r}; e.g. --name fmnist_3seeds")
    if size > 255:
        raise UsageError(f"--name is longer than a file system allows ({size} bytes, at most 255): {shown!r}; "
                         f"pass a shorter name")
    if sweep.l1_lambdas and not any(v["l1"] for v in parse_variants(sweep.variants)):
        raise UsageError(f"--l1 {' '.join(f'{lam:g}' for lam in sweep.l1_lambdas)} given but no variant uses it; add "
                         f"a +l1 variant, e.g. --variants {sweep.variants},bn+l1")
    if sweep.tune and sweep.batch_sizes:
        raise UsageError("--tune and --batch-sizes both given; a tuned comparison runs at one batch size, drop one")
    if sweep.seeds == AUTO_SEEDS:
        _check_auto_seeds(sweep)
    elif sweep.max_seeds != SweepConfig.max_seeds:
        raise UsageError(f"--max-seeds {sweep.max_seeds} has no effect without --seeds auto; drop it, or add "
                         f"--seeds auto")
    if sweep.tune and sweep.val_size:
        raise UsageError(f"--tune and --val-size {sweep.val_size} both given; the tuning stage holds out its own "
                         f"validation split and the final stage scores on the test split, drop --val-size")
    return parse_variants(sweep.variants)


def _check_auto_seeds(sweep: SweepConfig) -> None:
    """Refuse --seeds auto where there are no pairs of variants to decide, or where it decides the wrong ones."""
    if sweep.tune:
        raise UsageError("--seeds auto and --tune both given; a tuned comparison's final stage compares each variant "
                         "tuned and at the recipe over the same seeds, pass --seeds N")
    if sweep.batch_sizes:
        raise UsageError("--seeds auto and --batch-sizes both given; the study measures every variant at every batch "
                         "size over the same seeds, pass --seeds N")
    if len(parse_variants(sweep.variants, sweep.l1_lambdas or (DEFAULT_L1,))) < 2:
        raise UsageError(f"--seeds auto decides pairs of variants and --variants {sweep.variants} gives one; add a "
                         f"variant, or pass --seeds N")


def check_val_size(val_size: int, n_train: int) -> None:
    """Refuse a --val-size that leaves fewer than 2 of n_train images to train on (once the data is loaded)."""
    if val_size and val_size > n_train - 2:
        raise UsageError(f"--val-size {val_size} leaves {max(0, n_train - val_size)} of the {n_train:,} training "
                         f"images to train on; hold out at most {max(0, n_train - 2):,}")
