import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train
from conftest import ROOT
from model import (NORMS, REGISTRY, BatchNorm2d, GhostBatchNorm2d, Net, ResNet20, WSConv2d, build_model,
                   count_parameters, norm_layer)

NORMED = ("bn", "gn", "ln", "in", "gbn")  # the norms whose convs are plain nn.Conv2d


@pytest.mark.parametrize("norm", NORMS)
def test_output_shape_and_size(norm):
    model = build_model(norm).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert count_parameters(model) < 20_000


def _layers(model):
    return [(type(m), tuple(p.shape for p in m.parameters(recurse=False))) for m in model.modules()
            if not isinstance(m, (nn.Sequential, Net))]


@pytest.mark.parametrize("norm", NORMED)
def test_variants_differ_only_in_norm_layers(norm):
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.Identity)
    control = [layer for layer in _layers(build_model("none"))]
    variant = _layers(build_model(norm))
    assert len(control) == len(variant)
    differing = [(a, b) for a, b in zip(control, variant) if a != b]
    assert differing, "the variant should have norm layers"
    assert all(a[0] is nn.Identity and issubclass(b[0], norm_types) for a, b in differing)


def test_norm_layer_kinds():
    assert isinstance(norm_layer("bn", 4)(8), nn.BatchNorm2d)
    gn = norm_layer("gn", 4)(8)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    ln = norm_layer("ln", 4)(8)
    # layer norm over (C, H, W) with per-channel affine: 2C parameters
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1 and count_parameters(ln) == 16


def test_ln_matches_layer_norm_over_chw():
    x = torch.randn(2, 8, 5, 5)
    expected = nn.functional.layer_norm(x, x.shape[1:])
    assert torch.allclose(norm_layer("ln", 4)(8)(x), expected, atol=1e-5)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match="valid norms: bn, gn, ln, in, gbn, bn\\+ws, gn\\+ws, none"):
        build_model("batchnorm")


def test_groups_must_divide_every_width():
    with pytest.raises(ValueError, match=r"groups=3 does not divide .*valid group counts .*: 1, 2, 4, 8"):
        build_model("gn", groups=3)
    with pytest.raises(ValueError, match="groups=16"):
        build_model("gn", groups=16)  # divides 16, 32 but not the first conv's 8
    build_model("bn", groups=3)  # groups only matter for gn


def test_custom_widths_derive_head_size():
    model = build_model("gn", groups=2, widths=(4, "M", 6))
    assert model.head.in_features == 6
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_parameter_counts_and_state_dict_keys():
    """Every norm but the control has the same 19,650 parameters, and the same state_dict keys as its
    plain counterpart: weight standardisation and ghost batches add no parameters or buffers."""
    counts = {norm: count_parameters(build_model(norm)) for norm in NORMS}
    assert counts == {**{norm: 19_650 for norm in NORMS}, "none": 19_410}
    keys = {norm: list(build_model(norm).state_dict()) for norm in NORMS}
    assert keys["gbn"] == keys["bn+ws"] == keys["bn"]
    assert keys["in"] == keys["gn+ws"] == keys["ln"] == keys["gn"]


def test_registry_flags_match_the_layers():
    """The entry's flags say what the built net is: BatchNorm layers (a batch of 1 is refused) and WS convs."""
    for norm, entry in REGISTRY.items():
        model = build_model(norm)
        assert entry.batch_statistics == bool(train.batchnorms(model)), norm
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 6 and all(isinstance(m, WSConv2d) == entry.weight_standardized for m in convs), norm
        assert entry.description and "\n" not in entry.description and entry.reference
        assert not norm.endswith("+l1")  # the variant grammar's suffix stays unambiguous


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "none"])
def test_norms_compute_in_float32_under_autocast(norm):
    layer = norm_layer(norm, 4)(8).train()
    x = torch.randn(4, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, layer(x.bfloat16().float()), atol=1e-5)


def test_in_is_instance_norm_with_per_channel_affine():
    layer = norm_layer("in", 4)(8)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 8 and count_parameters(layer) == 16
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2), layer.bias.uniform_(-1, 1)
    x = torch.randn(3, 8, 5, 5)
    # reference: each (image, channel) over its own pixels, biased variance, eps 1e-5
    mean, var = x.mean(dim=(2, 3), keepdim=True), x.var(dim=(2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight[:, None, None] + layer.bias[:, None, None]
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer(x), F.instance_norm(x, weight=layer.weight, bias=layer.bias), atol=1e-5)


def _bn_reference(x, weight, bias, eps=1e-5):
    """Training-mode BatchNorm by hand: per channel over (N, H, W), biased variance."""
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def test_ghost_bn_trains_on_virtual_batches_and_evaluates_as_bn():
    torch.manual_seed(0)
    ghost = norm_layer("gbn", 4)(8)
    assert isinstance(ghost, GhostBatchNorm2d) and ghost.virtual_batch == 16
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 2), ghost.bias.uniform_(-1, 1)
    x = torch.randn(32, 8, 5, 5) * 3 + torch.arange(32.)[:, None, None, None]  # halves with different statistics
    bn = nn.BatchNorm2d(8)
    bn.load_state_dict(ghost.state_dict())
    out = ghost.train()(x)
    # train mode: BN applied separately to each half of 16 images, by hand and by nn.BatchNorm2d
    expected = torch.cat([_bn_reference(half, ghost.weight, ghost.bias) for half in x.split(16)])
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, _bn_reference(x, ghost.weight, ghost.bias), atol=1e-2)  # not whole-batch BN
    assert torch.allclose(out, torch.cat([bn.train()(half) for half in x.split(16)]), atol=1e-5)
    # the running statistics are updated as BatchNorm updates them, once per virtual batch
    assert torch.allclose(ghost.running_mean, bn.running_mean) and torch.allclose(ghost.running_var, bn.running_var)
    assert ghost.num_batches_tracked == bn.num_batches_tracked == 2
    # eval mode: nn.BatchNorm2d's output with the same running statistics
    assert torch.allclose(ghost.eval()(x), bn.eval()(x), atol=1e-6)
    # a batch that is not a multiple of 16: the last virtual batch is smaller
    odd = x[:20]
    expected = torch.cat([_bn_reference(chunk, ghost.weight, ghost.bias) for chunk in (odd[:16], odd[16:])])
    assert torch.allclose(ghost.train()(odd), expected, atol=1e-5)


def test_ws_conv_is_a_conv_with_the_standardised_weight():
    torch.manual_seed(0)
    conv = WSConv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight.detach()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)  # per output channel, over (in, kh, kw)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    expected = F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    assert not torch.allclose(conv(x), F.conv2d(x, w, padding=1), atol=1e-3)
    # standardised at every forward: shifting the raw weight changes nothing, scaling it nothing but eps's share
    with torch.no_grad():
        conv.weight.add_(0.3)
    assert torch.allclose(conv(x), expected, atol=1e-4)
    with torch.no_grad():
        conv.weight.mul_(7)
    assert torch.allclose(conv(x), expected, rtol=1e-2, atol=1e-2)
    # under bf16 autocast the weight's statistics stay float32; only the conv runs in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.standardized_weight().dtype == torch.float32 and conv(x).dtype == torch.bfloat16
    # gradients reach the raw weight through the standardisation
    conv(x).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_ws_variants_differ_from_their_norm_only_in_the_convs():
    for ws, plain in (("gn+ws", "gn"), ("bn+ws", "bn")):
        torch.manual_seed(0)
        a = build_model(ws)
        torch.manual_seed(0)
        b = build_model(plain)
        assert [type(m) for m in a.modules() if not isinstance(m, nn.Conv2d)] == \
               [type(m) for m in b.modules() if not isinstance(m, nn.Conv2d)]
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)  # the same initial weights
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        build_model("gn+ws", groups=3)  # gn+ws reads --groups as gn does


def render_norm_table() -> str:
    """The README's table of norms (between its `<!-- norms -->` markers), rendered from REGISTRY."""
    rows = ["| norm | what it normalises | parameters (small net, 1 channel) | parameters (resnet20, 3 channels) "
            "| reference |", "|---|---|---|---|---|"]
    for name, entry in REGISTRY.items():
        small = count_parameters(build_model(name))
        resnet = count_parameters(build_model(name, model="resnet20", in_channels=3))
        rows.append(f"| `{name}` | {entry.description} | {small:,} | {resnet:,} | {entry.reference} |")
    return "\n".join(rows)


def test_readme_table_of_norms_is_the_registry():
    text = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- norms -->\n(.*?)\n<!-- /norms -->", text, re.S)
    assert table, "README.md lost its <!-- norms --> table"
    assert table.group(1) == render_norm_table(), "README's table of norms drifted: paste render_norm_table()"


def test_small_net_takes_torchvision_norm_layer_convention():
    """Net(norm_layer=...) as torchvision's ResNets take it; build_model passes the registry's layer."""
    torch.manual_seed(0)
    direct = Net(norm_layer=norm_layer("gn", 4), in_channels=3, num_classes=5)
    torch.manual_seed(0)
    built = build_model("gn", in_channels=3, num_classes=5)
    assert [type(m) for m in direct.modules()] == [type(m) for m in built.modules()]
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), built.state_dict().values()))
    assert built(torch.randn(2, 3, 20, 20)).shape == (2, 5)
    assert isinstance(Net().features[2], BatchNorm2d)  # the default norm_layer: relu-norm, so conv, ReLU, norm


def resnet_norm_layers(model):
    """The layers ResNet20 got from norm_layer: the one after the stem's conv and the two of every block."""
    blocks = list(model.blocks)
    return [model.stem[1], *(layer for block in blocks for layer in (block.norm1, block.norm2))]


def test_resnet20_has_the_papers_size():
    """He et al. 2016, section 4.2: 6n+2 = 20 layers with n = 3, "0.27M" parameters."""
    model = build_model("bn", model="resnet20", in_channels=3)
    assert isinstance(model, ResNet20)
    assert count_parameters(model) == 269_722
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 19
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) == 19
    assert [m.num_features for m in resnet_norm_layers(model)] == [16] * 7 + [32] * 6 + [64] * 6
    # option-A shortcuts have no parameters: the 19 convs (3x3, no bias), 19 norms (2C each) and the head
    convs = 3 * 16 * 9 + 16 * 16 * 9 * 6 + (16 * 32 + 32 * 32 * 5) * 9 + (32 * 64 + 64 * 64 * 5) * 9
    assert convs + 2 * (16 * 7 + 32 * 6 + 64 * 6) + 64 * 10 + 10 == 269_722


@pytest.mark.parametrize("size, pooled", [(32, 8), (28, 7)])
def test_resnet20_output_shapes(size, pooled):
    model = build_model("bn", model="resnet20", in_channels=3).eval()
    features = model.blocks(model.stem(torch.randn(2, 3, size, size)))
    assert features.shape == (2, 64, pooled, pooled)  # strides 1, 2, 2
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    grey = build_model("gn", model="resnet20", in_channels=1, num_classes=7).eval()
    assert grey(torch.randn(3, 1, size, size)).shape == (3, 7)


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_builds_in_resnet20(norm):
    torch.manual_seed(0)
    model = build_model(norm, model="resnet20", in_channels=3).train()
    plain = build_model(norm.replace("+ws", ""), model="resnet20", in_channels=3)
    expected = type(plain.stem[1])
    layers = resnet_norm_layers(model)
    assert len(layers) == 19 and all(type(layer) is expected for layer in layers)
    assert type(norm_layer(norm, 4)(16)) is expected  # the registry's layer, in all 19 places
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(isinstance(m, WSConv2d) == REGISTRY[norm].weight_standardized for m in convs)
    assert count_parameters(model) == (268_346 if norm == "none" else 269_722)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_resnet20_groups_must_divide_its_widths():
    with pytest.raises(ValueError, match=r"groups=3 does not divide .*\(16, 32, 64 channels\): 1, 2, 4, 8, 16$"):
        build_model("gn", model="resnet20", in_channels=3, groups=3)
    assert build_model("gn", model="resnet20", in_channels=3, groups=16).stem[1].num_groups == 16
