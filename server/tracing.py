"""A SERVER span per call of Venna's services, when tracing is on (venna/backends/tracing.py).

Handlers are wrapped once, where the server is assembled, as for metrics: with tracing off a
handler is returned as it is and a call pays nothing. The span's parent is the W3C trace
context (``traceparent``, ``tracestate``) in the call's metadata, which the HTTP shim passes on
from its own request; a stream's span lasts until its last event. The span is the current one
while the handler runs, so that the store's and the upstream's spans are its children.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import grpc

from venna.backends import tracing
from venna.server import auth
from venna.server.errors import ABORTED_WITH

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

_Unary = Callable[[Any, Any], Any]
_Stream = Callable[[Any, Any], AsyncGenerator[Any, None]]

# The metadata keys of W3C trace context.
TRACE_CONTEXT_KEYS = frozenset({"traceparent", "tracestate"})
# Codes by which a server says the fault is its own (OpenTelemetry's gRPC conventions): only
# these mark a SERVER span as failed; a caller's mistake (NOT_FOUND, INVALID_ARGUMENT) does not.
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def wrap(
    service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with a span per call while tracing is on; ``handler`` itself otherwise."""
    found = tracing.tracer("venna.server")
    if found is None:
        return handler
    traced = _Traced(found, service, method)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            traced.unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            traced.stream(handler.unary_stream),  # type: ignore[arg-type]  # aio handlers are async
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class _Traced:
    """The spans of one method."""

    def __init__(self, tracer: Tracer, service: str, method: str) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._name = f"{service}/{method}"
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        self._propagator = TraceContextTextMapPropagator()

    def _start(self, context: Any) -> Span:
        from opentelemetry.trace import SpanKind

        return self._tracer.start_span(
            self._name, context=self._parent(context), kind=SpanKind.SERVER, attributes=self._attributes
        )

    def _parent(self, context: Any) -> Context:
        """The caller's trace context, from the call's metadata; an empty one (a new trace)
        without one."""
        carrier: dict[str, str] = {}
        try:
            metadata = context.invocation_metadata() or ()
        except Exception:
            metadata = ()
        for entry in metadata:
            key, value = (entry.key, entry.value) if hasattr(entry, "key") else entry
            if key in TRACE_CONTEXT_KEYS and isinstance(value, str):
                carrier[key] = value
        return self._propagator.extract(carrier)

    def unary(self, behavior: _Unary) -> _Unary:
        async def unary(request: Any, context: Any) -> Any:
            span = self._start(context)
            result = None
            error: BaseException | None = None
            try:
                with _current(span):
                    result = await behavior(request, context)
                return result
            except BaseException as raised:
                error = raised
                raise
            finally:
                _finish(span, request, result, error)

        return unary

    def stream(self, behavior: _Stream) -> _Stream:
        async def stream(request: Any, context: Any) -> AsyncGenerator[Any, None]:
            span = self._start(context)
            events = behavior(request, context)
            error: BaseException | None = None
            try:
                while True:
                    # Current only while the handler runs, never across a yield: the caller's
                    # code between two events is not the handler's.
                    with _current(span):
                        try:
                            event = await anext(events)
                        except StopAsyncIteration:
                            break
                    yield event
            except BaseException as raised:
                error = raised
                raise
            finally:
                try:
                    # Closed here, as the span's child: the handler's clean-up (settling a
                    # response whose client left) writes to the store under this call.
                    with _current(span):
                        await events.aclose()
                finally:
                    _finish(span, request, None, error)

        return stream


def _current(span: Span) -> AbstractContextManager[Span]:
    """``span`` as the current span, neither ended nor marked by an exception on leaving: the
    call's status decides (``_finish``)."""
    from opentelemetry.trace import use_span

    return use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def _finish(span: Span, request: Any, result: Any, error: BaseException | None) -> None:
    from opentelemetry.trace import StatusCode

    code = grpc.StatusCode.OK if error is None else (ABORTED_WITH.get() or _code_of(error))
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    workspace = auth.current_workspace()
    if workspace:
        span.set_attribute("venna.workspace", workspace)
    model = getattr(request, "model", "") or getattr(result, "model", "")
    if isinstance(model, str) and model:
        span.set_attribute("gen_ai.request.model", model)
    if code in SERVER_FAULTS:
        span.set_status(StatusCode.ERROR, code.name)
    span.end()


def _code_of(error: BaseException) -> grpc.StatusCode:
    """The status of a call that ended by ``error`` without aborting through the service's
    errors: its own code when it has one (a call made in process), CANCELLED for a caller
    that left, UNKNOWN otherwise."""
    code = getattr(error, "code", None)
    if callable(code):
        try:
            code = code()
        except Exception:
            code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(error, GeneratorExit | asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
