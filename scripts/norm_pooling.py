"""Draw docs/norm_pooling.png: which (sample, channel) cells each of the 8 built-in norms pools for one mean and
variance. Documentation, not analysis: `python scripts/norm_pooling.py [OUT.png]`."""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import NORMS  # noqa: E402

N, C, GROUPS, GHOST = 4, 8, 4, 2  # a batch of 4 images, 8 channels; gbn's virtual batch drawn as 2 images
channel, sample = np.tile(np.arange(C), (N, 1)), np.tile(np.arange(N)[:, None], (1, C))
bn, gn = channel, sample * GROUPS + channel // (C // GROUPS)
WS = "\n+ each conv's weight standardised per output channel"
LAYOUTS = {  # norm -> (set of statistics per cell (N, C), what it pools); -1: no statistics
    "bn": (bn, "per channel, over N, H, W"),
    "gn": (gn, f"per image and group of C/G channels ({GROUPS} groups)"),
    "ln": (sample, "per image, over C, H, W"),
    "in": (sample * C + channel, "per image and channel, over H, W"),
    "gbn": ((sample // GHOST) * C + channel, f"per channel and virtual batch ({GHOST} images here, 16 in training)"),
    "bn+ws": (bn, "as bn" + WS),
    "gn+ws": (gn, "as gn" + WS),
    "none": (np.full((N, C), -1), "nothing: no statistics"),
}
assert set(LAYOUTS) == set(NORMS), "a norm was added to model.REGISTRY: draw it here too"


COLOURS = ListedColormap([*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors])  # 40: in's 32 sets apart


def main(out=Path(__file__).resolve().parents[1] / "docs" / "norm_pooling.png"):
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.6))
    for ax, norm in zip(axes.flat, NORMS):
        ids, what = LAYOUTS[norm]
        ax.imshow(np.ma.masked_less(ids, 0), cmap=COLOURS, vmin=0, vmax=COLOURS.N - 1, aspect="auto")
        ax.set_xticks(range(C), [f"c{j}" for j in range(C)], fontsize=8)
        ax.set_yticks(range(N), [f"n{i}" for i in range(N)], fontsize=8)
        ax.set_xticks(np.arange(-0.5, C), minor=True)
        ax.set_yticks(np.arange(-0.5, N), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set(xlabel="channel C", ylabel="image N")
        ax.set_title(f"{norm}: {what}", fontsize=9)
    fig.suptitle("What each norm pools for one mean and variance (a batch N, C, H×W; a cell spans all H×W pixels "
                 "of one image's channel); one colour = one set of statistics", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
