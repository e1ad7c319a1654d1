"""A worker's own data: image folders, tables and arrays, read, described and prepared as the federation agreed.

Pure, like the protocol: the only I/O is reading the data files. See docs/data.md.
"""
