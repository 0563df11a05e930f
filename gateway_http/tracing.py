"""Traces through the HTTP shim.

Always, with or without OpenTelemetry: the W3C trace context headers of an HTTP request
(``traceparent``, ``tracestate``) go on to the service in the call's metadata, as the request
id does, so that a trace a client started continues in the service and out to its upstreams.

When tracing is switched on in this process (``enable``; ``venna http``, a shim of its own), the
shim also makes a SERVER span per HTTP request and a CLIENT span per gRPC call, whose context is
what the call carries instead. Nothing here imports OpenTelemetry before that, and with tracing
off the app is built without any of it.

The shim knows only the contract, so this switch is its own (the service's is
venna/backends/tracing.py); the command turns on the one its process needs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from venna.gateway_http.client import CallError, Metadata, ServiceClient

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

# A W3C traceparent: version, trace id, parent id, flags (a later version may add fields).
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[\x21-\x7e]*)?")
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
# Longer trace context headers are dropped: W3C's own bounds are well below this.
_MAX_TRACE_HEADER = 8192

_provider: TracerProvider | None = None


def enable(provider: TracerProvider) -> None:
    """Traces the shims built from now on with ``provider``."""
    global _provider
    _provider = provider


def disable() -> None:
    global _provider
    _provider = None


def _tracer() -> Tracer | None:
    return None if _provider is None else _provider.get_tracer("venna.gateway_http")


def trace_context(headers: Sequence[tuple[bytes, bytes]]) -> Metadata:
    """The request's W3C trace context, as gRPC metadata; nothing when it has none or a
    malformed one (several ``traceparent`` headers are malformed; several ``tracestate``
    headers are one list)."""
    parents = [value for name, value in headers if name == b"traceparent"]
    if len(parents) != 1 or not _TRACEPARENT.fullmatch(parents[0]):
        return ()
    states = [value for name, value in headers if name == b"tracestate"]
    forwarded = [("traceparent", parents[0].decode())]
    state = b",".join(states)
    # Printable ASCII, which gRPC metadata takes; anything else is dropped, not refused.
    if state and len(state) <= _MAX_TRACE_HEADER and state.isascii() and state.decode().isprintable():
        forwarded.append(("tracestate", state.decode()))
    return tuple(forwarded)


def middleware() -> list[Middleware]:
    """The app's tracing middleware while tracing is on; none otherwise."""
    tracer = _tracer()
    return [] if tracer is None else [Middleware(_HttpSpans, tracer=tracer)]


def traced_client(client: ServiceClient) -> ServiceClient:
    """``client`` with a CLIENT span per call while tracing is on; ``client`` itself otherwise."""
    tracer = _tracer()
    return client if tracer is None else _TracedClient(client, tracer)


class _HttpSpans:
    """A SERVER span per HTTP request, child of the request's ``traceparent``; it lasts until
    the response is sent (an SSE stream's last event) and is current meanwhile, so that the
    shim's calls are its children."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app = app
        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, StatusCode, use_span

        method = scope["method"]
        parent = self._propagator.extract(dict(trace_context(scope["headers"])))
        span = self._tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "url.scheme": scope.get("scheme", "http"),
            },
        )
        status: int | None = None

        async def sending(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            with use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                await self.app(scope, receive, sending)
        except BaseException as error:
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(StatusCode.ERROR, type(error).__qualname__)
            raise
        finally:
            # The route's template, once the router has matched one.
            template = getattr(scope.get("route"), "path", None)
            if isinstance(template, str):
                span.update_name(f"{method} {template}")
                span.set_attribute("http.route", template)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(StatusCode.ERROR)
            span.end()


class _TracedClient:
    """A ServiceClient whose calls each get a CLIENT span, whose context the call carries (in
    place of the one passed through from the HTTP request, which is its ancestor)."""

    def __init__(self, client: ServiceClient, tracer: Tracer) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._client = client
        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()

    async def check_key(self, metadata: Metadata) -> None:
        # A check may be a call of its own: it carries the HTTP request's span.
        await self._client.check_key(self._carrying(None, metadata))

    async def unary(self, method: MethodDescriptor, request: Message, metadata: Metadata) -> Message:
        span = self._start(method, metadata)
        try:
            response = await self._client.unary(method, request, self._carrying(span, metadata))
        except BaseException as error:
            _end(span, error)
            raise
        _end(span, None)
        return response

    async def stream(
        self, method: MethodDescriptor, request: Message, metadata: Metadata
    ) -> AsyncGenerator[Message, None]:
        span = self._start(method, metadata)
        messages = self._client.stream(method, request, self._carrying(span, metadata))
        error: BaseException | None = None
        try:
            async for message in messages:
                yield message
        except BaseException as raised:
            error = raised
            raise
        finally:
            try:
                await messages.aclose()
            finally:
                _end(span, error)

    def _start(self, method: MethodDescriptor, metadata: Metadata) -> Span:
        """A call's span: child of the current span (the HTTP request's), or, where there is
        none (a WebSocket turn), of the trace context passed on from the request."""
        from opentelemetry.trace import SpanKind, get_current_span

        parent = None
        if not get_current_span().get_span_context().is_valid:
            parent = self._propagator.extract({key: value for key, value in metadata if key in _TRACE_KEYS})
        service = method.containing_service.full_name
        return self._tracer.start_span(
            f"{service}/{method.name}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method.name},
        )

    def _carrying(self, span: Span | None, metadata: Metadata) -> Metadata:
        """``metadata`` with the trace context of ``span`` (None: the current span) instead of
        the one passed on from the request."""
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=None if span is None else set_span_in_context(span))
        if not carrier:
            return metadata  # no current span (a WebSocket's): what the request sent goes on
        kept = [(key, value) for key, value in metadata if key not in _TRACE_KEYS]
        return (*kept, *carrier.items())


def _end(span: Span, error: BaseException | None) -> None:
    """Ends a call's span with its gRPC status: any failure marks a CLIENT span."""
    from opentelemetry.trace import StatusCode

    code = None
    if error is None:
        code = grpc.StatusCode.OK
    elif isinstance(error, CallError):
        code = error.code
    elif isinstance(error, GeneratorExit | asyncio.CancelledError):
        code = grpc.StatusCode.CANCELLED  # the HTTP client left
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(StatusCode.ERROR, code.name)
    elif error is not None:
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(StatusCode.ERROR, type(error).__qualname__)
    span.end()
