"""A fake Venice.ai ``POST /responses``: a real HTTP server on loopback, scripted per request.

The Venice backend is an HTTP client, so it is tested against a real server rather than a mocked
transport: connection pooling, chunked SSE bodies, dropped connections, timeouts and the
closing of an abandoned upstream request all behave as they would against Venice. The server
runs uvicorn in a thread with its own event loop (as ``tests/http_harness.py`` does), so its
timing does not depend on the test's loop.

A test queues scenarios (``fake.queue(...)``), consumed one per request in order; the frames
mimic Venice's dialect (``response.reasoning.delta``, plain-string reasoning summaries,
``response.web_search.done`` without a sequence number, annotations only in
``output_item.done``, ``data: [DONE]``) with Venice's own ids and sequence numbers. Every request
is recorded with its headers, JSON body and timings, including when the client went away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.loop_thread import LoopThread, Shutdown
from venna.gateway_http.server import HttpServer

RESPONSES_PATH = "/api/v1/responses"
# The upstream's model list (GET), answered with ``FakeVenice.models`` when set.
MODELS_PATH = "/api/v1/models"
# The same server speaking chat completions (dialect "chat"), as Ollama and vLLM do.
CHAT_PATH = "/api/v1/chat/completions"
# OpenAI's token counting; answered only while ``FakeVenice.input_tokens`` is set, else 404.
INPUT_TOKENS_PATH = "/api/v1/responses/input_tokens"
DEFAULT_MODEL = "zai-org-glm-5-1"

# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True, slots=True)
class Frame:
    """One SSE frame: ``event: <event>`` + ``data: <json>``, sent ``delay`` seconds after the last."""

    event: str
    data: dict[str, Any]
    delay: float = 0.0
    # Sent verbatim instead of event + data (an SSE comment, a malformed frame).
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class StreamReply:
    """A 200 ``text/event-stream`` answer.

    ``done`` ends the stream with ``data: [DONE]``; ``cut`` drops the connection after the
    frames instead of finishing the chunked body (an upstream dying mid-stream).
    """

    frames: Sequence[Frame]
    done: bool = True
    cut: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def cut_after(self, count: int) -> StreamReply:
        """The same stream dropped after its first ``count`` frames, with no terminal event."""
        return replace(self, frames=list(self.frames[:count]), done=False, cut=True)

    def with_frames(self, index: int, *frames: Frame) -> StreamReply:
        """The same stream with ``frames`` inserted before frame ``index``."""
        return replace(self, frames=[*self.frames[:index], *frames, *self.frames[index:]])


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A non-2xx answer with a JSON body (or a raw text body, if ``body`` is a str)."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hang:
    """Read the request, then answer nothing for ``seconds`` (or until the client goes away)."""

    seconds: float = 30.0


Scenario = StreamReply | ErrorReply | Hang


def raw(text: str) -> Frame:
    """Bytes sent as they are, e.g. ``": keep-alive\\n\\n"`` or a frame that is not JSON."""
    return Frame("", {}, raw=text)


def error(status: int, body: Any = None, headers: dict[str, str] | None = None) -> ErrorReply:
    """An error answer; the default body is Venice's StandardError ``{"error": "<message>"}``."""
    return ErrorReply(status, {"error": f"fake error {status}"} if body is None else body, headers or {})


# ---------------------------------------------------------------------------------------------
# Venice-shaped streams


@dataclass(frozen=True, slots=True)
class Citation:
    """A url_citation annotation on the message text."""

    url: str
    title: str
    start_index: int
    end_index: int

    def json(self) -> dict[str, Any]:
        return {
            "type": "url_citation",
            "url": self.url,
            "title": self.title,
            "start_index": self.start_index,
            "end_index": self.end_index,
        }


@dataclass(frozen=True, slots=True)
class SearchResult:
    url: str
    title: str
    snippet: str = ""


@dataclass(frozen=True, slots=True)
class Call:
    """A function call the fake model makes; ``arguments`` is streamed in ``chunks`` deltas."""

    name: str
    arguments: str
    call_id: str = "call_venice_1"
    chunks: int = 3


USAGE: dict[str, Any] = {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}


class _Numbered:
    """Venice's frames with Venice's own sequence numbers (the gateway must renumber)."""

    def __init__(self, first_sequence_number: int) -> None:
        self.frames: list[Frame] = []
        self._next = first_sequence_number

    def add(self, event: str, *, delay: float = 0.0, numbered: bool = True, **fields: Any) -> None:
        data: dict[str, Any] = {"type": event, **fields}
        if numbered:
            data["sequence_number"] = self._next
            self._next += 1
        self.frames.append(Frame(event, data, delay))


def venice_stream(
    *,
    words: Sequence[str] = (),
    reasoning: Sequence[str] = (),
    encrypted_content: str | None = None,
    search_results: Sequence[SearchResult] = (),
    citations: Sequence[Citation] = (),
    calls: Sequence[Call] = (),
    usage: dict[str, Any] | None = USAGE,
    terminal: str = "completed",
    incomplete_reason: str = "max_output_tokens",
    failure: tuple[str, str] = ("inference_failed", "Inference failed upstream"),
    delay: float = 0.0,
    done: bool = True,
    model: str = DEFAULT_MODEL,
    first_sequence_number: int = 0,
) -> StreamReply:
    """A stream in Venice's typical order (see the module docstring).

    ``words`` are sent as separate output_text deltas (joined with no separator: give them
    their spaces), ``reasoning`` as ``response.reasoning.delta`` frames; ``delay`` is waited
    before every text or reasoning delta. ``terminal`` is completed, incomplete or failed.
    """
    response_id = "resp_chatcmpl-fake0001"
    base: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": 1767225600,
        "model": model,
        "status": "in_progress",
        "output": [],
    }
    out = _Numbered(first_sequence_number)
    out.add("response.created", response=base)
    if search_results:
        # Venice's own event, and the only one without a sequence number.
        out.add(
            "response.web_search.done",
            numbered=False,
            type="web_search_call",
            id="ws_venice_1",
            status="completed",
            results=[
                {"index": index, "url": result.url, "title": result.title, "snippet": result.snippet}
                for index, result in enumerate(search_results)
            ],
        )
    finals: list[dict[str, Any]] = []  # output items as output_item.done reports them
    index = 0
    if reasoning:
        out.add(
            "response.output_item.added",
            output_index=index,
            item={"type": "reasoning", "id": "rs_venice_1", "summary": []},
        )
        for chunk in reasoning:
            out.add(
                "response.reasoning.delta",
                delay=delay,
                item_id="rs_venice_1",
                output_index=index,
                delta=chunk,
            )
        final_reasoning: dict[str, Any] = {
            "type": "reasoning",
            "id": "rs_venice_1",
            "summary": ["".join(reasoning)],
        }
        if encrypted_content is not None:
            final_reasoning["encrypted_content"] = encrypted_content
        finals.append(final_reasoning)
        index += 1
    text = "".join(words)
    if words:
        message = {
            "type": "message",
            "id": "msg_venice_1",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        out.add("response.output_item.added", output_index=index, item=message)
        part = {"type": "output_text", "text": "", "annotations": []}
        out.add(
            "response.content_part.added",
            item_id="msg_venice_1",
            output_index=index,
            content_index=0,
            part=part,
        )
        for word in words:
            out.add(
                "response.output_text.delta",
                delay=delay,
                item_id="msg_venice_1",
                output_index=index,
                content_index=0,
                delta=word,
            )
        finals.append(
            {
                "type": "message",
                "id": "msg_venice_1",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": text, "annotations": [c.json() for c in citations]}
                ],
            }
        )
        index += 1
    for number, call in enumerate(calls, start=1):
        item_id = f"fc_venice_{number}"
        added = {
            "type": "function_call",
            "id": item_id,
            "call_id": call.call_id,
            "name": call.name,
            "arguments": "",
            "status": "in_progress",
        }
        out.add("response.output_item.added", output_index=index, item=added)
        for chunk in _chunks(call.arguments, call.chunks):
            out.add(
                "response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=chunk
            )
        finals.append({**added, "arguments": call.arguments, "status": "completed"})
        index += 1
    if terminal != "failed":
        for position, item in enumerate(finals):
            if item["type"] == "message":
                done_part = item["content"][0]
                out.add(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=position,
                    content_index=0,
                    text=text,
                )
                out.add(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=position,
                    content_index=0,
                    part=done_part,
                )
            out.add("response.output_item.done", output_index=position, item=item)
    final = {**base, "output": _completed_output(finals)}
    if usage is not None:
        final["usage"] = usage
    if terminal == "completed":
        out.add("response.completed", response={**final, "status": "completed"})
    elif terminal == "incomplete":
        out.add(
            "response.incomplete",
            response={**final, "status": "incomplete", "incomplete_details": {"reason": incomplete_reason}},
        )
    elif terminal == "failed":
        code, message_text = failure
        out.add(
            "response.failed",
            response={**base, "status": "failed", "error": {"code": code, "message": message_text}},
        )
    elif terminal != "none":
        raise ValueError(f"unknown terminal event {terminal!r}")
    return StreamReply(out.frames, done=done)


def _completed_output(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output as Venice's response.completed has it: annotations always empty, calls last."""
    output = []
    for item in finals:
        if item["type"] == "message":
            item = {**item, "content": [{**part, "annotations": []} for part in item["content"]]}
        output.append(item)
    return sorted(output, key=lambda item: item["type"] == "function_call")


def _chunks(text: str, count: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, count)))
    return [text[start : start + size] for start in range(0, len(text), size)] or [""]


def text_stream(words: Sequence[str], **options: Any) -> StreamReply:
    """Plain assistant text, one delta per word."""
    return venice_stream(words=words, **options)


def reasoning_then_text(
    reasoning: Sequence[str],
    words: Sequence[str],
    *,
    encrypted_content: str | None = "gAAAA-opaque-signature==",
    **options: Any,
) -> StreamReply:
    """A reasoning model: reasoning deltas, then the answer."""
    return venice_stream(reasoning=reasoning, encrypted_content=encrypted_content, words=words, **options)


def function_call_stream(
    name: str, arguments: str, *, call_id: str = "call_venice_1", **options: Any
) -> StreamReply:
    """The model calls function ``name`` with ``arguments`` (a JSON string)."""
    return venice_stream(calls=[Call(name, arguments, call_id)], **options)


def web_search_with_citations(
    results: Sequence[SearchResult], words: Sequence[str], citations: Sequence[Citation], **options: Any
) -> StreamReply:
    """Venice ran its web search: ``response.web_search.done``, then cited text."""
    return venice_stream(search_results=results, words=words, citations=citations, **options)


RAYLEIGH_TEXT = "The sky is blue because of Rayleigh scattering."
RAYLEIGH_CITATION = Citation("https://example.com/rayleigh", "Rayleigh scattering", 27, 47)


def rayleigh_search() -> StreamReply:
    """A searched answer, RAYLEIGH_TEXT in three deltas, citing RAYLEIGH_CITATION."""
    return web_search_with_citations(
        [
            SearchResult("https://example.com/rayleigh", "Rayleigh scattering", "Short waves scatter"),
            SearchResult("https://example.org/sky", "Sky", "Why the sky is blue"),
        ],
        ["The sky is blue", " because of", " Rayleigh scattering."],
        [RAYLEIGH_CITATION],
    )


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(slots=True)
class Recorded:
    """One request the fake received, and what became of its answer (times: time.monotonic())."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float
    # The client's (host, port): equal ports on two requests mean a reused connection.
    client: tuple[str, int] | None = None
    scenario: Scenario | None = field(default=None, repr=False)
    frames_sent: int = 0
    # When the fake finished its answer itself (complete, or cut on purpose).
    finished_at: float | None = None
    # When the client closed the connection before the answer was finished.
    disconnected_at: float | None = None

    @property
    def closed(self) -> bool:
        return self.finished_at is not None or self.disconnected_at is not None


class FakeVenice(LoopThread):
    """The fake server. ``start()``/``stop()`` it, ``queue()`` scenarios, read ``requests``."""

    thread_name = "fake-venice"

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.requests: list[Recorded] = []
        # The body of GET /models; None: 404, as from an upstream without a model list.
        self.models: dict[str, Any] | None = None
        # The count POST /responses/input_tokens answers; None: 404, as from an upstream without it.
        self.input_tokens: int | None = None
        self._scenarios: collections.deque[Scenario] = collections.deque()
        self._lock = threading.Lock()
        super().__init__()

    @property
    def base_url(self) -> str:
        """What the backend is configured with, Venice-like: ``/api/v1`` then ``/responses``."""
        return f"http://127.0.0.1:{self.port}/api/v1"

    def queue(self, *scenarios: Scenario) -> None:
        """Answers for the next requests, in order; a request finding none gets a 500."""
        with self._lock:
            self._scenarios.extend(scenarios)

    @property
    def pending(self) -> int:
        """Queued scenarios no request consumed yet."""
        with self._lock:
            return len(self._scenarios)

    def reset(self) -> None:
        with self._lock:
            self._scenarios.clear()
            self.requests = []
            self.models = None
            self.input_tokens = None

    @property
    def open_requests(self) -> list[Recorded]:
        """Requests whose answer is still being written and whose client is still there."""
        with self._lock:
            return [request for request in self.requests if not request.closed]

    def body(self, index: int = -1) -> dict[str, Any]:
        """The JSON body of request ``index``."""
        with self._lock:
            body = self.requests[index].body
        assert isinstance(body, dict), body
        return body

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Polls ``condition`` without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the fake Venice did not reach the expected state")
            await asyncio.sleep(0.002)

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> Shutdown:
        app = Starlette(routes=[Route("/{path:path}", _Endpoint(self), methods=["GET", "POST", "DELETE"])])
        server = HttpServer(app, f"127.0.0.1:{self.port}", shutdown_grace=1.0)
        await server.start()
        self.port = server.port
        return server.stop

    # ------------------------------------------------------------------ serving

    def _record(self, record: Recorded) -> Scenario | None:
        with self._lock:
            self.requests.append(record)
            if record.method != "POST" or record.path not in (RESPONSES_PATH, CHAT_PATH):
                return None
            return self._scenarios.popleft() if self._scenarios else None


class _Endpoint:
    """The raw ASGI handler behind every path, so that it can watch for the client leaving."""

    def __init__(self, fake: FakeVenice) -> None:
        self._fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        content = await request.body()
        try:
            body: Any = json.loads(content) if content else None
        except ValueError:
            body = content.decode(errors="replace")
        record = Recorded(
            method=request.method,
            path=request.url.path,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
            received_at=time.monotonic(),
            client=(request.client.host, request.client.port) if request.client else None,
        )
        scenario = self._fake._record(record)
        record.scenario = scenario
        if scenario is None and record.method == "GET" and record.path == MODELS_PATH and self._fake.models:
            scenario = ErrorReply(200, self._fake.models)
        counted = self._fake.input_tokens
        if (
            scenario is None
            and record.method == "POST"
            and record.path == INPUT_TOKENS_PATH
            and counted is not None
        ):
            scenario = ErrorReply(200, {"object": "response.input_tokens", "input_tokens": counted})
        if scenario is None:
            if record.method == "POST" and record.path in (RESPONSES_PATH, CHAT_PATH):
                scenario = ErrorReply(500, {"error": "fake Venice: no scenario queued"})
            else:
                scenario = ErrorReply(404, {"error": "Not found"})
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, record, gone))
        try:
            await _Player(record, send, gone).play(scenario)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _watch_disconnect(receive: Receive, record: Recorded, gone: asyncio.Event) -> None:
    """Notes the moment the client closes the connection before the answer is finished."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if record.finished_at is None:
                record.disconnected_at = time.monotonic()
                gone.set()
            return


@dataclass(slots=True)
class _Player:
    """Writes one scenario to the ASGI ``send``."""

    record: Recorded
    send: Send
    gone: asyncio.Event

    async def play(self, scenario: Scenario) -> None:
        if isinstance(scenario, ErrorReply):
            await self._error(scenario)
        elif isinstance(scenario, Hang):
            await self._pause(scenario.seconds)
            if not self.gone.is_set():
                await self._error(ErrorReply(504, {"error": "fake Venice: hung on purpose"}))
        else:
            await self._stream(scenario)

    async def _error(self, reply: ErrorReply) -> None:
        if isinstance(reply.body, str):
            payload, content_type = reply.body.encode(), b"text/plain; charset=utf-8"
        else:
            payload, content_type = json.dumps(reply.body).encode(), b"application/json"
        headers = [(b"content-type", content_type), *_encode(reply.headers)]
        await self.send({"type": "http.response.start", "status": reply.status, "headers": headers})
        self.record.finished_at = time.monotonic()
        await self.send({"type": "http.response.body", "body": payload, "more_body": False})

    async def _stream(self, reply: StreamReply) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"cf-ray", b"8f00fake0000-AMS"),
            *_encode(reply.headers),
        ]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        for frame in reply.frames:
            if frame.delay and not await self._pause(frame.delay):
                return
            text = frame.raw
            if text is None:
                text = f"event: {frame.event}\ndata: {json.dumps(frame.data)}\n\n"
            chunk = text.encode()
            await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.record.frames_sent += 1
            if self.gone.is_set():
                return
        if reply.cut:
            # Returning without finishing the chunked body makes uvicorn drop the connection.
            self.record.finished_at = time.monotonic()
            return
        self.record.finished_at = time.monotonic()
        tail = b"data: [DONE]\n\n" if reply.done else b""
        await self.send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _pause(self, seconds: float) -> bool:
        """Sleeps, unless the client leaves first; True if it is still there."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gone.wait(), seconds)
        return not self.gone.is_set()


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


@contextlib.contextmanager
def running(port: int = 0) -> Iterator[FakeVenice]:
    """A started fake, stopped on exit."""
    fake = FakeVenice(port)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


async def closes_within(fake: FakeVenice, index: int, timeout: float) -> Recorded:
    """Waits until request ``index`` is closed, then returns its record."""
    await fake.wait_for(lambda: len(fake.requests) > index and fake.requests[index].closed, timeout)
    return fake.requests[index]


__all__ = [
    "CHAT_PATH",
    "DEFAULT_MODEL",
    "INPUT_TOKENS_PATH",
    "MODELS_PATH",
    "RESPONSES_PATH",
    "USAGE",
    "Call",
    "Citation",
    "ErrorReply",
    "FakeVenice",
    "Frame",
    "Hang",
    "Recorded",
    "Scenario",
    "SearchResult",
    "StreamReply",
    "closes_within",
    "error",
    "function_call_stream",
    "raw",
    "reasoning_then_text",
    "running",
    "text_stream",
    "venice_stream",
    "web_search_with_citations",
]


# ---------------------------------------------------------------------------------------------
# Fixtures (a pytest plugin of the suite: see tests/conftest.py)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeVenice]:
    """One fake Venice per test module: starting uvicorn per test would dominate the runtime."""
    with running() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeVenice) -> FakeVenice:
    """The module's fake, with no scenarios queued and no requests recorded."""
    fake_server.reset()
    return fake_server
