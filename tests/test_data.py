import gzip

import pytest
import torch

import data as data_lib
from conftest import make_idx_dir
from data import write_idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    directory = make_idx_dir(tmp_path / "d", n_train=50, n_test=20, gz=gz, seed=3)
    dataset = data_lib.load_dataset(str(directory))
    assert dataset.train_images.shape == (50, 28, 28) and dataset.train_images.dtype == torch.uint8
    assert dataset.test_labels.shape == (20,) and dataset.test_labels.dtype == torch.int64
    g = torch.Generator().manual_seed(3)
    assert torch.equal(dataset.train_images, torch.randint(0, 256, (50, 28, 28), generator=g).to(torch.uint8))
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


def test_images_not_28x28(idx_dir):
    write_idx(_path(idx_dir), torch.zeros(64, 32, 32), data_lib.IMAGE_MAGIC)
    _expect_one_line(idx_dir, r"images are \(32, 32\), expected 28x28")


def test_missing_file_and_unknown_name(idx_dir, tmp_path):
    _path(idx_dir).unlink()
    _expect_one_line(idx_dir, "no train-images-idx3-ubyte")
    with pytest.raises(data_lib.DataError, match="unknown dataset 'cifar'; use one of mnist, fashion-mnist"):
        data_lib.load_dataset("cifar")


def test_offline_download_error_names_offline_options(tmp_path, monkeypatch):
    import torchvision.datasets

    def refuse(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(torchvision.datasets, "MNIST", refuse)
    with pytest.raises(data_lib.DataError, match="could not download mnist .* dataset-fashion-mnist") as info:
        data_lib.load_dataset("mnist", data_dir=tmp_path)
    assert "\n" not in str(info.value)


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
