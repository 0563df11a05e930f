"""The HTTP shim: OpenAI's Responses endpoints as JSON and SSE, over the gRPC contract.

Routes come from the contract's ``google.api.http`` annotations. Where a unary and a
server-streaming RPC share a route (POST /v1/responses, GET /v1/responses/{id}), ``stream``
— in the body or the query — picks the streaming one. Path parameters, the JSON body (for
``body: "*"``) and query parameters fill the request message; the reply is the JSON of the
response message, or an SSE stream of its events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import Receive

from venna.gateway_http.client import ADMIN_SERVICE, CallError, Metadata, ServiceClient, message_class
from venna.gateway_http.codec import Codec, CodecError
from venna.gateway_http.errors import (
    NO_RETRY,
    BadRequest,
    ClientLeft,
    call_error_response,
    error_response,
    quote,
)
from venna.gateway_http.middleware import FramingGuardMiddleware, RequestIdMiddleware
from venna.gateway_http.parsing import (
    OFFLOAD_BYTES,
    check_content_type,
    disconnected,
    drop_unsupported,
    forwarded_metadata,
    parse_json_object,
    query_bool,
    query_fields,
)
from venna.gateway_http.routes import Binding, bindings, pick
from venna.gateway_http.sse import EventStreams
from venna.gateway_http.tracing import middleware as tracing_middleware
from venna.gateway_http.tracing import traced_client
from venna.gateway_http.websocket import WEBSOCKET_MAX_SECONDS, ResponsesWebSocket

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_KEEPALIVE_SECONDS = 15.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# The largest body of an admin call (a name, a few limits), read before its key is checked.
ADMIN_MAX_BODY_BYTES = 64 * 1024
# Where WebSocket mode is served: the path of POST /v1/responses, as OpenAI serves it.
WEBSOCKET_PATH = "/v1/responses"


class ResponsesHttpApp:
    """Builds the Starlette app around a ServiceClient."""

    def __init__(
        self,
        client: ServiceClient,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS,
        metrics: Callable[[], bytes] | None = None,
        ready: Callable[[], Awaitable[bool]] | None = None,
        cors_origins: Sequence[str] = (),
        websocket_max_seconds: float = WEBSOCKET_MAX_SECONDS,
    ) -> None:
        # How long one WebSocket connection may last (OpenAI's limit: 60 minutes).
        self.websocket_max_seconds = websocket_max_seconds
        # With tracing on, a span per call, whose context the call carries.
        self.client = traced_client(client)
        # Browser origins allowed to call the API ("*" for any); none: no CORS headers at all.
        self.cors_origins = tuple(cors_origins)
        # Whether the service behind should get traffic (GET /readyz); without one, always.
        self.ready = ready
        # The server's metrics in Prometheus' text format, served at GET /metrics when given.
        self.metrics = metrics
        self.codec = Codec()
        self.streams = EventStreams(self.codec, keepalive_seconds)
        self.max_body_bytes = max_body_bytes
        self._routes: list[Route] = []
        for binding in bindings():
            for method in (binding.unary, binding.streaming):
                if method is not None:
                    # Built now: bodies may be decoded in worker threads, which must find the
                    # codec's converters ready rather than build them concurrently.
                    self.codec.prepare(method.input_type)

    def build(self) -> Starlette:
        self._routes = [
            Route(binding.template, self._endpoint(binding), methods=[binding.verb]) for binding in bindings()
        ]
        # WebSocket mode of the create route: its streaming RPC, one turn after another.
        (create,) = [b for b in bindings() if b.verb == "POST" and b.template == WEBSOCKET_PATH]
        assert create.streaming is not None
        websocket = ResponsesWebSocket(
            self.client, self.codec, create.streaming, max_seconds=self.websocket_max_seconds
        )
        routes = [
            *self._routes,
            WebSocketRoute(WEBSOCKET_PATH, websocket.serve),
            Route("/healthz", self._health, methods=["GET"]),
            Route("/livez", self._health, methods=["GET"]),
            Route("/readyz", self._readiness, methods=["GET"]),
            *([Route("/metrics", self._metrics, methods=["GET"])] if self.metrics is not None else []),
            Route("/v1/{rest:path}", self._unrouted, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
            middleware=[
                # Outermost: a request's span covers everything the shim does for it.
                *tracing_middleware(),
                *self._cors(),
                Middleware(RequestIdMiddleware),
                Middleware(FramingGuardMiddleware),
            ],
        )

    def _cors(self) -> list[Middleware]:
        """CORS for browser clients of the configured origins: preflights answered, and the
        request id and retry delay readable by the page. Keys travel in a header, never in
        cookies, so credentials mode stays off."""
        if not self.cors_origins:
            return []
        return [
            Middleware(
                CORSMiddleware,
                allow_origins=list(self.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "retry-after"],
                max_age=600,
            )
        ]

    # ------------------------------------------------------------------ endpoints

    def _endpoint(self, binding: Binding) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                response = await self._handle(binding, request)
            except BadRequest as error:
                response = error_response(
                    error.status,
                    error.message,
                    "invalid_request_error",
                    error.param,
                    error.code,
                    error.headers,
                )
            except (ClientLeft, ClientDisconnect):
                # Not sent: the connection is gone. A status of our own marks it in any log.
                response = Response(status_code=499)
            except CodecError as error:
                response = error_response(
                    400, error.message, "invalid_request_error", error.param, error.code
                )
            except CallError as error:
                response = call_error_response(error)
            return response

        return endpoint

    async def _handle(self, binding: Binding, request: Request) -> Response:
        # Nothing of the body is read before the headers are checked and the key is known good:
        # a client without a valid key costs one key check, whatever it sends.
        if binding.has_body:
            check_content_type(request)
        metadata = forwarded_metadata(request)
        limit = self.max_body_bytes
        if pick(binding, False).containing_service.full_name != ADMIN_SERVICE.full_name:
            # Before the body is read: an unauthenticated client cannot make the shim read it.
            await self.client.check_key(metadata)
        else:
            # The admin call checks its own (admin) key; until then, only a small body is read.
            limit = min(limit, ADMIN_MAX_BODY_BYTES)
        if binding.has_body:
            body = await self._read_body(request, limit)
            if len(body) > OFFLOAD_BYTES:
                # Parsing and decoding megabytes takes a while: other clients are served meanwhile.
                method, message = await asyncio.to_thread(
                    self._decode_body, binding, body, request.path_params
                )
            else:
                method, message = self._decode_body(binding, body, request.path_params)
        else:
            stream = bool(binding.streaming) and query_bool("stream", request.query_params.get("stream", ""))
            method = pick(binding, stream)
            fields = query_fields(request, method.input_type)
            fields.update(request.path_params)
            message = self.codec.decode(fields, message_class(method.input_type.full_name))
        if method.server_streaming:
            return await self._sse(method, message, metadata)
        result = await self._unary_while_connected(method, message, metadata, request.receive)
        return Response(orjson.dumps(self.codec.encode(result)), media_type="application/json")

    def _decode_body(
        self, binding: Binding, body: bytes, path_params: Mapping[str, Any]
    ) -> tuple[MethodDescriptor, Message]:
        """The RPC a JSON body asks for, and its request message."""
        fields = parse_json_object(body)
        stream = False
        if binding.streaming is not None:
            # Only where a route can stream; elsewhere `stream` is as unknown as any other key.
            stream = fields.pop("stream", None) or False
            fields.pop("stream_options", None)  # obfuscation padding is not sent: nothing to switch off
        drop_unsupported(fields)
        if not isinstance(stream, bool):
            raise BadRequest(400, "Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
        method = pick(binding, stream)
        fields.update(path_params)
        return method, self.codec.decode(fields, message_class(method.input_type.full_name))

    async def _read_body(self, request: Request, limit: int) -> bytes:
        """The body, refused (413) as soon as it is known to exceed ``limit`` bytes.

        How long it may take to arrive is bounded by the connection (see gateway_http.server).
        """
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, f"The request body exceeds {limit} bytes.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(413, f"The request body exceeds {limit} bytes.")
        return bytes(body)

    async def _unary_while_connected(
        self, method: MethodDescriptor, message: Message, metadata: Metadata, receive: Receive
    ) -> Message:
        """The unary call's reply; the call is cancelled if the client leaves before it.

        Cancelling it is what stops the generation (and its upstream request) and stores the
        response as cancelled, as a gRPC deadline or an SSE disconnect does.
        """
        call = asyncio.ensure_future(self.client.unary(method, message, metadata))
        watcher = asyncio.ensure_future(disconnected(receive))
        left = False
        try:
            await asyncio.wait((call, watcher), return_when=asyncio.FIRST_COMPLETED)
            left = watcher.done() and watcher.exception() is None
            if not left:
                await asyncio.wait((call,))  # the connection cannot be watched: the call goes on
        finally:
            watcher.cancel()
            if not call.done():
                call.cancel()
                # The call settles the response as it unwinds: let it, even when this task is
                # itself being cancelled.
                await asyncio.wait((call,))
        if left and call.cancelled():
            raise ClientLeft
        return call.result()

    async def _sse(self, method: MethodDescriptor, message: Message, metadata: Metadata) -> Response:
        """An SSE response, or a JSON error if the stream fails before its first event."""
        return await self.streams.response(self.client.stream(method, message, metadata))

    async def _metrics(self, request: Request) -> Response:
        assert self.metrics is not None
        return Response(self.metrics(), media_type=PROMETHEUS_TEXT)

    async def _readiness(self, request: Request) -> Response:
        if self.ready is None or await self.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _unrouted(self, request: Request) -> Response:
        """405 for a known path asked with another method; 501 for any other path under /v1."""
        allowed = sorted(
            {
                verb
                for route in self._routes
                if route.matches(request.scope)[0] is Match.PARTIAL
                for verb in route.methods or ()
            }
        )
        if allowed:
            return error_response(
                405,
                f"Method {request.method} is not allowed on {quote(request.url.path)}; "
                f"allowed: {', '.join(allowed)}.",
                "invalid_request_error",
                None,
                "method_not_allowed",
                {"allow": ", ".join(allowed), **NO_RETRY},
            )
        return error_response(
            501,
            f"Endpoint '{request.method} {quote(request.url.path)}' is not implemented yet on Venna gateway",
            "not_implemented",
            None,
            "not_implemented",
            NO_RETRY,
        )

    async def _http_exception(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        message = {
            404: "Not found.",
            405: f"Method {request.method} is not allowed on {quote(request.url.path)}.",
        }.get(error.status_code, str(error.detail))
        code = "method_not_allowed" if error.status_code == 405 else None
        headers = {**(error.headers or {}), **NO_RETRY}
        return error_response(error.status_code, message, "invalid_request_error", None, code, headers)


def create_metrics_app(
    metrics: Callable[[], bytes], ready: Callable[[], Awaitable[bool]] | None = None
) -> Starlette:
    """The app of a metrics port (``--metrics-listen``), for deployments without the shim:
    ``/metrics`` and the probes, served like the shim (its deadlines, its TLS) rather than by
    prometheus-client's own server, whose single thread a client could hold mid-handshake."""

    async def exposition(request: Request) -> Response:
        return Response(metrics(), media_type=PROMETHEUS_TEXT)

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readiness(request: Request) -> Response:
        if ready is None or await ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    return Starlette(
        routes=[
            Route("/metrics", exposition, methods=["GET"]),
            Route("/livez", live, methods=["GET"]),
            Route("/healthz", live, methods=["GET"]),
            Route("/readyz", readiness, methods=["GET"]),
        ]
    )


def create_app(client: ServiceClient, **options: Any) -> Starlette:
    """The ASGI app of the shim."""
    return ResponsesHttpApp(client, **options).build()
