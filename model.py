"""The network: one small CNN whose normalisation layer is a constructor argument.

Pure modules only: no data, no I/O, no device moves, no Ray. `make_norm` is the one place
that maps a norm name to a layer, so the variants differ in exactly that place.
"""
from dataclasses import asdict, dataclass

import torch
from torch import nn

NORMS = ("bn", "gn", "ln", "none")


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


def make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    """The single name -> layer map.

    "ln" is layer norm over (C, H, W) of each sample, implemented as GroupNorm(1, C): identical
    statistics to nn.LayerNorm([C, H, W]) but with per-channel affine parameters (2C), whereas
    nn.LayerNorm([C, H, W]) learns an affine per element (2CHW), multiplying the parameter count
    and tying the net to one input size.
    """
    if norm == "bn":
        return BatchNorm2d(channels)
    if norm == "gn":
        if groups < 1 or channels % groups:
            raise ValueError(
                f"groups={groups} does not divide {channels} channels; "
                f"use a group count that divides every width (valid here: {_divisors(channels)})")
        return GroupNorm(groups, channels)
    if norm == "ln":
        return GroupNorm(1, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


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
        widths = [w for w in config.widths if w != "M"]
        if config.norm == "gn":
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
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), *norm_act]
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
