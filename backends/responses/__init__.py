"""Any OpenAI-compatible Responses API upstream (``POST /responses``) as a backend: the client
(client.py), request translation (requests.py), stream translation (streams.py) and error
mapping (errors.py); the kind ``responses`` and its venna.toml section are here."""

from __future__ import annotations

from dataclasses import dataclass

from venna.backends import base
from venna.backends.registry import BackendKind, BuildContext
from venna.backends.responses.client import DEFAULT_ACCEPTS, DIALECTS, ResponsesUpstream
from venna.backends.responses.requests import upstream_model, upstream_request

__all__ = [
    "DEFAULT_ACCEPTS",
    "DIALECTS",
    "KIND",
    "ResponsesConfig",
    "ResponsesUpstream",
    "upstream_model",
    "upstream_request",
]


# The kind: ``kind = "responses"`` in an ``[upstreams.NAME]`` section of venna.toml.


@dataclass(frozen=True, slots=True)
class ResponsesConfig:
    """An ``[upstreams.NAME]`` section of kind ``responses``."""

    base_url: str
    # The environment variable holding the upstream's API key (never the key itself); none
    # (an upstream that needs no key, such as a local Ollama) when unset.
    api_key_env: str = ""
    # "venice" (nested tool shapes), "openai" (flat ones), or "chat" (POST /chat/completions).
    # Venice's, for sections written before there were kinds.
    dialect: str = "venice"
    # The optional generation settings the upstream honours; the dialect's list by default.
    accepts: list[str] | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"'dialect' must be one of {', '.join(DIALECTS)}, got '{self.dialect}'")
        unknown = set(self.accepts or ()) - base.OPTIONAL_SETTINGS
        if unknown:
            raise ValueError(
                f"'accepts' has unknown settings {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(base.OPTIONAL_SETTINGS))}"
            )
        for name in ("connect_timeout", "read_timeout", "max_attempts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"'{name}' must be a positive number")


def build(config: ResponsesConfig, context: BuildContext) -> ResponsesUpstream:
    return ResponsesUpstream(
        config.base_url,
        context.environ.get(config.api_key_env, "") if config.api_key_env else None,
        prefix=f"{context.name}/",
        dialect=config.dialect,
        accepts=frozenset(config.accepts) if config.accepts is not None else None,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        max_attempts=config.max_attempts,
        name=context.name,
        observer=context.observer,
    )


KIND = BackendKind(
    "responses",
    ResponsesConfig,
    build,
    "an OpenAI-compatible upstream: POST /responses (dialect openai or venice) or POST /chat/completions"
    " (dialect chat)",
)
