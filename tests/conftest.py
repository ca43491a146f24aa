"""Shared fixtures: synthetic idx files for fast tests, a real Fashion-MNIST subset for learning tests."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data as data_lib  # noqa: E402


def make_idx_dir(directory: Path, n_train=64, n_test=32, gz=True, seed=0) -> Path:
    """A directory holding MNIST's four idx files with random images and labels."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        image_stem, label_stem = data_lib.SPLIT_FILES[split]
        data_lib.write_idx(directory / (image_stem + ext), torch.randint(0, 256, (n, 28, 28), generator=g), data_lib.IMAGE_MAGIC)
        data_lib.write_idx(directory / (label_stem + ext), torch.randint(0, 10, (n,), generator=g), data_lib.LABEL_MAGIC)
    return directory


@pytest.fixture
def idx_dir(tmp_path):
    return make_idx_dir(tmp_path / "idx")


@pytest.fixture(scope="session")
def smoke_experiment(tmp_path_factory):
    """A real 4-variant x 2-epoch sweep on a Fashion-MNIST subset (tune_main.py --smoke-test)."""
    import tune_main

    storage = tmp_path_factory.mktemp("results")
    code = tune_main.main(["--smoke-test", "--storage-path", str(storage), "--name", "e2e", "--cpus-per-trial", "2"])
    assert code == 0
    return storage / "e2e"


@pytest.fixture(scope="session")
def fashion():
    """The full real Fashion-MNIST (Debian's dataset-fashion-mnist, or torchvision's download)."""
    return data_lib.load_dataset("fashion-mnist", data_dir=Path(__file__).resolve().parents[1] / "data")


@pytest.fixture(scope="session")
def fashion_small(fashion):
    """5,000 training and 2,000 test images of real Fashion-MNIST."""
    return fashion.subset(5000, 2000)
