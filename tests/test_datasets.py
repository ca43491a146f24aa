"""Datasets as specs: CIFAR-10's python batches (read offline from a tiny archive in CIFAR's own format),
image folders (colour and grayscale), per-channel statistics. (Sweeps of ResNet-20 and a user's torchvision
ResNet on them: tests/test_sweeps.py.)"""
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import data as data_lib
import train

matplotlib.use("Agg")


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    # CIFAR's own layout: rows of 3072 bytes, 1024 red, then green, then blue pixels, each plane row-major
    return {"batch_label": f"batch {seed}", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}


def write_cifar_archive(data_dir: Path, per_batch=4) -> dict:
    """cifar-10-python.tar.gz as torchvision downloads it, tiny: five training batches and a test batch."""
    batches = {name: _cifar_batch(per_batch, i) for i, name in enumerate([*data_lib.CIFAR_FILES["train"], "test_batch"])}
    data_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(data_dir / data_lib.CIFAR_ARCHIVE, "w:gz") as archive:
        members = {**{name: pickle.dumps(batch, protocol=2) for name, batch in batches.items()},
                   "batches.meta": pickle.dumps({"label_names": list(data_lib.CIFAR10_CLASSES)}, protocol=2)}
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{data_lib.CIFAR_FOLDER}/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return batches


def test_cifar10_reads_an_archive_offline_in_cifars_own_format(tmp_path):
    batches = write_cifar_archive(tmp_path / "data")
    dataset = data_lib.load_dataset("cifar10", data_dir=tmp_path / "data")
    assert dataset.train_images.shape == (20, 3, 32, 32) and dataset.test_images.shape == (4, 3, 32, 32)
    assert dataset.channels == 3 and dataset.image_size == (32, 32) and dataset.classes == data_lib.CIFAR10_CLASSES
    first = batches["data_batch_1"]
    # image 0's green plane, row 1, column 2 is byte 1024 + 32 + 2 of its row
    assert dataset.train_images[0, 1, 1, 2] == first["data"][0, 1024 + 32 + 2]
    assert dataset.train_labels[:4].tolist() == first["labels"]
    assert dataset.test_labels.tolist() == batches["test_batch"]["labels"]
    assert dataset.augment == {"degrees": 0.0, "shift": 4, "flip": True}
    assert (dataset.mean, dataset.std) == (data_lib.SPECS["cifar10"].mean, data_lib.SPECS["cifar10"].std)
    # unpacked once: the folder reads again without the archive, and as a directory given by path
    (tmp_path / "data" / data_lib.CIFAR_ARCHIVE).unlink()
    again = data_lib.load_dataset(str(tmp_path / "data" / data_lib.CIFAR_FOLDER))
    assert torch.equal(again.train_images, dataset.train_images) and again.classes == dataset.classes
    assert again.mean == dataset.mean and again.augment == dataset.augment


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_cifar_batch_that_would_run_code_or_is_cut_short_gets_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cifar"
    folder.mkdir()
    for name in [*data_lib.CIFAR_FILES["train"], "test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(2, 0), protocol=2))
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": _RunsCode(), "labels": [0]}))
    with pytest.raises(data_lib.DataError, match=r"data_batch_3: not a CIFAR-10 python batch .*posix.system is not "
                                                 r"allowed in a data file.*re-download") as info:
        data_lib.load_dataset(str(folder))
    assert "\n" not in str(info.value) and not (tmp_path / "pwned").exists()
    whole = pickle.dumps(_cifar_batch(2, 0), protocol=2)
    (folder / "data_batch_3").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(data_lib.DataError, match=r"data_batch_3: not a CIFAR-10 python batch \(\w+"):
        data_lib.load_dataset(str(folder))


@pytest.mark.parametrize("opcode", [b"\x8d", b"\x8e"], ids=["a 2**62-byte string", "2**62 bytes"])
def test_a_cifar_batch_claiming_more_than_it_holds_gets_one_line(tmp_path, opcode):
    folder = tmp_path / "cifar"
    folder.mkdir()
    for name in [*data_lib.CIFAR_FILES["train"], "test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(2, 0), protocol=2))
    # protocol 4: a dict, then a string (BINUNICODE8) or bytes (BINBYTES8) whose 8-byte length says 2**62
    (folder / "data_batch_2").write_bytes(b"\x80\x04}\x94" + opcode + (2 ** 62).to_bytes(8, "little") + b"abc")
    with pytest.raises(data_lib.DataError, match=r"data_batch_2: not a CIFAR-10 python batch \((UnpicklingError|"
                                                 r"MemoryError): .*\); re-download or re-copy the file$") as info:
        data_lib.load_dataset(str(folder))
    assert "\n" not in str(info.value)


def write_image_folder(root: Path, classes=("cat", "dog", "ant"), per_class=(6, 3), size=(12, 10), mode="RGB",
                       seed=0) -> dict:
    """root/train/<class>/<i>.png and root/test/<class>/<i>.png, random pixels; returns {path: array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in zip(data_lib.IMAGE_FOLDER_SPLITS, per_class):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                path = root / split / name / f"{i}.png"
                Image.fromarray(pixels, mode).save(path)
                written[path] = pixels
    return written


def test_an_rgb_image_folder_reads_in_colour_with_its_folders_as_classes(tmp_path):
    written = write_image_folder(tmp_path / "pets")
    ant_test = tmp_path / "pets" / "test" / "ant"
    for path in ant_test.iterdir():  # a test split without one training class still reads
        path.unlink()
    ant_test.rmdir()
    dataset = data_lib.load_dataset(str(tmp_path / "pets"))
    assert dataset.classes == ("ant", "cat", "dog")  # sorted, as torchvision's ImageFolder orders them
    assert dataset.train_images.shape == (18, 3, 10, 12) and dataset.test_images.shape == (6, 3, 10, 12)
    assert dataset.test_labels.tolist() == [1, 1, 1, 2, 2, 2]  # the training split's indices
    cat = tmp_path / "pets" / "train" / "cat" / "0.png"
    index = [i for i, label in enumerate(dataset.train_labels.tolist()) if label == 1][0]
    assert torch.equal(dataset.train_images[index], torch.from_numpy(written[cat]).permute(2, 0, 1))
    # undeclared: no flips (a directory's augmentation is declared, never read from its name)
    assert dataset.augment == data_lib.UNDECLARED.augment and dataset.mean is None


def test_grayscale_folders_are_one_channel_and_a_mixed_folder_is_rgb(tmp_path):
    gray = write_image_folder(tmp_path / "gray", mode="L")
    dataset = data_lib.load_dataset(str(tmp_path / "gray"))
    assert dataset.channels == 1
    path = tmp_path / "gray" / "train" / "ant" / "2.png"
    Image.fromarray(np.stack([gray[path]] * 3, axis=-1), "RGB").save(path)  # one colour image among grayscale
    mixed = data_lib.load_dataset(str(tmp_path / "gray"))
    assert mixed.channels == 3
    first_gray = torch.from_numpy(gray[tmp_path / "gray" / "train" / "ant" / "0.png"])
    assert all(torch.equal(mixed.train_images[0, c], first_gray) for c in range(3))  # repeated into R, G, B


@pytest.mark.parametrize("damage, expected", [
    ("size", r"train/dog/1.png: 7x7 pixels, the other images 12x10 pixels; resize the images to one size"),
    ("corrupt", r"train/cat/0.png: not a readable image .*replace or delete it"),
    ("unknown test class", r"test/bee: class 'bee' is not among the training classes \(ant, cat, dog\)"),
    ("declared classes", r"dataset.json: an image folder's class names are its class folders' names; drop classes"),
    ("no images", r"train: no images \(.*\.png.*\) in class folders ant, cat, dog; add images or delete"),
    ("empty class", r"train: no images \(.*\.png.*\) in class folder cat; add images or delete the empty"),
    ("class of other files", r"train: no images \(.*\) in class folder dog; add images or delete the empty"),
])
def test_a_broken_image_folder_gets_one_line_naming_what_to_fix(tmp_path, damage, expected):
    root = tmp_path / "pets"
    write_image_folder(root)
    if damage == "size":
        Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(root / "train" / "dog" / "1.png")
    elif damage == "corrupt":
        (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG not really")
    elif damage == "unknown test class":
        (root / "test" / "bee").mkdir()
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "test" / "bee" / "0.png")
    elif damage == "declared classes":
        (root / data_lib.DECLARATION).write_text('{"classes": ["a", "b", "c"]}')
    elif damage == "empty class":  # its test images stay: a 3-way head trained on 2 classes
        for path in (root / "train" / "cat").iterdir():
            path.unlink()
    elif damage == "class of other files":
        for path in (root / "train" / "dog").iterdir():
            path.rename(path.with_suffix(".txt"))
    else:
        for path in (root / "train").rglob("*.png"):
            path.unlink()
    with pytest.raises(data_lib.DataError, match=expected) as info:
        data_lib.load_dataset(str(root))
    assert "\n" not in str(info.value)


def _two_classes(root: Path) -> Path:
    """A grayscale 12x10 image folder of classes ant and cat, two training and one test image each."""
    write_image_folder(root, classes=("ant", "cat"), per_class=(2, 1), mode="L")
    return root


def _replace_first(root: Path, image: Image.Image, suffix=".png", **save) -> Path:
    """train/ant/0.png (the first training image) replaced by `image` saved as `suffix`."""
    (root / "train" / "ant" / "0.png").unlink()
    image.save(root / "train" / "ant" / f"0{suffix}", **save)
    return root / "train" / "ant" / f"0{suffix}"


PIXELS = np.random.default_rng(1).random((10, 12))  # in [0, 1), one 12x10 image


@pytest.mark.parametrize("image, suffix, expected", [
    (Image.fromarray((PIXELS * 65535).astype(np.uint16)), ".png", (PIXELS * 65535).astype(np.uint16) / 65535),
    (Image.fromarray((PIXELS * 65535).astype(">u2")), ".tif", (PIXELS * 65535).astype(np.uint16) / 65535),  # I;16B
    (Image.fromarray(PIXELS.astype(np.float32)), ".tif", PIXELS.astype(np.float32)),
], ids=["16-bit grayscale PNG", "16-bit big-endian TIFF", "float TIFF in [0, 1]"])
def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped(tmp_path, image, suffix, expected):
    root = _two_classes(tmp_path / "deep")
    _replace_first(root, image, suffix)
    dataset = data_lib.load_dataset(str(root))
    assert dataset.channels == 1
    assert np.array_equal(dataset.train_images[0, 0].numpy(), np.rint(expected * 255).astype(np.uint8))


def test_a_palette_image_with_transparency_reads_as_its_colours(tmp_path):
    root = _two_classes(tmp_path / "palette")
    palette = Image.fromarray((PIXELS * 3).astype(np.uint8), "P")  # colour indices 0, 1, 2
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    _replace_first(root, palette, transparency=0)
    dataset = data_lib.load_dataset(str(root))
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    assert dataset.channels == 3
    assert torch.equal(dataset.train_images[0].permute(1, 2, 0), colours[torch.from_numpy((PIXELS * 3).astype(np.int64))])


def test_float_pixels_outside_0_1_are_refused_naming_the_file(tmp_path):
    root = _two_classes(tmp_path / "floats")
    path = _replace_first(root, Image.fromarray((PIXELS * 255).astype(np.float32)), ".tif")
    with pytest.raises(data_lib.DataError, match=rf"^{path}: F pixel values from [\d.]+ to 25[\d.]+, but such pixels are "
                                                 rf"read as 0 \(black\) to 1 \(white\); scale the images into that range"):
        data_lib.load_dataset(str(root))


@pytest.mark.parametrize("orientation, upright", [(6, lambda a: np.rot90(a, -1)), (3, lambda a: np.rot90(a, 2))],
                         ids=["rotate 90 (stored 10x12)", "rotate 180"])
def test_exif_orientation_is_applied_before_the_size_check(tmp_path, orientation, upright):
    root = _two_classes(tmp_path / "photos")
    shown = (PIXELS * 255).astype(np.uint8)  # 12x10, as the other images
    stored = np.ascontiguousarray(np.rot90(shown, 1) if orientation == 6 else np.rot90(shown, 2))
    assert np.array_equal(upright(stored), shown)
    exif = Image.Exif()
    exif[0x0112] = orientation  # a camera's Orientation tag: how a viewer turns the stored pixels
    _replace_first(root, Image.fromarray(stored), exif=exif)
    dataset = data_lib.load_dataset(str(root))
    assert np.array_equal(dataset.train_images[0, 0].numpy(), shown)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _garbled_png() -> bytes:
    """A 12x10 PNG whose image data is split in two chunks, the second's type garbled (PIL: SyntaxError)."""
    buffer = io.BytesIO()
    Image.fromarray((PIXELS * 255).astype(np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    start = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[start:start + 4])[0]
    pixels = png[start + 8:start + 8 + length]
    garbled = _png_chunk(b"IDAT", pixels[:20]) + struct.pack(">I", length - 20) + b"ID\xffT" + pixels[20:] + b"0000"
    return png[:start] + garbled + png[start + 12 + length:]


def _bomb_png() -> bytes:
    """A 20000x9100 (182-megapixel) grayscale PNG header: more pixels than PIL opens."""
    header = struct.pack(">IIBBBBB", 20000, 9100, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"")) + \
        _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("content, problem", [
    (_garbled_png(), r"SyntaxError: broken PNG file"),
    (_bomb_png(), r"DecompressionBombError: Image size \(182000000 pixels\) exceeds limit"),
], ids=["garbled chunk", "decompression bomb"])
def test_a_file_pil_refuses_is_one_line_naming_it(tmp_path, content, problem):
    root = _two_classes(tmp_path / "broken")
    path = root / "train" / "cat" / "1.png"
    path.write_bytes(content)
    with pytest.raises(data_lib.DataError, match=rf"^{path}: not a readable image \({problem}.*; replace or delete "
                                                 rf"it$") as info:
        data_lib.load_dataset(str(root))
    assert "\n" not in str(info.value)


def test_hidden_files_and_folders_are_not_data(tmp_path):
    root = _two_classes(tmp_path / "notebook")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / "train" / "ant" / "0.png", root / "train" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # AppleDouble
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    dataset = data_lib.load_dataset(str(root))
    assert dataset.classes == ("ant", "cat") and dataset.train_labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("link, target", [("train/ant/up", ".."), ("train/bee", "../../elsewhere")],
                         ids=["a loop inside a class", "a class folder linked outside"])
def test_a_folder_link_is_refused_in_one_line_naming_it(tmp_path, link, target):
    root = _two_classes(tmp_path / "linked")
    write_image_folder(tmp_path / "elsewhere", classes=("bee",), per_class=(2, 0), mode="L")
    (root / link).symlink_to(target, target_is_directory=True)
    with pytest.raises(data_lib.DataError, match=rf"^{root / link}: a link to a folder \(.*\); an image folder follows "
                                                 rf"none \(one can loop or bring in other classes' images\)") as info:
        data_lib.load_dataset(str(root))
    assert "\n" not in str(info.value)


def test_fewer_than_two_classes_are_refused(tmp_path):
    root = tmp_path / "one"
    write_image_folder(root, classes=("cat",), per_class=(2, 1), mode="L")
    with pytest.raises(data_lib.DataError, match=rf"^{root / 'train'}: 1 class folder \(cat\); a classifier needs two "
                                                 rf"or more, one folder of images per class$"):
        data_lib.load_dataset(str(root))


def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    root = _two_classes(tmp_path / "locked")

    def denied(path):  # what a folder without read permission gives a user who is not root
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data_lib.os, "scandir", denied)
    with pytest.raises(data_lib.DataError, match=rf"^{root / 'train'}: cannot be listed \(Permission denied\)"):
        data_lib.check_dataset(str(root))


@pytest.mark.parametrize("folder, shown", [(b"caf\xe9", "caf\\xe9"), (b"a\nb", "a\\nb"), (b"$x^2$ & \xc3\xa9", "$x^2$ & é")],
                         ids=["latin-1", "newline", "dollars and UTF-8"])
def test_any_class_folder_name_is_a_printable_json_safe_class_name(tmp_path, folder, shown):
    root = _two_classes(tmp_path / "names")
    for split in ("train", "test"):
        os.rename(os.fsencode(root / split / "cat"), os.fsencode(root / split) + b"/" + folder)
    dataset = data_lib.load_dataset(str(root))
    assert set(dataset.classes) == {"ant", shown} and all(name.isprintable() for name in dataset.classes)
    assert json.loads(json.dumps(dataset.classes).encode("utf-8")) == list(dataset.classes)


def test_a_declaration_sets_a_folders_augmentation_and_statistics(tmp_path):
    write_image_folder(tmp_path / "pets")
    (tmp_path / "pets" / data_lib.DECLARATION).write_text(
        '{"augment": {"degrees": 0, "shift": 2, "flip": true}, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}')
    dataset = data_lib.load_dataset(str(tmp_path / "pets"))
    assert dataset.augment == {"degrees": 0.0, "shift": 2, "flip": True}
    run = train.TrainingRun({"epochs": 1, "batch_size": 4}, dataset)
    assert run.mean.tolist() == pytest.approx([0.5, 0.4, 0.3]) and run.std.tolist() == pytest.approx([0.2, 0.2, 0.25])
    (tmp_path / "pets" / data_lib.DECLARATION).write_text('{"mean": [0.5], "std": [0.2]}')
    with pytest.raises(data_lib.DataError, match=r"mean and std list 1 and 1 values for 3-channel images; give one per channel"):
        data_lib.load_dataset(str(tmp_path / "pets"))


def test_colour_training_normalises_per_channel_and_its_checkpoint_rebuilds(tmp_path):
    write_image_folder(tmp_path / "pets", per_class=(8, 3))
    dataset = data_lib.load_dataset(str(tmp_path / "pets"))
    run = train.TrainingRun({"epochs": 1, "batch_size": 8, "norm": "gn"}, dataset)
    x = dataset.train_images.float() / 255
    assert run.mean.tolist() == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert run.std.tolist() == pytest.approx([x[:, c].std().item() for c in range(3)], abs=1e-6)
    inputs = data_lib.to_input(dataset.train_images, run.mean, run.std)
    assert inputs.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # every channel centred on its own mean
    metrics = run.run_epoch()
    assert metrics["epoch"] == 1 and 0 <= metrics["test_acc"] <= 1
    run.save(tmp_path / "state.pt")
    model, state = train.model_from_checkpoint(tmp_path / "state.pt")
    assert state["net_config"]["in_channels"] == 3 and state["net_config"]["num_classes"] == 3
    expected = train.evaluate(run.model, run.eval_x, run.eval_y, mean=run.mean, std=run.std)["preds"]
    again = train.evaluate(model, dataset.test_images, dataset.test_labels, **state["input_stats"])["preds"]
    assert torch.equal(expected, again)


def test_augmentation_pads_each_channel_with_its_own_background():
    x = torch.stack([torch.full((8, 8), -1.0), torch.full((8, 8), -3.0), torch.full((8, 8), 2.0)])[None]  # (1, 3, 8, 8)
    x[:, :, 3:5, 3:5] += 5  # a bright square in each channel
    out = data_lib.augment(x, torch.Generator().manual_seed(0), degrees=45.0, shift=2, flip=True)
    corners = out[0, :, 0, 0]
    assert torch.allclose(corners, torch.tensor([-1.0, -3.0, 2.0]))


def test_the_misclassified_grid_draws_colour_in_colour(tmp_path):
    import analysis

    write_image_folder(tmp_path / "pets")
    dataset = data_lib.load_dataset(str(tmp_path / "pets"))
    sample = {"classes": dataset.classes, "indices": list(range(3)), "images": dataset.test_images[:3],
              "true": [0, 1, 2], "pred": [1, 2, 0], "confidence": [0.5] * 3, "variant": "bn", "epoch": 1, "acc": 0.5}
    fig = analysis.plot_misclassified(sample)
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (10, 12, 3) and np.array_equal(np.asarray(shown), dataset.test_images[0].permute(1, 2, 0).numpy())
