"""The nets and their norms, pure modules (no data, I/O, devices or Ray). `REGISTRY` maps a norm's name to its layer:
the variants differ only there. `build_net` builds every net, built-in (`MODELS`) or a user's, with `norm_layer=`."""
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from errors import ModelError


@dataclass(frozen=True)
class NetConfig:
    """What a checkpoint saves to rebuild its net. `widths`, `order` and `dropout` shape the small net only."""
    norm: str = "bn"
    model: str = "small"  # a built-in net (MODELS) or a user's builder, "path/to/file.py:build" or "module:build"
    groups: int = 4  # GroupNorm groups: 4 divides every width below; GN is flat over group counts (Wu & He)
    widths: tuple = (8, 16, "M", 16, 24, "M", 24, 32)  # conv widths, "M": 2x2 max-pool (28 -> 14 -> 7)
    num_classes: int = 10
    in_channels: int = 1
    dropout: float = 0.0
    order: str = "relu-norm"  # conv -> ReLU -> norm, or "norm-relu"; relu-norm lets GN and LN fit as well as BN
    to_dict = asdict  # what a checkpoint saves

    @classmethod
    def from_dict(cls, saved: dict) -> "NetConfig":
        return cls(**{**saved, "widths": tuple(saved["widths"])})


class _Float32Norm:
    """Mixin: the norm computes in float32 under autocast (statistics are delicate; bf16 GroupNorm is slow on CPU)."""

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
    """BatchNorm on each chunk of `virtual_batch` images in training (the last may be smaller), BatchNorm in eval."""

    def __init__(self, num_features: int, virtual_batch: int = 16, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch = virtual_batch

    def forward(self, x):  # x: (N, C, H, W)
        if not self.training:
            return super().forward(x)
        return torch.cat([super(GhostBatchNorm2d, self).forward(chunk) for chunk in x.split(self.virtual_batch)])


class WSConv2d(nn.Conv2d):
    """Weight Standardization (Qiao et al. 2019): each output channel's weight as (w - mean) / sqrt(var + eps) over
    (in, kh, kw), biased variance. Same parameters, state and init as nn.Conv2d."""
    eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:  # (out, in, kh, kw)
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        return (self.weight - mean) / torch.sqrt(var + self.eps)

    def forward(self, x):
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class GroupsError(ValueError):
    """--groups does not divide a norm layer's channel count."""


def _group_norm(channels: int, groups: int) -> nn.Module:
    if groups < 1 or channels % groups:
        raise GroupsError(f"groups={groups} does not divide {channels} channels")
    return GroupNorm(groups, channels)


GHOST_BATCH = 16  # Ghost BatchNorm's virtual batch, in images


@dataclass(frozen=True)
class Norm:
    make: Callable[[int, int], nn.Module]  # (channels, groups) -> the norm layer after a conv
    description: str  # one line: what it pools
    reference: str
    batch_statistics: bool = False  # training-mode statistics pool over images: a batch of 1 has none
    weight_standardized: bool = False  # build_net turns the net's convs into WSConv2d


# The one map from a norm's name (never ending in "+l1") to its layer. "ln" is GroupNorm(1, C): nn.LayerNorm([C, H,
# W])'s statistics with a per-channel affine (2C parameters, not 2CHW) that ties the net to no input size.
REGISTRY = {
    "bn": Norm(lambda channels, groups: BatchNorm2d(channels),
               "BatchNorm: per channel, over the batch and pixels (N, H, W); running statistics in eval",
               "Ioffe & Szegedy 2015", batch_statistics=True),
    "gn": Norm(_group_norm, "GroupNorm: per image, over `--groups` groups of channels and their pixels",
               "Wu & He 2018"),
    "ln": Norm(lambda channels, groups: GroupNorm(1, channels),
               "LayerNorm over (C, H, W) of each image, as GroupNorm(1, C): per-channel affine", "Ba et al. 2016"),
    "in": Norm(lambda channels, groups: GroupNorm(channels, channels),
               "InstanceNorm: per image and channel, over its pixels, as GroupNorm(C, C): per-channel affine",
               "Ulyanov et al. 2016"),
    "gbn": Norm(lambda channels, groups: GhostBatchNorm2d(channels, virtual_batch=GHOST_BATCH), f"Ghost BatchNorm: "
                f"BatchNorm over virtual batches of {GHOST_BATCH} images in training; BatchNorm in eval",
                "Hoffer et al. 2017; Summers & Dinneen 2020", batch_statistics=True),
    "bn+ws": Norm(lambda channels, groups: BatchNorm2d(channels),
                  "BatchNorm after weight-standardised convs (each conv's weight standardised per output channel)",
                  "Qiao et al. 2019", batch_statistics=True, weight_standardized=True),
    "gn+ws": Norm(_group_norm,
                  "GroupNorm after weight-standardised convs (each conv's weight standardised per output channel)",
                  "Qiao et al. 2019", weight_standardized=True),
    "none": Norm(lambda channels, groups: nn.Identity(), "no normalisation: the control", "-"),
}
NORMS = tuple(REGISTRY)


def norm_entry(norm: str) -> Norm:
    """The registry entry of `norm`; an unknown name raises ValueError listing the valid ones."""
    if norm not in REGISTRY:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return REGISTRY[norm]


def norm_layer(norm: str, groups: int = 4) -> Callable[[int], nn.Module]:
    """torchvision's `norm_layer`: channels -> the norm's layer. ValueError: unknown norm; GroupsError: see groups."""
    return partial(norm_entry(norm).make, groups=groups)


class Net(nn.Module):
    """The default net ("small"): conv3x3 -> ReLU -> norm blocks (`order`), max-pools between stages, global average
    pool, linear head; input (B, in_channels, H >= 4, W >= 4). Convs have no bias in every variant ("none" too):
    a norm's shift does a bias's work. With in and "relu-norm" the output is constant (train.preflight refuses it)."""

    def __init__(self, norm_layer: Callable[[int], nn.Module] = BatchNorm2d, in_channels: int = 1,
                 num_classes: int = 10, widths: tuple = NetConfig.widths, order: str = NetConfig.order,
                 dropout: float = 0.0):
        super().__init__()
        layers, channels = [], in_channels
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            norm_act = [norm_layer(width), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       *(norm_act[::-1] if order == "relu-norm" else norm_act)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):  # x: (B, C, H, W) normalised images
        x = self.features(x).mean(dim=(2, 3))  # (B, C', H/4, W/4), global average pool -> (B, C')
        return self.head(self.dropout(x))  # (B, num_classes) logits


class BasicBlock(nn.Module):
    """Two 3x3 convs, each followed by a norm, and a parameter-free shortcut (He et al. 2016, option A: identity,
    or stride-2 subsampling with zero-padded channels where the block widens)."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = norm_layer(channels)
        self.stride, self.pad = stride, channels - in_channels

    def forward(self, x):  # (B, C_in, H, W) -> (B, C, H / stride, W / stride)
        out = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.pad))  # zero channels appended
        return torch.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, section 4.2): a 3x3 conv of 16 channels, three stages of three BasicBlocks at 16,
    32 and 64 channels (stride 2 between), global average pooling, a linear head; 19 norm layers."""

    def __init__(self, norm_layer: Callable[[int], nn.Module] = BatchNorm2d, in_channels: int = 3,
                 num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), norm_layer(16),
                                  nn.ReLU(inplace=True))
        widths = [width for width in (16, 32, 64) for _ in range(blocks_per_stage)]  # stride 2 where a stage widens
        self.blocks = nn.Sequential(*(BasicBlock(before, width, 1 + (width != before), norm_layer)
                                      for before, width in zip([16, *widths], widths)))
        self.head = nn.Linear(widths[-1], num_classes)
        for module in self.modules():  # He et al. 2015's init, as torchvision's ResNets use
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # x: (B, C, H, W) normalised images
        x = self.blocks(self.stem(x))  # (B, 64, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))  # (B, num_classes) logits


MODELS = {  # built-in nets: name -> (builder, one line for --help and the README); a user's is called as these are
    "small": (Net, "the default: 6 convs of 8-32 channels, 6 norm layers, 19,650 parameters (bn, 1 channel)"),
    "resnet20": (ResNet20, "ResNet-20 (He et al. 2016): 19 convs of 16-64 channels, 19 norm layers, "
                           "269,722 parameters (bn, 3 channels)"),
}


def build_net(config: NetConfig, builder: Callable | None = None) -> nn.Module:
    """The net `config` describes, by `builder` (default: MODELS'), its norm as `norm_layer`, convs WSConv2d where the
    norm says so. ValueError: unknown norm; GroupsError; ModelError: no nn.Module built or norm_layer never called."""
    entry, builder = norm_entry(config.norm), builder or MODELS[config.model][0]
    extra = {"widths": config.widths, "order": config.order, "dropout": config.dropout} if builder is Net else {}
    widths, refused = [], []

    def layer(channels: int) -> nn.Module:  # notes what --groups refuses, so that the error names every width
        widths.append(channels)
        try:
            return entry.make(channels, config.groups)
        except GroupsError:
            refused.append(channels)
            return GroupNorm(1, channels)  # a stand-in, for the build to finish
    net = builder(norm_layer=layer, in_channels=config.in_channels, num_classes=config.num_classes, **extra)
    if not isinstance(net, nn.Module):
        raise ModelError(f"--model {config.model} returned a {type(net).__name__}, not a net; a builder must return "
                         f"an nn.Module")
    if not widths:  # e.g. torchvision's resnet18(num_classes=...) without norm_layer=norm_layer
        raise ModelError(f"--model {config.model} never called the norm_layer it was given, so every variant would "
                         f"train the same net; build each norm layer as norm_layer(channels)")
    if refused:
        valid = [d for d in range(1, min(widths) + 1) if all(w % d == 0 for w in widths)]
        raise GroupsError(f"groups={config.groups} does not divide the channel counts {sorted(set(refused))}; valid "
                          f"group counts for this net's norm layers ({', '.join(map(str, sorted(set(widths))))} "
                          f"channels): {', '.join(map(str, valid))}")
    if entry.weight_standardized:  # every conv, as Qiao et al. 2019 apply WS
        for module in net.modules():
            if type(module) is nn.Conv2d:  # WSConv2d adds no state, only its forward: the swap keeps every tensor
                module.__class__ = WSConv2d
    return net


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(norm: str = "bn", **overrides) -> nn.Module:
    """A built-in net (default: the small one) with `norm`; `overrides` are NetConfig's other fields."""
    return build_net(NetConfig(norm=norm, **overrides))
