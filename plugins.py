"""`--model`: a built-in net's name (model.MODELS) or a user's own builder, and building the net a config names.

A user's builder is `path/to/file.py:build` or `module:build`: a callable taking torchvision's `norm_layer`
convention, `build(norm_layer=..., in_channels=..., num_classes=...)`, and returning an nn.Module that maps
(B, in_channels, H, W) images to (B, num_classes) logits. A builder that does not name an `in_channels`
parameter (torchvision's own `resnet18`, whose `**kwargs` go to a ResNet that takes none) is called without it
and gets 3-channel images only. On a cluster the file travels to every node in Ray's runtime environment
(`py_modules`, cluster.connect), where it is imported by its file name; anywhere the file exists it is loaded
from its path.
"""
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from errors import ModelError, UsageError
import model as model_lib



def is_builtin(spec: str) -> bool:
    return spec in model_lib.MODELS


def canonical(spec: str) -> str:
    """`spec` as a launch saves it: a file's path made absolute, so that a --resume and the analysis find it from
    any working directory. Raises ModelError for a spec that is neither a built-in nor TARGET:NAME, or for a file
    that is not here (the driver, which ships it to a cluster's nodes)."""
    if is_builtin(spec):
        return spec
    target, name = _split(spec)
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelError(_not_found(target))
        return f"{path}:{name}"
    return spec


def shipped_file(spec: str) -> str | None:
    """The user's model file a cluster's nodes need (for Ray's `py_modules`), or None (a built-in, a module)."""
    if is_builtin(spec):
        return None
    target, _ = _split(spec)
    return target if target.endswith(".py") else None


def load_builder(spec: str) -> Callable:
    """The builder `spec` names, called with the keyword arguments it accepts (see the module docstring).

    Raises ModelError for an unknown built-in, a missing file or module, a missing or non-callable name.
    """
    if is_builtin(spec):
        return model_lib.MODELS[spec][0]
    target, name = _split(spec)
    module = _load_file(target) if target.endswith(".py") else _import(target, spec)
    builder = getattr(module, name, None)
    if not callable(builder):
        found = "not defined" if builder is None else f"a {type(builder).__name__}, not a function"
        raise ModelError(f"--model {spec}: {name} is {found} in {target}; define "
                         f"def {name}(norm_layer, in_channels, num_classes) returning an nn.Module")
    return _accepting(builder, spec)


def build(config: model_lib.NetConfig) -> nn.Module:
    """The net `config` describes, built-in or a user's (model.build_net). Raises ModelError for a builder that
    cannot be loaded or fails; a bad --groups raises model.GroupsError, an unknown norm ValueError."""
    if is_builtin(config.model):
        return model_lib.build_net(config)
    model_lib.norm_entry(config.norm)  # an unknown norm is ours to report, not the builder's failure
    builder = load_builder(config.model)

    def checked(norm_layer, **kwargs):  # before build_net uses what it returned (+ws walks its modules)
        made = []

        def counted(*args, **options):
            made.append(norm_layer(*args, **options))
            return made[-1]

        net = builder(norm_layer=counted, **kwargs)
        if not isinstance(net, nn.Module):
            raise ModelError(f"--model {config.model} returned a {type(net).__name__}, not a net; a builder must "
                             f"return an nn.Module")
        if not made:  # e.g. torchvision's resnet18(num_classes=...) without norm_layer=norm_layer
            raise ModelError(f"--model {config.model} never called the norm_layer it was given, so every variant "
                             f"would train the same net; build each norm layer as norm_layer(channels)")
        return net

    try:
        return model_lib.build_net(config, checked)
    except (model_lib.GroupsError, ModelError):  # a bad --groups, a builder refusing the data's channels
        raise
    except Exception as e:  # the user's code: say whose, in one line, with its own words
        raise ModelError(f"--model {config.model} raised {type(e).__name__}: {_first_line(e)} (building it with "
                         f"norm {config.norm}, {config.in_channels} input channel(s), {config.num_classes} classes); "
                         f"fix the builder so that it builds with these arguments") from e


def _split(spec: str) -> tuple:
    target, sep, name = spec.rpartition(":")
    if not sep and spec.endswith(".py"):  # the file without its builder's name
        raise ModelError(f"--model {spec}: name the builder in the file too, as {spec}:build")
    if not sep or not target or not name.isidentifier():
        raise ModelError(f"unknown model {spec!r}; use a built-in ({', '.join(model_lib.MODELS)}) or your own "
                         f"builder as path/to/file.py:build or module:build")
    return target, name


def _load_file(target: str):
    """The user's file as a module named after it: loaded from its path where it exists (the driver, a local
    Ray), else imported by that name (a cluster node, where Ray's runtime environment put it on the path)."""
    path = Path(target).expanduser()
    name = path.stem
    if not path.is_file():
        try:
            return importlib.import_module(name)
        except ImportError as e:
            if e.name != name:  # the file is there but imports something missing
                raise ModelError(f"--model {target}: importing it raised {type(e).__name__}: {_first_line(e)}; "
                                 f"install it on every node") from None
            raise ModelError(_not_found(target)) from None
    taken_by = _location(name)  # what `import name` gives: another module's file shadows or is shadowed
    if taken_by is not None and not _same_file(taken_by, path):
        raise ModelError(f"--model {target}: its module name {name!r} is taken (by {taken_by}); "
                         f"rename the file, e.g. my_{name}.py")
    if name in sys.modules:  # loaded before, from this file
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # importable by name, as it is on a cluster's nodes
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ModelError(f"--model {target}: importing it raised {type(e).__name__}: {_first_line(e)}; fix the file "
                         f"so that it imports") from e
    return module


def _import(target: str, spec: str):
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ModelError(f"--model {spec}: cannot import {target} ({_first_line(e)}); pass a file as "
                         f"path/to/file.py:build, or install the module") from None


def _not_found(target: str) -> str:
    return f"--model: {target} not found; pass the path of a Python file that defines the builder"


def _location(name: str) -> str | None:
    """Where `import name` finds its module (a loaded one first): a file, a package's directory, "a built-in
    module", or None where nothing has that name."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None) or "a built-in module"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin is None and spec.submodule_search_locations:  # a namespace package: directories only
        return next(iter(spec.submodule_search_locations))
    return spec.origin if spec.has_location else "a built-in module"


def _same_file(location: str, path: Path) -> bool:
    return Path(location).resolve() == path.resolve()


def _accepting(builder: Callable, spec: str) -> Callable:
    """`builder` called with the keyword arguments of the norm_layer convention that it accepts: torchvision's
    ResNets take norm_layer and num_classes but no in_channels (their first conv reads 3 channels)."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return builder
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    missing = [k for k in ("norm_layer", "num_classes") if k not in parameters and not takes_all]
    if missing:
        raise ModelError(f"--model {spec} takes no {' or '.join(missing)} argument; a builder is called as "
                         f"build(norm_layer=..., in_channels=..., num_classes=...), torchvision's convention")
    # in_channels only where named: torchvision's factories pass their **kwargs on to a ResNet that takes none
    if "in_channels" in parameters:
        return builder

    def without_in_channels(norm_layer, in_channels, num_classes, **extra):
        if in_channels != 3:
            raise ModelError(f"--model {spec} takes no in_channels argument, so it reads 3-channel images, and this "
                             f"data has {in_channels} channel(s); wrap it in a builder that replaces its first conv")
        return builder(norm_layer=norm_layer, num_classes=num_classes, **extra)
    return without_in_channels


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check(spec: str, norms, groups: int, dataset) -> None:
    """Build the net for each norm and run it on two blank images of `dataset`'s shape, before any trial starts.

    Raises UsageError for a --groups the net's norm layers refuse, ModelError for a builder that fails
    or whose output is not (2, classes) logits.
    """
    import torch

    shape = (2, dataset.channels, *dataset.image_size)
    for norm in norms:
        config = model_lib.NetConfig(model=spec, norm=norm, groups=groups, in_channels=dataset.channels,
                                     num_classes=len(dataset.classes))
        try:
            net = build(config)
        except model_lib.GroupsError as e:
            raise UsageError(f"--model {spec}: {e}") from None
        try:
            with torch.no_grad():
                out = net.eval()(torch.zeros(shape))
        except Exception as e:
            raise ModelError(f"--model {spec} with {norm} fails on a batch of {tuple(shape)} images: "
                             f"{type(e).__name__}: {_first_line(e)}") from e
        if tuple(getattr(out, "shape", ())) != (2, config.num_classes):
            raise ModelError(f"--model {spec} returns {tuple(getattr(out, 'shape', ()))} for a batch of "
                             f"{tuple(shape)} images; a net must return (batch, {config.num_classes}) logits")
