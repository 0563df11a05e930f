"""Which backend serves a model name, from the built-in backends and an optional ``venna.toml``.

A model name is a base name optionally followed by ``:``-separated options
(``echo:delay_ms=50``), or a provider prefix and the provider's model (``venice/qwen3``); the
base name or prefix picks the backend, and the backend checks the rest. An alias names another
model (``venna-1`` → ``venice/zai-org-glm-5-1``); options after an alias are kept
(``venna-1:enable_web_search=on``).

``venna.toml`` adds upstreams and aliases::

    [upstreams.local]                       # serves local/<model>
    base_url = "http://127.0.0.1:8000/v1"
    api_key_env = "LOCAL_API_KEY"           # the environment variable holding the key
    dialect = "openai"                      # "venice" (nested tools, the default) or "openai"
    accepts = ["temperature", "top_p", "max_output_tokens", "stop", "seed", "tools", "tool_choice"]

    [aliases]
    "venna-1" = "venice/zai-org-glm-5-1"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from venna.backends.base import OPTIONAL_SETTINGS, Backend
from venna.server.errors import invalid_argument, quoted

DEFAULT_CONFIG = Path("venna.toml")
_UPSTREAM_KEYS = frozenset(
    {
        "base_url",
        "api_key_env",
        "dialect",
        "accepts",
        "connect_timeout",
        "read_timeout",
        "max_attempts",
    }
)


class ConfigError(ValueError):
    """A routing table that cannot be served; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Route:
    """A resolved model: the backend and the model name it receives (aliases expanded)."""

    backend: Backend
    model: str


class Router:
    """A fixed table from base model name to backend, plus aliases."""

    def __init__(self, backends: Mapping[str, Backend], aliases: Mapping[str, str] | None = None) -> None:
        self._backends = dict(backends)
        self._aliases = dict(aliases or {})

    async def aclose(self) -> None:
        """Releases what backends hold (connection pools), once each."""
        for backend in {id(backend): backend for backend in self._backends.values()}.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()

    @property
    def models(self) -> list[str]:
        return sorted({*self._backends, *self._aliases})

    def resolve(self, model: str) -> Route:
        """The route of ``model``; resolving a resolved name gives the same route."""
        head, colon, options = model.partition(":")
        target = self._aliases.get(head)
        if target is not None:
            model = f"{target}:{options}" if colon else target
        backend = self._backends.get(_base_name(model))
        if backend is None:
            # Which models exist is the operator's business, not every caller's.
            raise invalid_argument(
                "model", f"The requested model '{quoted(model)}' does not exist.", reason="MODEL_NOT_FOUND"
            )
        return Route(backend, model)


def _base_name(model: str) -> str:
    """``echo:delay_ms=5`` -> ``echo``; ``venice/qwen3:suffix`` -> ``venice`` (a provider prefix)."""
    head = model.split(":", 1)[0]
    return head.split("/", 1)[0]


def default_router(config: Path | None = None, environ: Mapping[str, str] | None = None) -> Router:
    """The built-in backends (echo, and Venice from ``VENICE_*``), extended by a ``venna.toml``.

    ``config`` defaults to ``./venna.toml`` when that file exists; a named file must exist.
    Backends are imported here so that a deployment pays only for what it routes.
    """
    from venna.backends.echo import MODEL_NAMES, EchoBackend
    from venna.backends.venice import DEFAULT_BASE_URL, VeniceBackend

    environ = os.environ if environ is None else environ
    table: dict[str, Any] = {}
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    if config is not None:
        table = _load(config)
    echo = EchoBackend()
    backends: dict[str, Backend] = dict.fromkeys(MODEL_NAMES, echo)
    venice = {"base_url": environ.get("VENICE_BASE_URL") or DEFAULT_BASE_URL, "api_key_env": "VENICE_API_KEY"}
    upstreams: dict[str, Any] = {"venice": venice}
    for name, settings in _table(table, "upstreams", config).items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{config}: [upstreams.{name}] must be a table")
        if name in MODEL_NAMES or not name or "/" in name or ":" in name:
            raise ConfigError(f"{config}: '{name}' cannot name an upstream")
        upstreams[name] = {**upstreams.get(name, {}), **settings}
    for name, settings in upstreams.items():
        where = f"{config}: [upstreams.{name}]"
        unknown = set(settings) - _UPSTREAM_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        if not isinstance(settings.get("base_url"), str):
            raise ConfigError(f"{where}: 'base_url' (a string) is required")
        accepts = settings.get("accepts")
        if accepts is not None:
            if not isinstance(accepts, list) or not all(isinstance(value, str) for value in accepts):
                raise ConfigError(f"{where}: 'accepts' must be a list of setting names")
            unknown = set(accepts) - OPTIONAL_SETTINGS
            if unknown:
                raise ConfigError(
                    f"{where}: 'accepts' has unknown settings {', '.join(sorted(unknown))}; "
                    f"known: {', '.join(sorted(OPTIONAL_SETTINGS))}"
                )
        limits = ("connect_timeout", "read_timeout", "max_attempts")
        options: dict[str, Any] = {key: settings[key] for key in limits if key in settings}
        for key, value in options.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}: '{key}' must be a positive number")
        if "max_attempts" in options and not isinstance(options["max_attempts"], int):
            raise ConfigError(f"{where}: 'max_attempts' must be a whole number")
        try:
            backends[name] = VeniceBackend(
                settings["base_url"],
                environ.get(str(settings.get("api_key_env") or ""), ""),
                prefix=f"{name}/",
                dialect=str(settings.get("dialect", "venice")),
                accepts=frozenset(accepts) if accepts is not None else None,
                **options,
            )
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: {error}") from None
    aliases: dict[str, str] = {}
    for alias, target in _table(table, "aliases", config).items():
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{config}: alias '{alias}' must name a model")
        if not alias or "/" in alias or ":" in alias or alias in upstreams:
            raise ConfigError(f"{config}: '{alias}' cannot be an alias (no '/' or ':', not an upstream name)")
        if target.partition(":")[0] in table.get("aliases", {}):
            raise ConfigError(f"{config}: alias '{alias}' names another alias; name the model itself")
        if _base_name(target) not in backends:
            raise ConfigError(f"{config}: alias '{alias}' names '{target}', which no backend serves")
        aliases[alias] = target
    unknown_sections = set(table) - {"upstreams", "aliases"}
    if unknown_sections:
        raise ConfigError(f"{config}: unknown sections {', '.join(sorted(unknown_sections))}")
    return Router(backends, aliases)


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None


def _table(table: dict[str, Any], key: str, config: Path | None) -> dict[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{config}: [{key}] must be a table")
    return value
