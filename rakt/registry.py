"""The one way rakt keeps a family of choices: stages, KD modes, adapt modes, curation rules, transfer sets,
engines and index schemes are each a `Registry`, a name -> entry mapping in registration order with a decorator,
a duplicate check and one lookup error. Installed packages can add entries through an entry-point group.

The lowest layer: it imports nothing of rakt, so every package (rakt.indexes included) uses it.
"""
from __future__ import annotations

import importlib.metadata
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """`what` names an entry in messages ("KD mode"); `error` is the exception an unknown name raises (a stage's
    input or config error); `replace` lets a name be registered again (index schemes: a re-run notebook cell);
    `entry_points`: the importlib.metadata group whose entries (loaded on first use) extend the registry."""

    def __init__(self, what: str, entries: dict[str, T] | None = None, *, error: type[Exception] = ValueError,
                 replace: bool = False, entry_points: str | None = None) -> None:
        super().__init__()
        self.what, self.error, self.replace, self.group = what, error, replace, entry_points
        for name, entry in (entries or {}).items():
            self.add(name, entry)

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name registered before is refused unless the registry replaces."""
        if name in self and not self.replace:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = entry
        return entry

    def register(self, name: str, make: Callable[[Callable], T] | None = None) -> Callable[[Callable], Callable]:
        """Decorator: register `make(fn)` (or `fn` itself) under `name`; returns `fn` unchanged."""
        def decorate(fn: Callable) -> Callable:
            self.add(name, make(fn) if make is not None else fn)
            return fn

        return decorate

    def copy(self) -> "Registry[T]":
        """A registry with the same entries and settings (e.g. for a test that registers its own entry)."""
        return Registry(self.what, dict(self), error=self.error, replace=self.replace, entry_points=self.group)

    def names(self) -> list[str]:
        """Registered names in order, then those the entry-point group declares."""
        return [*self, *(n for n in sorted(self._declared()) if n not in self)]

    def lookup(self, name: str) -> T:
        """The entry `name` (loaded from its entry point the first time); an unknown name raises `error` listing
        the choices."""
        if name in self:
            return self[name]
        point = self._declared().get(name)
        if point is None:
            raise self.error(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        try:
            entry = point.load()
        except Exception as e:  # an installed plugin that fails to import: say which one
            raise self.error(f"{self.what} {name!r}: entry point {point.value!r} ({self.group}) failed to load: "
                             f"{type(e).__name__}: {e}; reinstall or fix that package") from e
        return entry

    def _declared(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self.group is None:
            return {}
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}
