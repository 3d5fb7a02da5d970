"""Distributed engines behind the Backend protocol (DESIGN.md, seam 5)."""

from slimtrain.trainer.backends.base import Backend, LossFn, StepResult
from slimtrain.trainer.registry import BACKENDS

__all__ = ["Backend", "LossFn", "StepResult", "BACKENDS", "build_backend"]


def build_backend(name: str, **kwargs) -> Backend:
    """Instantiate the registered backend `name`."""
    # Importing the module registers it; kept lazy so `import slimtrain.trainer` never pulls DeepSpeed.
    if name == "deepspeed":
        import slimtrain.trainer.backends.deepspeed  # noqa: F401
    return BACKENDS.get(name)(**kwargs)
