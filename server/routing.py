"""Which backend serves a model name, from the built-in backends and an optional ``venna.toml``.

A model name is a base name optionally followed by ``:``-separated options
(``echo:delay_ms=50``), or a provider prefix and the provider's model (``venice/qwen3``); the
base name or prefix picks the backend, and the backend checks the rest. An alias names another
model (``venna-1`` → ``venice/zai-org-glm-5-1``); options after an alias are kept
(``venna-1:enable_web_search=on``).

``venna.toml`` adds upstreams and aliases. Each upstream has a ``kind`` from the backend
registry (``responses`` when it names none) and that kind's keys::

    [upstreams.local]                       # serves local/<model>
    kind = "responses"                      # an OpenAI-compatible upstream
    base_url = "http://127.0.0.1:8000/v1"
    api_key_env = "LOCAL_API_KEY"           # the environment variable holding the key (if any)
    dialect = "openai"                      # "venice" (nested tools, the default), "openai", or
                                            # "chat" (POST /chat/completions: Ollama, vLLM, ...)
    accepts = ["temperature", "top_p", "max_output_tokens", "stop", "seed", "tools", "tool_choice"]

    [aliases]
    "venna-1" = "venice/zai-org-glm-5-1"
"""

from __future__ import annotations

import asyncio
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from venna.backends import registry, venice
from venna.backends.base import UNOBSERVED, Backend, ModelCatalog, ModelInfo, UpstreamObserver
from venna.backends.echo import MODEL_NAMES
from venna.server.errors import invalid_argument, quoted

DEFAULT_CONFIG = Path("venna.toml")


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

    async def list_models(self) -> list[ModelInfo]:
        """Every model a request may name, by id: each backend's own list where it has one
        (fetched at once, each bounded by its own timeout), its routing name otherwise, and
        the aliases."""
        catalogs = {
            name: backend for name, backend in self._backends.items() if isinstance(backend, ModelCatalog)
        }
        listed = await asyncio.gather(*(catalog.list_models() for catalog in catalogs.values()))
        models = {model.id: model for found in listed for model in found}
        for name in self._backends:
            if name not in catalogs:
                models.setdefault(name, ModelInfo(id=name, owned_by="venna"))
        for alias in self._aliases:
            models.setdefault(alias, ModelInfo(id=alias, owned_by="venna"))
        return [models[model_id] for model_id in sorted(models)]

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


def default_router(
    config: Path | None = None,
    environ: Mapping[str, str] | None = None,
    observer: UpstreamObserver = UNOBSERVED,
) -> Router:
    """The built-in backends (echo, and Venice from ``VENICE_*``), extended by a ``venna.toml``.

    ``config`` defaults to ``./venna.toml`` when that file exists; a named file must exist.
    Each upstream's ``kind`` (``responses`` unless it says otherwise) is looked up in the backend
    registry, which imports only the kinds the table uses.
    """
    environ = os.environ if environ is None else environ
    table: dict[str, Any] = {}
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    if config is not None:
        table = _load(config)
    unknown_sections = set(table) - {"upstreams", "aliases"}
    if unknown_sections:
        raise ConfigError(f"{config}: unknown sections {', '.join(sorted(unknown_sections))}")
    echo = registry.get("echo")
    backends: dict[str, Backend] = dict.fromkeys(
        MODEL_NAMES,
        echo.build(registry.parse_config(echo, {}), registry.BuildContext("echo", environ, observer)),
    )
    sections: dict[str, dict[str, Any]] = {venice.NAME: venice.section(environ)}
    for name, settings in _table(table, "upstreams", config).items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{config}: [upstreams.{name}] must be a table")
        if name in MODEL_NAMES or not name or "/" in name or ":" in name:
            raise ConfigError(f"{config}: '{name}' cannot name an upstream")
        sections[name] = {**sections.get(name, {}), **settings}
    for name, settings in sections.items():
        context = registry.BuildContext(name, environ, observer)
        backends[name] = _build(settings, context, f"{config}: [upstreams.{name}]")
    aliases: dict[str, str] = {}
    for alias, target in _table(table, "aliases", config).items():
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{config}: alias '{alias}' must name a model")
        if not alias or "/" in alias or ":" in alias or alias in sections:
            raise ConfigError(f"{config}: '{alias}' cannot be an alias (no '/' or ':', not an upstream name)")
        if target.partition(":")[0] in table.get("aliases", {}):
            raise ConfigError(f"{config}: alias '{alias}' names another alias; name the model itself")
        if _base_name(target) not in backends:
            raise ConfigError(f"{config}: alias '{alias}' names '{target}', which no backend serves")
        aliases[alias] = target
    return Router(backends, aliases)


def _build(section: Mapping[str, Any], context: registry.BuildContext, where: str) -> Backend:
    """The backend of one ``[upstreams.NAME]`` section, through its kind in the registry."""
    settings = dict(section)
    kind_name = settings.pop("kind", "responses")
    if not isinstance(kind_name, str):
        raise ConfigError(f"{where}: 'kind' must be a string")
    try:
        kind = registry.get(kind_name)
    except registry.UnknownKind as error:
        raise ConfigError(f"{where}: {error}") from None
    try:
        return kind.build(registry.parse_config(kind, settings), context)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


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
