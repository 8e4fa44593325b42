"""Registries of the extension points: methods, models and data sets, each ``name -> factory``.

One class serves all three: a decorator to register, the sorted names, a lookup that names the valid
choices on a typo, and per-entry metadata (a data set's preset).
The registries live here, below every layer that fills them, so the config can validate a name
without importing the trainer.

Examples
--------
>>> from l2b.registry import Registry
>>> shapes = Registry("shape")
>>> @shapes.register("square", sides=4)
... def square():
...     return "square"
>>> shapes.names(), shapes.get("square")(), shapes.meta("square")
(['square'], 'square', {'sides': 4})
"""

from __future__ import annotations

import logging
from typing import Callable, Generic, TypeVar

from .errors import L2BError, closest

__all__ = ["Registry", "METHODS", "MODELS", "DATASETS", "DATA_FORMATS"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)
_REQUIRED = object()


class Registry(Generic[F]):
    """Names of one kind (``"method"``, ``"model"``, ``"dataset"``) mapped to factories and metadata."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}
        self._meta: dict[str, dict] = {}

    def register(self, name: str, **meta) -> Callable[[F], F]:
        """Decorator: make ``fn`` available as ``name``; keyword arguments are kept as its metadata.

        Registering a name again replaces the earlier entry (with a log message), so a user can
        override a built-in one.
        """
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':' or surrounding spaces, "
                             f"got {name!r}")

        def add(fn: F) -> F:
            if name in self._entries and self._entries[name] is not fn:
                log.info("%s %r registered again: the new entry replaces the old one", self.kind, name)
            self._entries[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str) -> None:
        """Raise :class:`L2BError` naming the valid choices (or the package to install) for an unknown name."""
        if name in self._entries:
            return
        raise L2BError(f"unknown {self.kind} {name!r}{closest(name, self._entries)}; "
                       f"choose one of: {', '.join(self.names())}")

    def get(self, name: str, default=_REQUIRED) -> F:
        """The factory registered as ``name``; without ``default``, an unknown name raises :class:`L2BError`."""
        if default is not _REQUIRED and name not in self._entries:
            return default
        self.check(name)
        return self._entries[name]

    # item access, so a test can swap an entry for its duration (pytest's monkeypatch.setitem)
    def __getitem__(self, name: str) -> F:
        return self._entries[name]

    def __setitem__(self, name: str, fn: F) -> None:  # the swapped entry keeps its metadata (a preset)
        self.register(name, **self._meta.get(name, {}))(fn)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        del self._meta[name]

    def meta(self, name: str) -> dict:
        self.check(name)
        return dict(self._meta[name])


METHODS: Registry = Registry("method")  # name -> factory(**config values) -> Method (l2b.methods)
MODELS: Registry = Registry("model")  # name -> builder(num_classes, in_channels, **kw) -> nn.Module (l2b.models)
DATASETS: Registry = Registry("dataset")  # name -> loader(cfg) -> ImageData (l2b.data)
DATA_FORMATS: Registry = Registry("data format")  # prefix of "KIND:PATH" -> loader(path, cfg) -> ImageData
