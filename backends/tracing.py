"""Traces of the service's side: the switch that turns them on in this process, CLIENT spans of
upstream HTTP requests (which carry ``traceparent`` up, so that the upstream joins the trace)
and spans of store operations.

OpenTelemetry is an optional extra (``venna[otel]``). Nothing here imports it until tracing is
switched on (``enable``), and every decision is taken when a thing is built: with tracing off,
the upstream's HTTP session and the store are exactly what they were, so calls pay nothing.
The server's spans (venna/server/tracing.py) read the same switch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import aiohttp
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from venna.backends.store import ResponseStore

_provider: TracerProvider | None = None


def enable(provider: TracerProvider) -> None:
    """Traces what is built from now on (servers, upstream sessions, stores) with ``provider``."""
    global _provider
    _provider = provider


def disable() -> None:
    """Builds untraced things again (what is already built keeps its spans)."""
    global _provider
    _provider = None


def tracer(name: str) -> Tracer | None:
    """A tracer of the enabled provider; None while tracing is off."""
    return None if _provider is None else _provider.get_tracer(name)


# ---------------------------------------------------------------------------------------------
# Upstream HTTP requests


def upstream_trace_configs() -> list[aiohttp.TraceConfig]:
    """For a new aiohttp session: a CLIENT span per request and ``traceparent`` in its
    headers; no configs (so aiohttp does no per-request work) while tracing is off."""
    found = tracer("venna.backends.upstream")
    return [] if found is None else [_upstream_config(found)]


def _upstream_config(tracer: Tracer) -> aiohttp.TraceConfig:
    import aiohttp
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()

    async def started(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        url = params.url
        attributes: dict[str, str | int] = {
            "http.request.method": params.method,
            # Neither credentials nor the query: either may hold a secret.
            "url.full": str(url.with_user(None).with_query(None).with_fragment(None)),
            "server.address": url.host or "",
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        span = tracer.start_span(params.method, kind=SpanKind.CLIENT, attributes=attributes)
        context.span = span
        # The request's own headers: what is set here is what goes up.
        propagator.inject(params.headers, context=trace.set_span_in_context(span))

    async def ended(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        span: Span | None = getattr(context, "span", None)
        if span is None:
            return
        status = params.response.status
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(StatusCode.ERROR)
        span.end()

    async def failed(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        span: Span | None = getattr(context, "span", None)
        if span is None:
            return
        name = type(params.exception).__qualname__
        span.set_attribute("error.type", name)
        span.set_status(StatusCode.ERROR, name)
        span.end()

    config = aiohttp.TraceConfig()
    config.on_request_start.append(started)
    config.on_request_end.append(ended)
    config.on_request_exception.append(failed)
    return config


# ---------------------------------------------------------------------------------------------
# The store

# The operations that get a span: what a call reads and writes of responses, conversations,
# keys and usage. Lease upkeep and wake-ups are left out.
_TRACED_OPERATIONS = frozenset(
    {
        "authenticate",
        "create_response",
        "save_response",
        "append_events",
        "record_usage",
        "get_response",
        "delete_response",
        "load_context",
        "find_items",
        "list_input_items",
        "events_after",
        "last_sequence_number",
        "last_terminal_event",
        "request_cancel",
        "take_over",
        "create_conversation",
        "get_conversation",
        "update_conversation",
        "delete_conversation",
        "add_conversation_items",
        "conversation_items",
        "get_conversation_item",
        "delete_conversation_item",
        "usage_totals",
    }
)


def traced_store(store: ResponseStore, location: str | Path) -> ResponseStore:
    """``store`` with a span per operation while tracing is on; ``store`` itself otherwise,
    so that an untraced server pays nothing."""
    found = tracer("venna.backends.store")
    if found is None:
        return store
    postgres = isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))
    return cast("ResponseStore", _TracedStore(store, found, "postgresql" if postgres else "sqlite"))


class _TracedStore:
    """Stands for a store: every attribute is the store's, and the traced operations start a
    CLIENT span. Only within a call's trace (a background response's writes included, after
    the call's span ended): upkeep no call asked for (lease renewals every few seconds) would
    otherwise make a trace of its own at each turn.

    An operation's awaitable is made at once, as the caller asked for it (engines queue writes
    in the order they are asked for); a future stays that very future, its span ended when it
    is done."""

    def __init__(self, store: ResponseStore, tracer: Tracer, system: str) -> None:
        self._store = store
        self._tracer = tracer
        self._system = system

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._store, name)
        if not callable(found):
            return found  # a property (``shared``): read from the store each time
        if name in _TRACED_OPERATIONS:
            found = self._traced(name, found)
        setattr(self, name, found)  # looked up once
        return found

    def _traced(self, name: str, operation: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        tracer = self._tracer
        span_name = f"store {name}"
        attributes = {"db.system.name": self._system, "db.operation.name": name}
        current_span = trace.get_current_span

        def call(*args: Any, **kwargs: Any) -> Awaitable[Any]:
            # A call's span, even ended: a background response's writes come after its reply.
            if not current_span().get_span_context().is_valid:
                return operation(*args, **kwargs)
            span = tracer.start_span(span_name, kind=SpanKind.CLIENT, attributes=attributes)
            try:
                awaitable = operation(*args, **kwargs)
            except BaseException as error:
                _failed(span, error)
                span.end()
                raise
            if isinstance(awaitable, asyncio.Future):
                awaitable.add_done_callback(lambda done: _settled(span, done))
                return awaitable
            return _ending(span, awaitable)

        return call


def _settled(span: Span, done: asyncio.Future[Any]) -> None:
    if done.cancelled():
        _failed(span, asyncio.CancelledError())
    elif (error := done.exception()) is not None:
        _failed(span, error)
    span.end()


async def _ending(span: Span, awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except BaseException as error:
        _failed(span, error)
        raise
    finally:
        span.end()


def _failed(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import StatusCode

    name = type(error).__qualname__
    span.set_attribute("error.type", name)
    span.set_status(StatusCode.ERROR, name)
