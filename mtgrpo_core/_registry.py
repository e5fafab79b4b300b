"""A tiny name -> factory registry shared by the controller kinds (task weighting, advantage
weighting, rollout allocation): one set of names for the trainer, the simulator, the
integrations and the CLI (docs/ARCHITECTURE.md, "Names")."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    """Factories registered under a canonical name plus aliases.

    Parameters
    ----------
    kind : str
        What is registered ("task weighting", ...), used in error messages.
    required : tuple of str
        Attributes a registered class must have (checked at registration).
    """

    def __init__(self, kind: str, required: tuple[str, ...] = ()):
        self.kind = kind
        self.required = tuple(required)
        self.factories: dict[str, Callable[..., Any]] = {}
        self.aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str, factory: Callable[..., Any] | None = None):
        """Register ``factory`` (or, used as a decorator, the decorated class) under ``name``."""
        for n in (name, *aliases):
            if not isinstance(n, str) or not n:
                raise ValueError(f"name: expected a non-empty string, got {n!r}")
            if n in self.factories or n in self.aliases:
                raise ValueError(f"name: {self.kind} {n!r} is already registered")

        def deco(obj):
            if isinstance(obj, type):
                missing = [a for a in self.required if not hasattr(obj, a)]
                if missing:
                    raise TypeError(f"{obj.__name__}: a {self.kind} needs {missing}")
            self.factories[name] = obj
            for a in aliases:
                self.aliases[a] = name
            return obj

        if factory is not None:
            return deco(factory)
        return deco

    def names(self, *, aliases: bool = False) -> tuple[str, ...]:
        """Canonical names (and, with ``aliases=True``, the aliases after them)."""
        return tuple(self.factories) + (tuple(self.aliases) if aliases else ())

    def canonical(self, name: str) -> str:
        """The canonical name of ``name``; ValueError listing the choices when unknown."""
        if isinstance(name, str):
            if name in self.factories:
                return name
            if name in self.aliases:
                return self.aliases[name]
        raise ValueError(f"{self.kind}: expected one of {self.names(aliases=True)}, got {name!r}")

    def make(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build the object registered as ``name`` (or an alias of it)."""
        return self.factories[self.canonical(name)](*args, **kwargs)
