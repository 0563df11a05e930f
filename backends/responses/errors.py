"""Upstream failures as backend errors: summarised, never passed through raw (an upstream 5xx
body may hold a traceback or a database URL), with retry hints where the upstream gave one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from venna.backends import base


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after") or headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# How much of an upstream's own error message reaches the caller.
MAX_UPSTREAM_MESSAGE = 300


def clipped(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_UPSTREAM_MESSAGE else text[: MAX_UPSTREAM_MESSAGE - 1] + "…"


def _json(content: bytes) -> Any:
    """The body as JSON; None if it is not JSON."""
    try:
        return json.loads(content)
    except ValueError:
        return None


def _error_message(content: bytes) -> str | None:
    """The upstream's own message about a request it refused (a 4xx), from the JSON error
    bodies Venice and OpenAI-style servers send, clipped; None for any other body. Raw text
    (an HTML page, a stack trace) never reaches the caller."""
    body = _json(content)
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return clipped(message) if isinstance(message, str) and message.strip() else None
    message = error if isinstance(error, str) else body.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    issues = body.get("issues")
    if isinstance(issues, list) and issues:
        details = "; ".join(
            f"{'.'.join(map(str, issue.get('path', [])))}: {issue.get('message')}"
            for issue in issues
            if isinstance(issue, dict)
        )
        if details:
            message = f"{message}: {details}"
    elif isinstance(body.get("details"), str):
        message = f"{message}: {body['details']}"
    return clipped(message)


def _error_code_and_param(content: bytes) -> tuple[str | None, str | None]:
    body = _json(content)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    code, param = error.get("code"), error.get("param")
    if param == "messages":  # the upstream speaks of its chat-completions form: here it is input
        param = "input"
    return (
        code if isinstance(code, str) and code else None,
        param if isinstance(param, str) and param else None,
    )


def upstream_error(status: int, content: bytes, retry_after: float | None) -> base.BackendError:
    """The error of a refused upstream call (its status and body). A 5xx says only that the
    upstream failed, with its status: its body (a stack trace, a proxy's page) is the
    upstream's business. A 4xx keeps the upstream's own JSON message, which tells the caller
    what to fix."""
    if status in (401, 403):
        return base.BackendError(
            base.ErrorKind.INTERNAL,
            "The gateway's upstream credentials were rejected; contact the gateway operator.",
            code="server_error",
        )
    if status == 504 or status == 408:
        return base.BackendError(
            base.ErrorKind.TIMEOUT, f"The upstream model timed out (HTTP {status}).", code="server_error"
        )
    if not 400 <= status < 500:
        return base.BackendError(
            base.ErrorKind.UNAVAILABLE, f"The upstream model failed (HTTP {status}).", code="server_error"
        )
    message = _error_message(content)
    if status == 402:
        return base.BackendError(
            base.ErrorKind.QUOTA_EXCEEDED,
            message or "The upstream account has insufficient balance (HTTP 402).",
            code="insufficient_quota",
        )
    if status == 429:
        return base.BackendError(
            base.ErrorKind.RATE_LIMITED,
            message or "The upstream model is rate limited (HTTP 429).",
            code="rate_limit_exceeded",
            retry_after=retry_after,
        )
    if status == 404:
        return base.BackendError(
            base.ErrorKind.INVALID_REQUEST,
            message or "The upstream does not know this model (HTTP 404).",
            code="model_not_found",
            param="model",
        )
    # An OpenAI-shaped body names its own code and parameter (context_length_exceeded, …).
    code, param = _error_code_and_param(content)
    return base.BackendError(
        base.ErrorKind.INVALID_REQUEST,
        message or f"The upstream model refused the request (HTTP {status}).",
        code=code or "invalid_request",
        param=param,
    )


def truncated() -> base.BackendError:
    return base.BackendError(
        base.ErrorKind.UNAVAILABLE,
        "The upstream stream ended before the response was complete.",
        code="server_error",
    )


def stream_error(data: dict[str, Any]) -> base.BackendError:
    error = data.get("error")
    if isinstance(error, dict):
        message = str(error.get("message") or "The upstream model failed.")
        code = str(error.get("code") or error.get("type") or "server_error")
    else:
        message = str(data.get("message") or error or "The upstream model failed.")
        code = str(data.get("code") or "server_error")
    return base.BackendError(base.ErrorKind.INTERNAL, clipped(message), code=clipped(code))
