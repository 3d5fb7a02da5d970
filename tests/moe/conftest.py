"""tests/trainer's helpers (train_helpers: `slimtrain train` run as a user runs it) for the MoE training tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
