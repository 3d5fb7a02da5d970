"""The package installs under one import name and exposes the four sub-packages (layering: test_layering.py)."""

import importlib
import subprocess
import sys
import tempfile


def test_subpackages_import_under_slimtrain() -> None:
    for name in ("slimtrain.core", "slimtrain.trainer", "slimtrain.modules", "slimtrain.data"):
        mod = importlib.import_module(name)
        assert mod.__name__ == name


def test_no_bare_top_level_packages() -> None:
    # DESIGN.md: a user's environment must never get bare `core`, `trainer`, `modules` or `data` packages.
    # Checked in a fresh interpreter outside the repository, so that neither the checkout nor the
    # test directories on pytest's sys.path can make them importable.
    code = "import importlib.util as u; print([n for n in ('core', 'trainer', 'modules', 'data') if u.find_spec(n)])"
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

