"""The package installs under one import name and exposes the three sub-packages."""

import importlib


def test_subpackages_import_under_slimtrain() -> None:
    for name in ("slimtrain.trainer", "slimtrain.modules", "slimtrain.data"):
        mod = importlib.import_module(name)
        assert mod.__name__ == name


def test_no_bare_top_level_packages() -> None:
    # DESIGN.md: a user's environment must never get bare `trainer`, `modules` or `data` packages.
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here and p != ""]
        for bare in ("trainer", "modules"):
            assert importlib.util.find_spec(bare) is None, f"bare package {bare!r} is importable"
    finally:
        sys.path[:] = saved
