"""`--model`: a built-in net (model.MODELS) or a user's builder, `path/to/file.py:build` or `module:build`, called
as torchvision's ResNets are, `build(norm_layer=..., in_channels=..., num_classes=...)` -> an nn.Module."""
import contextlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

import model as model_lib
from errors import ModelError, UsageError, first_line

NOT_FOUND = "--model: {} not found; pass the path of a Python file that defines the builder"


def is_builtin(spec: str) -> bool:
    return spec in model_lib.MODELS


def canonical(spec: str) -> str:
    """`spec` with a file's path made absolute, as a launch saves it; ModelError for a bad spec or a missing file."""
    target, name = (spec, "") if is_builtin(spec) else _split(spec)
    if target.endswith(".py") and not Path(target).expanduser().is_file():
        raise ModelError(NOT_FOUND.format(target))
    return f"{Path(target).expanduser().resolve()}:{name}" if target.endswith(".py") else spec


def shipped_file(spec: str) -> str | None:
    """The user's file a cluster's nodes need (Ray's `py_modules`), or None (a built-in, a module)."""
    target = spec.rpartition(":")[0]
    return target if target.endswith(".py") else None


def source_file(spec: str) -> str | None:
    """The .py file a user's builder is defined in (loading it), what a resume checks; None: built-in or not Python."""
    if is_builtin(spec):
        return None
    target, name = _split(spec)
    if target.endswith(".py"):
        return target
    with contextlib.suppress(TypeError):
        return inspect.getsourcefile(inspect.unwrap(getattr(importlib.import_module(target), name)))


def build(config: model_lib.NetConfig) -> torch.nn.Module:
    """The net `config` describes (model.build_net). ValueError: an unknown norm; for a user's builder, ModelError
    where it cannot be loaded, fails or returns no net, UsageError for a --groups its layers refuse."""
    if is_builtin(config.model):
        return model_lib.build_net(config)
    model_lib.norm_entry(config.norm)  # an unknown norm is ours to report, not the builder's failure
    builder, spec = _builder(config.model, config.in_channels), config.model
    try:
        return model_lib.build_net(config, builder)
    except ModelError:
        raise
    except model_lib.GroupsError as e:
        raise UsageError(f"--model {spec}: {e}") from None
    except Exception as e:  # the user's code: say whose, in one line, in its own words
        raise ModelError(f"--model {spec} raised {type(e).__name__}: {first_line(e)} (building it with norm "
                         f"{config.norm}, {config.in_channels} input channel(s), {config.num_classes} classes); fix "
                         f"the builder so that it builds with these arguments") from e


def _split(spec: str) -> tuple:
    target, sep, name = spec.rpartition(":")
    if not sep and spec.endswith(".py"):
        raise ModelError(f"--model {spec}: name the builder in the file too, as {spec}:build")
    if not target or not name.isidentifier():
        raise ModelError(f"unknown model {spec!r}; use a built-in ({', '.join(model_lib.MODELS)}) or your own "
                         f"builder as path/to/file.py:build or module:build")
    return target, name


def _builder(spec: str, in_channels: int):
    """The builder `spec` names, called with the arguments it takes (one without in_channels, as torchvision's
    `resnet18`, reads 3-channel images only); ModelError where it cannot be loaded or called so."""
    target, name = _split(spec)
    path, is_file = Path(target).expanduser(), target.endswith(".py")
    module = path.stem if is_file else target
    try:
        builder = getattr(_load(path, module) if is_file and path.is_file() else importlib.import_module(module),
                          name, None)
    except ModelError:
        raise
    except Exception as e:
        if is_file:  # a file half imported is forgotten, as Python forgets a module that fails to import
            sys.modules.pop(module, None)
        if isinstance(e, ImportError) and e.name == module:  # nothing of that name here
            raise ModelError(NOT_FOUND.format(target) if is_file else f"--model {spec}: cannot import {target} ("
                             f"{first_line(e)}); pass a file as path/to/file.py:build, or install the module") from None
        raise ModelError(f"--model {target}: importing it raised {type(e).__name__}: {first_line(e)}; fix the "
                         f"file so that it imports{' on every node' * isinstance(e, ImportError)}") from e
    if not callable(builder):
        found = "not defined" if builder is None else f"a {type(builder).__name__}, not a function"
        raise ModelError(f"--model {spec}: {name} is {found} in {target}; define "
                         f"def {name}(norm_layer, in_channels, num_classes) returning an nn.Module")
    parameters = inspect.signature(builder).parameters  # one without norm_layer fails in build, in Python's words
    if "in_channels" not in parameters and in_channels != 3:  # torchvision's factories: a ResNet reading RGB
        raise ModelError(f"--model {spec} takes no in_channels argument, so it reads 3-channel images, and this "
                         f"data has {in_channels} channel(s); wrap it in a builder that replaces its first conv")
    return builder if "in_channels" in parameters else lambda in_channels, **kwargs: builder(**kwargs)


def _load(path: Path, name: str):
    """The user's file imported as module `name`, as a cluster's nodes import it; ModelError if another has it."""
    found = importlib.util.find_spec(name)  # a namespace package (no origin) yields to a module of its name
    if found and found.origin and Path(found.origin).resolve() != path.resolve():
        raise ModelError(f"--model {path}: its module name {name!r} is taken (by {found.origin}); rename the file, "
                         f"e.g. my_{name}.py")
    if name not in sys.modules:  # in sys.modules while it runs, as an import's module is (_builder forgets a failure)
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]

