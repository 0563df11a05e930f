"""ASGI middleware of the shim: a request id on every reply, and refusal of ambiguous framing."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as Message_

from venna.gateway_http.errors import error_response


class RequestIdMiddleware:
    """Gives every reply an ``x-request-id``, as OpenAI's API does (SDKs surface it on errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ("req_" + secrets.token_hex(16)).encode()

        async def send_with_id(message: Message_) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class FramingGuardMiddleware:
    """Refuses requests whose body framing is ambiguous, before anything else looks at them.

    A request with both Content-Length and Transfer-Encoding can be read differently by a
    proxy in front and by this server (request smuggling); it gets a 400 and the connection
    is closed, since where its body ends is not known.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                response = error_response(
                    400,
                    "A request may not have both Content-Length and Transfer-Encoding headers.",
                    "invalid_request_error",
                    None,
                    "invalid_request_framing",
                    {"connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
