"""--model as a plug-in: a user's builder from a file or a module, torchvision's ResNets, the one-line errors
of a builder that cannot be loaded or does not fit the data, bf16 and checkpoints of a plugged-in net."""
import sys
import textwrap

import pytest
import torch
from torch import nn

import errors
import data as data_lib
import model
import plugins
import train
from config import TrialConfig
from model import NetConfig, WSConv2d
from test_train import output_dtypes

# A user's file: two conv -> norm -> ReLU blocks, global average pooling, a linear head.
TINY_NET = """
from torch import nn


def build(norm_layer, in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), norm_layer(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), norm_layer(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
"""

# A user's file wrapping torchvision's ResNet-18 factory, its first conv replaced for the data's channels.
TORCHVISION_NET = """
import torchvision
from torch import nn


def build(norm_layer, in_channels, num_classes):
    net = torchvision.models.resnet18(norm_layer=norm_layer, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return net
"""

GREY, COLOUR = (1, 28, 28), (3, 32, 32)  # (C, H, W) of the images check() runs a net on


def check(spec: str, norms, groups: int, image_shape) -> None:
    """The driver's pre-flight run (train.preflight) of the net for each norm, on a training batch of 2 images."""
    images = torch.zeros(2, *image_shape, dtype=torch.uint8)
    dataset = data_lib.Dataset("synthetic", images, torch.arange(2), None, None, data_lib.DIGIT_CLASSES)
    for norm in norms:
        train.preflight(TrialConfig(model=spec, norm=norm, groups=groups, batch_size=2), dataset)


@pytest.fixture
def user_file(tmp_path):
    """write(name, text) -> the path of tmp_path/<name>.py; the modules loaded from tmp_path are unloaded after."""
    def write(name: str, text: str):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(text))
        return path
    yield write
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def one_line_error(error_type, match: str, call, *args):
    """call(*args) raises error_type (a NormsweepError: printed as one `error: ...` line) matching `match`."""
    assert issubclass(error_type, errors.NormsweepError)
    with pytest.raises(error_type, match=match) as raised:
        call(*args)
    assert "\n" not in str(raised.value), str(raised.value)
    return str(raised.value)


def test_a_builder_from_a_file_and_from_a_module(user_file, monkeypatch):
    path = user_file("mymodels", TINY_NET)
    for spec in (f"{path}:build", f"{path.parent.name}/../{path.parent.name}/mymodels.py:build"):
        monkeypatch.chdir(path.parent.parent)  # the second spec is relative: canonical makes it absolute
        assert plugins.canonical(spec) == f"{path}:build"
    assert plugins.shipped_file(f"{path}:build") == str(path)
    assert plugins.shipped_file("resnet20") is None and plugins.shipped_file("mymodels:build") is None
    net = plugins.build(NetConfig(model=f"{path}:build", norm="gn", in_channels=1))
    assert isinstance(net[1], model.GroupNorm) and net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    check(f"{path}:build", ["bn", "gn", "in", "gn+ws"], 4, GREY)

    module_path = user_file("mymodule", TINY_NET)
    monkeypatch.syspath_prepend(str(module_path.parent))
    # a file on the path is importable by its name, and that name is its own: not a collision with itself
    assert isinstance(plugins.build(NetConfig(model=f"{module_path}:build")), nn.Sequential)
    net = plugins.build(NetConfig(model="mymodule:build", norm="bn+ws", in_channels=3, num_classes=5))
    assert isinstance(net[1], model.BatchNorm2d) and isinstance(net[0], WSConv2d)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert plugins.canonical("mymodule:build") == "mymodule:build"


def test_builtins_build_through_plugins():
    assert isinstance(plugins.build(NetConfig(model="resnet20", in_channels=3)), model.ResNet20)
    check("resnet20", ["bn", "gn"], 4, COLOUR)
    check("small", ["bn", "gn"], 4, GREY)


@pytest.mark.parametrize("norm, layer", [("bn", model.BatchNorm2d), ("gn", model.GroupNorm), ("in", model.GroupNorm),
                                         ("gn+ws", model.GroupNorm)])
def test_a_torchvision_resnet_factory_with_our_norms(user_file, norm, layer):
    spec = f"{user_file('tvmodels', TORCHVISION_NET)}:build"
    net = plugins.build(NetConfig(model=spec, norm=norm, in_channels=1))
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(norms) == 20 and all(type(m) is layer for m in norms)  # ResNet-18: 20 norm layers, all ours
    if norm != "bn":
        assert [m.num_groups for m in norms] == [m.num_channels if norm == "in" else 4 for m in norms]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(isinstance(m, WSConv2d) == (norm == "gn+ws") for m in convs)
    assert net.conv1.in_channels == 1
    check(spec, [norm], 4, GREY)  # a forward on (2, 1, 28, 28) gives (2, 10)


def test_torchvision_resnet18_itself_reads_three_channels_only():
    spec = "torchvision.models:resnet18"
    net = plugins.build(NetConfig(model=spec, norm="gn", in_channels=3))
    assert all(type(m) is model.GroupNorm for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)))
    check(spec, ["bn", "gn"], 4, COLOUR)
    one_line_error(plugins.ModelError, r"^--model torchvision.models:resnet18 takes no in_channels argument, so it "
                   r"reads 3-channel images, and this data has 1 channel\(s\); wrap it in a builder that replaces its "
                   r"first conv$", check, spec, ["bn"], 4, GREY)


def test_a_builder_that_cannot_be_loaded_is_one_line_that_says_what_to_do(user_file, tmp_path):
    def build(spec, **config):
        return plugins.build(NetConfig(model=spec, in_channels=1, **config))

    missing = tmp_path / "nowhere.py"
    for call in (plugins.canonical, lambda spec: build(spec)):
        one_line_error(plugins.ModelError, f"^--model: {missing} not found; pass the path of a Python file that "
                       f"defines the builder$", call, f"{missing}:build")
    one_line_error(plugins.ModelError, r"^unknown model 'resnet200'; use a built-in \(small, resnet20\) or your own "
                   r"builder as path/to/file.py:build or module:build$", plugins.canonical, "resnet200")
    one_line_error(plugins.ModelError, r"cannot import no_such_module .*; pass a file as path/to/file.py:build, or "
                   r"install the module$", build, "no_such_module:build")

    path = user_file("mymodels", TINY_NET)
    one_line_error(plugins.ModelError, rf"^--model {path}:make: make is not defined in {path}; define "
                   rf"def make\(norm_layer, in_channels, num_classes\) returning an nn.Module$", build, f"{path}:make")

    shadowing = user_file("json", TINY_NET)  # its name is the standard library's json
    one_line_error(plugins.ModelError, rf"^--model {shadowing}: its module name 'json' is taken \(by .*json.*\); "
                   r"rename the file, e.g. my_json.py$", build, f"{shadowing}:build")
    assert "build" not in vars(sys.modules["json"])  # the real json is untouched

    failing = user_file("failing", """
        def build(norm_layer, in_channels, num_classes):
            raise RuntimeError("needs pretrained weights\\nfrom the internet")
    """)
    one_line_error(plugins.ModelError, rf"^--model {failing}:build raised RuntimeError: needs pretrained weights "
                   r"\(building it with norm bn, 1 input channel\(s\), 10 classes\); fix the builder so that it builds "
                   r"with these arguments$", build, f"{failing}:build")

    broken = user_file("broken", "import torch\ndef build(:\n")
    one_line_error(plugins.ModelError, rf"^--model {broken}: importing it raised SyntaxError: .*; fix the file so that "
                   r"it imports$", build, f"{broken}:build")
    assert "broken" not in sys.modules

    no_net = user_file("no_net", "def build(norm_layer, in_channels, num_classes):\n    return None\n")
    for norm in ("bn", "gn+ws"):  # +ws walks the returned net's modules: still this error, not an AttributeError
        one_line_error(plugins.ModelError, r"returned a NoneType, not a net; a builder must return an nn.Module$",
                       lambda spec: build(spec, norm=norm), f"{no_net}:build")

    # a builder that takes norm_layer and never calls it: every variant would be the same net
    ignores = user_file("ignores", """
        import torchvision
        from torch import nn

        def build(norm_layer, in_channels, num_classes):  # torchvision's own BatchNorm, whatever the variant
            return torchvision.models.resnet18(num_classes=num_classes)

        def fixed(norm_layer, in_channels, num_classes):
            return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(num_classes))
    """)
    for name in ("build", "fixed"):
        one_line_error(plugins.ModelError, rf"^--model {ignores}:{name} never called the norm_layer it was given, so "
                       r"every variant would train the same net; build each norm layer as norm_layer\(channels\)$",
                       lambda spec: build(spec, norm="gn"), f"{ignores}:{name}")

    no_norm = user_file("no_norm", "def build(in_channels, num_classes):\n    pass\n")
    one_line_error(plugins.ModelError, r"raised TypeError: .*unexpected keyword argument 'norm_layer' \(building it "
                   r"with norm bn, .*\); fix the builder", build, f"{no_norm}:build")


def test_a_net_that_does_not_fit_the_data_is_refused_before_trials(user_file):
    flat = user_file("flat", """
        from torch import nn

        def build(norm_layer, in_channels, num_classes):  # forgets to pool: (B, classes, H, W)
            return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), norm_layer(8), nn.Conv2d(8, num_classes, 1))
    """)
    one_line_error(plugins.ModelError, rf"^--model {flat}:build returns \(2, 10, 28, 28\) for a batch of "
                   r"\(2, 1, 28, 28\) images; a net must return \(batch, 10\) logits$",
                   check, f"{flat}:build", ["bn"], 4, GREY)
    wide = user_file("wide", TINY_NET.replace("nn.Conv2d(in_channels, 8", "nn.Conv2d(3, 8"))
    one_line_error(plugins.ModelError, rf"^--model {wide}:build with norm bn fails in a training step on a batch of "
                   r"\(2, 1, 28, 28\) images: RuntimeError: ", check, f"{wide}:build", ["bn"], 4, GREY)
    pair = user_file("pair", TINY_NET.replace("return nn.Sequential(", "return Pair(").replace(
        "from torch import nn\n", "from torch import nn\n\n\nclass Pair(nn.Sequential):  # (logits, aux), as "
        "Inception\n    def forward(self, x):\n        return super().forward(x), None\n"))
    one_line_error(plugins.ModelError, rf"^--model {pair}:build returns a tuple for a batch of \(2, 1, 28, 28\) "
                   r"images; a net must return \(batch, 10\) logits$", check, f"{pair}:build", ["bn"], 4, GREY)
    tiny = user_file("tiny", TINY_NET)
    one_line_error(errors.UsageError, rf"^--model {tiny}:build: groups=3 does not divide the channel counts \[8, 16\]; "
                   r"valid group counts for this net's norm layers \(8, 16 channels\): 1, 2, 4, 8$",
                   check, f"{tiny}:build", ["bn", "gn"], 3, GREY)


@pytest.fixture
def idx_dataset(idx_dir):
    """64 training and 32 test images of noise, 28x28 grayscale, read back from their idx files."""
    return data_lib.load_dataset(str(idx_dir))


@pytest.mark.parametrize("norm", ["bn", "gn+ws"])
def test_bf16_autocast_keeps_a_plugged_in_nets_norms_in_float32(user_file, idx_dataset, norm):
    config = {"model": f"{user_file('mymodels', TINY_NET)}:build", "norm": norm, "epochs": 1, "batch_size": 16,
              "threads": 1, "precision": "bf16"}
    run = train.TrainingRun(config, idx_dataset)
    dtypes = output_dtypes(run.model)
    metrics = run.run_epoch()
    assert dtypes == {"conv": {torch.bfloat16}, "norm": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


@pytest.mark.parametrize("norm", ["bn", "gn+ws"])
def test_a_checkpoint_of_a_plugged_in_net_rebuilds_it(user_file, idx_dataset, tmp_path, norm):
    spec = f"{user_file('mymodels', TINY_NET)}:build"
    run = train.TrainingRun({"model": spec, "norm": norm, "epochs": 1, "batch_size": 16, "threads": 1}, idx_dataset)
    run.run_epoch()  # trained weights and, for bn, running statistics
    run.save(tmp_path / "state.pt")
    del sys.modules["mymodels"]  # rebuilt from the file the checkpoint names, as a fresh process does
    rebuilt, state = train.model_from_checkpoint(tmp_path / "state.pt")
    assert state["net_config"]["model"] == spec
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in run.model.modules()]
    saved = run.model.state_dict()
    assert rebuilt.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in rebuilt.state_dict().items())
    rebuilt.to(memory_format=train.MEMORY_FORMAT)  # the run's layout: the same kernels, so the same bits
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), run.model.eval()(x))
