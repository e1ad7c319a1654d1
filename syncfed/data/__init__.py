"""A worker's own data: image folders, tables and arrays, read, described and prepared as the federation agreed.

Pure, like the protocol: the only I/O is reading the data files. See docs/data.md.
A reader's heavy imports (pandas for tables, Pillow for images) wait until a
spec needs it, so ``import syncfed.data`` stays light.
"""

from __future__ import annotations

from .base import Source, SourceOptions
from .sources import load_data, open_source

__all__ = ["SourceOptions", "Source", "open_source", "load_data"]
