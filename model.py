"""The network: one small CNN whose normalisation layer is a constructor argument.

Pure modules only: no data, no I/O, no device moves, no Ray. `REGISTRY` is the one map from a
norm's name to its layer (and, for weight standardisation, its convs), so the variants differ in
exactly that place.
"""
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

@dataclass(frozen=True)
class NetConfig:
    norm: str = "bn"
    # GroupNorm groups. 4 divides every width below and leaves >= 2 channels per group in the
    # narrowest layer; GN's accuracy is flat over a wide range of group counts (Wu & He 2018).
    groups: int = 4
    # conv widths, "M" = 2x2 max-pool. 28 -> 14 -> 7 spatially, then global average pooling.
    # Narrow at 28x28 (where convs cost the most time), two convs per stage: 19,650 parameters.
    widths: tuple = (8, 16, "M", 16, 24, "M", 24, 32)
    num_classes: int = 10
    in_channels: int = 1
    dropout: float = 0.0
    # Block order: "relu-norm" (conv -> ReLU -> norm) or "norm-relu" (conv -> norm -> ReLU). Normalising
    # after the ReLU let GroupNorm and LayerNorm fit small training sets as well as BatchNorm does
    # (docs/validation.md); every variant gets the same order.
    order: str = "relu-norm"

    def to_dict(self):
        return asdict(self)


class _Float32Norm:
    """Mixin: the norm computes in float32 even under autocast.

    Under bf16 autocast the convolutions run in bf16, but a norm's statistics are the numerically
    delicate part (and GroupNorm's bf16 CPU kernel is the slow path), so they stay in float32.
    Outside autocast this is the plain layer, with the same parameters and state_dict keys.
    """

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class BatchNorm2d(_Float32Norm, nn.BatchNorm2d):
    pass


class GroupNorm(_Float32Norm, nn.GroupNorm):
    pass


class GhostBatchNorm2d(BatchNorm2d):
    """BatchNorm whose training-mode statistics come from virtual batches of `virtual_batch` images.

    The batch is cut into chunks of `virtual_batch` images (the last may be smaller) and each chunk is
    batch-normalised on its own, updating the running statistics once per chunk, exactly as BatchNorm
    run on each chunk would. In eval mode it is BatchNorm with running statistics. Same parameters and
    state_dict keys as BatchNorm2d; `virtual_batch` is a constructor argument, not state.
    """

    def __init__(self, num_features: int, virtual_batch: int = 16, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch = virtual_batch

    def forward(self, x):  # x: (N, C, H, W)
        if not self.training:
            return super().forward(x)
        return torch.cat([super(GhostBatchNorm2d, self).forward(chunk) for chunk in x.split(self.virtual_batch)])

    def extra_repr(self):
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"


class WSConv2d(nn.Conv2d):
    """A conv with Weight Standardization (Qiao et al. 2019): every forward standardises each output
    channel's weight over (in, kh, kw), w_hat = (w - mean) / sqrt(var + eps), biased variance.

    Same parameters, state_dict keys and initial weights as nn.Conv2d: only the forward differs. The
    weight is a float32 parameter, so its statistics are computed in float32 even under autocast; the
    convolution itself runs in autocast's dtype like every other conv.
    """

    eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:  # (out, in, kh, kw)
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (self.weight - mean) / torch.sqrt(var + self.eps)

    def forward(self, x):
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def _group_norm(channels: int, groups: int) -> nn.Module:
    if groups < 1 or channels % groups:
        raise ValueError(
            f"groups={groups} does not divide {channels} channels; "
            f"use a group count that divides every width (valid here: {_divisors(channels)})")
    return GroupNorm(groups, channels)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


# Ghost BatchNorm's virtual batch, in images: the batch a BN statistic is taken over in training.
GHOST_BATCH = 16


@dataclass(frozen=True)
class Norm:
    """One registry entry: how to build the layer, what it is, where it comes from."""
    make: Callable[[int, int], nn.Module]  # (channels, groups) -> the norm layer after a conv
    description: str  # one line: what it pools
    reference: str
    uses_groups: bool = False  # reads NetConfig.groups (which must then divide every width)
    batch_statistics: bool = False  # training-mode statistics pool over images: a batch of 1 has none
    weight_standardized: bool = False  # Net builds its convs as WSConv2d instead of nn.Conv2d


# The one map from a norm's name to its layer. NORMS, the CLI help, the error messages and the README's
# table of norms (render_norm_table) all derive from it. A name must not end in "+l1" (the variant suffix).
REGISTRY = {
    "bn": Norm(lambda channels, groups: BatchNorm2d(channels),
               "BatchNorm: per channel, over the batch and pixels (N, H, W); running statistics in eval",
               "Ioffe & Szegedy 2015", batch_statistics=True),
    "gn": Norm(_group_norm,
               "GroupNorm: per image, over `--groups` groups of channels and their pixels",
               "Wu & He 2018", uses_groups=True),
    "ln": Norm(lambda channels, groups: GroupNorm(1, channels),
               "LayerNorm over (C, H, W) of each image, as GroupNorm(1, C): per-channel affine",
               "Ba et al. 2016"),
    "in": Norm(lambda channels, groups: GroupNorm(channels, channels),
               "InstanceNorm: per image and channel, over its pixels, as GroupNorm(C, C): per-channel affine",
               "Ulyanov et al. 2016"),
    "gbn": Norm(lambda channels, groups: GhostBatchNorm2d(channels, virtual_batch=GHOST_BATCH),
                f"Ghost BatchNorm: BatchNorm over virtual batches of {GHOST_BATCH} images in training; BatchNorm in eval",
                "Hoffer et al. 2017; Summers & Dinneen 2020", batch_statistics=True),
    "bn+ws": Norm(lambda channels, groups: BatchNorm2d(channels),
                  "BatchNorm after weight-standardised convs (each conv's weight standardised per output channel)",
                  "Qiao et al. 2019", batch_statistics=True, weight_standardized=True),
    "gn+ws": Norm(_group_norm,
                  "GroupNorm after weight-standardised convs (each conv's weight standardised per output channel)",
                  "Qiao et al. 2019", uses_groups=True, weight_standardized=True),
    "none": Norm(lambda channels, groups: nn.Identity(),
                 "no normalisation: the control", "-"),
}
NORMS = tuple(REGISTRY)


def norm_entry(norm: str) -> Norm:
    """The registry entry of `norm`; an unknown name raises ValueError listing the valid ones."""
    if norm not in REGISTRY:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return REGISTRY[norm]


def make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    """The norm layer that follows a conv of `channels` outputs.

    "ln" is layer norm over (C, H, W) of each sample, implemented as GroupNorm(1, C): identical
    statistics to nn.LayerNorm([C, H, W]) but with per-channel affine parameters (2C), whereas
    nn.LayerNorm([C, H, W]) learns an affine per element (2CHW), multiplying the parameter count
    and tying the net to one input size.
    """
    return norm_entry(norm).make(channels, groups)


class Net(nn.Module):
    """conv3x3 -> ReLU -> norm blocks (config.order), max-pools between stages, global average pool,
    linear head.

    Convs have no bias: each conv after the first reads a norm's output, whose shift (beta) does a
    bias's work, and keeping it off in every variant (the "none" control too) keeps the variants
    identical except for the norm layers.
    """

    def __init__(self, config: NetConfig = NetConfig()):
        super().__init__()
        self.config = config
        norm = norm_entry(config.norm)
        conv = WSConv2d if norm.weight_standardized else nn.Conv2d  # same parameters and initial weights
        widths = [w for w in config.widths if w != "M"]
        if norm.uses_groups:
            bad = [w for w in widths if config.groups < 1 or w % config.groups]
            if bad:
                common = [d for d in range(1, min(widths) + 1) if all(w % d == 0 for w in widths)]
                raise ValueError(
                    f"groups={config.groups} does not divide the channel counts {bad}; "
                    f"valid group counts for widths {widths}: {', '.join(map(str, common))}")
        layers, channels = [], config.in_channels
        for width in config.widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            norm_act = [make_norm(config.norm, width, config.groups), nn.ReLU(inplace=True)]
            if config.order == "relu-norm":
                norm_act.reverse()
            layers += [conv(channels, width, 3, padding=1, bias=False), *norm_act]
            channels = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(channels, config.num_classes)

    def forward(self, x):  # x: (B, 1, 28, 28) normalised images
        x = self.features(x)  # (B, C, 7, 7)
        x = x.mean(dim=(2, 3))  # (B, C) global average pool
        return self.head(self.dropout(x))  # (B, num_classes) logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(norm: str = "bn", **overrides) -> Net:
    return Net(NetConfig(norm=norm, **overrides))


def render_norm_table() -> str:
    """The README's table of norms (between its `<!-- norms -->` markers), rendered from REGISTRY."""
    rows = ["| norm | what it normalises | parameters (default net) | reference |", "|---|---|---|---|"]
    for name, entry in REGISTRY.items():
        rows.append(f"| `{name}` | {entry.description} | {count_parameters(build_model(name)):,} | {entry.reference} |")
    return "\n".join(rows)
