"""The example plugins (tests/plugins/example_plugins), registered in this process and, for the
`slimtrain train` subprocesses, through an entry-point distribution on PYTHONPATH, as a third-party
package would ship them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer"))  # train_helpers: runs `slimtrain train` as a user would
EXAMPLES = ("router", "probe", "splice")


@pytest.fixture(scope="session")
def example_plugins() -> None:
    """Register router, probe and splice in this process (once)."""
    import importlib

    from slimtrain.modules.plugin_registry import PLUGINS, register_plugin

    for name in EXAMPLES:
        config_cls, plugin_cls = importlib.import_module(f"example_plugins.{name}").ENTRY
        if name not in PLUGINS:
            register_plugin(name, config_cls)(plugin_cls)


@pytest.fixture(scope="session")
def entry_point_env(tmp_path_factory) -> dict[str, str]:
    """Environment for a subprocess that finds the examples through the `slimtrain.plugins` entry points."""
    site = tmp_path_factory.mktemp("site")
    info = site / "slimtrain_example_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slimtrain-example-plugins\nVersion: 0.1\n")
    lines = [f"{name} = example_plugins.{name}:ENTRY" for name in EXAMPLES]
    (info / "entry_points.txt").write_text("[slimtrain.plugins]\n" + "\n".join(lines) + "\n")
    path = os.pathsep.join([str(site), str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path}
