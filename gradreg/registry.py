"""A strict name -> factory registry (fvcore style): duplicates and unknown names are errors."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name or setting; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SettingError(RegistryError):
    """A known setting with a value of the wrong type or out of range; the message names it."""


class Registry(Generic[T]):
    """Map short names to factories (classes or functions).

    Example:
        >>> REG = Registry("toys")
        >>> @REG.register("one")
        ... def one(scale: float = 1.0):
        ...     return scale
        >>> REG.build({"name": "one", "scale": 2.0})
        2.0
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a factory under ``name``."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise RegistryError(f"{self.kind} '{name}' is already registered")
            self._items[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory registered as ``name``; unknown names list the valid ones."""
        if name not in self._items:
            raise RegistryError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")
        return self._items[name]

    def settings(self, name: str) -> list[str]:
        """Names of the keyword settings the factory accepts."""
        factory = self.get(name)
        if dataclasses.is_dataclass(factory):
            return [f.name for f in dataclasses.fields(factory) if f.init]
        params = inspect.signature(factory).parameters.values()
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def build(self, spec: str | Mapping[str, Any], **extra: Any) -> T:
        """Build from a name or a ``{"name": ..., **settings}`` mapping; unknown settings are errors."""
        if isinstance(spec, str):
            name, settings = spec, {}
        elif isinstance(spec, Mapping) and "name" in spec:
            settings = {k: v for k, v in spec.items() if k != "name"}
            name = spec["name"]
        else:
            raise ValueError(f"a {self.kind} spec is a name or a mapping with a 'name' key, got {spec!r}")
        settings = {**extra, **settings}
        valid = self.settings(name)
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise RegistryError(
                f"unknown setting(s) {', '.join(unknown)} for {self.kind} '{name}'; "
                f"valid: {', '.join(valid) or '(none)'}"
            )
        try:
            return self.get(name)(**settings)
        except SettingError as err:
            raise SettingError(f"{self.kind} '{name}': {err}") from None
