"""The user's own model and data, named by import strings, checked once before any Ray work starts.

``train.model: "mypkg.nets:build"`` and ``data.name: "mypkg.data:load"`` follow Ray's ``import_attr``
convention (``module.path:callable``, as uvicorn and Ray Serve use it). The module comes from the
working directory (put on ``sys.path`` first, as uvicorn's ``--app-dir .`` does; Ray workers run in the
driver's working directory on local Ray, and in the shipped ``working_dir`` under ``raygd submit``) or
from an installed package (``runtime_env={"py_modules": [...]}`` or the cluster image, see
cluster/README.md). The signatures:

    build(input_shape: tuple[int, ...], num_classes: int, **train.model_args) -> nn.Module
        # forward(x [N, *input_shape]) -> logits [N, C], or [N, T, C] for a sequence model
    load(**data.args) -> (train, test)
        # each a map-style Dataset of (input, label) pairs, or a pair of tensors (inputs, labels)

``check_workload`` imports both, builds the model, runs one forward on two training examples and
checks what comes back; every failure is a ``PluginError`` (a ``ConfigError``: the CLI exits 2) that
names the field, the import string and what failed, so nothing reaches Ray or MLflow.

Written here rather than with Ray's ``import_attr`` alone because that raises bare ImportError /
AttributeError with no field name, and adds neither the working directory nor the signature checks.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from raygd.config import ConfigError, is_import_string

if TYPE_CHECKING:
    from torch import nn


class PluginError(ConfigError):
    """A user's model or data factory cannot be imported, called or used; the message names the field."""


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def import_attr(field_name: str, string: str) -> Any:
    """Import ``module.path:attr`` (attr may be dotted) from the working directory or an installed package.

    Raises:
        PluginError: the string is malformed, the module does not import (with the cause), it has no
            such attribute, or the attribute is not callable.
    """
    if not is_import_string(string):
        raise PluginError(f"{field_name} = {string!r} is invalid: write it as module.path:callable.")
    module_name, attr_path = string.split(":")
    _cwd_on_path()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # a user's module may raise anything at import
        cause = f"{type(err).__name__}: {err}"
        where = f"the working directory {os.getcwd()} or an installed package"
        raise PluginError(
            f"{field_name} = {string!r}: module {module_name!r} does not import from {where} ({cause})."
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{field_name} = {string!r}: module {module_name!r} has no attribute {attr_path!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(
            f"{field_name} = {string!r}: {attr_path!r} is a {type(obj).__name__}, not callable: "
            "name a function or class."
        )
    return obj


def build_user_model(
    string: str, input_shape: tuple[int, ...], num_classes: int, model_args: dict[str, Any] | None = None
) -> nn.Module:
    """Call the user's model factory ``string`` as ``build(input_shape, num_classes, **model_args)``."""
    from torch import nn

    factory = import_attr("train.model", string)
    model_args = model_args or {}
    try:
        model = factory(tuple(input_shape), int(num_classes), **model_args)
    except Exception as err:
        raise PluginError(
            f"train.model = {string!r} raised {type(err).__name__}: {err} when called as "
            f"build(input_shape={tuple(input_shape)}, num_classes={num_classes}, **{model_args!r})."
        ) from err
    if not isinstance(model, nn.Module):
        raise PluginError(
            f"train.model = {string!r} returned a {type(model).__name__}: the factory must return a torch nn.Module."
        )
    return model


def _as_tensors(string: str, part: str, ds: Any) -> tuple[Any, Any]:
    """(inputs, labels) tensors from a pair of tensors or a map-style Dataset of (input, label) pairs."""
    import torch

    if isinstance(ds, (tuple, list)) and len(ds) == 2 and all(isinstance(t, torch.Tensor) for t in ds):
        x, y = ds
    elif isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        x, y = ds.tensors
    elif hasattr(ds, "__getitem__") and hasattr(ds, "__len__") and not isinstance(ds, (tuple, list, torch.Tensor)):
        if len(ds) == 0:
            raise PluginError(f"data.name = {string!r}: its {part} set is empty.")
        items = [ds[i] for i in range(len(ds))]
        first = items[0]
        if not (isinstance(first, (tuple, list)) and len(first) == 2):
            raise PluginError(
                f"data.name = {string!r}: {part}[0] is a {type(first).__name__}; each item must be an "
                "(input, label) pair."
            )
        try:
            x = torch.stack([torch.as_tensor(a) for a, _ in items])
            y = torch.stack([torch.as_tensor(b) for _, b in items])
        except (RuntimeError, TypeError, ValueError) as err:
            raise PluginError(f"data.name = {string!r}: the {part} items do not stack into tensors ({err}).") from None
    else:
        raise PluginError(
            f"data.name = {string!r}: the {part} set is a {type(ds).__name__}; return a map-style torch Dataset of "
            "(input, label) pairs or a pair of tensors (inputs, labels)."
        )
    if x.shape[0] != y.shape[0]:
        raise PluginError(f"data.name = {string!r}: the {part} set has {x.shape[0]} inputs but {y.shape[0]} labels.")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() not in (1, 2):
        raise PluginError(
            f"data.name = {string!r}: {part} labels are {y.dtype} of shape {tuple(y.shape)}; labels must be integer "
            "class indices, [N] (one per example) or [N, T] (one per position of a sequence)."
        )
    return x, y.long()


def load_user_data(string: str, args: dict[str, Any]) -> tuple[Any, Any, Any, Any, int | None]:
    """Call the data factory as ``load(**data.args)``: (x_train, y_train, x_test, y_test, declared classes).

    The declared class count is the train set's ``num_classes`` attribute when it has one (a vocabulary
    size, say), else None (the caller takes 1 + the largest label).
    """
    factory = import_attr("data.name", string)
    try:
        out = factory(**args)
    except Exception as err:
        raise PluginError(
            f"data.name = {string!r} raised {type(err).__name__}: {err} when called as load(**{args!r})."
        ) from err
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise PluginError(
            f"data.name = {string!r} returned a {type(out).__name__}; the factory must return (train, test)."
        )
    train, test = out
    declared = getattr(train, "num_classes", None)
    if declared is not None and (not isinstance(declared, int) or declared < 2):
        raise PluginError(
            f"data.name = {string!r}: its train set's num_classes = {declared!r} must be an integer >= 2."
        )
    return (*_as_tensors(string, "train", train), *_as_tensors(string, "test", test), declared)
