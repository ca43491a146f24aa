"""Input checks shared by every entry point (tune_main.py, train.py).

`check_settings` refuses bad command-line settings in one line before anything expensive starts:
no Ray, no data loading, no directories; a number outside its range in the schema (settings.py) is
refused by `check_ranges`, the rest here. `check_resources` is the one check that needs a running
Ray (what the cluster has). Both raise UsageError; the CLIs print it as `error: ...` and exit 2.
"""
import argparse
import math
import sys

from model import MODELS, NORMS, REGISTRY, build_model, norm_entry
from settings import SETTINGS

from errors import USAGE_EXIT, NormsweepError, UsageError  # noqa: F401




class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse's own print the usage block first)."""

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(USAGE_EXIT)


L1_SUFFIX = "+l1"


def parse_variant(token: str) -> tuple:
    """'gn+ws+l1' -> ('gn+ws', True): a registry name, whole (names hold '+' too), then an optional '+l1'."""
    if token in NORMS:
        return token, False
    if token.endswith(L1_SUFFIX) and token[:-len(L1_SUFFIX)] in NORMS:
        return token[:-len(L1_SUFFIX)], True
    raise UsageError(f"bad variant {token!r}; the grammar is NORM[+l1] with NORM one of {', '.join(NORMS)}")


def parse_variants(spec: str, lambdas) -> list:
    """'bn,gn,ln,bn+l1' -> one dict per trial variant; each '+l1' variant once per lambda."""
    variants, names = [], []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        norm, l1 = parse_variant(token)
        if token in names:  # a repeat would run as extra trials that look like extra seeds
            raise UsageError(f"--variants lists {token!r} twice; list each variant once (use --seeds for repeats)")
        names.append(token)
        if l1:
            variants += [{"name": token, "norm": norm, "l1": lam} for lam in lambdas]
        else:
            variants.append({"name": token, "norm": norm, "l1": 0.0})
    if not variants:
        raise UsageError("no variants given; e.g. --variants bn,gn,ln,bn+l1")
    return variants


def check_ranges(settings: dict) -> None:
    """Refuse a number outside its setting's range in the schema (settings.SETTINGS); None is "the default"."""
    for key, setting in SETTINGS.items():
        value = settings.get(key)
        if setting.range is None or not _is_number(value):  # tune_main.py's --l1 list: check_settings
            continue
        if value not in setting.range:
            raise UsageError(f"{setting.flag} must be {setting.range.what}, got {value:g}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_settings(settings: dict) -> None:
    """Refuse bad settings (argparse names, e.g. vars(args)); keys an entry point lacks are skipped.

    Conventions: 0 means "auto/all/none" for batch_size, train_size, val_size, threads and
    max_concurrent; None means "the default" for cpus_per_trial and gpus_per_trial.
    """
    check_ranges(settings)
    batch, batch_sizes = settings.get("batch_size"), settings.get("batch_sizes")
    if batch_sizes is not None:
        if batch:
            raise UsageError(f"--batch-size {batch} and --batch-sizes both given; drop --batch-size "
                             f"(--batch-sizes runs every listed size)")
        if not batch_sizes or min(batch_sizes) < 1 or len(set(batch_sizes)) != len(batch_sizes):
            raise UsageError(f"--batch-sizes must list distinct whole numbers of images, 1 or more, "
                             f"e.g. 2,4,8,16,32; got {','.join(map(str, batch_sizes)) or 'nothing'}")
    train_size = settings.get("train_size")
    if train_size is not None and (train_size < 0 or train_size == 1):
        raise UsageError(f"--train-size must be 0 (all images) or at least 2 images, got {train_size}")
    if train_size and settings.get("smoke_test"):
        raise UsageError("--train-size has no effect with --smoke-test (which trains on its own subset); drop one")
    check_name(settings.get("name"))
    if settings.get("ship_code") is False and not settings.get("address"):
        raise UsageError("--no-ship-code has no effect without --address (a local Ray ships nothing); drop it")
    check_tuning(settings)

    l1 = settings.get("l1")  # train.py's one lambda is checked by check_ranges
    if l1 is not None and not _is_number(l1):  # tune_main.py: lambdas for the +l1 variants
        bad = [lam for lam in l1 if not (lam > 0 and math.isfinite(lam))]
        if bad:
            raise UsageError(f"--l1 lambdas must be > 0, got {', '.join(f'{lam:g}' for lam in bad)}")
        if len(set(l1)) != len(l1):
            raise UsageError(f"--l1 lists a lambda twice ({' '.join(f'{lam:g}' for lam in l1)}); list each once")
    norms = [settings["norm"]] if "norm" in settings else []
    if settings.get("variants") is not None:
        variants = parse_variants(settings["variants"], l1 or [1.0])
        if l1 and not any(v["l1"] for v in variants):  # l1 is None unless --l1 was given
            raise UsageError(f"--l1 {' '.join(f'{lam:g}' for lam in l1)} given but no variant uses it; "
                             f"add a +l1 variant, e.g. --variants {settings['variants']},bn+l1")
        norms = sorted({v["norm"] for v in variants})
    smallest = min(batch_sizes or [batch or 2])  # batch 0 is auto: at least MIN_BATCH
    batch_normed = [norm for norm in norms if norm in REGISTRY and REGISTRY[norm].batch_statistics]
    if smallest < 2 and batch_normed:  # training-mode BN takes its statistics over the batch
        flag = "--batch-sizes" if batch_sizes else "--batch-size"
        raise UsageError(f"{flag}: a batch of 1 image gives BatchNorm no batch statistics; use 2 or more, "
                         f"or drop the {'/'.join(batch_normed)} variants (gn and ln train on single images)")
    net = settings.get("model", "small")
    for norm in norms:  # an unknown norm, or a group count that does not divide a built-in net's widths
        try:
            if net in MODELS:
                build_model(norm, groups=settings.get("groups", 4), model=net)
            else:  # a user's net is built and run once its data is loaded (plugins.check)
                norm_entry(norm)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if net not in MODELS:
        import plugins  # (plugins' errors are NormsweepErrors: it imports this module)
        plugins.canonical(net)  # refuses a --model that is neither a built-in nor TARGET:NAME


def check_tuning(settings: dict) -> None:
    """Refuse a tuned comparison's grid (--tune-lrs, --tune-weight-decays) that cannot run or means nothing."""
    grids = (("tune_lrs", lambda v: v > 0, "positive learning rates, e.g. 0.025,0.05,0.1"),
             ("tune_weight_decays", lambda v: v >= 0, "weight decays of 0 or more, e.g. 5e-5,5e-4"))
    for key, allowed, what in grids:
        values = settings.get(key)
        if values is None:
            continue
        flag, shown = f"--{key.replace('_', '-')}", ",".join(f"{v:g}" for v in values) or "nothing"
        if not values or not all(allowed(v) and math.isfinite(v) for v in values):
            raise UsageError(f"{flag} must list {what}; got {shown}")
        if len(set(values)) != len(values):
            raise UsageError(f"{flag} lists a value twice ({shown}); list each once")
    if settings.get("tune") and settings.get("batch_sizes"):
        raise UsageError("--tune and --batch-sizes both given; a tuned comparison runs at one batch size, drop one")
    if settings.get("tune") and settings.get("val_size"):
        raise UsageError(f"--tune and --val-size {settings['val_size']} both given; the tuning stage holds out its own "
                         f"validation split and the final stage scores on the test split, drop --val-size")


def check_val_size(val_size: int, n_train: int) -> None:
    """Refuse a --val-size that leaves fewer than 2 of the n_train training images to train on (checked once
    the data is loaded: the training set's size is the data's)."""
    if val_size and val_size > n_train - 2:
        raise UsageError(f"--val-size {val_size} leaves {max(0, n_train - val_size)} of the {n_train:,} training "
                         f"images to train on; hold out at most {max(0, n_train - 2):,}")


NAME_MAX_BYTES = 255  # the longest file name ext4, XFS, APFS, NTFS and S3 key components all hold


def check_name(name) -> None:
    """Refuse an experiment name (--name) that cannot be one directory under the storage path."""
    if name is None:
        return
    encoded = name.encode("utf-8", "surrogateescape")
    shown = name if len(name) <= 40 else f"{name[:40]}... ({len(encoded)} bytes)"
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise UsageError(f"--name must be one directory name, without '/' or '\\' and not '.' or '..', "
                         f"got {shown!r}; e.g. --name fmnist_3seeds")
    if len(encoded) > NAME_MAX_BYTES:
        raise UsageError(f"--name is longer than a file system allows ({len(encoded)} bytes, at most "
                         f"{NAME_MAX_BYTES}): {shown!r}; pass a shorter name")


def check_resources(per_trial: dict, cluster: dict) -> None:
    """Refuse per-trial resources the Ray cluster can never give (its trials would stay PENDING)."""
    have_cpus, have_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if per_trial["gpu"] > 0 and not have_gpus:
        raise UsageError(f"--gpus-per-trial {per_trial['gpu']:g}: the Ray cluster has no GPUs "
                         f"({have_cpus:g} CPUs only); drop the flag or join a cluster with GPUs (--address)")
    if per_trial["gpu"] > have_gpus:
        raise UsageError(f"--gpus-per-trial {per_trial['gpu']:g}: the Ray cluster has {have_gpus:g} GPUs; "
                         f"ask for at most that")
    if per_trial.get("memory", 0) > cluster.get("memory", math.inf):
        raise UsageError(f"each trial needs about {per_trial['memory'] / 2**30:.2f} GiB of host memory and the Ray "
                         f"cluster has {cluster['memory'] / 2**30:.2f} GiB free for tasks; free memory on the nodes "
                         f"or join a larger cluster (--address)")
    if per_trial["cpu"] > have_cpus:
        raise UsageError(f"--cpus-per-trial {per_trial['cpu']:g}: the Ray cluster has {have_cpus:g} CPUs; "
                         f"ask for at most that (fractions share a core)")
