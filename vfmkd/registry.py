"""A small name -> builder registry shared by backbones, necks, heads, teachers and losses."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator, TypeVar

from vfmkd.errors import UserError

T = TypeVar("T", bound=Callable[..., Any])


class UnknownNameError(UserError, KeyError):
    """A name no registry entry has; a KeyError (as before) that prints as its message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry:
    """Maps names to classes or factories.

    Registration happens where the class is defined; modules that pull in optional heavy
    packages import them inside the function that needs them, so registering stays cheap.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (default: its ``__name__``) and aliases."""

        def decorator(obj: T) -> T:
            for key in (name or obj.__name__, *aliases):
                if key in self._entries and self._entries[key] is not obj:
                    raise KeyError(f"{self.kind} '{key}' is already registered")
                self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        """Return the entry for ``name``; an unknown name lists the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'.{hint} Known: {', '.join(sorted(self._entries))}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
TEACHERS = Registry("teacher")
LOSSES = Registry("loss")
EVALUATORS = Registry("evaluator")
