"""The package installs under one import name and exposes the three sub-packages."""

import importlib
import subprocess
import sys
import tempfile


def test_subpackages_import_under_slimtrain() -> None:
    for name in ("slimtrain.trainer", "slimtrain.modules", "slimtrain.data"):
        mod = importlib.import_module(name)
        assert mod.__name__ == name


def test_no_bare_top_level_packages() -> None:
    # DESIGN.md: a user's environment must never get bare `trainer`, `modules` or `data` packages.
    # Checked in a fresh interpreter outside the repository, so that neither the checkout nor the
    # test directories on pytest's sys.path can make them importable.
    code = "import importlib.util as u; print([n for n in ('trainer', 'modules', 'data') if u.find_spec(n)])"
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_layers_do_not_import_upwards() -> None:
    # modules/ is the lowest layer, data/ may use it, and neither may import the trainer (seam 3).
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    bad = []
    for layer in ("modules", "data"):
        for path in (root / layer).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.match(r"\s*(from|import)\s+slimtrain\.trainer", line):
                    bad.append(f"{path.relative_to(root)}: {line.strip()}")
    assert not bad, bad
