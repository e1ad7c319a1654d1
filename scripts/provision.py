"""Provision a secured project: ``python scripts/provision.py project.toml -o startup/``."""

import sys

from syncfed.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["provision", *sys.argv[1:]]))
