"""Venice.ai: a preset of the Responses upstream (backends/responses.py) in Venice's dialect.

Built in as the upstream ``venice`` (models ``venice/<model>``), keyed by ``VENICE_API_KEY``; a
``[upstreams.venice]`` section in venna.toml changes any of its settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from venna.backends.responses import ResponsesUpstream

NAME = "venice"
DEFAULT_BASE_URL = "https://api.venice.ai/api/v1"
API_KEY_ENV = "VENICE_API_KEY"


def section(environ: Mapping[str, str]) -> dict[str, Any]:
    """The built-in ``[upstreams.venice]`` section (``VENICE_BASE_URL`` moves it)."""
    return {
        "kind": "responses",
        "base_url": environ.get("VENICE_BASE_URL") or DEFAULT_BASE_URL,
        "api_key_env": API_KEY_ENV,
        "dialect": "venice",
    }


def venice_upstream(
    base_url: str = DEFAULT_BASE_URL, api_key: str = "", *, prefix: str = f"{NAME}/", **options: Any
) -> ResponsesUpstream:
    """A Responses upstream set up as Venice: ``venice/<model>`` names, Venice's dialect."""
    return ResponsesUpstream(base_url, api_key, prefix=prefix, dialect="venice", **options)
