"""The load generator: closed loops of unary calls and sets of concurrent streams, over gRPC or
HTTP, from this process or from several worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import grpc
import grpc.aio
import httpx

from benchkit.config import UNARY_TEXT, Metadata
from venna.responses.v1 import response_pb2, service_pb2, service_pb2_grpc


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One measurement: ``kind`` is grpc_unary, http_unary, grpc_stream or http_sse.

    Unary kinds run a closed loop of ``concurrency`` callers for ``duration`` seconds; stream
    kinds run ``concurrency`` streams of ``words`` words each, once.
    """

    kind: str
    target: str  # gRPC address, or HTTP base URL ending in /v1
    key: str
    concurrency: int
    duration: float = 0.0
    warmup: float = 0.0
    words: int = 0
    model: str = "echo"
    # Extra fields of every HTTP request body (e.g. {"store": False}).
    body: tuple[tuple[str, Any], ...] = ()


@dataclass(slots=True)
class LoadResult:
    # Seconds per request (unary) or per whole stream.
    latencies: list[float] = field(default_factory=list)
    calls: int = 0
    events: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    started: float = 0.0  # time.time() when measuring began
    finished: float = 0.0
    # The largest RSS of the server under load, where it was watched.
    peak_rss: int = 0

    @property
    def elapsed(self) -> float:
        return max(self.finished - self.started, 1e-9)

    def failed(self, error: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{type(error).__name__}: {error}"[:500])

    def _add_counts(self, other: LoadResult) -> None:
        self.peak_rss = max(self.peak_rss, other.peak_rss)
        self.latencies += other.latencies
        self.calls += other.calls
        self.events += other.events
        self.errors += other.errors
        self.error_samples += other.error_samples[: max(0, 5 - len(self.error_samples))]

    def merge(self, other: LoadResult) -> None:
        """Adds a measurement made at the same time (another client process)."""
        self._add_counts(other)
        self.started = min(self.started, other.started) if self.started else other.started
        self.finished = max(self.finished, other.finished)

    def then(self, other: LoadResult) -> None:
        """Adds a measurement made later, counting only the time both spent measuring."""
        self._add_counts(other)
        if not self.started:
            self.started = other.started
            self.finished = other.started
        self.finished += other.elapsed


def words_text(count: int) -> str:
    """``count`` distinct-looking short words, so each echo delta is a few bytes."""
    return " ".join(f"w{index % 1000:03d}" for index in range(count))


def user_message(text: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.role = response_pb2.ROLE_USER
    item.message.content.add().input_text.text = text
    return item


def auth(key: str) -> Metadata:
    """The call metadata for a workspace key; none for the baselines, which take no key."""
    return (("authorization", f"Bearer {key}"),) if key else ()


def stub_for(channel: grpc.aio.Channel) -> service_pb2_grpc.ResponsesServiceAsyncStub:
    return service_pb2_grpc.ResponsesServiceStub(channel)  # the stub is typed by its channel's kind


def open_channel(target: str, own_connection: bool = False) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if own_connection:
        # Channels with equal arguments share one connection unless each has its own pool.
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(target, options=options)


async def closed_loop(call: Callable[[int], Awaitable[None]], concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` callers (numbered, for their own connections) calling back to back for
    ``seconds``."""
    result = LoadResult(started=time.time())
    deadline = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call(index)
            except Exception as error:
                result.failed(error)
                continue
            result.latencies.append(time.perf_counter() - started)
            result.calls += 1

    await asyncio.gather(*(caller(index) for index in range(concurrency)))
    result.finished = time.time()
    return result


async def concurrent_streams(stream: Callable[[int], Awaitable[int]], count: int) -> LoadResult:
    """``count`` streams at once; each returns how many events it received."""
    result = LoadResult(started=time.time())

    async def one(index: int) -> None:
        started = time.perf_counter()
        try:
            received = await stream(index)
        except Exception as error:
            result.failed(error)
            return
        result.latencies.append(time.perf_counter() - started)
        result.calls += 1
        result.events += received

    await asyncio.gather(*(one(index) for index in range(count)))
    result.finished = time.time()
    return result


async def run_spec(spec: LoadSpec, ready: Callable[[], None] | None = None) -> LoadResult:
    """Runs one measurement (warm-up first, then ``ready`` — a start barrier — then the load)."""
    if spec.kind in ("grpc_unary", "grpc_stream"):
        return await _run_grpc(spec, ready)
    return await _run_http(spec, ready)


async def _run_grpc(spec: LoadSpec, ready: Callable[[], None] | None) -> LoadResult:
    """gRPC load over one channel (one HTTP/2 connection, as a typical client has)."""
    metadata = auth(spec.key)
    async with open_channel(spec.target) as channel:
        stub = stub_for(channel)
        if spec.kind == "grpc_unary":
            request = service_pb2.CreateResponseRequest(model="echo", input=[user_message(UNARY_TEXT)])

            async def unary(index: int) -> None:
                await stub.CreateResponse(request, metadata=metadata)

            await closed_loop(unary, spec.concurrency, spec.warmup)
            if ready is not None:
                await asyncio.to_thread(ready)
            return await closed_loop(unary, spec.concurrency, spec.duration)

        def streamer(words: int) -> Callable[[int], Awaitable[int]]:
            request = service_pb2.CreateResponseRequest(model="echo", input=[user_message(words_text(words))])

            async def stream(index: int) -> int:
                received = 0
                last = None
                async for event in stub.StreamResponse(request, metadata=metadata):
                    received += 1
                    last = event
                if last is None or last.WhichOneof("event") != "completed":
                    raise RuntimeError("stream ended without response.completed")
                return received

            return stream

        await concurrent_streams(streamer(min(spec.words, 200)), spec.concurrency)
        if ready is not None:
            await asyncio.to_thread(ready)
        return await concurrent_streams(streamer(spec.words), spec.concurrency)


async def _run_http(spec: LoadSpec, ready: Callable[[], None] | None) -> LoadResult:
    """HTTP/1.1 load with one keep-alive connection per concurrent caller.

    Each caller has its own one-connection httpx client: one shared client with a pool of
    ``concurrency`` connections is the same set of connections, but httpx's pool bookkeeping
    makes the client itself collapse at 64 callers (a few dozen req/s against any server).
    """
    headers = {"content-type": "application/json", **dict(auth(spec.key))}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    # Only plain HTTP is used, but each client would otherwise load its own CA bundle (~30 ms).
    tls = ssl.create_default_context()
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=spec.target, headers=headers, limits=limits, timeout=120.0, verify=tls
                )
            )
            for _ in range(spec.concurrency)
        ]
        if spec.kind == "http_unary":
            body = json.dumps({"model": spec.model, "input": UNARY_TEXT, **dict(spec.body)}).encode()

            async def post(index: int) -> None:
                reply = await clients[index].post("/responses", content=body)
                if reply.status_code != 200:
                    raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")

            await closed_loop(post, spec.concurrency, spec.warmup)
            if ready is not None:
                await asyncio.to_thread(ready)
            return await closed_loop(post, spec.concurrency, spec.duration)

        def streamer(words: int) -> Callable[[int], Awaitable[int]]:
            body = json.dumps(
                {"model": spec.model, "input": words_text(words), "stream": True, **dict(spec.body)}
            ).encode()

            async def stream(index: int) -> int:
                frames = 0
                last = last_data = ""
                async with clients[index].stream("POST", "/responses", content=body) as reply:
                    if reply.status_code != 200:
                        await reply.aread()
                        raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
                    async for line in reply.aiter_lines():
                        if line.startswith("data:") and line != "data: [DONE]":  # [DONE]: some gateways
                            frames += 1
                            last_data = line
                        elif line.startswith("event:"):
                            last = line.removeprefix("event:").strip()
                if not last and last_data:  # a server that sends no event lines (some gateways)
                    last = json.loads(last_data.removeprefix("data:")).get("type", "")
                if last != "response.completed":
                    raise RuntimeError(f"SSE stream ended after {last!r}, not response.completed")
                return frames

            return stream

        await concurrent_streams(streamer(min(spec.words, 200)), spec.concurrency)
        if ready is not None:
            await asyncio.to_thread(ready)
        return await concurrent_streams(streamer(spec.words), spec.concurrency)


def _worker(spec: LoadSpec, barrier: Any, results: Any) -> None:
    """A client process: warms up, waits for its siblings, measures, reports."""
    try:
        result = asyncio.run(run_spec(spec, lambda: barrier.wait(timeout=120)))
        results.put(asdict(result))
    except BaseException as error:
        failure = LoadResult(started=time.time(), finished=time.time())
        failure.failed(error)
        results.put(asdict(failure))
        barrier.abort()


def run_load(spec: LoadSpec, processes: int) -> LoadResult:
    """Runs ``spec`` in this process, or split over ``processes`` client processes that start
    measuring together."""
    processes = max(1, min(processes, spec.concurrency))
    if processes == 1:
        return asyncio.run(run_spec(spec))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    queue = context.Queue()
    shares = [
        spec.concurrency // processes + (index < spec.concurrency % processes) for index in range(processes)
    ]
    workers = [
        context.Process(target=_worker, args=(replace(spec, concurrency=share), barrier, queue), daemon=True)
        for share in shares
    ]
    for worker in workers:
        worker.start()
    merged = LoadResult()
    try:
        for _ in workers:
            merged.merge(LoadResult(**queue.get(timeout=spec.duration + spec.warmup + 600)))
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return merged
