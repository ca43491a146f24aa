import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

import data as data_lib
from conftest import make_idx_dir
from data import write_idx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    directory = make_idx_dir(tmp_path / "d", n_train=50, n_test=20, gz=gz, seed=3)
    dataset = data_lib.load_dataset(str(directory))
    assert dataset.train_images.shape == (50, 1, 28, 28) and dataset.train_images.dtype == torch.uint8
    assert dataset.test_labels.shape == (20,) and dataset.test_labels.dtype == torch.int64
    g = torch.Generator().manual_seed(3)
    assert torch.equal(dataset.train_images, torch.randint(0, 256, (50, 28, 28), generator=g).to(torch.uint8).unsqueeze(1))
    assert torch.equal(dataset.train_labels, torch.randint(0, 10, (50,), generator=g))


def _path(directory, split=0, kind="images"):
    stem = data_lib.SPLIT_FILES["train"][0 if kind == "images" else 1]
    return directory / (stem + ".gz")


def _expect_one_line(directory, pattern):
    with pytest.raises(data_lib.DataError, match=pattern) as info:
        data_lib.load_dataset(str(directory))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_truncated_gzip(idx_dir):
    path = _path(idx_dir)
    path.write_bytes(path.read_bytes()[:200])
    message = _expect_one_line(idx_dir, "truncated gzip")
    assert str(path) in message


def test_wrong_magic(idx_dir):
    path = _path(idx_dir, kind="labels")
    write_idx(path, torch.zeros(64, 28, 28), data_lib.IMAGE_MAGIC)
    _expect_one_line(idx_dir, r"train-labels-idx1-ubyte.gz: wrong magic number 0x00000803, expected 0x00000801")


def test_data_shorter_than_header_promises(idx_dir):
    path = _path(idx_dir)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    _expect_one_line(idx_dir, "header promises 50176 bytes .* holds 50076")


def test_count_mismatch(idx_dir):
    write_idx(_path(idx_dir, kind="labels"), torch.zeros(63), data_lib.LABEL_MAGIC)
    _expect_one_line(idx_dir, "holds 64 images but .* holds 63 labels")


def test_label_out_of_range(idx_dir):
    write_idx(_path(idx_dir, kind="labels"), torch.full((64,), 12), data_lib.LABEL_MAGIC)
    _expect_one_line(idx_dir, "label 12 outside 0-9")


def test_splits_of_different_image_sizes(idx_dir):
    write_idx(_path(idx_dir), torch.zeros(64, 32, 32), data_lib.IMAGE_MAGIC)
    _expect_one_line(idx_dir, r"training images are 32x32 with 1 channel but test images 28x28 with 1 channel; "
                              r"both splits need one image size")
    # idx files of any one size are read: the nets pool globally
    stem = data_lib.SPLIT_FILES["test"][0]
    write_idx(idx_dir / (stem + ".gz"), torch.zeros(32, 32, 32), data_lib.IMAGE_MAGIC)
    dataset = data_lib.load_dataset(str(idx_dir))
    assert dataset.image_size == (32, 32) and dataset.channels == 1


def test_missing_file_and_unknown_name(idx_dir, tmp_path):
    _path(idx_dir).unlink()
    _expect_one_line(idx_dir, "no train-images-idx3-ubyte")
    with pytest.raises(data_lib.DataError, match=r"^unknown dataset 'cifar' \(and no such directory\); did you mean "
                                                 r"cifar10\?$"):
        data_lib.load_dataset("cifar")


@pytest.mark.parametrize("dataset, message", [
    ("fashion_mnist", "unknown dataset 'fashion_mnist' (and no such directory); did you mean fashion-mnist?"),
    ("data/fmnist4k", "no such directory: data/fmnist4k; --dataset takes mnist, fashion-mnist, cifar10 or a directory "
                      "of MNIST-format idx files, CIFAR-10 batches or class folders of images"),
    ("notes.txt", "not a directory: notes.txt; --dataset takes mnist"),
    ("empty", "empty: no dataset here; a data directory holds MNIST's four idx files"),
    ("one-class", "one-class/train: 1 class folder (cat); a classifier needs two or more"),
], ids=["mistyped name", "missing directory", "a file", "a directory that is no dataset", "one class"])
@pytest.mark.parametrize("program", ["tune", "train"])
def test_a_dataset_that_cannot_be_read_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys, program, dataset,
                                                                     message):
    import train
    import tune_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "empty").mkdir()
    for split in ("train", "test"):
        (tmp_path / "one-class" / split / "cat").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "ray", None)  # importing Ray, or the sweep that imports it, raises ImportError
    monkeypatch.setitem(sys.modules, "sweep", None)
    if program == "tune":  # train.py reads the data where it checks it
        monkeypatch.setattr(data_lib, "read_directory", lambda *a, **k: pytest.fail("data read before the check"))
    main, extra = (tune_main.main, ["--storage-path", str(tmp_path / "results")]) if program == "tune" else (train.main, [])
    assert main(["--dataset", dataset, *extra]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "results").exists()


def test_a_fingerprint_changes_with_any_pixel_label_or_class_name(tmp_path):
    import pickle

    directory = make_idx_dir(tmp_path / "idx", n_train=64, n_test=32)
    dataset = data_lib.load_dataset(str(directory))
    fingerprint = dataset.fingerprint()
    assert len(fingerprint) == 64 and data_lib.load_dataset(str(directory)).fingerprint() == fingerprint
    assert pickle.loads(pickle.dumps(dataset, protocol=5)).fingerprint() == fingerprint  # as a trial receives it
    assert dataset.subset(64, 31).fingerprint() != fingerprint
    changed = [dataset.subset(64), dataset.subset(64), dataset.subset(64)]
    changed[0].train_images[5, 0, 3, 3] ^= 1
    changed[1].test_labels[0] = (changed[1].test_labels[0] + 1) % 10
    changed[2].classes = ("zero", *dataset.classes[1:])
    assert len({fingerprint, *(d.fingerprint() for d in changed)}) == 4


def _tree(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _offline(monkeypatch):
    """No network, as torchvision meets it: every urlopen fails to resolve the host."""
    import socket
    import urllib.error
    import urllib.request

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh data dir", "data dir with other files"])
def test_offline_mnist_says_why_and_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    _offline(monkeypatch)
    data_dir = tmp_path / "data"
    if existing:
        (data_dir / "FashionMNIST" / "raw").mkdir(parents=True)
        (data_dir / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(data_lib.DataError) as info:
        data_lib.load_dataset("mnist", data_dir=data_dir)
    message = str(info.value)
    assert message.startswith(f"could not download mnist into {data_dir} (no network: urlopen error [Errno -2] "
                              f"Name or service not known); pass --dataset DIR, a directory holding its four idx files")
    assert "--dataset mnist --data-dir DIR" in message and "dataset-fashion-mnist" not in message
    assert "\n" not in message
    assert _tree(tmp_path) == before  # no MNIST/raw, no lock file, no data dir


def test_a_download_cut_off_midway_removes_its_partial_file(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def cut_off(url, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x1f\x8b" + b"\0" * 100)  # the first bytes of a gzip, then the line drops
        raise ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", cut_off)
    monkeypatch.setattr(data_lib, "DEBIAN_FASHION_DIR", tmp_path / "no-debian-package")
    (tmp_path / "data").mkdir()
    with pytest.raises(data_lib.DataError, match=r"could not download fashion-mnist .*\(no network: .*Connection "
                                                 r"reset by peer\).* or install Debian's dataset-fashion-mnist"):
        data_lib.load_dataset("fashion-mnist", data_dir=tmp_path / "data")
    assert _tree(tmp_path) == ["data"]


@pytest.mark.parametrize("known, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_a_torchvision_download_root_as_dataset_says_how_to_read_it(tmp_path, monkeypatch, known, folder):
    monkeypatch.setattr(data_lib, "DEBIAN_FASHION_DIR", tmp_path / "no-debian-package")
    make_idx_dir(tmp_path / "tvroot" / folder / "raw", n_train=20, n_test=10)
    for given in (tmp_path / "tvroot", tmp_path / "tvroot" / folder):  # the root, or its dataset folder
        _expect_one_line(given, rf"^{given}: no dataset here, but torchvision's download of {known} is in "
                                rf"{tmp_path / 'tvroot' / folder / 'raw'}; --dataset {known} "
                                rf"--data-dir {tmp_path / 'tvroot'} reads it$")
    dataset = data_lib.load_dataset(known, data_dir=tmp_path / "tvroot")  # which reads it, without downloading
    assert len(dataset.train_labels) == 20 and dataset.classes == data_lib.SPECS[known].classes
    # and its raw folder, given as a directory, is that dataset by location
    assert data_lib.load_dataset(str(tmp_path / "tvroot" / folder / "raw"), tmp_path / "tvroot").augment == \
        data_lib.SPECS[known].augment


def _train_only(directory: Path) -> Path:
    make_idx_dir(directory, n_train=48, n_test=8)
    for stem in data_lib.SPLIT_FILES["test"]:
        (directory / (stem + ".gz")).unlink()
    return directory


@pytest.mark.parametrize("extra", [[], ["--train-size", "40"]], ids=["all", "train-size"])
def test_train_only_directory_trains_with_val_size(tmp_path, capsys, extra):
    import train

    directory = _train_only(tmp_path / "train-only")
    code = train.main(["--dataset", str(directory), "--val-size", "16", "--epochs", "1", "--threads", "1", *extra])
    assert code == 0, capsys.readouterr().err
    assert f"{32 if not extra else 24} train / 16 val images" in capsys.readouterr().out


def test_train_only_directory_without_val_size_says_what_to_do(tmp_path, capsys):
    import train

    directory = _train_only(tmp_path / "train-only")
    assert train.main(["--dataset", str(directory), "--epochs", "1"]) == 2
    assert capsys.readouterr().err == (
        f"error: {directory}: no test split (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); add the "
        f"test files, or evaluate on held-out training images with --val-size N (which reads no test split)\n")
    # read without its test split, the dataset refuses to hand out the one it does not have
    dataset = data_lib.load_dataset(str(directory), test_split=False)
    with pytest.raises(data_lib.DataError, match=r"no test split .* --val-size N \(which reads no test split\)$"):
        dataset.test_images
    with pytest.raises(data_lib.DataError, match="no test split"):
        dataset.subset(8).test_labels  # nor does its subset


FASHION_FLIP = {"degrees": 0.0, "shift": 0, "flip": True}


@pytest.fixture
def synthetic_fashion(tmp_path, monkeypatch):
    """A tiny synthetic stand-in for Debian's Fashion-MNIST package, at the package's place."""
    directory = make_idx_dir(tmp_path / "debian-fashion", n_train=200, n_test=50)
    monkeypatch.setattr(data_lib, "DEBIAN_FASHION_DIR", directory)
    return directory


@pytest.mark.parametrize("flags", [[], ["--val"]], ids=["subset", "val subset"])
def test_a_fashion_subset_is_labelled_as_clothes(tmp_path, synthetic_fashion, monkeypatch, flags):
    import make_subset

    monkeypatch.setattr(make_subset, "VAL_SIZE", 50)
    out = tmp_path / "fmnist4k"
    make_subset.main(["fashion", str(out), "--per-class", "2", *flags])
    dataset = data_lib.load_dataset(str(out))
    assert dataset.classes == data_lib.FASHION_CLASSES and dataset.augment == FASHION_FLIP
    assert len(dataset.train_labels) == 20
    assert pickle_round_trip(dataset.subset(10)).augment == FASHION_FLIP  # as trials receive it


def pickle_round_trip(dataset):
    import pickle

    return pickle.loads(pickle.dumps(dataset, protocol=5))


def test_debian_fashion_dir_given_as_a_directory_is_fashion(synthetic_fashion):
    dataset = data_lib.load_dataset(str(synthetic_fashion))
    assert dataset.classes == data_lib.FASHION_CLASSES and dataset.augment == FASHION_FLIP


@pytest.mark.parametrize("dirname", ["fashion-mnist", "mnist", "clothes"])
def test_a_directory_name_decides_nothing(tmp_path, dirname):
    undeclared = data_lib.load_dataset(str(make_idx_dir(tmp_path / "a" / dirname)))
    assert undeclared.classes == tuple("0123456789") and undeclared.augment == data_lib.SPECS["mnist"].augment
    declared = make_idx_dir(tmp_path / "b" / dirname)
    (declared / "dataset.json").write_text('{"source": "fashion-mnist"}')
    dataset = data_lib.load_dataset(str(declared))
    assert dataset.classes == data_lib.FASHION_CLASSES and dataset.augment == FASHION_FLIP


def test_declaration_explicit_fields_win_over_the_source(idx_dir):
    names = [f"kind {i}" for i in range(10)]
    (idx_dir / "dataset.json").write_text(json.dumps(
        {"source": "fashion-mnist", "classes": names, "augment": {"degrees": 5, "shift": 1, "flip": False}}))
    dataset = data_lib.load_dataset(str(idx_dir))
    assert dataset.classes == tuple(names) and dataset.augment == {"degrees": 5.0, "shift": 1, "flip": False}
    (idx_dir / "dataset.json").write_text(json.dumps({"classes": names}))  # classes only: no flips
    assert data_lib.load_dataset(str(idx_dir)).augment == data_lib.SPECS["mnist"].augment


@pytest.mark.parametrize("text, problem", [
    ('{"source": "fashion-mnist",}', r"not valid JSON \(Expecting property name enclosed in double quotes: line 1"),
    ('["fashion-mnist"]', "expected a JSON object with source, classes, augment, mean, std, note, got list"),
    ('{"source": "cifar100"}', r'source must be one of mnist, fashion-mnist, cifar10 .*, got "cifar100"'),
    ('{"source": "cifar10"}', r"mean and std list 3 and 3 values for 1-channel images; give one per channel"),
    ('{"clases": []}', r"unknown key 'clases' \(a declaration has source, classes, augment, mean, std, note\)"),
    ('{"classes": ["a"]}', "classes must be a list of 2 or more distinct non-empty names"),
    ('{"classes": ["a", "a", "b", "c", "d", "e", "f", "g", "h", "i"]}', "classes must be a list of 2 or more distinct"),
    ('{"mean": [0.5], "std": [0]}', r"std must be a list of one number per channel, each from 1e-06 to 1 .*, got \[0\]"),
    ('{"mean": [0.5]}', "declare mean and std together"),
    ('{"augment": {"flip": true}}', 'augment must be an object {"degrees": 0 to 180, "shift": 0 to 13 pixels, '),
    ('{"augment": {"degrees": 0, "shift": 0, "flip": "yes"}}', r'augment must be .*, got {"degrees": 0, .*"yes"}'),
    ('{"augment": {"degrees": -3, "shift": 0, "flip": false}}', "augment must be an object"),
    ('{"augment": {"degrees": 0, "shift": 1.5, "flip": false}}', "augment must be an object"),
    ('{"note": 3}', "note must be a string, got 3"),
])
def test_a_malformed_declaration_gets_one_line_naming_the_file(idx_dir, text, problem):
    path = idx_dir / "dataset.json"
    path.write_text(text)
    message = _expect_one_line(idx_dir, problem)
    assert message.startswith(f"{path}: ")


def test_batches_are_a_seeded_permutation():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28)
    labels = torch.arange(10)
    first = [y for _, y in data_lib.batches(images, labels, 4, torch.Generator().manual_seed(0))]
    again = [y for _, y in data_lib.batches(images, labels, 4, torch.Generator().manual_seed(0))]
    assert [len(y) for y in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(torch.cat(first), labels)


def test_augment_flip_and_identity():
    x = torch.randn(32, 1, 28, 28)
    same = data_lib.augment(x, torch.Generator(), degrees=0, shift=0, flip=False)
    assert torch.allclose(same, x, atol=1e-5)
    out = data_lib.augment(x, torch.Generator().manual_seed(1), degrees=0, shift=0, flip=True)
    flipped = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x)]
    kept = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 32


def test_augment_shift_moves_content():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    out = data_lib.augment(x, torch.Generator().manual_seed(0), degrees=0, shift=2, flip=False)
    centres = [(o[0].sum(0) * torch.arange(28)).sum() / o[0].sum() for o in out]  # column centre of mass
    offsets = {round(c.item() - 13.5) for c in centres}
    assert offsets <= {-2, -1, 0, 1, 2} and len(offsets) > 1


def test_training_stats_normalise_to_zero_mean_unit_std(fashion_small):
    mean, std = data_lib.image_stats(fashion_small.train_images)
    x = data_lib.to_input(fashion_small.train_images, mean, std)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert fashion_small.classes[9] == "Ankle boot"


def test_dataset_pickles_out_of_band_and_trials_never_write_into_it(tmp_path):
    """Through Ray's object store (pickle protocol 5 with buffers) the images travel as shared buffers,
    not inside each trial's payload, and training reads them without writing."""
    import pickle

    import train

    dataset = data_lib.load_dataset(str(make_idx_dir(tmp_path / "idx", n_train=64, n_test=32)))
    buffers = []
    payload = pickle.dumps(dataset, protocol=5, buffer_callback=buffers.append)
    assert len(payload) < 2000 and sum(b.raw().nbytes for b in buffers) >= 64 * 784  # images out of band
    frozen = [bytes(b.raw()) for b in buffers]
    shared = pickle.loads(payload, buffers=[b.raw() for b in buffers])
    assert shared.train_images.data_ptr() in {_address(b) for b in buffers}  # the buffer itself, not a copy
    run = train.TrainingRun({"norm": "bn", "epochs": 1, "threads": 1}, shared)
    run.run_epoch()
    assert [bytes(b.raw()) for b in buffers] == frozen  # nothing written into the shared copy
    assert torch.equal(shared.train_images, dataset.train_images)


def _address(buffer) -> int:
    import numpy as np

    return np.frombuffer(buffer.raw(), dtype=np.uint8).ctypes.data
