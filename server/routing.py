"""Which backend serves a model name.

A model name is a base name optionally followed by ``:``-separated options
(``echo:delay_ms=50``); the base name picks the backend, and the backend checks the options.
"""

from __future__ import annotations

from collections.abc import Mapping

from backends.base import Backend
from server.errors import invalid_argument


class Router:
    """A fixed table from base model name to backend."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = dict(backends)

    @property
    def models(self) -> list[str]:
        return sorted(self._backends)

    def resolve(self, model: str) -> Backend:
        backend = self._backends.get(model.split(":", 1)[0])
        if backend is None:
            raise invalid_argument(
                "model",
                f"The requested model '{model}' does not exist. Available models: {', '.join(self.models)}.",
                reason="MODEL_NOT_FOUND",
            )
        return backend


def default_router() -> Router:
    """The built-in backends; imported here so that a deployment pays only for what it routes."""
    from backends.echo import MODEL_NAMES, EchoBackend

    echo = EchoBackend()
    return Router(dict.fromkeys(MODEL_NAMES, echo))
