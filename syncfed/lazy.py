"""Names a package exports but loads on first use (PEP 562): importing the package loads none of their modules.

``syncfed`` itself, ``syncfed.coordinator`` and ``syncfed.worker`` use it, so that ``import syncfed.tensors``
loads no networking, and ``python -m syncfed analytics`` or a worker refusing its data loads no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    namespace: dict[str, Any], homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's ``__getattr__`` and ``__dir__`` for ``homes``: each name, by the module that defines it,
    relative to the package (``.results``), with ``:attribute`` where the name there differs (``.pool:Backoff``).

    ``namespace`` is the package's ``globals()``: a name is kept there once loaded, so later look-ups skip
    ``__getattr__``.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = home.partition(":")
        value = getattr(importlib.import_module(module, package), attribute or name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
