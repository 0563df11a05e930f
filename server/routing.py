"""Which backend serves a model name.

A model name is a base name optionally followed by ``:``-separated options
(``echo:delay_ms=50``), or a provider prefix and the provider's model (``venice/qwen3``); the
base name or prefix picks the backend, and the backend checks the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

from backends.base import Backend
from server.errors import invalid_argument


class Router:
    """A fixed table from base model name to backend."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = dict(backends)

    async def aclose(self) -> None:
        """Releases what backends hold (connection pools), once each."""
        for backend in {id(backend): backend for backend in self._backends.values()}.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()

    @property
    def models(self) -> list[str]:
        return sorted(self._backends)

    def resolve(self, model: str) -> Backend:
        backend = self._backends.get(_base_name(model))
        if backend is None:
            raise invalid_argument(
                "model",
                f"The requested model '{model}' does not exist. Available models: {', '.join(self.models)}.",
                reason="MODEL_NOT_FOUND",
            )
        return backend


def _base_name(model: str) -> str:
    """``echo:delay_ms=5`` -> ``echo``; ``venice/qwen3:suffix`` -> ``venice`` (a provider prefix)."""
    head = model.split(":", 1)[0]
    return head.split("/", 1)[0]


def default_router() -> Router:
    """The built-in backends; imported here so that a deployment pays only for what it routes."""
    import os

    from backends.echo import MODEL_NAMES, EchoBackend
    from backends.venice import DEFAULT_BASE_URL, VeniceBackend

    echo = EchoBackend()
    venice = VeniceBackend(
        os.environ.get("VENICE_BASE_URL") or DEFAULT_BASE_URL, os.environ.get("VENICE_API_KEY", "")
    )
    return Router({**dict.fromkeys(MODEL_NAMES, echo), "venice": venice})
