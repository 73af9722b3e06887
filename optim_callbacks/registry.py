"""A small generic name -> entry registry whose lookups fail with the closest valid name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from optim_callbacks.validation import check_choice

__all__ = ["Registry"]

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries by name, with explicit aliases.

    ``kind`` names what the registry holds ("optimizer", "scheduler"); it is the parameter
    name used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self, name: str, entry: Entry, *, aliases: tuple[str, ...] = (), replace: bool = False
    ) -> Entry:
        for key in (name, *aliases):
            if not replace and (key in self._entries or key in self._aliases):
                raise ValueError(
                    f"{self.kind}: {key!r} is already registered; pass replace=True to override it"
                )
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name
        return entry

    def unregister(self, name: str) -> Entry:
        """Remove ``name`` (or the entry an alias of it names) and its aliases; return the entry."""
        key = self.canonical(name)
        for alias in [a for a, target in self._aliases.items() if target == key]:
            del self._aliases[alias]
        return self._entries.pop(key)

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases."""
        key = name.lower() if isinstance(name, str) else name
        key = self._aliases.get(key, key)
        check_choice(self.kind, key, [*self._entries, *self._aliases])
        return key

    def get(self, name: str) -> Entry:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered names in registration order (aliases not included)."""
        return list(self._entries)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def items(self) -> Iterator[tuple[str, Entry]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
