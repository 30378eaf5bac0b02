"""A strict name -> factory registry (fvcore style): duplicates and unknown names are errors."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, Literal, TypeVar

import yaml

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name or setting; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SettingError(RegistryError):
    """A known setting with a value of the wrong type or out of range; the message names it."""


# Lower bounds of numeric settings by name, e.g. {"temperature": (">", 0.0)}; None passes (an optional setting).
Bounds = Mapping[str, tuple[str, float]]


def check_settings(values: Mapping[str, Any], hints: Mapping[str, Any], bounds: Bounds = {}, prefix: str = "") -> None:  # noqa: B006
    """Raise :class:`SettingError` naming the first value that is not of its annotated type or below its bound.

    Config files and command lines reach constructors as plain values; checking them here makes a temperature of
    ``"1e3"`` (a string to PyYAML), a negative learning rate or a batch size of 0 fail at once, not mid-run.
    """
    for name, value in values.items():
        hint = hints.get(name, Any)
        if not _matches(value, hint):
            raise SettingError(f"{prefix}{name}={value!r} is not {_describe(hint)}{_yaml_note(value, hint)}")
        if not _finite(value):
            raise SettingError(f"{prefix}{name}={value!r} must be finite")
        op, bound = bounds.get(name, (None, None))
        if op is not None and value is not None and not (value > bound if op == ">" else value >= bound):
            raise SettingError(f"{prefix}{name}={value!r} must be {op} {bound}")


def plain_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The annotations of ``factory``'s parameters that :func:`check_settings` judges: plain types, Literals, lists.

    Plain types are int, float, bool, str and None.

    A user's dataset reader or model may take a Path, a tuple, ... (its own business), or annotate with names it imports
    only for type checkers.
    """
    try:  # a signature, not get_type_hints: a factory may be a class, a functools.partial or a callable object
        parameters = inspect.signature(factory, eval_str=True).parameters.values()
    except NameError:
        return {}
    hints = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}

    def plain(hint: Any) -> bool:
        if typing.get_origin(hint) is Literal:
            return True
        if typing.get_origin(hint) in (typing.Union, types.UnionType, list):
            return all(map(plain, typing.get_args(hint)))
        return hint in (int, float, bool, str, type(None))

    return {key: hint for key, hint in hints.items() if plain(hint)}


def numeric_bounds(bounds: Bounds, hints: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """The ``bounds`` of settings that ``hints`` annotate as numbers only (or None): a bound can judge their values.

    A user's model or reader may take a ``width`` of another kind (a list, a name): a bound by name does not apply.
    """

    def numeric(hint: Any) -> bool:
        return {*(typing.get_args(hint) or [hint])} - {type(None)} <= {int, float}

    return {key: bound for key, bound in bounds.items() if key in hints and numeric(hints[key])}


class Settings:
    """Mixin for dataclasses whose fields are settings: :func:`check_settings` runs on construction."""

    lower_bounds: ClassVar[Bounds] = {}

    def __post_init__(self) -> None:
        check_settings(self.settings(), typing.get_type_hints(type(self)), self.lower_bounds)

    def settings(self) -> dict[str, Any]:
        """Every setting by name, defaults included: what the object computes with (results.json records it)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]


def _finite(value: Any) -> bool:
    """False for a float that is inf or nan (YAML's ``.inf``, ``.nan``), or a list holding one; integers are finite."""
    items = value if isinstance(value, list | tuple) else [value]
    floats = [v for v in items if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral)]
    return all(math.isfinite(v) for v in floats)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (float accepts int; bool is not a number)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint in (float, int):  # numpy scalars too; bool is an int to Python, not a number of a setting
        return isinstance(value, numbers.Real if hint is float else numbers.Integral) and not isinstance(value, bool)
    if origin is list:  # list[int] -> a list or tuple of integers
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list | tuple) and all(_matches(v, item) for v in value)
    return isinstance(value, origin or hint)


def _yaml_note(value: Any, hint: Any) -> str:
    """PyYAML (YAML 1.1) reads ``1e3``, ``1e-3`` and ``None`` as strings: say so where a number or null was meant.

    A single value where a list is expected (``mean=0.5``): say how to write the list.
    """
    if value == "None" and _matches(None, hint):
        return " (YAML reads None as text: write null)"
    if value is not None and not isinstance(value, list | tuple) and _matches([value], hint):
        return f" (write a list: {yaml.safe_dump([value], default_flow_style=True).strip()})"  # 1e-05 as 1.0e-05
    if isinstance(value, str) and _matches(1.0, hint):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (YAML reads it as text: write {float(value)!r})"
    return ""


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is list and typing.get_args(hint):
        plural = {float: "numbers", int: "integers", str: "strings"}
        item = typing.get_args(hint)[0]
        return f"a list of {plural.get(item, _describe(item))}"
    names = {float: "a number", int: "an integer", type(None): "None"}
    return names.get(hint, getattr(origin or hint, "__name__", str(hint)))


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
        # A list or mapping (a YAML typo such as name: [odin]) is unhashable: `in` would raise a bare TypeError.
        if not isinstance(name, str) or name not in self._items:
            # '{name:dos}' is a YAML string: a flow mapping needs a space after each colon
            brace = isinstance(name, str) and name.startswith("{")
            hint = " (a mapping needs a space after each ':', e.g. {name: value})" if brace else ""
            raise RegistryError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(self.names())}")
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
