"""Test-only: installs the megatron CPU shim in every Python process started with this directory on PYTHONPATH."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_shim  # noqa: E402

cpu_shim.install()
