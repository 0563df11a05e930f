"""ASGI middleware of the shim: a request id on every reply, and refusal of ambiguous framing."""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as Message_

from venna.gateway_http.errors import error_response

# A request id a client may choose: short, and nothing a log line could be forged with.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/=+-]{1,128}")
# Where the request's id is kept in the ASGI scope, for the shim to pass on to the service.
REQUEST_ID_KEY = "venna.request_id"


class RequestIdMiddleware:
    """Gives every reply an ``x-request-id``, as OpenAI's API does (SDKs surface it on errors):
    the client's own when it sent a sane one, a new one otherwise. The shim carries it to the
    service in the call's metadata, where the access log records it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        sent = [value for name, value in scope["headers"] if name == b"x-request-id"]
        if len(sent) == 1 and _CLIENT_REQUEST_ID.fullmatch(sent[0]):
            request_id = sent[0]
        else:
            request_id = ("req_" + secrets.token_hex(16)).encode()
        scope[REQUEST_ID_KEY] = request_id.decode()
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

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
