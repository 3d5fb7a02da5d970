"""The packages form layers: core at the bottom, data and modules on it (never on each other), trainer on all.

Every import of every file is read with `ast`, wherever it sits: at the top, inside a function, under
`if TYPE_CHECKING:`. Relative imports are resolved, so `from ...data import x` cannot climb around the
rule, and a string that is exactly a slimtrain module name counts too (an `import_module` table imports it).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The packages each one may not import; trainer may import all of them.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("data", "modules", "trainer"),
    "data": ("modules", "trainer"),
    "modules": ("data", "trainer"),
    "trainer": (),
}
_MODULE_NAME = re.compile(r"slimtrain(\.\w+)+")


def imported_names(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the source of `module`.

    `from a import b` yields both `a` and `a.b`, since b may be a module (`from slimtrain import data`).
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            yield node.lineno, node.value


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from` import names, its leading dots resolved against `module`."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)] if node.level - 1 < len(parts) else ["<above-top-level>"]
    return ".".join(parts + ([node.module] if node.module else []))


def violations(package: str, source: str, module: str, is_package: bool = False) -> list[str]:
    """`line: name` for each import in `source` (a file of `package`) of a package it may not import."""
    banned = tuple(f"slimtrain.{p}" for p in FORBIDDEN[package])
    return [f"{line}: {name}" for line, name in imported_names(source, module, is_package)
            if any(name == b or name.startswith(b + ".") for b in banned)]


def _module_of(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(ROOT).with_suffix("")
    is_package = rel.name == "__init__"
    parts = rel.parts[:-1] if is_package else rel.parts
    return ".".join(("slimtrain", *parts)), is_package


def test_packages_import_only_lower_layers() -> None:
    bad = []
    for package in FORBIDDEN:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no Python files under {package}/"  # an empty walk would pass vacuously
        for path in files:
            module, is_package = _module_of(path)
            for where in violations(package, path.read_text(encoding="utf-8"), module, is_package):
                bad.append(f"{path.relative_to(ROOT)}:{where}")
    assert not bad, "imports against the layering (core <- data, modules <- trainer):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "package, module, source",
    [
        ("core", "slimtrain.core.masks", "import slimtrain.trainer.lifecycle.loop"),
        ("core", "slimtrain.core.masks", "from slimtrain import data"),
        ("data", "slimtrain.data.packing", "def f():\n    from slimtrain.modules.plugin import Plugin\n"),
        ("data", "slimtrain.data.batch",
         "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from slimtrain.trainer.recipe.schema import Recipe\n"),
        ("modules", "slimtrain.modules.transformer.model", "from ...data import batch"),
        ("modules", "slimtrain.modules.transformer.model", "from ...data.batch import Batch"),
        ("modules", "slimtrain.modules.plugin_registry", "importlib.import_module('slimtrain.trainer.lifecycle.run')"),
    ],
)
def test_checker_reports_forbidden_imports(package: str, module: str, source: str) -> None:
    assert violations(package, source, module)


@pytest.mark.parametrize(
    "package, module, source",
    [
        ("data", "slimtrain.data.packing", "from slimtrain.core.registry import Registry"),
        ("modules", "slimtrain.modules.transformer.model", "from .attention import bind_attention\nfrom .. import plugin"),
        ("trainer", "slimtrain.trainer.lifecycle.run", "from slimtrain.data import prepare\nimport slimtrain.modules"),
    ],
)
def test_checker_allows_imports_down_the_layers(package: str, module: str, source: str) -> None:
    assert violations(package, source, module) == []
