"""The layering rule the package's folders make checkable, and the size of its rooms.

Only ``coordinator/``, ``worker/``, ``net/`` and ``cli/`` do I/O. Every other
module is pure: it imports neither asyncio nor websockets, and nothing from
those four packages either, so that the rule holds transitively and a pure
module can be used, and tested, without an event loop. Each check reads the
import statements with ``ast`` (no module is imported) and names every
statement that breaks the rule, with its file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "syncfed"

#: The packages that do I/O; everything else under syncfed/ is pure.
IO_PACKAGES = ("coordinator", "worker", "net", "cli")

#: What a pure module may not import, directly.
IO_LIBRARIES = ("asyncio", "websockets")

#: Modules outside the I/O packages that may import from them, each for a reason.
ALLOWED_TO_IMPORT_IO = {
    # The public API re-exports run_worker and Coordinator for users embedding syncfed.
    "__init__.py": "public API",
    # `python -m syncfed` hands its arguments to the command lines.
    "__main__.py": "entry point",
    # Shims kept for one release at the old import paths; they only re-export from net/.
    # (syncfed/coordinator.py and syncfed/worker.py need none: they become the packages.)
    "client.py": "shim for syncfed.net.link",
    "transport.py": "shim for syncfed.net.transport",
    "spawn.py": "shim for syncfed.net.spawn",
    "secure_round.py": "shim for syncfed.net.secure_round",
}

#: The largest rooms the package allows.
MAX_FILE_LINES = 800
MAX_CLASS_LINES = 300


def modules() -> Iterator[Path]:
    """Every Python file of the package, in a stable order."""
    yield from sorted(PACKAGE.rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def is_io(path: Path) -> bool:
    return path.relative_to(PACKAGE).parts[0] in IO_PACKAGES


def module_name(path: Path) -> str:
    """``syncfed/net/link.py`` -> ``syncfed.net.link``, ``syncfed/net/__init__.py`` -> ``syncfed.net``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import statement of ``path``, wherever it stands,
    relative imports resolved; ``from x import y`` gives both ``x`` and ``x.y``, as y may be a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            yield node.lineno, source
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_package_is_where_the_checks_look() -> None:
    assert (PACKAGE / "__init__.py").is_file()
    assert any(not is_io(path) for path in modules())


def test_pure_modules_import_neither_asyncio_nor_websockets() -> None:
    broken = sorted(
        {
            (relative(path), line, library)
            for path in modules()
            if not is_io(path)
            for line, name in imported(path)
            for library in IO_LIBRARIES
            if within(name, library)
        }
    )
    assert not broken, "pure modules that import asyncio or websockets:\n" + "\n".join(
        f"{file}:{line} imports {library}" for file, line, library in broken
    )


def test_pure_modules_import_nothing_from_the_io_packages() -> None:
    # The shims re-export I/O, so importing one is importing from net/.
    shims = [name.removesuffix(".py") for name in ALLOWED_TO_IMPORT_IO if not name.startswith("__")]
    forbidden = [f"syncfed.{package}" for package in (*IO_PACKAGES, *shims)]
    broken = sorted(
        {
            (relative(path), line, package)
            for path in modules()
            if not is_io(path) and path.relative_to(PACKAGE).as_posix() not in ALLOWED_TO_IMPORT_IO
            for line, name in imported(path)
            for package in forbidden
            if within(name, package)
        }
    )
    assert not broken, "pure modules that import from coordinator/, worker/, net/, cli/ or a shim of them:\n" + (
        "\n".join(f"{file}:{line} imports {package}" for file, line, package in broken)
    )


def test_the_allowed_exceptions_still_exist() -> None:
    """An allow-list entry whose file is gone is removed, so that the list stays short and true."""
    stale = sorted(name for name in ALLOWED_TO_IMPORT_IO if not (PACKAGE / name).is_file())
    assert not stale, "allow-listed modules that no longer exist (remove them from the list): " + ", ".join(stale)


def test_no_file_is_over_the_line_limit() -> None:
    broken = [
        f"{relative(path)} has {lines} lines, over {MAX_FILE_LINES}"
        for path in modules()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    ]
    assert not broken, "\n".join(broken)


def test_no_class_is_over_the_line_limit() -> None:
    broken = [
        f"{relative(path)}:{node.lineno} class {node.name} has {lines} lines, over {MAX_CLASS_LINES}"
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef)
        and (lines := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_CLASS_LINES
    ]
    assert not broken, "\n".join(broken)
