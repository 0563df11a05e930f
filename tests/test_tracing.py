"""Traces through real servers: an HTTP request's ``traceparent`` continues in the service (a
SERVER span per call), out to a real loopback upstream (a CLIENT span, and ``traceparent`` in
the upstream request) and into the store (a span per operation); a shim with tracing on adds
its own spans; ``venna serve --traces otlp`` exports OTLP/HTTP protobuf to a real loopback
receiver, while running and on SIGTERM; without the ``otel`` extra, tracing is a clear usage
error and everything else works, trace context headers included."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from websockets.sync.client import connect

from tests.fake_venice import DEFAULT_MODEL, FakeVenice, error, text_stream
from tests.http_harness import HttpVenna, running
from tests.process_harness import ROOT, create_key, serving
from tests.test_chat_backend import chat_stream
from venna.backends import tracing as service_tracing
from venna.backends.echo import EchoBackend
from venna.backends.responses import ResponsesUpstream
from venna.gateway_http import tracing as shim_tracing
from venna.server import tracing as server_tracing
from venna.server.routing import Router

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CREATE = "venna.responses.v1.ResponsesService/CreateResponse"
STREAM = "venna.responses.v1.ResponsesService/StreamResponse"
CHAT_MODEL = "local/llama3.2"


# A started HttpVenna, stopped at the end of the block.
serving_http = contextlib.contextmanager(running)


def hex_id(value: int, digits: int) -> str:
    return format(value, f"0{digits}x")


def trace_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return hex_id(span.context.trace_id, 32)


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return hex_id(span.context.span_id, 16)


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else hex_id(span.parent.span_id, 16)


def wait_for(
    exporter: InMemorySpanExporter, found: Callable[[Sequence[ReadableSpan]], bool], timeout: float = 10.0
) -> Sequence[ReadableSpan]:
    """The finished spans, once ``found`` holds of them: a stream's span ends just after its last
    event is sent, a background response's store writes after its reply."""
    deadline = time.monotonic() + timeout
    while True:
        spans = exporter.get_finished_spans()
        if found(spans):
            return spans
        assert time.monotonic() < deadline, " ".join(sorted({span.name for span in spans}))
        time.sleep(0.02)


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the service's side (servers, upstream sessions, stores built now on)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service_tracing.enable(provider)
    try:
        yield exporter
    finally:
        service_tracing.disable()
        shim_tracing.disable()
        provider.shutdown()


def gateway(path: Path, fake: FakeVenice, transport: str = "in_process") -> HttpVenna:
    """Venna over HTTP with echo and a chat-completions upstream on the fake (``local/…``)."""
    upstream = ResponsesUpstream(fake.base_url, None, prefix="local/", dialect="chat", backoff_base=0.01)
    return HttpVenna(path, transport=transport, router=Router({"echo": EchoBackend(), "local": upstream}))


def headers(venna: HttpVenna, traceparent: str = TRACEPARENT) -> dict[str, str]:
    return {"authorization": f"Bearer {venna.alpha}", "traceparent": traceparent}


@pytest.mark.parametrize("transport", ["in_process", "channel"])
def test_an_http_requests_trace_goes_through_the_service_to_the_upstream(
    tmp_path: Path, fake: FakeVenice, exporter: InMemorySpanExporter, transport: str
) -> None:
    fake.queue(chat_stream({"content": "Hi"}))
    with serving_http(gateway(tmp_path / "venna.db", fake, transport)) as venna:
        reply = httpx.post(
            f"{venna.base_url}/responses",
            json={"model": CHAT_MODEL, "input": "hi"},
            headers={**headers(venna), "tracestate": "vendor=abc"},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        spans = wait_for(exporter, lambda spans: bool(named(spans, CREATE)))
        key = venna.alpha

    (server,) = named(spans, CREATE)
    assert server.kind is SpanKind.SERVER
    assert (trace_of(server), parent_id(server)) == (TRACE_ID, PARENT_ID)
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.trace_state.get("vendor") == "abc"
    attributes = dict(server.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "venna.responses.v1.ResponsesService"
    assert attributes["rpc.method"] == "CreateResponse"
    assert attributes["rpc.grpc.status_code"] == 0
    assert str(attributes["venna.workspace"]).startswith("ws_")
    assert attributes["gen_ai.request.model"] == CHAT_MODEL
    assert server.status.status_code is StatusCode.UNSET

    # The upstream request: a CLIENT span under the call's, whose context went up with it.
    (client,) = [span for span in spans if span.kind is SpanKind.CLIENT and span.name == "POST"]
    assert trace_of(client) == TRACE_ID and parent_id(client) == span_id(server)
    assert dict(client.attributes or {}) == {
        "http.request.method": "POST",
        "url.full": f"{fake.base_url}/chat/completions",
        "server.address": "127.0.0.1",
        "server.port": fake.port,
        "http.response.status_code": 200,
    }
    (upstream_request,) = fake.requests
    assert upstream_request.headers["traceparent"] == f"00-{TRACE_ID}-{span_id(client)}-01"
    assert upstream_request.headers["tracestate"] == "vendor=abc"
    # No span carries the caller's key.
    assert not [span for span in spans for value in (span.attributes or {}).values() if key in str(value)]


def test_store_operations_are_spans_of_the_call_that_made_them(
    tmp_path: Path, fake: FakeVenice, exporter: InMemorySpanExporter
) -> None:
    with serving_http(gateway(tmp_path / "venna.db", fake)) as venna:
        url = f"{venna.base_url}/responses"
        first = httpx.post(url, json={"model": "echo", "input": "one"}, headers=headers(venna)).json()
        second = httpx.post(
            url,
            json={"model": "echo", "input": "two", "previous_response_id": first["id"]},
            headers=headers(venna),
        )
        assert second.status_code == 200
        assert httpx.get(f"{url}/{first['id']}", headers=headers(venna)).status_code == 200
        queued = httpx.post(
            url, json={"model": "echo", "input": "three", "background": True}, headers=headers(venna)
        ).json()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/{queued['id']}", headers=headers(venna)).json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        wanted = {"create_response", "save_response", "load_context", "get_response", "append_events"}
        spans = wait_for(
            exporter,
            lambda spans: wanted <= {str((span.attributes or {}).get("db.operation.name")) for span in spans},
        )

    by_id = {span_id(span): span for span in spans}
    stored = [span for span in spans if span.name.startswith("store ")]
    for span in stored:
        attributes = dict(span.attributes or {})
        assert span.name == f"store {attributes['db.operation.name']}"
        assert attributes["db.system.name"] == "sqlite" and span.kind is SpanKind.CLIENT
        assert trace_of(span) == TRACE_ID
        # Under the call that made it, even when written after the call's reply (background).
        caller = by_id[parent_id(span) or ""]
        assert caller.kind is SpanKind.SERVER and caller.name.startswith("venna.responses.v1.")
    (load,) = [span for span in stored if span.name == "store load_context"]
    assert dict(by_id[parent_id(load) or ""].attributes or {})["rpc.method"] == "CreateResponse"


def test_failed_calls_and_upstream_errors_are_marked(
    tmp_path: Path, fake: FakeVenice, exporter: InMemorySpanExporter
) -> None:
    fake.queue(error(500, {"error": {"message": "boom"}}))
    with serving_http(gateway(tmp_path / "venna.db", fake)) as venna:
        failed = httpx.post(
            f"{venna.base_url}/responses", json={"model": CHAT_MODEL, "input": "hi"}, headers=headers(venna)
        )
        assert failed.status_code == 503
        missing = httpx.get(f"{venna.base_url}/responses/resp_nope", headers=headers(venna))
        assert missing.status_code == 404
        get = "venna.responses.v1.ResponsesService/GetResponse"
        spans = wait_for(exporter, lambda spans: bool(named(spans, CREATE) and named(spans, get)))

    (server,) = named(spans, CREATE)
    assert server.status.status_code is StatusCode.ERROR
    assert server.status.description == "UNAVAILABLE"
    assert dict(server.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    (client,) = [span for span in spans if span.name == "POST"]
    assert client.status.status_code is StatusCode.ERROR
    assert dict(client.attributes or {})["http.response.status_code"] == 500
    # The caller's mistake is no fault of the server's: recorded, not marked.
    (lookup,) = named(spans, get)
    assert dict(lookup.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert lookup.status.status_code is StatusCode.UNSET


def test_a_streams_span_lasts_until_its_last_event(
    tmp_path: Path, fake: FakeVenice, exporter: InMemorySpanExporter
) -> None:
    with serving_http(gateway(tmp_path / "venna.db", fake)) as venna:
        with httpx.stream(
            "POST",
            f"{venna.base_url}/responses",
            json={"model": "echo:delay_ms=100", "input": "a b c d", "stream": True},
            headers=headers(venna),
            timeout=10,
        ) as streamed:
            assert streamed.status_code == 200
            lines = list(streamed.iter_lines())
        assert "event: response.completed" in lines
        spans = wait_for(exporter, lambda spans: bool(named(spans, STREAM)))

    (stream,) = named(spans, STREAM)
    assert stream.start_time is not None and stream.end_time is not None
    assert (stream.end_time - stream.start_time) / 1e9 >= 0.3  # three delays of 100 ms
    assert dict(stream.attributes or {})["rpc.grpc.status_code"] == 0
    assert parent_id(stream) == PARENT_ID
    # The stored response's writes happen within the stream, under its span.
    stored = [span for span in spans if span.name.startswith("store ")]
    assert stored and {parent_id(span) for span in stored} == {span_id(stream)}


def test_a_shim_with_tracing_on_adds_its_request_span_and_call_span(
    tmp_path: Path, fake: FakeVenice, exporter: InMemorySpanExporter
) -> None:
    """`venna http` traced: the shim's SERVER span (its route as name), a CLIENT span for its
    gRPC call, and the service's span under that, in the client's trace."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    shim_tracing.enable(provider)
    with serving_http(gateway(tmp_path / "venna.db", fake, "channel")) as venna:
        reply = httpx.post(
            f"{venna.base_url}/responses", json={"model": "echo", "input": "hi"}, headers=headers(venna)
        )
        assert reply.status_code == 200
        spans = wait_for(
            exporter,
            lambda spans: len(named(spans, CREATE)) == 2 and bool(named(spans, "POST /v1/responses")),
        )

    (http,) = named(spans, "POST /v1/responses")
    assert http.kind is SpanKind.SERVER and parent_id(http) == PARENT_ID and trace_of(http) == TRACE_ID
    assert dict(http.attributes or {}) == {
        "http.request.method": "POST",
        "url.path": "/v1/responses",
        "url.scheme": "http",
        "http.route": "/v1/responses",
        "http.response.status_code": 200,
    }
    (call,) = [span for span in named(spans, CREATE) if span.kind is SpanKind.CLIENT]
    (served,) = [span for span in named(spans, CREATE) if span.kind is SpanKind.SERVER]
    assert parent_id(call) == span_id(http)
    assert parent_id(served) == span_id(call)
    assert dict(call.attributes or {})["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize("shim_traced", [False, True])
def test_a_websocket_turn_continues_the_handshakes_trace(
    tmp_path: Path, fake: FakeVenice, exporter: InMemorySpanExporter, shim_traced: bool
) -> None:
    """Each turn is a call of its own, in the trace of the upgrade request's ``traceparent``:
    directly, or under the shim's span for the turn when the shim traces too."""
    if shim_traced:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        shim_tracing.enable(provider)
    with serving_http(gateway(tmp_path / "venna.db", fake, "channel")) as venna:
        url = venna.base_url.replace("http://", "ws://") + "/responses"
        with connect(url, additional_headers=headers(venna), open_timeout=10) as socket:
            socket.send(json.dumps({"type": "response.create", "model": "echo", "input": "hi"}))
            while json.loads(socket.recv(timeout=10))["type"] != "response.completed":
                pass
        spans = wait_for(exporter, lambda spans: len(named(spans, STREAM)) == (2 if shim_traced else 1))

    (served,) = [span for span in named(spans, STREAM) if span.kind is SpanKind.SERVER]
    assert trace_of(served) == TRACE_ID
    if shim_traced:
        (call,) = [span for span in named(spans, STREAM) if span.kind is SpanKind.CLIENT]
        assert parent_id(call) == PARENT_ID and parent_id(served) == span_id(call)
    else:
        assert parent_id(served) == PARENT_ID


def test_with_tracing_off_nothing_is_wrapped(tmp_path: Path) -> None:
    """Off (the default), every hook hands back what it was given: calls pay nothing."""
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    assert server_tracing.wrap("venna.responses.v1.ResponsesService", "GetResponse", handler) is handler
    assert service_tracing.upstream_trace_configs() == []
    store = object()
    assert service_tracing.traced_store(store, tmp_path / "venna.db") is store  # type: ignore[arg-type]
    client = object()
    assert shim_tracing.traced_client(client) is client  # type: ignore[arg-type]
    assert shim_tracing.middleware() == []


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ([(b"traceparent", TRACEPARENT.encode())], [("traceparent", TRACEPARENT)]),
        (
            [(b"tracestate", b"a=1"), (b"traceparent", TRACEPARENT.encode()), (b"tracestate", b"b=2")],
            [("traceparent", TRACEPARENT), ("tracestate", "a=1,b=2")],
        ),
        # Two traceparents say nothing for sure; a malformed one is nothing.
        ([(b"traceparent", TRACEPARENT.encode())] * 2, []),
        ([(b"traceparent", b"00-xyz")], []),
        ([(b"traceparent", TRACEPARENT.upper().encode())], []),
        # A tracestate gRPC metadata cannot carry is dropped, not the traceparent.
        (
            [(b"traceparent", TRACEPARENT.encode()), (b"tracestate", "a=\u00e9".encode())],
            [("traceparent", TRACEPARENT)],
        ),
        ([(b"tracestate", b"a=1")], []),
    ],
)
def test_trace_context_headers_become_metadata(
    sent: list[tuple[bytes, bytes]], forwarded: list[tuple[str, str]]
) -> None:
    assert list(shim_tracing.trace_context([(b"accept", b"*/*"), *sent])) == forwarded


# ---------------------------------------------------------------------------------------------
# Real processes


class OtlpReceiver:
    """A loopback OTLP/HTTP endpoint: keeps each export request (protobuf) it is sent."""

    def __init__(self) -> None:
        self.exports: list[tuple[str, str, ExportTraceServiceRequest]] = []
        self._lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                with received._lock:
                    received.exports.append(
                        (
                            self.path,
                            self.headers.get("content-type") or "",
                            ExportTraceServiceRequest.FromString(body),
                        )
                    )
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def spans(self) -> list[tuple[dict[str, Any], OtlpSpan]]:
        """Every span received, with its resource's attributes."""
        with self._lock:
            exports = [request for _, _, request in self.exports]
        return [
            (attributes_of(resource_spans.resource.attributes), span)
            for request in exports
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def wait_for(self, name: str, trace_id: str, timeout: float = 15.0) -> tuple[dict[str, Any], OtlpSpan]:
        deadline = time.monotonic() + timeout
        while True:
            for resource, span in self.spans():
                if span.name == name and span.trace_id.hex() == trace_id:
                    return resource, span
            assert time.monotonic() < deadline, f"no span {name} of trace {trace_id} arrived"
            time.sleep(0.05)


def attributes_of(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    return {pair.key: getattr(pair.value, str(pair.value.WhichOneof("value"))) for pair in pairs}


def test_venna_serve_exports_otlp_while_running_and_on_sigterm(
    tmp_path: Path, fake: FakeVenice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `venna serve --traces otlp` (a Venice upstream on the fake), exporting to a real
    loopback receiver: the spans of a call arrive while it runs; those of a stream still in
    flight at SIGTERM arrive before the process exits."""
    db = tmp_path / "venna.db"
    key = create_key(db, "alpha")
    second_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        # Batches every second: the first spans arrive while the server runs.
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "1000")
        monkeypatch.setenv("VENICE_BASE_URL", fake.base_url)
        monkeypatch.setenv("VENICE_API_KEY", "upstream-test-key")
        fake.queue(text_stream(["Hello", " there"]))
        with serving(db, tmp_path / "serve.log", "--traces", "otlp") as server:
            reply = httpx.post(
                f"{server.base_url}/responses",
                json={"model": f"venice/{DEFAULT_MODEL}", "input": "hi"},
                headers={"authorization": f"Bearer {key}", "traceparent": TRACEPARENT},
                timeout=10,
            )
            assert reply.status_code == 200, reply.text
            resource, call = receiver.wait_for(CREATE, TRACE_ID)
            assert server.process.poll() is None  # exported while running
            _, upstream = receiver.wait_for("POST", TRACE_ID)

            with httpx.stream(
                "POST",
                f"{server.base_url}/responses",
                json={"model": "echo:delay_ms=150", "input": "one two three four", "stream": True},
                headers={
                    "authorization": f"Bearer {key}",
                    "traceparent": f"00-{second_trace}-{PARENT_ID}-01",
                },
                timeout=15,
            ) as streamed:
                lines = streamed.iter_lines()
                assert next(lines).startswith("event: response.created")
                os.kill(server.process.pid, signal.SIGTERM)
                rest = list(lines)
            assert "event: response.completed" in rest  # drained, not cut
            assert server.process.wait(timeout=15) == 0
            _, stream = receiver.wait_for(STREAM, second_trace, timeout=0.5)  # flushed before exit

    assert resource["service.name"] == "venna"
    assert {path for path, _, _ in receiver.exports} == {"/v1/traces"}
    assert {kind for _, kind, _ in receiver.exports} == {"application/x-protobuf"}
    assert call.kind == OtlpSpan.SPAN_KIND_SERVER and call.parent_span_id.hex() == PARENT_ID
    attributes = attributes_of(call.attributes)
    assert attributes["rpc.grpc.status_code"] == 0 and attributes["gen_ai.request.model"].startswith(
        "venice/"
    )
    assert upstream.kind == OtlpSpan.SPAN_KIND_CLIENT and upstream.parent_span_id == call.span_id
    assert attributes_of(upstream.attributes)["url.full"] == f"{fake.base_url}/responses"
    assert fake.requests[0].headers["traceparent"] == f"00-{TRACE_ID}-{upstream.span_id.hex()}-01"
    assert attributes_of(stream.attributes)["rpc.grpc.status_code"] == 0
    assert "upstream-test-key" not in str(receiver.exports) and key not in str(receiver.exports)


# Runs the `venna` command with OpenTelemetry made unimportable, as in an install without the
# extra: any import of it fails the way a missing package does.
WITHOUT_OTEL = """
import importlib.abc, sys

class NoOpenTelemetry(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoOpenTelemetry())
assert not [name for name in sys.modules if name.startswith("opentelemetry")]
"""


def without_otel(script: str, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WITHOUT_OTEL + script, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VENNA_LOG_LEVEL": "WARNING"},
    )


@pytest.mark.parametrize("command", ["serve", "http"])
@pytest.mark.parametrize("mode", ["otlp", "console"])
def test_traces_without_the_extra_are_a_usage_error(tmp_path: Path, command: str, mode: str) -> None:
    argv = [command, "--traces", mode, "--http-listen", "127.0.0.1:0"]
    if command == "serve":
        argv += ["--grpc-listen", "127.0.0.1:0", "--db", str(tmp_path / "venna.db")]
    process = without_otel("from venna.cli import main\nsys.exit(main(sys.argv[1:]))", *argv)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2, err
    assert err.splitlines() == [
        f"venna: --traces {mode} needs OpenTelemetry, which is not installed (opentelemetry);"
        " install the extra: pip install 'venna[otel]'"
    ]
    assert not (tmp_path / "venna.db").exists()  # refused before anything started


def test_without_the_extra_venna_serves_and_passes_trace_context_on(tmp_path: Path) -> None:
    """No OpenTelemetry at all: `venna serve` (traces off) answers over HTTP, and the shim still
    puts the request's trace context in the call's metadata."""
    db = tmp_path / "venna.db"
    key = create_key(db, "alpha")
    script = """
from starlette.requests import Request
from venna.gateway_http.parsing import forwarded_metadata

scope = {"type": "http", "headers": [(b"traceparent", sys.argv[1].encode()), (b"authorization", b"Bearer k")]}
print(list(forwarded_metadata(Request(scope))), flush=True)
from venna.cli import main
sys.exit(main(sys.argv[2:]))
"""
    argv = ["serve", "--db", str(db), "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]
    process = without_otel(script, TRACEPARENT, *argv)
    try:
        assert process.stdout is not None
        metadata = process.stdout.readline()
        assert metadata.strip() == str([("authorization", "Bearer k"), ("traceparent", TRACEPARENT)])
        started = process.stdout.readline()
        assert "HTTP on http://" in started, process.stderr.read() if process.stderr else ""
        base_url = started.split("HTTP on ")[1].split(",")[0]
        reply = httpx.post(
            f"{base_url}/responses",
            json={"model": "echo", "input": "untraced"},
            headers={"authorization": f"Bearer {key}", "traceparent": TRACEPARENT},
            timeout=10,
        )
        assert reply.status_code == 200 and reply.json()["status"] == "completed"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)
