"""A name -> builder registry, one instance per kind (models, losses, synthetic generators, data sources).

Top level so that ``models`` and ``data`` can each keep one without importing each other.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``@registry.register("name")`` on a builder; ``registry.build("name", **kwargs)``.

    Args:
        kind: what is registered, for messages ("model", "synthetic generator").
        listing: how users list the names, for the unknown-name message.
    """

    def __init__(self, kind: str, listing: str):
        self.kind, self.listing = kind, listing
        self._builders: dict[str, Callable[..., T]] = {}
        self._info: dict[str, dict] = {}

    def register(self, name: str, **info):
        """Decorator registering a builder under ``name``; ``info`` is kept for ``info(name)``."""
        def wrap(builder):
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = builder
            self._info[name] = dict(info)
            return builder

        return wrap

    def check(self, name: str) -> None:
        """Raise ValueError for an unknown name, listing the closest registered ones."""
        if name not in self._builders:
            near = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            raise ValueError(f"unknown {self.kind} '{name}'" + (f"; did you mean {', '.join(near)}?" if near else "")
                             + f" ({self.listing} shows all)")

    def get(self, name: str) -> Callable[..., T]:
        """The builder registered as ``name`` (a function or a class)."""
        self.check(name)
        return self._builders[name]

    def info(self, name: str) -> dict:
        """What was registered with ``name`` besides its builder (e.g. a model's kind)."""
        self.check(name)
        return dict(self._info[name])

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names, sorted; ``pattern`` filters with shell wildcards."""
        names = sorted(self._builders)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def parameters(self, name: str) -> list[str]:
        """Keyword arguments the builder of ``name`` accepts (for early config checks)."""
        return [p.name for p in inspect.signature(self._builders[name]).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def build(self, name: str, **kwargs) -> T:
        self.check(name)
        return self._builders[name](**kwargs)
