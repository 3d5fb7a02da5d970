"""Typed errors the user can act on. Each message names the field or file, the bad value and the fix."""


class SlimtrainError(Exception):
    """Base class of the errors slimtrain raises for bad input or state."""


class RecipeError(SlimtrainError, ValueError):
    """A recipe (or a command-line override) is invalid; raised before any work starts."""


class CheckpointError(SlimtrainError):
    """A checkpoint is missing, incomplete or does not match the recipe."""


class TrainingStopped(SlimtrainError):
    """The run stopped on purpose (e.g. too many non-finite losses); the message says why and what to do."""
