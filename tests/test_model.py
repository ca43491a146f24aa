import pytest
import torch
from torch import nn

from model import NORMS, Net, NetConfig, build_model, count_parameters, make_norm

NORMED = ("bn", "gn", "ln")


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
    assert isinstance(make_norm("bn", 8, 4), nn.BatchNorm2d)
    gn = make_norm("gn", 8, 4)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    ln = make_norm("ln", 8, 4)
    # layer norm over (C, H, W) with per-channel affine: 2C parameters
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1 and count_parameters(ln) == 16


def test_ln_matches_layer_norm_over_chw():
    x = torch.randn(2, 8, 5, 5)
    expected = nn.functional.layer_norm(x, x.shape[1:])
    assert torch.allclose(make_norm("ln", 8, 4)(x), expected, atol=1e-5)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match="valid norms: bn, gn, ln, none"):
        build_model("batchnorm")


def test_groups_must_divide_every_width():
    with pytest.raises(ValueError, match=r"groups=3 does not divide .*valid group counts .*: 1, 2, 4, 8"):
        build_model("gn", groups=3)
    with pytest.raises(ValueError, match="groups=16"):
        build_model("gn", groups=16)  # divides 16, 32 but not the first conv's 8
    build_model("bn", groups=3)  # groups only matter for gn


def test_custom_widths_derive_head_size():
    model = Net(NetConfig(norm="gn", groups=2, widths=(4, "M", 6)))
    assert model.head.in_features == 6
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
