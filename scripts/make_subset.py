"""Write small MNIST-format datasets for checking defaults outside the regime they were tuned in.

  python scripts/make_subset.py fashion DIR --per-class 400 --seed 0          # 4,000 train images, full test split
  python scripts/make_subset.py fashion DIR --per-class 400 --seed 1 --val     # test split = 10k held-out *training* images
  python scripts/make_subset.py fashion DIR --per-class 400 --test-per-class 200  # and 2,000 test images
  python scripts/make_subset.py digits DIR                                    # scikit-learn's 8x8 digits at 28x28

Training images are drawn per class with numpy's default_rng(seed), `choice` without replacement
within each class, classes 0..9 in turn, indices sorted. With --val the 10,000-image validation
split of `train.py --val-size 10000` (data.validation_split, data.VALIDATION_SEED) becomes the test split and
the subset is drawn from the other 50,000 images, so defaults are chosen without the test split.
Each directory gets a dataset.json beside its idx files (data.DECLARATION): the class names and the
augmentation of the data it was drawn from, so that a subset of Fashion-MNIST is labelled as clothes.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as data_lib  # noqa: E402

VAL_SIZE = 10_000  # as train.py --val-size 10000 holds out (data.VALIDATION_SEED)


def per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    labels = labels.numpy()
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return torch.from_numpy(np.sort(np.concatenate(picks)))


def fashion(args):
    ds = data_lib.load_dataset("fashion-mnist")
    train_x, train_y, test_x, test_y = ds.train_images, ds.train_labels, ds.test_images, ds.test_labels
    if args.val:
        train_x, train_y, test_x, test_y = data_lib.validation_split(train_x, train_y, VAL_SIZE)
    idx = per_class(train_y, args.per_class, args.seed)
    if args.test_per_class:  # a smaller test split, drawn the same way (cheaper evaluation every epoch)
        test_idx = per_class(test_y, args.test_per_class, args.seed)
        test_x, test_y = test_x[test_idx], test_y[test_idx]
    return train_x[idx], train_y[idx], test_x, test_y


def digits(args):
    """scikit-learn's 1,797 real 8x8 digits (0-16 grey levels), upsampled into MNIST's 20x20 box in 28x28."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8) in [0, 1]
    images = F.pad(F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    images = (images.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    per = min(int((labels == c).sum()) for c in range(10))
    train_idx = per_class(labels, args.per_class or (2 * per) // 3, args.seed)
    test_mask = torch.ones(len(labels), dtype=torch.bool)
    test_mask[train_idx] = False
    return images[train_idx], labels[train_idx], images[test_mask], labels[test_mask]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=("fashion", "digits"))
    parser.add_argument("out", type=Path, help="directory to write the four idx files into")
    parser.add_argument("--per-class", type=int, default=0,
                        help="training images per class (fashion: required; digits: default 2/3 of the rarest class)")
    parser.add_argument("--seed", type=int, default=0, help="numpy default_rng seed of the draw")
    parser.add_argument("--val", action="store_true", help="fashion: test split = held-out training images")
    parser.add_argument("--test-per-class", type=int, default=0,
                        help="fashion: keep only this many test images per class (default: the whole test split)")
    args = parser.parse_args(argv)
    if args.source == "fashion" and args.per_class < 1:
        parser.error("fashion needs --per-class N (N >= 1)")
    train_x, train_y, test_x, test_y = (fashion if args.source == "fashion" else digits)(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for (image_stem, label_stem), images, labels in zip(data_lib.SPLIT_FILES.values(), (train_x, test_x),
                                                        (train_y, test_y)):  # gzipped idx files, grayscale only
        data_lib.write_idx(args.out / f"{image_stem}.gz", images.reshape(len(images), *images.shape[-2:]),
                           data_lib.IMAGE_MAGIC)
        data_lib.write_idx(args.out / f"{label_stem}.gz", labels, data_lib.LABEL_MAGIC)
    # What the subset is, beside its idx files: class names and augmentation of the data it came from.
    note = (f"{len(train_y)} train / {len(test_y)} test images made by scripts/make_subset.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    # scikit-learn's digits are not MNIST, but digits all the same: named and augmented as MNIST's
    spec = data_lib.SPECS["fashion-mnist" if args.source == "fashion" else "mnist"]
    declared = {"note": note, **({"source": "fashion-mnist"} if args.source == "fashion" else {}),
                "classes": list(spec.classes), "augment": spec.augment}
    (args.out / data_lib.DECLARATION).write_text(json.dumps(declared, indent=2) + "\n")
    data_lib.read_declaration(args.out)  # what it wrote reads back
    print(f"{args.out}: {len(train_y)} train / {len(test_y)} test images, {data_lib.DECLARATION} "
          f"({'Fashion-MNIST' if args.source == 'fashion' else 'digit'} class names)")


if __name__ == "__main__":
    main()
