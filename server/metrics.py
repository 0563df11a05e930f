"""Prometheus metrics of one server (calls by RPC and status, their latency, open streams,
background work, tokens by workspace and model) and its access log: one line per call.

Each server has a registry of its own (several may run in one process, in tests), exposed by the
HTTP shim at ``GET /metrics`` and, for deployments without the shim, on ``--metrics-listen``.
Calls are counted where every handler is wrapped, so a call made through the shim in process
counts exactly as one made over a socket.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from venna.responses.v1 import response_pb2
from venna.server import auth
from venna.server.errors import ABORTED_WITH

log = logging.getLogger(__name__)
access_log = logging.getLogger("venna.access")

# Latency buckets (seconds): from a cached read to a long generation.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_Unary = Callable[[Any, Any], Any]
_Stream = Callable[[Any, Any], AsyncGenerator[Any, None]]


class _BackgroundCollector(Collector):
    """Background responses of this process by state, read at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "venna_background_responses",
            "Background responses held by this process, by state",
            labels=["state"],
        )
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "venna_rpc_calls",
            "Calls finished, by service, method and gRPC status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "venna_rpc_duration_seconds",
            "Time from a call's start to its end (a stream's last event), by service and method",
            ["service", "method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "venna_rpc_open_streams",
            "Server-streaming calls in progress, by method",
            ["method"],
            registry=self.registry,
        )
        # Each method's latency histogram, bound when its handler is wrapped.
        self._latencies: dict[tuple[str, str], Histogram] = {}
        self.tokens = Counter(
            "venna_tokens",
            "Tokens of finished responses, by workspace id, model and kind (input or output)",
            ["workspace", "model", "kind"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "venna_upstream_requests",
            "Requests to upstream models (each attempt), by upstream and outcome: ok, http_<status>,"
            " connect_error, timeout, error",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "venna_upstream_response_seconds",
            "Time from sending a request upstream to the start of its answer, by upstream",
            ["upstream"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "venna_upstream_retries",
            "Upstream requests sent again, by upstream and what the failed attempt got",
            ["upstream", "reason"],
            registry=self.registry,
        )
        self.store_batch = Histogram(
            "venna_store_commit_batch_size",
            "Store calls that shared one commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.store_commit = Histogram(
            "venna_store_commit_seconds",
            "Time one commit of the store took, its batch's calls included",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    def store_committed(self, calls: int, seconds: float) -> None:
        """A commit of the store (called on the store's own thread for SQLite; prometheus-client's
        metrics take that)."""
        self.store_batch.observe(calls)
        self.store_commit.observe(seconds)

    def upstream_request(self, upstream: str, outcome: str, seconds: float) -> None:
        self.upstream_requests.labels(upstream, outcome).inc()
        self.upstream_latency.labels(upstream).observe(seconds)

    def upstream_retry(self, upstream: str, reason: str) -> None:
        self.upstream_retries.labels(upstream, reason).inc()

    def watch_background(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_BackgroundCollector(counts))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def count_usage(self, workspace_id: str, response: response_pb2.Response) -> None:
        if not response.HasField("usage"):
            return
        usage = response.usage
        self.tokens.labels(workspace_id, response.model, "input").inc(usage.input_tokens)
        self.tokens.labels(workspace_id, response.model, "output").inc(usage.output_tokens)

    def wrap(
        self, service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` counted and timed."""
        short = service.rsplit(".", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(short, method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(short, method, handler.unary_stream),  # type: ignore[arg-type]
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError("only unary and server-streaming methods are counted")

    def _finish(
        self,
        service: str,
        method: str,
        started: float,
        error: BaseException | None,
        request: Any,
        request_id: str,
    ) -> None:
        seconds = time.perf_counter() - started
        self._latencies[(service, method)].observe(seconds)
        if error is None:
            code = grpc.StatusCode.OK
        else:
            aborted = ABORTED_WITH.get()
            code = aborted if aborted is not None else _code_of(error)
        self.calls.labels(service, method, code.name).inc()
        if access_log.isEnabledFor(logging.INFO):
            # Never a key, never content: who, what, how it ended, how long it took. The same
            # fields go along as the record's extras, for JSON logs.
            fields = {
                "method": f"{service}/{method}",
                "code": code.name,
                "duration_ms": round(seconds * 1000, 1),
                "workspace": auth.current_workspace(),
                "model": getattr(request, "model", "") or None,
                "request_id": request_id,
            }
            access_log.info(
                "%s %s %.1fms workspace=%s model=%s request_id=%s",
                fields["method"],
                fields["code"],
                fields["duration_ms"],
                fields["workspace"] or "-",
                fields["model"] or "-",
                fields["request_id"],
                extra=fields,
            )

    def _unary(self, service: str, method: str, behavior: _Unary) -> _Unary:
        self._latencies[(service, method)] = self.latency.labels(service, method)  # bound once

        async def unary(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            ABORTED_WITH.set(None)
            request_id = await _answer_request_id(context)
            try:
                result = await behavior(request, context)
            except BaseException as error:
                self._finish(service, method, started, error, request, request_id)
                raise
            self._finish(service, method, started, None, request, request_id)
            return result

        return unary

    def _stream(self, service: str, method: str, behavior: _Stream) -> _Stream:
        self._latencies[(service, method)] = self.latency.labels(service, method)  # bound once
        gauge = self.open_streams.labels(method)

        async def stream(request: Any, context: Any) -> AsyncGenerator[Any, None]:
            started = time.perf_counter()
            ABORTED_WITH.set(None)
            request_id = await _answer_request_id(context)
            gauge.inc()
            error: BaseException | None = None
            try:
                # Closed here when the caller stops reading, not later by the collector: the
                # handler's clean-up (settling a response whose client left) runs at once.
                async with aclosing(behavior(request, context)) as events:
                    async for event in events:
                        yield event
            except BaseException as raised:
                error = raised
                raise
            finally:
                gauge.dec()
                self._finish(service, method, started, error, request, request_id)

        return stream


async def _answer_request_id(context: Any) -> str:
    """The call's request id (the caller's ``x-request-id``, or a new one), sent back in the
    response headers so that a caller can quote it when it reports a problem."""
    request_id = _request_id(context) or "req_" + secrets.token_hex(16)
    try:
        await context.send_initial_metadata((("x-request-id", request_id),))
    except Exception:  # a call already over (its client gone): the handler finds out by itself
        log.debug("could not send the request id of a call", exc_info=True)
    return request_id


def _request_id(context: Any) -> str | None:
    """The call's ``x-request-id`` metadata (the shim passes on the HTTP request's)."""
    try:
        metadata = context.invocation_metadata() or ()
    except Exception:
        return None
    for entry in metadata:
        key, value = (entry.key, entry.value) if hasattr(entry, "key") else entry
        if key == "x-request-id":
            return str(value)[:128]
    return None


def _code_of(error: BaseException) -> grpc.StatusCode:
    """The status of a call that ended by ``error`` without aborting: a client that left (or
    a generator closed early) is CANCELLED, anything else UNKNOWN."""
    code = getattr(error, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    if callable(code):
        try:
            called = code()
        except Exception:
            called = None
        if isinstance(called, grpc.StatusCode):
            return called
    if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
