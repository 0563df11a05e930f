"""Backend kinds by name, each with a typed configuration section in ``venna.toml``.

A kind is a ``BackendKind``: a name, a dataclass whose fields are the keys of an
``[upstreams.NAME]`` section (``kind = "<kind>"``), and a function that builds a backend from a
parsed section. Kinds are found three ways, all ending in ``register``:

* the built-ins, listed below as ``module:attribute`` references and imported only when a
  routing table asks for them;
* packages installed beside Venna that declare an entry point in the group ``venna.backends``
  (``mykind = "my_package.backend:KIND"``), loaded the same way;
* ``register(kind)`` called directly, for a program that embeds Venna.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

from venna.backends.base import UNOBSERVED, Backend, UpstreamObserver

ENTRY_POINT_GROUP = "venna.backends"

# Venna's own kinds, loaded through the same path as a third party's.
BUILTIN_KINDS: Mapping[str, str] = {
    "echo": "venna.backends.echo:KIND",
    "responses": "venna.backends.responses:KIND",
}

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a kind's ``build`` knows besides its section."""

    # The upstream's name in the routing table: it serves the models ``<name>/<model>``.
    name: str
    # The environment, for settings kept out of files (API keys).
    environ: Mapping[str, str]
    # Where a backend that calls an upstream reports each request (the server's metrics).
    observer: UpstreamObserver = UNOBSERVED


@dataclass(frozen=True, slots=True)
class BackendKind(Generic[ConfigT]):
    """One kind of backend: how its section reads and how a backend is made from it."""

    name: str
    # A dataclass: its fields are the section's keys (those with defaults are optional).
    # ``__post_init__`` may raise ValueError to refuse a combination of values.
    config: type[ConfigT]
    build: Callable[[ConfigT, BuildContext], Backend]
    description: str = ""


class UnknownKind(LookupError):
    """No kind of that name is registered, built in or installed."""


_kinds: dict[str, BackendKind[Any]] = {}


def register(kind: BackendKind[Any]) -> BackendKind[Any]:
    """Makes ``kind`` available by its name; registering the same kind again is harmless."""
    if not dataclasses.is_dataclass(kind.config):
        raise TypeError(f"backend kind '{kind.name}': its config must be a dataclass")
    known = _kinds.get(kind.name)
    if known is not None and known is not kind:
        raise ValueError(f"backend kind '{kind.name}' is registered already")
    _kinds[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Forgets kind ``name`` (for programs and tests that registered one for a while)."""
    _kinds.pop(name, None)


def get(name: str) -> BackendKind[Any]:
    """The kind called ``name``; imports a built-in or installed one on first use."""
    if name not in _kinds:
        reference = BUILTIN_KINDS.get(name) or _installed().get(name)
        if reference is None:
            raise UnknownKind(f"unknown backend kind '{name}'; known: {', '.join(names())}")
        register(_load(name, reference))
    return _kinds[name]


def names() -> list[str]:
    """Every kind that can be used: registered, built in or installed."""
    return sorted({*_kinds, *BUILTIN_KINDS, *_installed()})


def _installed() -> dict[str, str]:
    """Kinds of installed packages: entry point name -> ``module:attribute``."""
    return {point.name: point.value for point in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load(name: str, reference: str) -> BackendKind[Any]:
    module_name, _, attribute = reference.partition(":")
    value = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    if not isinstance(value, BackendKind) or value.name != name:
        raise TypeError(f"'{reference}' is not the backend kind '{name}'")
    return value


# --------------------------------------------------------------------------------- sections


def parse_config(kind: BackendKind[ConfigT], section: Mapping[str, Any]) -> ConfigT:
    """``section`` as ``kind``'s config; ValueError names the first key that is wrong."""
    fields = {field.name: field for field in dataclasses.fields(kind.config)}  # type: ignore[arg-type]
    unknown = set(section) - set(fields)
    if unknown:
        raise ValueError(f"unknown keys {', '.join(sorted(unknown))} for kind '{kind.name}'")
    hints = typing.get_type_hints(kind.config)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in section:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"'{name}' is required")
            continue
        values[name] = _checked(name, section[name], hints[name])
    return kind.config(**values)


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it has type ``hint`` (str, int, float, bool, list[str], ``X | None``)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None):
            continue
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [_checked(name, element, item) for element in value]
    expected = " or ".join(_describe(option) for option in options if option is not type(None))
    raise ValueError(f"'{name}' must be {expected}, got {value!r}")


_NAMES = {
    str: ("a string", "strings"),
    int: ("a whole number", "whole numbers"),
    float: ("a number", "numbers"),
}


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_NAMES[item][1] if item in _NAMES else item}"
    if hint is bool:
        return "true or false"
    return _NAMES[hint][0] if hint in _NAMES else str(hint)
