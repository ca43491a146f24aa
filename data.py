"""Datasets as in-memory tensors and the batch pipeline that feeds the training loop.

Owns: reading MNIST-format idx files (gzipped or raw) with one-line errors for corrupt input,
locating MNIST / Fashion-MNIST (Debian's package, torchvision's download, or a user's folder),
per-epoch seeded shuffling, normalisation from training-split statistics, and batched
augmentation on the batch's device. No DataLoader, no PIL, no workers.
"""
import gzip
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("mnist", "fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
SPLIT_FILES = {  # split -> (images stem, labels stem), MNIST's own file names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 0x803, 0x801  # unsigned byte data, 3 dims / 1 dim
# Per-dataset augmentation. Horizontal flips suit clothes, not digits. Chosen on a 10k validation
# split of Fashion-MNIST's training data (20 epochs, 50k train): flip alone beat flip + rotation
# +-7 deg + shift 2 px by 0.7 points for bn (91.97 vs 91.24); a 20k-parameter net underfits under
# the stronger augmentation. Digits keep the assignment's +-7 deg rotation, which its best
# solutions use to reach 99.4%.
AUGMENT = {
    "mnist": {"degrees": 7.0, "shift": 0, "flip": False},
    "fashion-mnist": {"degrees": 0.0, "shift": 0, "flip": True},
}


class DataError(ValueError):
    """Bad or missing data; the message is one line that says what to do."""


@dataclass
class Dataset:
    name: str
    train_images: torch.Tensor  # (N, 28, 28) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, 28, 28) uint8
    test_labels: torch.Tensor  # (M,) int64
    classes: tuple

    def subset(self, n_train: int, n_test: int) -> "Dataset":
        """The first n_train / n_test images, copied so that pickling does not ship the full storage."""
        return Dataset(self.name, self.train_images[:n_train].clone(), self.train_labels[:n_train].clone(),
                       self.test_images[:n_test].clone(), self.test_labels[:n_test].clone(), self.classes)

    @property
    def augment(self) -> dict:
        return AUGMENT.get(self.name, AUGMENT["mnist"])

    def __reduce__(self):
        # As numpy arrays, which pickle protocol 5 hands over as out-of-band buffers: through Ray's
        # object store every trial on a node then reads the one shared copy (zero-copy) instead of
        # unpickling its own (torch tensors would be copied). Trials never write into these tensors.
        arrays = [t.numpy() for t in (self.train_images, self.train_labels, self.test_images, self.test_labels)]
        return _from_arrays, (self.name, *arrays, self.classes)


def _from_arrays(name, train_images, train_labels, test_images, test_labels, classes) -> Dataset:
    with warnings.catch_warnings():  # read-only shared memory: torch warns that it cannot be written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = [torch.from_numpy(a) for a in (train_images, train_labels, test_images, test_labels)]
    return Dataset(name, *tensors, classes)


def read_idx(path, magic: int) -> torch.Tensor:
    """Read one idx file (gzipped if the name ends in .gz) into a uint8 tensor."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable or truncated gzip ({e}); re-download or re-copy the file") from None
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', raw[:4])[0]:08x}" if len(raw) >= 4 else "nothing"
        raise DataError(f"{path}: wrong magic number {found}, expected 0x{magic:08x}; not an idx "
                        f"{'image' if magic == IMAGE_MAGIC else 'label'} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header; re-download or re-copy the file")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise DataError(f"{path}: header promises {expected} bytes of data for shape {shape}, "
                        f"file holds {len(raw) - header}; the file is truncated or corrupt")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def write_idx(path, tensor: torch.Tensor, magic: int, compress: bool | None = None):
    """Write a tensor as a uint8 idx file; gzipped when the name ends in .gz (the inverse of read_idx)."""
    path = Path(path)
    payload = struct.pack(">I", magic) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    payload += tensor.to(torch.uint8).numpy().tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_directory(directory, train_images, train_labels, test_images, test_labels) -> Path:
    """A directory of MNIST's four gzipped idx files that `load_dataset(directory)` reads back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        image_stem, label_stem = SPLIT_FILES[split]
        write_idx(directory / (image_stem + ".gz"), images, IMAGE_MAGIC)
        write_idx(directory / (label_stem + ".gz"), labels, LABEL_MAGIC)
    return directory


def read_split(directory, split: str):
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, validated."""
    image_stem, label_stem = SPLIT_FILES[split]
    image_path, label_path = (_find(directory, stem) for stem in (image_stem, label_stem))
    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC).long()
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{image_path}: images are {tuple(images.shape[1:])}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds "
                        f"{len(labels)} labels; the pair does not match")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{label_path}: label {labels.max().item()} outside 0-9")
    return images, labels


def _find(directory, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise DataError(f"{directory}: no {stem}[.gz]; a data directory needs MNIST's four idx files "
                    f"({', '.join(s for pair in SPLIT_FILES.values() for s in pair)})")


def read_directory(directory, name: str, classes=DIGIT_CLASSES) -> Dataset:
    train = read_split(directory, "train")
    test = read_split(directory, "test")
    return Dataset(name, *train, *test, classes=classes)


def load_dataset(name: str, data_dir="data") -> Dataset:
    """`mnist`, `fashion-mnist`, or a directory of MNIST-format idx files."""
    if name == "fashion-mnist" and _has_idx_files(DEBIAN_FASHION_DIR):
        return read_directory(DEBIAN_FASHION_DIR, name, FASHION_CLASSES)
    if name in DATASETS:
        raw_dir = _download(name, Path(data_dir))
        return read_directory(raw_dir, name, FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES)
    if Path(name).is_dir():
        return read_directory(name, Path(name).name)
    raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} "
                    f"or a directory of MNIST-format idx files")


def _has_idx_files(directory: Path) -> bool:
    return all(any((directory / (s + ext)).is_file() for ext in ("", ".gz"))
               for pair in SPLIT_FILES.values() for s in pair)


def _download(name: str, data_dir: Path) -> Path:
    """torchvision's download into data_dir, under a file lock so concurrent trials don't race."""
    from filelock import FileLock
    from torchvision import datasets

    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    raw_dir = data_dir / cls.__name__ / "raw"
    if _has_idx_files(raw_dir):
        return raw_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(data_dir / f".{name}.lock")):
            cls(str(data_dir), train=True, download=True)
            cls(str(data_dir), train=False, download=True)
    except PermissionError:
        raise DataError(f"cannot write to data directory {data_dir}; pass a writable --data-dir") from None
    except Exception as e:  # torchvision raises RuntimeError / URLError / socket errors offline
        offline = ("Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) for "
                   "--dataset fashion-mnist, or --dataset /path/to/dir holding the four idx files")
        raise DataError(f"could not download {name} into {data_dir} ({type(e).__name__}); "
                        f"if offline, use {offline}") from None
    return raw_dir


def validation_split(images, labels, size: int, seed: int):
    """Carve a seeded held-out split from the training data: (train_x, train_y, val_x, val_y)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:size], order[size:]
    return images[train], labels[train], images[val], labels[val]


def image_stats(images: torch.Tensor):
    """Mean and std of the pixel values (in [0, 1]) of a uint8 image tensor."""
    x = images.float().div_(255)
    return x.mean().item(), x.std().item()


def to_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalised float (B, 1, 28, 28)."""
    return ((images.float() / 255 - mean) / std).unsqueeze(1)


def batches(images, labels, batch_size: int, generator: torch.Generator | None = None):
    """Yield (images, labels) batches, in a fresh random order when a generator is given."""
    n = len(labels)
    # Drawn on the generator's device (the batch's device in training): no host round trip per epoch.
    order = (torch.randperm(n, generator=generator, device=generator.device).to(images.device)
             if generator is not None else None)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        yield images[idx], labels[idx]


def augment(x: torch.Tensor, generator: torch.Generator, degrees: float, shift: int, flip: bool):
    """Random rotation (+-degrees), translation (+-shift pixels) and optional horizontal flip.

    One affine grid per sample, applied with a single grid_sample on the batch's device. The random
    parameters are drawn from `generator` on its own device: a generator on the batch's device keeps
    the step free of host-to-device copies, and a seeded one keeps runs reproducible per device type
    (a CUDA generator's stream differs from the CPU's).
    x: (B, 1, H, W) float.
    """
    batch, _, height, width = x.shape
    device = generator.device
    angle = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * math.radians(degrees)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    tx = (torch.randint(-shift, shift + 1, (batch,), generator=generator, device=device) * 2 / width)
    ty = (torch.randint(-shift, shift + 1, (batch,), generator=generator, device=device) * 2 / height)
    sign = (torch.where(torch.rand(batch, generator=generator, device=device) < 0.5, -1.0, 1.0) if flip
            else torch.ones(batch, device=device))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sign, -sin, tx], 1),
                         torch.stack([sin * sign, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    # background is the normalised value of a black pixel: pad with x's minimum, not 0.
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background
