"""Datasets as in-memory tensors: what one declares (`Spec`, dataset.json); MNIST's idx files, CIFAR-10's batches, image
folders and the known datasets, read or refused in one line (DataError); the batch pipeline of the training loop."""
import contextlib
import difflib
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import struct
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import DataError

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Spec:
    """What a dataset declares: the training loop, the nets and the analysis read these, never its name."""
    classes: tuple  # label i is called classes[i]
    augment: dict  # {"degrees": rotation +-, "shift": translation +- pixels, "flip": horizontal flips}
    mean: tuple | None = None  # per channel, of pixel values in [0, 1]; None: measured on each run's training images
    std: tuple | None = None


# Flips suit clothes, not digits: flip alone beat flip + rotation +-7 deg + shift 2 px by 0.7 points for bn on a 10k
# validation split of Fashion-MNIST (91.97 vs 91.24). Digits keep MNIST's +-7 deg; CIFAR-10 He et al. 2016's recipe.
SPECS = {
    "mnist": Spec(DIGIT_CLASSES, {"degrees": 7.0, "shift": 0, "flip": False}),
    "fashion-mnist": Spec(FASHION_CLASSES, {"degrees": 0.0, "shift": 0, "flip": True}),
    "cifar10": Spec(CIFAR10_CLASSES, {"degrees": 0.0, "shift": 4, "flip": True},
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
}
DATASETS = tuple(SPECS)
# A directory declares its Spec in this file beside its data, never guessed from its name. Without one: label numbers
# as class names, statistics measured per run, the digits' augmentation (a mirrored digit is another glyph).
DECLARATION, UNDECLARED = "dataset.json", SPECS["mnist"]
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),  # (images, labels), MNIST's
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_STEMS = (*SPLIT_FILES["train"], *SPLIT_FILES["test"])
IMAGE_MAGIC, LABEL_MAGIC = 0x803, 0x801  # unsigned byte data, 3 dims / 1 dim
CIFAR_FOLDER, CIFAR_ARCHIVE = "cifar-10-batches-py", "cifar-10-python.tar.gz"  # as torchvision downloads it
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
IMAGE_FOLDER_SPLITS = ("train", "test")  # an image folder: root/train/<class>/*.png, root/test/<class>/*.png
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
GRAY_MODES = ("1", "L", "LA", "La")  # PIL's 8-bit modes with one colour channel; the others are read as RGB
DOWNLOADS = {"mnist": ("MNIST", "MNIST/raw"), "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
             "cifar10": ("CIFAR10", CIFAR_FOLDER)}  # torchvision's dataset class, where its files land in --data-dir
VAL_SIZE_HINT = "evaluate on held-out training images with --val-size N (which reads no test split)"
SPLITS = ("train_images", "train_labels", "_test_images", "_test_labels")


@dataclass(eq=False, repr=False)
class Dataset:
    """A dataset in memory and what it declares: images (N, C, H, W) uint8 (given as (N, H, W): grayscale), labels
    (N,) int64. Read with `test_split=False`, `test_images` and `test_labels` may raise DataError: it has none."""
    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    _test_images: torch.Tensor | None
    _test_labels: torch.Tensor | None
    classes: tuple  # label i is called classes[i]
    augment: dict | None = None  # None: the known dataset's (SPECS), else the digits'
    mean: tuple | None = None  # per channel, declared; None: measured on each run's training images
    std: tuple | None = None

    def __post_init__(self):
        self.train_images, self._test_images = (x.unsqueeze(1) if x is not None and x.dim() == 3 else x
                                                for x in (self.train_images, self._test_images))
        self.augment = dict(self.augment or SPECS.get(self.name, UNDECLARED).augment)

    test_images = property(lambda self: self._test()[0], doc="(M, C, H, W) uint8; DataError without a test split")
    test_labels = property(lambda self: self._test()[1], doc="(M,) int64; DataError without a test split")
    channels = property(lambda self: self.train_images.shape[1])
    image_size = property(lambda self: tuple(self.train_images.shape[-2:]), doc="(H, W) in pixels")
    tensors = property(lambda self: [t for t in map(self.__getattribute__, SPLITS) if t is not None])
    nbytes = property(lambda self: sum(t.nbytes for t in self.tensors), doc="bytes of the images and labels")

    def _test(self) -> tuple:
        if self._test_images is None:
            raise DataError(f"{self.name}: no test split (read without it); {VAL_SIZE_HINT}")
        return self._test_images, self._test_labels

    def fingerprint(self) -> str:
        """sha256 (64 hex digits) of the class names, shapes, images and labels: equal where the data is."""
        digest = hashlib.sha256(json.dumps([self.classes, [list(t.shape) for t in self.tensors]]).encode())
        for tensor in self.tensors:
            digest.update(tensor.contiguous().numpy())
        return digest.hexdigest()

    def subset(self, n_train: int, n_test: int | None = None) -> "Dataset":
        """The first n_train / n_test (default: all) images, copied so that pickling ships only these."""
        return replace(self, **{key: None if getattr(self, key) is None else getattr(self, key)[:n].clone()
                                for key, n in zip(SPLITS, (n_train, n_train, n_test, n_test))})

    def held_out(self, size: int) -> "Dataset":
        """`size` training images held out in the test split's place (validation_split, VALIDATION_SEED)."""
        return replace(self, **dict(zip(SPLITS, validation_split(self.train_images, self.train_labels, size))))

    def __reduce__(self):
        # As numpy arrays, which protocol 5 pickles out of band: every trial on a node reads one copy in Ray's object
        # store (torch tensors would be copied). Trials never write into it.
        return _from_arrays, ({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()},)


def _from_arrays(fields: dict) -> Dataset:
    with warnings.catch_warnings():  # read-only shared memory: torch warns that it cannot be written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return Dataset(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()})


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """An idx file (gzipped: .gz) as a uint8 tensor of its header's shape; DataError if cut short or of another kind."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable or truncated gzip ({e}); re-download or re-copy the file") from None
    found, dims = (int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None), magic & 0xFF
    if found != magic:
        raise DataError(f"{path}: wrong magic number {'nothing' if found is None else f'0x{found:08x}'}, expected "
                        f"0x{magic:08x}; not an idx {'image' if magic == IMAGE_MAGIC else 'label'} file")
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims]) if len(raw) >= 4 + 4 * dims else (-1,)
    if len(raw) - 4 - 4 * dims != math.prod(shape):
        raise DataError(f"{path}: header promises {max(math.prod(shape), 0)} bytes of data for shape {shape}, file "
                        f"holds {max(len(raw) - 4 - 4 * dims, 0)}; the file is truncated or corrupt")
    return torch.frombuffer(bytearray(raw[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def write_idx(path, tensor: torch.Tensor, magic: int):
    """Write a tensor as a uint8 idx file; gzipped when the name ends in .gz (the inverse of read_idx)."""
    payload = struct.pack(f">I{tensor.dim()}I", magic, *tensor.shape) + tensor.to(torch.uint8).numpy().tobytes()
    Path(path).write_bytes(gzip.compress(payload) if str(path).endswith(".gz") else payload)


def _idx_file(directory: Path, stem: str) -> Path | None:
    return next((directory / (stem + ext) for ext in ("", ".gz") if (directory / (stem + ext)).is_file()), None)


def _complete(directory: Path) -> bool:  # all of MNIST's idx files, or all of CIFAR-10's batches
    return (all(_idx_file(directory, stem) for stem in IDX_STEMS)
            or all((directory / file).is_file() for files in CIFAR_FILES.values() for file in files))


def _read_split(directory: Path, kind: str, split: str) -> tuple:
    """Images (N, C, H, W) uint8, labels (N,) int64 of a split's idx files or CIFAR-10 batches: pickled dicts of
    "labels" and "data", (N, 3072) rows of red, green, blue, unpickled as numpy arrays only (a file runs no code)."""
    if kind == "idx":
        paths = [_idx_file(directory, stem) for stem in SPLIT_FILES[split]]
        if None in paths:
            raise DataError(f"{directory}: no {SPLIT_FILES[split][paths.index(None)]}[.gz]; a data directory needs "
                            f"MNIST's four idx files ({', '.join(IDX_STEMS)})")
        images, labels = read_idx(paths[0], IMAGE_MAGIC), read_idx(paths[1], LABEL_MAGIC).long()  # (N, H, W), (N,)
        if len(images) != len(labels):
            raise DataError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels; "
                            f"the pair does not match")
        return images.unsqueeze(1), labels
    images, labels = [], []
    for path in (directory / file for file in CIFAR_FILES[split]):
        try:  # from the file's bytes: a string's length is bounded by what the file holds
            batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
            labels.append(torch.as_tensor(np.asarray(batch["labels"], dtype=np.int64)))
            images.append(torch.from_numpy(np.asarray(batch["data"], np.uint8).reshape(len(labels[-1]), 3, 32, 32)))
        except (pickle.UnpicklingError, EOFError, OSError, AttributeError, KeyError, ValueError, TypeError,
                MemoryError) as e:  # MemoryError: a bytes object's length is allocated before it is read
            raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: "
                            f"{e or 'a length larger than the file'}); re-download or re-copy the file") from None
    return torch.cat(images), torch.cat(labels)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other class."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # _codecs: protocol 2's bytes
               *((f"numpy.{core}.multiarray", f) for core in ("core", "_core") for f in ("_reconstruct", "scalar"))}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")


def printable(text) -> str:
    """Any str as one printable line: unprintable characters and undecodable bytes (surrogates) as backslash escapes."""
    return "".join(c if c.isprintable() else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("unicode_escape").decode() for c in str(text))


def _walk_folder(directory: Path, splits: tuple) -> tuple:
    """An image folder's files in ImageFolder's order, unread and not hidden: ([[(path, label), ...] per split], class
    names: train/'s folders, printable). DataError: a folder link, under two classes, an empty class, a new test one."""
    samples, names = [], None
    for split in splits:
        root, images = directory / split, {}
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        unknown, names = sorted(set(folders) - set(names or folders)), names or folders
        if unknown:
            raise DataError(printable(f"{root / unknown[0]}: class {unknown[0]!r} is not among the training classes "
                                       f"({', '.join(names)}); rename it or add it to train/"))
        if len(names) < 2:
            raise DataError(printable(f"{root}: {len(names)} class folder{'s' * (len(names) != 1)} "
                                       f"({', '.join(names) or 'none'}); a classifier needs two or more, one folder of "
                                       f"images per class"))
        for name in folders:
            images[name] = []
            for parent, below, files in os.walk(root / name):  # lists a folder link in `below`, enters none
                below[:] = [folder for folder in below if not folder.startswith(".")]
                link = next((p for p in [Path(parent), *(Path(parent, f) for f in below)] if p.is_symlink()), None)
                if link:
                    raise DataError(printable(f"{link}: a link to a folder ({os.path.realpath(link)}); an image "
                                               f"folder follows none (one can loop or bring in other classes' images): "
                                               f"copy the images in, or link each image file"))
                images[name] += [Path(parent, file) for file in files
                                 if not file.startswith(".") and file.lower().endswith(IMAGE_EXTENSIONS)]
        empty = [name for name in folders if not images[name]]  # a test split may lack some classes, not all
        if empty and (split == "train" or len(empty) == len(folders)):
            raise DataError(printable(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folder"
                                       f"{'s' * (len(empty) > 1)} {', '.join(empty)}; add images or delete the empty "
                                       f"folders (an image folder holds {split}/<class>/<image>.png)"))
        samples.append([(path, names.index(name)) for name in folders for path in
                        sorted(images[name], key=lambda path: (str(path.parent), path.name))])
    return samples, tuple(map(printable, names))


def _read_folder(samples: list) -> list:
    """[(images (N, C, H, W) uint8, labels (N,) int64) per split], EXIF-turned; C = 1 where all are gray, else 3 (no
    alpha); 16/32-bit integer pixels span 0-65535, float ones 0-1. DataError: undecodable, out of range, odd size."""
    from PIL import Image, ImageOps
    flat, arrays = [sample for split in samples for sample in split], []
    for path, _ in flat:
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                full = 1.0 if image.mode == "F" else 65535 if image.mode.split(";")[0] == "I" else None  # I, I;16*
                pixels = np.asarray(image if full else image.convert("L" if image.mode in GRAY_MODES else "RGB"))
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as e:
            raise DataError(printable(f"{path}: not a readable image ({type(e).__name__}: {e}); replace or delete it"))
        if full and not 0 <= pixels.min() <= pixels.max() <= full:  # NaN fails too
            raise DataError(printable(f"{path}: {image.mode} pixel values from {pixels.min():g} to {pixels.max():g}, "
                                       f"but such pixels are read as 0 (black) to {full:g} (white); scale the images "
                                       f"into that range, or save them as 8-bit"))
        arrays.append(np.rint(pixels * (255 / full)).astype(np.uint8)[..., None] if full else np.atleast_3d(pixels))
    sizes = [a.shape[:2] for a in arrays]
    common = max(set(sizes), key=sizes.count)
    for (path, _), (height, width) in zip(flat, sizes):
        if (height, width) != common:
            raise DataError(printable(f"{path}: {width}x{height} pixels, the other images {common[1]}x{common[0]} "
                                       f"pixels; resize the images to one size"))
    channels = max(a.shape[2] for a in arrays)  # 3 where any image has colour
    images = torch.from_numpy(np.stack([np.broadcast_to(a, (*common, channels)) for a in arrays]))
    images, labels, n = images.permute(0, 3, 1, 2).contiguous(), torch.tensor([y for _, y in flat]), len(samples[0])
    return [(images[:n], labels[:n]), (images[n:], labels[n:])][:len(samples)]


def _survey(directory: Path, test_split: bool, spec: Spec | None = None) -> tuple:
    """What `directory` holds, unread: ("idx", "cifar" or "folder", splits, `spec` or its declaration, _walk_folder)."""
    if any(_idx_file(directory, stem) for stem in IDX_STEMS):
        kind, has_test = "idx", any(_idx_file(directory, stem) for stem in SPLIT_FILES["test"])
        test_files = ", ".join(stem + "[.gz]" for stem in SPLIT_FILES["test"])
    elif (directory / CIFAR_FILES["train"][0]).is_file():
        kind, has_test, test_files = "cifar", (directory / CIFAR_FILES["test"][0]).exists(), CIFAR_FILES["test"][0]
    elif (directory / IMAGE_FOLDER_SPLITS[0]).is_dir():
        kind, has_test, test_files = "folder", (directory / IMAGE_FOLDER_SPLITS[1]).is_dir(), "test/<class>/ folders"
    else:
        for known, (_, folder) in DOWNLOADS.items():  # a torchvision download root (root/MNIST/raw), or root/MNIST
            root = directory.parent if directory.name == Path(folder).parts[0] else directory
            if _complete(root / folder):
                raise DataError(f"{directory}: no dataset here, but torchvision's download of {known} is in "
                                f"{root / folder}; --dataset {known} --data-dir {root} reads it")
        raise DataError(f"{directory}: no dataset here; a data directory holds MNIST's four idx files, CIFAR-10's "
                        f"python batches (a {CIFAR_FOLDER} folder) or images in train/<class>/ and test/<class>/")
    default = SPECS["cifar10"] if kind == "cifar" else UNDECLARED  # CIFAR batches are CIFAR-10 unless declared
    declared = spec or read_declaration(directory, image_folder=kind == "folder", default=default)
    if not has_test and test_split:
        raise DataError(f"{directory}: no test split ({test_files}); add the test files, or {VAL_SIZE_HINT}")
    splits = IMAGE_FOLDER_SPLITS[:1 + has_test]
    try:
        return kind, splits, declared, _walk_folder(directory, splits) if kind == "folder" else None
    except OSError as e:  # a folder that cannot be listed
        raise DataError(printable(f"{e.filename}: cannot be listed ({e.strerror}); make it readable")) from None


def read_directory(directory, name: str, spec: Spec | None = None, test_split: bool = True) -> Dataset:
    """The dataset in `directory`, declaring `spec` or its DECLARATION; DataError, one line, for bad input."""
    directory = Path(directory)
    kind, splits, declared, walked = _survey(directory, test_split, spec)
    if kind == "folder":  # its class folders name the classes
        read, declared = _read_folder(walked[0]), replace(declared, classes=walked[1])
    else:
        read = [_read_split(directory, kind, split) for split in splits]
    (train_x, train_y), (test_x, test_y) = [*read, (None, None)][:2]
    if test_x is not None and test_x.shape[1:] != train_x.shape[1:]:
        shapes = [f"{h}x{w} with {c} channel{'s' * (c != 1)}" for c, h, w in (train_x.shape[1:], test_x.shape[1:])]
        raise DataError(f"{directory}: training images are {shapes[0]} but test images {shapes[1]}; both splits "
                        f"need one image size and channel count")
    labels, n = torch.cat([y for y in (train_y, test_y) if y is not None]), len(declared.classes)
    outside = labels[(labels < 0) | (labels >= n)]
    if len(outside):
        raise DataError(f"{directory}: label {outside[0].item()} outside 0-{n - 1} ({n} classes declared); fix the "
                        f"labels or declare the class names in {DECLARATION}")
    if declared.mean is not None and not len(declared.mean) == len(declared.std) == train_x.shape[1]:
        raise DataError(f"{directory / DECLARATION}: mean and std list {len(declared.mean)} and {len(declared.std)} "
                        f"values for {train_x.shape[1]}-channel images; give one per channel")
    return Dataset(name, train_x, train_y, test_x, test_y, **vars(declared))


DECLARATION_KEYS = {  # each optional key of a DECLARATION -> (is the value valid?, what it must be)
    "source": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)} (its classes, augmentation and statistics)"),
    "classes": (lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c.strip() for c in v)
                and len(set(v)) == len(v), "a list of 2 or more distinct non-empty names, label 0's first"),
    "augment": (lambda v: isinstance(v, dict) and set(v) == {"degrees", "shift", "flip"}
                and type(v["degrees"]) in (int, float) and 0 <= v["degrees"] <= 180
                and type(v["shift"]) is int and 0 <= v["shift"] <= 13 and isinstance(v["flip"], bool),
                'an object {"degrees": 0 to 180, "shift": 0 to 13 pixels, "flip": true or false}'),
    **{key: (lambda v, low=low: isinstance(v, list) and v and all(type(x) in (int, float) and low <= x <= 1 for x in v),
             f"a list of one number per channel, each from {low:g} to 1 (pixel values in [0, 1])")
       for key, low in (("mean", 0.0), ("std", 1e-6))},
    "note": (lambda v: isinstance(v, str), "a string"),
}


def read_declaration(directory, image_folder: bool = False, default: Spec = UNDECLARED) -> Spec:
    """What a directory declares in its DECLARATION (DECLARATION_KEYS) over `default`; DataError naming the file."""
    path = Path(directory) / DECLARATION
    if not path.exists():
        return default

    def bad(what):
        return DataError(f"{path}: {what}; see docs/data.md for the format, or delete the file")
    try:
        declared = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(f"unreadable or not valid JSON ({e})") from None
    if not isinstance(declared, dict):
        raise bad(f"expected a JSON object with {', '.join(DECLARATION_KEYS)}, got {type(declared).__name__}")
    for key, value in declared.items():
        if key not in DECLARATION_KEYS:
            raise bad(f"unknown key {key!r} (a declaration has {', '.join(DECLARATION_KEYS)})")
        if not DECLARATION_KEYS[key][0](value):
            raise bad(f"{key} must be {DECLARATION_KEYS[key][1]}, got {json.dumps(value)}")
    if image_folder and "classes" in declared:
        raise bad("an image folder's class names are its class folders' names; drop classes")
    if ("mean" in declared) != ("std" in declared):
        raise bad("declare mean and std together, or neither (then both are measured on the training images)")
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in declared.items()
              if key in ("classes", "augment", "mean", "std")}
    return replace(SPECS[declared["source"]] if "source" in declared else default, **fields)


def _directory(name: str) -> Path:
    """The directory `--dataset name` names; DataError for none, saying which known name a mistyped one meant."""
    directory = Path(name).expanduser()
    close = difflib.get_close_matches(name.lower(), DATASETS, n=1) if os.sep not in name else []
    if directory.is_dir():
        return directory
    if close and not directory.exists():
        raise DataError(f"unknown dataset {name!r} (and no such directory); did you mean {close[0]}?")
    raise DataError(f"{'not a directory' if directory.exists() else 'no such directory'}: {name}; --dataset takes "
                    f"{', '.join(DATASETS)} or a directory of MNIST-format idx files, CIFAR-10 batches or class "
                    f"folders of images")


def check_dataset(name: str, test_split: bool = True) -> None:
    """DataError, one line, for a --dataset that cannot be read, reading no data (before Ray starts)."""
    if name not in SPECS:
        _survey(_directory(name), test_split)


def load_dataset(name: str, data_dir="data", test_split: bool = True) -> Dataset:
    """A known dataset (DATASETS: Debian's Fashion-MNIST where installed, else torchvision's download into data_dir)
    or a directory (read_directory; test_split=False lets it lack a test split). DataError, one line, for bad input."""
    data_dir = Path(data_dir)
    if name in SPECS:
        debian = name == "fashion-mnist" and _complete(DEBIAN_FASHION_DIR)
        return read_directory(DEBIAN_FASHION_DIR if debian else _download(name, data_dir), name, SPECS[name])
    directory = _directory(name)  # a known dataset's files as a directory: Debian's, or its download in data_dir
    places = {DEBIAN_FASHION_DIR: "fashion-mnist", **{data_dir / folder: k for k, (_, folder) in DOWNLOADS.items()}}
    known = next((known for place, known in places.items() if place.resolve() == directory.resolve()), None)
    return read_directory(directory, known or directory.name, known and SPECS[known], test_split)


def _download(name: str, data_dir: Path) -> Path:
    """`name`'s folder in data_dir, downloaded by torchvision (or unpacked from a CIFAR-10 archive) under a file lock;
    DataError, one line, on failure, which leaves nothing behind (no folder, no lock)."""
    from filelock import FileLock
    from torchvision import datasets
    from torchvision.datasets.utils import extract_archive

    (class_name, folder), archive, lock = DOWNLOADS[name], data_dir / CIFAR_ARCHIVE, data_dir / f".{name}.lock"
    if _complete(data_dir / folder):
        return data_dir / folder
    made = [path for path in (lock, data_dir, *data_dir.parents) if not path.exists()]  # removed on failure
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(lock), tempfile.TemporaryDirectory(prefix=f".{name}-", dir=data_dir) as tmp:
            if not _complete(data_dir / folder):  # else another run moved them in while this one waited
                if name == "cifar10" and archive.is_file():
                    extract_archive(str(archive), tmp)
                else:
                    getattr(datasets, class_name)(tmp, download=True)  # every split's files
                (data_dir / folder).mkdir(parents=True, exist_ok=True)
                for file in (Path(tmp) / folder).iterdir():
                    file.replace(data_dir / folder / file.name)
    except BaseException as e:
        for path in made:  # the lock, then data_dir and its parents (innermost first)
            with contextlib.suppress(OSError):
                path.unlink() if path.is_file() else path.rmdir()
        if not isinstance(e, Exception):  # Ctrl-C, SystemExit
            raise
        if isinstance(e, PermissionError):
            raise DataError(f"cannot write to data directory {data_dir}; pass a writable --data-dir") from None
        if name == "cifar10" and archive.is_file():
            raise DataError(f"{archive}: cannot unpack it ({type(e).__name__}: {e}); re-download it") from None
        # torchvision's message ends in its last mirror's error: "Tried URL, got:\n<urlopen error [Errno -2] ...>"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip("<>")
        why = "no network" if "urlopen error" in reason or isinstance(e, OSError) else "download failed"
        debian = f", or install Debian's dataset-fashion-mnist package ({DEBIAN_FASHION_DIR})"
        raise DataError(f"could not download {name} into {data_dir} ({why}: {reason}); pass --dataset DIR, a directory "
                        f"holding its {'python batches' if name == 'cifar10' else 'four idx files'}, or download it on "
                        f"a machine with a network (--dataset {name} --data-dir DIR), copy DIR here and pass "
                        f"--data-dir DIR{debian * (name == 'fashion-mnist')}") from None
    return data_dir / folder


VALIDATION_SEED = 12345  # of every held-out split (--val-size): each trial, the analysis, make_subset.py hold out one


def validation_split(images, labels, size: int, seed: int = VALIDATION_SEED):
    """(train_x, train_y, val_x, val_y): `size` images held out of the training data by a torch.randperm of `seed`."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return images[order[size:]], labels[order[size:]], images[order[:size]], labels[order[:size]]


def image_stats(images: torch.Tensor) -> tuple:
    """Per-channel mean and std, float32 (C,), of the pixel values in [0, 1] of uint8 images (N, C, H, W)."""
    channels = (images[:, c].float().div_(255) for c in range(images.shape[1]))  # one (N, H, W) at a time: memory
    stats = [(x.mean().item(), x.std().item()) for x in channels]
    return tuple(torch.tensor(values, dtype=torch.float32) for values in zip(*stats))


def to_input(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float (B, C, H, W); mean, std per channel (C,), best on the images' device."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=images.device).reshape(-1, 1, 1) for v in (mean, std))
    return (images.float() / 255 - mean) / std


def batches(images, labels, batch_size: int, generator: torch.Generator | None = None):
    """Yield (images, labels) batches, in a fresh random order when a generator is given."""
    # Drawn on the generator's device (the batch's device in training): no host round trip per epoch.
    order = (torch.randperm(len(labels), generator=generator, device=generator.device).to(images.device)
             if generator is not None else None)
    for start in range(0, len(labels), batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        yield images[idx], labels[idx]


def augment(x: torch.Tensor, generator: torch.Generator, degrees: float, shift: int, flip: bool):
    """Random rotation (+-degrees), translation (+-shift pixels) and optional horizontal flip of x (B, C, H, W)
    float, one affine grid per sample, drawn from `generator` on its device (the batch's: no host copies)."""
    (batch, _, height, width), device = x.shape, generator.device
    angle = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * math.radians(degrees)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    tx, ty = (torch.randint(-shift, shift + 1, (batch,), generator=generator, device=device) * 2 / size
              for size in (width, height))
    sign = (torch.where(torch.rand(batch, generator=generator, device=device) < 0.5, -1.0, 1.0) if flip
            else torch.ones(batch, device=device))
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([cos * sign, -sin, tx, sin * sign, cos, ty], 1).view(batch, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    # background is the normalised value of a black pixel: pad with each channel's minimum, not 0.
    background = x.amin(dim=(2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background
