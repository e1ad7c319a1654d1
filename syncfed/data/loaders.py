"""Arrays from an ``.npz`` file, and whatever a Python loader named on the worker's command line returns.

Nothing is unpickled: an ``.npz`` file is read with ``allow_pickle=False``,
so an array of Python objects is refused, never loaded. A loader
``module.path:function`` is code the worker's operator chose, imported only
because the worker's own ``--data`` names it (as a ``--model`` is); a
coordinator can never make a worker import anything.

A loader is called with the ``--data-arg key=value`` settings as keyword
arguments (string values), so one function serves every site. It returns:

- ``(x, y)`` arrays, or ``(x, y, info)`` with ``info`` a dict of optional
  ``classes`` (names for the class indices in ``y``) and ``feature_names``;
- a pandas DataFrame, read as a table (``--label-column`` and the other table options apply);
- a ``torch.utils.data.Dataset`` of ``(input, label)`` pairs, read into
  arrays once (its ``classes`` attribute, as torchvision's ``ImageFolder``
  has, names integer labels).
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..exceptions import DatasetError
from .arrays import ArraySource
from .base import Source, SourceOptions
from .labels import class_name

__all__ = ["read_npz", "call_loader", "source_from"]

#: What an ``.npz`` file or a loader's ``info`` may hold besides ``x`` and ``y``.
_EXTRAS: Final = ("classes", "feature_names")


def read_npz(path: str | Path, options: SourceOptions) -> ArraySource:
    """The arrays ``x`` and ``y`` of an ``.npz`` file (``np.savez(path, x=x, y=y)``), with its optional
    string arrays ``classes`` and ``feature_names``; other arrays are ignored.

    Raises:
        DatasetError: one line naming the file if it is not an ``.npz`` file, lacks ``x`` or ``y``,
            holds Python objects, or its arrays do not fit together.
    """
    where = str(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{where}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{where}: not an .npz file: {reason(exc)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{where}: one array, not an .npz file of arrays x and y (np.savez(path, x=x, y=y))")
    with archive:
        held = archive.files
        for name in ("x", "y"):
            if name not in held:
                what = ", ".join(repr(array) for array in held) or "no arrays"
                raise DatasetError(f"{where}: no array {name!r}; the file holds {what}")
        arrays = {name: _npz_array(archive, name, where) for name in ("x", "y", *_EXTRAS) if name in held}
    return ArraySource(
        arrays["x"],
        arrays["y"],
        where=where,
        classes=_names(arrays["classes"], "classes", where) if "classes" in arrays else None,
        feature_names=_names(arrays["feature_names"], "feature_names", where) if "feature_names" in arrays else None,
        options=options,
    )


def _npz_array(archive: Any, name: str, where: str) -> np.ndarray:
    try:
        return np.asarray(archive[name])
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise DatasetError(f"{where}: array {name!r} cannot be read: {reason(exc)}") from None
        raise DatasetError(
            f"{where}: array {name!r} holds Python objects, which a worker never unpickles;"
            " save numbers, and names as strings"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{where}: array {name!r} cannot be read: {reason(exc)}") from None


def _names(values: Any, what: str, where: str) -> list[str]:
    """``classes`` or ``feature_names`` as text, from a 1-d array or a sequence."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise DatasetError(f"{where}: {what} must be a list of names, not shape {array.shape}")
    return [value.decode() if isinstance(value, bytes) else class_name(value) for value in array.tolist()]


def call_loader(path: str, options: SourceOptions) -> Source:
    """The source a Python loader ``module.path:function`` returns, called with ``options.data_args``.

    Raises:
        DatasetError: one line, "loader mypkg.data:load failed: ValueError: ...", if the module
            cannot be imported or the loader raises; or naming the loader if what it returns is not data.
    """
    where = f"loader {path}"
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DatasetError(f"{where}: cannot import {module_name}: {reason(exc)}") from None
    except Exception as exc:  # the module's own code failed as it was imported
        raise DatasetError(f"{where} failed: {_failure(exc)}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise DatasetError(f"{where}: module {module_name} has no function {attribute!r}")
    try:
        result = function(**options.data_args)
    except Exception as exc:
        raise DatasetError(f"{where} failed: {_failure(exc)}") from None
    return source_from(result, options, where)


def source_from(value: Any, options: SourceOptions, where: str | None = None) -> Source:
    """A source over data a notebook or a loader holds: ``(x, y)``, ``(x, y, info)``, a pandas
    DataFrame or a torch Dataset (see the module docstring); ``where`` names it in error lines.

    Raises:
        DatasetError: if ``value`` is none of these, or its data do not fit together.
    """
    if _is_a(value, "pandas", "DataFrame"):
        from .tables import TableSource  # pandas is imported already: value is its DataFrame

        return TableSource.from_frame(value, options, where or "DataFrame")
    if _is_a(value, "torch.utils.data", "Dataset"):
        return _from_torch(value, options, where or "torch Dataset")
    where = where or "arrays"
    if not (isinstance(value, tuple) and len(value) in (2, 3)):
        raise DatasetError(
            f"{where}: {type(value).__name__} is not (x, y), (x, y, info), a pandas DataFrame or a torch Dataset"
        )
    info = value[2] if len(value) == 3 else {}
    if not isinstance(info, dict) or not set(info) <= set(_EXTRAS):
        raise DatasetError(f"{where}: info must be a dict of optional {' and '.join(_EXTRAS)}, not {info!r:.80}")
    return ArraySource(
        _array(value[0], "x", where),
        _array(value[1], "y", where),
        where=where,
        classes=_names(info["classes"], "classes", where) if "classes" in info else None,
        feature_names=_names(info["feature_names"], "feature_names", where) if "feature_names" in info else None,
        options=options,
    )


def _is_a(value: Any, module: str, name: str) -> bool:
    """Whether ``value`` is an instance of ``module.name``, without importing the module: if it is not
    imported yet, nothing can be an instance of its classes."""
    return module in sys.modules and isinstance(value, getattr(sys.modules[module], name))


def _array(value: Any, what: str, where: str) -> np.ndarray:
    """A loader's array, tensor or list as a numpy array."""
    if _is_a(value, "torch", "Tensor"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged lists
        raise DatasetError(f"{where}: {what} is not an array: {reason(exc)}") from None


def _from_torch(dataset: Any, options: SourceOptions, where: str) -> ArraySource:
    """A torch Dataset's ``(input, label)`` pairs read into arrays, in its order."""
    items: Iterable[Any] = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else dataset
    inputs: list[np.ndarray] = []
    labels: list[Any] = []
    try:
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise DatasetError(f"{where}: item {i} is a {type(item).__name__}, not an (input, label) pair")
            x, y = _array(item[0], f"item {i}'s input", where), _array(item[1], f"item {i}'s label", where)
            if inputs and x.shape != inputs[0].shape:
                raise DatasetError(f"{where}: item {i}'s input has shape {x.shape}, item 0's {inputs[0].shape}")
            if y.size != 1:
                raise DatasetError(f"{where}: item {i}'s label has shape {y.shape}, not one value")
            inputs.append(x)
            labels.append(y.reshape(()).item())
    except DatasetError:
        raise
    except Exception as exc:  # the Dataset's own code (a transform, a file it reads) failed
        raise DatasetError(f"{where} failed: {_failure(exc)}") from None
    if not inputs:
        raise DatasetError(f"{where}: the torch Dataset is empty")
    classes = getattr(dataset, "classes", None)
    names = (
        [str(name) for name in classes]
        if isinstance(classes, (list, tuple)) and all(isinstance(label, int) for label in labels)
        else None
    )
    return ArraySource(np.stack(inputs), np.asarray(labels), where=where, classes=names, options=options)


def reason(exc: BaseException) -> str:
    """An exception's message as one line for an error line: its first line, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _failure(exc: BaseException) -> str:
    """What went wrong in a user's code, as one line: the exception's type and message."""
    kind, message = type(exc).__name__, reason(exc)
    return kind if message == kind else f"{kind}: {message}"
