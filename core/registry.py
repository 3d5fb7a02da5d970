"""Named registries (packers, plugins, backends, adapters): implementations chosen by name, never by getattr.

Lives in the lowest layer (`slimtrain.core`) so that `data`, `modules` and `trainer` can all register
without importing each other. `did_you_mean` is the one place that suggests a close name in an error.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A recipe named something no registry entry is called; the message lists what exists."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`"did you mean 'x'?"` for the choice closest to `word`, or `""` when none is close enough."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """A name → factory table with a did-you-mean error for unknown names.

    kind: what an entry is, as the errors say it ("packer", "plugin").
    also_valid: names the caller accepts besides the entries and resolves before any lookup (an
        attention backend's "auto"); an unknown-name error lists them first, so it shows every choice.
    """

    def __init__(self, kind: str, *, also_valid: Iterable[str] = ()) -> None:
        self.kind = kind
        self.also_valid = tuple(also_valid)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering `obj` under `name`; a second registration of a name is an error."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry called `name`, or an UnknownNameError listing the names that exist."""
        if name not in self._items:
            choices = [*self.also_valid, *sorted(self._items)]
            hint = did_you_mean(name, choices)
            hint = f"{hint} " if hint else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}; {hint}choose one of {choices}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
