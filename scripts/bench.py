#!/usr/bin/env python3
"""Venna's performance against bare servers, measured side by side in one run on this machine.

Every figure is reported as Venna / baseline, both measured in the same run: the baseline is a
bare ``grpc.aio`` or starlette/uvicorn server (``scripts/bench_baselines.py``) that answers the
same calls with messages of the same size and does nothing else, so the ratio is the cost of
what Venna does per call. Sections (``--only`` takes any of them, comma-separated):

    grpc_unary   CreateResponse (echo, store=true): req/s, p50/p99 at concurrency 1, 16, 64
    grpc_stream  StreamResponse events/s: one long stream, and 64 concurrent streams
    http_unary   POST /v1/responses through the HTTP shim: req/s, p50/p99 at 1, 16, 64, and
                 the latency the shim adds over calling gRPC directly
    http_sse     the shim's SSE streams: events/s, one long stream and 64 concurrent
    chain        previous_response_id chains to depth 1,000: context rebuild time, latency of
                 continuing at each depth, stored bytes per turn
    memory       server RSS idle and with 1,000 open streams
    background   responses/s through the background runner vs foreground CreateResponse

    python scripts/bench.py [--quick] [--only SECTION[,SECTION]] [--json PATH] [--client-processes N]

Every server runs in its own process on a free 127.0.0.1 port over a scratch directory; the load
comes from this process (asyncio: grpc.aio and httpx), or from ``--client-processes`` worker
processes. Each measurement is bounded (a fixed duration or a fixed amount of work, after a
short warm-up); the default run takes a few minutes, ``--quick`` well under one. Results go to a
table on stdout and, with every raw number and the machine's description, to a JSON file.
Exit status 1 means a section failed or calls failed during a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import select
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx

from venna.backends.store.sqlite.queries import Store
from venna.responses.v1 import response_pb2, service_pb2, service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BASELINES = Path(__file__).resolve().parent / "bench_baselines.py"
SECTIONS = ("grpc_unary", "grpc_stream", "http_unary", "http_sse", "chain", "memory", "background")
UNARY_TEXT = "hello benchmark world"
STARTUP_TIMEOUT = 60.0
CLIENT_NOTE = (
    "The load generator is Python (asyncio, grpc.aio, httpx) on the same machine as the servers; "
    "against the bare baselines the client is often the bottleneck, so their figures are lower "
    "bounds. The same client drives both sides, so the ratio remains a fair comparison."
)

Metadata = tuple[tuple[str, str], ...]


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True, slots=True)
class Profile:
    """How much work each measurement does."""

    duration: float = 4.0  # seconds measured per closed-loop point and side
    warmup: float = 0.5  # seconds of discarded load before each round of a point
    # Venna and baseline alternate this many times per point, each round doing 1/rounds of the
    # closed-loop duration (streams: all of the work, so stream points do it ``rounds`` times).
    rounds: int = 2
    concurrency: tuple[int, ...] = (1, 16, 64)
    long_words: int = 20_000  # one long stream: ~this many delta events
    many_streams: int = 64
    many_words: int = 2_000  # per stream of the concurrent ones
    chain_depths: tuple[int, ...] = (1, 10, 100, 1_000)
    rebuild_runs: int = 9  # load_context timings per depth (median)
    continue_runs: int = 20  # CreateResponse continuing from each depth
    memory_streams: int = 1_000
    memory_delay_ms: int = 1_000  # between deltas of a held stream
    memory_words: int = 120  # so a held stream stays open ~2 minutes
    memory_samples: int = 8
    background_count: int = 1_500
    background_concurrency: int = 16


QUICK = Profile(
    duration=0.4,
    warmup=0.1,
    rounds=1,
    long_words=1_000,
    many_words=100,
    chain_depths=(1, 10, 100),
    rebuild_runs=3,
    continue_runs=3,
    memory_streams=100,
    memory_samples=3,
    background_count=100,
)


@dataclass(slots=True)
class Row:
    """One line of the table: Venna's figure, the baseline's, and the target if there is one."""

    metric: str
    unit: str
    venna: float
    baseline: float | None = None
    baseline_label: str = "bare"
    target: str = ""
    # Whether the target is met; None when the row has no target.
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.venna / self.baseline


@dataclass(slots=True)
class SectionResult:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ processes


def child_env() -> dict[str, str]:
    """The environment of the processes this script starts: the project importable from its
    checkout, output unbuffered."""
    path = [str(ROOT), str(ROOT / "protos"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}


class ServerProcess:
    """A server in its own process whose first stdout line says where it listens."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("w")
        try:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True, env=child_env()
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def first_line(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """Waits for the start-up line; raises if the process exits or stays silent."""
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.log_text()[-2000:]}")
        return line.strip()

    def rss_bytes(self) -> int:
        """Resident set size, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within a few seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


class PeakRss:
    """Samples a server's RSS every few milliseconds on a thread, keeping the largest."""

    def __init__(self, server: ServerProcess | None, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.server is not None
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, self.server.rss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        if self.server is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self._stop.set()
            self._thread.join()


@dataclass(slots=True)
class VennaHandle:
    grpc_target: str
    http_base: str  # ends in /v1
    key: str
    db_path: Path
    process: ServerProcess


@dataclass(slots=True)
class BaselineHandle:
    address: str
    process: ServerProcess


class Bench:
    """Runs the sections: owns the scratch directory, the profile and every server started."""

    def __init__(self, scratch: Path, profile: Profile, client_processes: int) -> None:
        self.scratch = scratch
        self.profile = profile
        self.client_processes = client_processes
        self._count = 0
        # Non-empty server logs (warnings, errors), by server name.
        self.server_logs: dict[str, str] = {}

    def _next(self, name: str) -> str:
        self._count += 1
        return f"{self._count:02d}-{name}"

    @contextlib.contextmanager
    def venna(self, config: Path | None = None) -> Iterator[VennaHandle]:
        """A fresh ``venna serve`` over a new database, with one workspace key (and the
        routing table ``config``, if given)."""
        name = self._next("venna")
        db = self.scratch / f"{name}.db"
        command = [sys.executable, "-m", "venna.cli"]
        key = subprocess.run(
            [*command, "keys", "create", "--workspace", "bench", "--db", str(db)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        server = ServerProcess(
            name,
            [
                *command,
                "serve",
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                "--log-level",
                "WARNING",
                "--shutdown-grace",
                "2",
                *(["--config", str(config)] if config is not None else []),
            ],
            self.scratch / f"{name}.log",
        )
        try:
            line = server.first_line()
            match = re.search(r"gRPC on (\S+), HTTP on (\S+),", line)
            if match is None:
                raise RuntimeError(f"unexpected start-up line from venna serve: {line!r}")
            yield VennaHandle(match.group(1), match.group(2), key, db, server)
        finally:
            server.stop()
            self._keep_log(server)

    @contextlib.contextmanager
    def baseline(self, kind: str) -> Iterator[BaselineHandle]:
        """A bare ``grpc`` or ``http`` server from bench_baselines.py."""
        name = self._next(f"bare-{kind}")
        server = ServerProcess(
            name,
            [sys.executable, str(BASELINES), kind, "--listen", "127.0.0.1:0"],
            self.scratch / f"{name}.log",
        )
        try:
            yield BaselineHandle(server.first_line(), server)
        finally:
            server.stop()
            self._keep_log(server)

    def _keep_log(self, server: ServerProcess) -> None:
        text = server.log_text().strip()
        if text:
            self.server_logs[server.name] = text


# ------------------------------------------------------------------------------ statistics


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else math.nan


# ------------------------------------------------------------------------------ load generation


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


# ------------------------------------------------------------------------------ sections


def alternate(
    bench: Bench, specs: list[LoadSpec], servers: list[ServerProcess | None] | None = None
) -> list[LoadResult]:
    """Runs the specs one after another in ``rounds`` rounds, each doing 1/rounds of a
    closed-loop duration, so that a change in the machine's load during the run falls on every
    side alike. Where ``servers`` names a spec's server, its peak RSS is recorded."""
    rounds = bench.profile.rounds
    specs = [replace(spec, duration=spec.duration / rounds) if spec.duration else spec for spec in specs]
    watched = servers or [None] * len(specs)
    results = [LoadResult() for _ in specs]
    for _ in range(rounds):
        for spec, server, result in zip(specs, watched, results, strict=True):
            with PeakRss(server) as rss:
                measured = run_load(spec, bench.client_processes)
            measured.peak_rss = rss.peak
            result.then(measured)
    return results


def measure_pair(
    bench: Bench,
    spec: LoadSpec,
    bare_target: str,
    servers: tuple[ServerProcess, ServerProcess] | None = None,
) -> tuple[LoadResult, LoadResult]:
    """Venna and the baseline under the same load, alternating."""
    bare_spec = replace(spec, target=bare_target, key="")
    venna, bare = alternate(bench, [spec, bare_spec], list(servers) if servers else None)
    return venna, bare


def _check(result: LoadResult, what: str, section: SectionResult) -> None:
    if result.errors:
        section.errors.append(f"{what}: {result.errors} failed calls, e.g. {result.error_samples[:3]}")
    if not result.calls:
        section.errors.append(f"{what}: no call succeeded")


def summarize(result: LoadResult) -> dict[str, Any]:
    return {
        "calls": result.calls,
        "events": result.events,
        "errors": result.errors,
        "error_samples": result.error_samples,
        "elapsed_s": result.elapsed,
        "calls_per_s": result.calls / result.elapsed,
        "events_per_s": result.events / result.elapsed,
        "p50_ms": median(result.latencies) * 1e3,
        "p90_ms": percentile(result.latencies, 0.90) * 1e3,
        "p99_ms": percentile(result.latencies, 0.99) * 1e3,
        "max_ms": max(result.latencies, default=math.nan) * 1e3,
    }


def unary_rows(
    bench: Bench, kind: str, label: str, venna_target: str, key: str, bare_target: str, section: SectionResult
) -> None:
    """Closed-loop req/s and latency of Venna and the baseline at each concurrency."""
    profile = bench.profile
    for concurrency in profile.concurrency:
        spec = LoadSpec(kind, venna_target, key, concurrency, profile.duration, profile.warmup)
        venna, bare = measure_pair(bench, spec, bare_target)
        _check(venna, f"Venna {label} c{concurrency}", section)
        _check(bare, f"bare {label} c{concurrency}", section)
        section.raw[f"c{concurrency}"] = {"venna": summarize(venna), "bare": summarize(bare)}
        rate_v, rate_b = venna.calls / venna.elapsed, bare.calls / bare.elapsed
        p99_v, p99_b = percentile(venna.latencies, 0.99) * 1e3, percentile(bare.latencies, 0.99) * 1e3
        rate = Row(f"{label} c{concurrency} throughput", "req/s", rate_v, rate_b)
        p50 = Row(
            f"{label} c{concurrency} p50",
            "ms",
            median(venna.latencies) * 1e3,
            median(bare.latencies) * 1e3,
        )
        p99 = Row(f"{label} c{concurrency} p99", "ms", p99_v, p99_b)
        if concurrency == 16:
            rate.target, rate.met = "ratio >= 0.5", rate_b > 0 and rate_v / rate_b >= 0.5
            if kind == "grpc_unary":
                p99.target, p99.met = "ratio <= 2", p99_b > 0 and p99_v / p99_b <= 2
        section.rows += [rate, p50, p99]


def section_grpc_unary(bench: Bench) -> SectionResult:
    section = SectionResult()
    with bench.venna() as venna, bench.baseline("grpc") as bare:
        section.raw["message_bytes"] = asyncio.run(_reply_sizes(venna, bare.address))
        unary_rows(
            bench, "grpc_unary", "gRPC CreateResponse", venna.grpc_target, venna.key, bare.address, section
        )
    return section


async def _reply_sizes(venna: VennaHandle, bare_address: str) -> dict[str, int]:
    """Serialized sizes of one CreateResponse reply from each side (they should be close)."""
    request = service_pb2.CreateResponseRequest(model="echo", input=[user_message(UNARY_TEXT)])
    sizes = {}
    for name, target, metadata in (("venna", venna.grpc_target, auth(venna.key)), ("bare", bare_address, ())):
        async with open_channel(target) as channel:
            reply = await stub_for(channel).CreateResponse(request, metadata=metadata)
            sizes[name] = reply.ByteSize()
    return sizes


def stream_rows(
    bench: Bench,
    kind: str,
    label: str,
    venna: VennaHandle,
    venna_target: str,
    bare: BaselineHandle,
    bare_target: str,
    section: SectionResult,
) -> None:
    """Events/s of one long stream and of many concurrent streams, Venna and baseline."""
    profile = bench.profile
    shapes = (
        ("long", 1, profile.long_words, f"{label} 1 stream x {profile.long_words} words"),
        (
            "concurrent",
            profile.many_streams,
            profile.many_words,
            f"{label} {profile.many_streams} streams x {profile.many_words} words",
        ),
    )
    for name, streams, words, title in shapes:
        spec = LoadSpec(kind, venna_target, venna.key, streams, words=words)
        mine, theirs = measure_pair(bench, spec, bare_target, (venna.process, bare.process))
        _check(mine, f"Venna {title}", section)
        _check(theirs, f"bare {title}", section)
        section.raw[name] = {
            "streams": streams,
            "words": words,
            "venna": summarize(mine) | {"peak_rss_bytes": mine.peak_rss},
            "bare": summarize(theirs) | {"peak_rss_bytes": theirs.peak_rss},
        }
        rate_v, rate_b = mine.events / mine.elapsed, theirs.events / theirs.elapsed
        section.rows.append(
            Row(
                title,
                "events/s",
                rate_v,
                rate_b,
                target="ratio >= 0.7",
                met=rate_b > 0 and rate_v / rate_b >= 0.7,
            )
        )
        section.rows.append(
            Row(f"{title}: server peak RSS", "MiB", mine.peak_rss / 2**20, theirs.peak_rss / 2**20)
        )


def section_grpc_stream(bench: Bench) -> SectionResult:
    section = SectionResult()
    with bench.venna() as venna, bench.baseline("grpc") as bare:
        stream_rows(
            bench, "grpc_stream", "gRPC StreamResponse", venna, venna.grpc_target, bare, bare.address, section
        )
    return section


def section_http_unary(bench: Bench) -> SectionResult:
    section = SectionResult()
    profile = bench.profile
    with bench.venna() as venna, bench.baseline("http") as bare:
        unary_rows(
            bench,
            "http_unary",
            "HTTP POST /v1/responses",
            venna.http_base,
            venna.key,
            f"http://{bare.address}/v1",
            section,
        )
        # The shim's added latency: the same server called over gRPC and through HTTP.
        one = LoadSpec("http_unary", venna.http_base, venna.key, 1, profile.duration, profile.warmup)
        http, direct = alternate(bench, [one, replace(one, kind="grpc_unary", target=venna.grpc_target)])
    _check(http, "Venna HTTP c1 (shim comparison)", section)
    _check(direct, "Venna gRPC c1 (shim comparison)", section)
    section.raw["shim_comparison"] = {"http_c1": summarize(http), "grpc_c1": summarize(direct)}
    http_p50, grpc_p50 = median(http.latencies) * 1e3, median(direct.latencies) * 1e3
    section.rows.append(
        Row("shim: HTTP p50 vs gRPC p50, c1", "ms", http_p50, grpc_p50, baseline_label="gRPC")
    )
    section.rows.append(Row("shim: added latency per request, c1", "ms", http_p50 - grpc_p50))
    section.raw["shim_added_ms"] = http_p50 - grpc_p50
    section.raw["shim_ratio"] = http_p50 / grpc_p50 if grpc_p50 else None
    return section


def section_http_sse(bench: Bench) -> SectionResult:
    section = SectionResult()
    with bench.venna() as venna, bench.baseline("http") as bare:
        stream_rows(
            bench, "http_sse", "HTTP SSE", venna, venna.http_base, bare, f"http://{bare.address}/v1", section
        )
    return section


def _database_bytes(connection: sqlite3.Connection) -> tuple[int, int]:
    """(bytes in pages, bytes in use) of the database as committed, WAL included."""
    page_count = connection.execute("PRAGMA page_count").fetchone()[0]
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    try:
        # Exact to the byte, where pages grow in 4 KiB steps.
        used = connection.execute("SELECT SUM(pgsize - unused) FROM dbstat").fetchone()[0]
    except sqlite3.OperationalError:  # an SQLite built without the dbstat table
        used = page_count * page_size
    return page_count * page_size, int(used or 0)


async def _chain(venna: VennaHandle, profile: Profile, section: SectionResult) -> None:
    with contextlib.ExitStack() as stack:
        # The store the server writes, opened by this process to time context rebuilds alone.
        store = Store(venna.db_path)
        stack.callback(store.close)
        connection = stack.enter_context(contextlib.closing(sqlite3.connect(venna.db_path)))
        workspace_id = store.authenticate(venna.key)
        if workspace_id is None:
            raise RuntimeError("the benchmark key does not authenticate against the store")
        metadata = auth(venna.key)
        depths = sorted(profile.chain_depths)
        async with open_channel(venna.grpc_target) as channel:
            stub = stub_for(channel)
            sizes = {0: _database_bytes(connection)}
            ids: dict[int, str] = {}
            previous: str | None = None
            turn_latencies: list[float] = []
            started = time.perf_counter()
            for turn in range(1, depths[-1] + 1):
                request = service_pb2.CreateResponseRequest(
                    model="echo", input=[user_message(f"turn {turn:05d} of the benchmark chain")]
                )
                if previous is not None:
                    request.previous_response_id = previous
                began = time.perf_counter()
                reply = await stub.CreateResponse(request, metadata=metadata)
                turn_latencies.append(time.perf_counter() - began)
                previous = reply.id
                if turn in depths:
                    ids[turn] = reply.id
                    sizes[turn] = _database_bytes(connection)
            build_seconds = time.perf_counter() - started
            section.raw["build"] = {
                "turns": depths[-1],
                "seconds": build_seconds,
                "turns_per_s": depths[-1] / build_seconds,
                "first_turn_ms": turn_latencies[0] * 1e3,
                "last_turn_ms": turn_latencies[-1] * 1e3,
            }

            rebuild: dict[int, float] = {}
            continued: dict[int, float] = {}
            for depth in depths:
                timings = []
                for _ in range(profile.rebuild_runs):
                    began = time.perf_counter()
                    context = store.load_context(workspace_id, ids[depth])
                    timings.append(time.perf_counter() - began)
                    if context is None or len(context) != 2 * depth:
                        section.errors.append(
                            f"load_context at depth {depth} returned "
                            f"{None if context is None else len(context)} items, expected {2 * depth}"
                        )
                        break
                rebuild[depth] = median(timings) * 1e3
                latencies = []
                for _ in range(profile.continue_runs):
                    request = service_pb2.CreateResponseRequest(
                        model="echo",
                        input=[user_message("one more turn of the benchmark chain")],
                        previous_response_id=ids[depth],
                    )
                    began = time.perf_counter()
                    await stub.CreateResponse(request, metadata=metadata)
                    latencies.append(time.perf_counter() - began)
                continued[depth] = median(latencies) * 1e3
                section.raw[f"depth_{depth}"] = {
                    "rebuild_ms_median": rebuild[depth],
                    "rebuild_ms_all": [t * 1e3 for t in timings],
                    "continue_p50_ms": continued[depth],
                    "continue_p99_ms": percentile(latencies, 0.99) * 1e3,
                    "database_page_bytes": sizes[depth][0],
                    "database_used_bytes": sizes[depth][1],
                }

    first = depths[0]
    for depth in depths:
        row = Row(
            f"context rebuild (load_context) depth {depth}",
            "ms",
            rebuild[depth],
            rebuild[first],
            baseline_label=f"depth {first}",
        )
        if depth == 1_000:
            row.target, row.met = "< 20 ms", rebuild[depth] < 20
        section.rows.append(row)
    for depth in depths:
        section.rows.append(
            Row(
                f"CreateResponse continuing depth {depth} p50",
                "ms",
                continued[depth],
                continued[first],
                baseline_label=f"depth {first}",
            )
        )
    # Bytes per turn between measurement points; the first interval is the reference.
    intervals = list(itertools.pairwise(depths))
    per_turn = {
        (low, high): (
            (sizes[high][1] - sizes[low][1]) / (high - low),
            (sizes[high][0] - sizes[low][0]) / (high - low),
        )
        for low, high in intervals
    }
    section.raw["bytes_per_turn"] = [
        {"from": low, "to": high, "used_bytes": used, "page_bytes": pages}
        for (low, high), (used, pages) in per_turn.items()
    ]
    if intervals:
        reference = per_turn[intervals[0]][0]
        for low, high in intervals:
            used = per_turn[(low, high)][0]
            section.rows.append(
                Row(
                    f"stored bytes per turn, turns {low}->{high}",
                    "B",
                    used,
                    reference,
                    baseline_label=f"{intervals[0][0]}->{intervals[0][1]}",
                    target="flat: ratio 0.67-1.5",
                    met=reference > 0 and 0.67 <= used / reference <= 1.5,
                )
            )


def section_chain(bench: Bench) -> SectionResult:
    section = SectionResult()
    with bench.venna() as venna:
        asyncio.run(_chain(venna, bench.profile, section))
    return section


async def _hold_streams(
    target: str, key: str, server: ServerProcess, profile: Profile, section: SectionResult, who: str
) -> dict[str, Any]:
    """Opens ``memory_streams`` slow streams, samples the server's RSS while all are open, then
    cancels them."""
    request = service_pb2.CreateResponseRequest(
        model=f"echo:delay_ms={profile.memory_delay_ms}",
        input=[user_message(words_text(profile.memory_words))],
    )
    metadata = auth(key)
    channels = [open_channel(target, own_connection=True) for _ in range(4)]
    stubs = [stub_for(channel) for channel in channels]
    # Warm the server up a little so that "idle" means started and used, not just imported.
    warm = service_pb2.CreateResponseRequest(model="echo", input=[user_message(UNARY_TEXT)])
    for _ in range(20):
        async for _event in stubs[0].StreamResponse(warm, metadata=metadata):
            pass
    await asyncio.sleep(0.5)
    idle = server.rss_bytes()

    total = profile.memory_streams
    opened = 0
    ended = 0
    all_open = asyncio.Event()
    calls: list[Any] = []
    failures: list[str] = []

    async def hold(index: int) -> None:
        nonlocal opened, ended
        call = stubs[index % len(stubs)].StreamResponse(request, metadata=metadata)
        calls.append(call)
        first = True
        try:
            async for _event in call:
                if first:
                    first = False
                    opened += 1
                    if opened == total:
                        all_open.set()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                failures.append(f"{error.code().name}: {error.details()}")
        finally:
            ended += 1

    began = time.perf_counter()
    tasks = [asyncio.create_task(hold(index)) for index in range(total)]
    try:
        await asyncio.wait_for(all_open.wait(), timeout=120)
        open_seconds = time.perf_counter() - began
        samples = []
        for _ in range(profile.memory_samples):
            samples.append(server.rss_bytes())
            await asyncio.sleep(0.25)
        still_open = total - ended
    except TimeoutError:
        section.errors.append(f"{who}: only {opened} of {total} streams delivered an event within 120 s")
        open_seconds, samples, still_open = math.nan, [server.rss_bytes()], total - ended
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if still_open != total:
        section.errors.append(f"{who}: {total - still_open} streams ended before RSS was sampled")
    if failures:
        section.errors.append(f"{who}: {len(failures)} streams failed, e.g. {failures[:3]}")
    await asyncio.sleep(1.0)
    after = server.rss_bytes()
    for channel in channels:
        await channel.close(grace=None)
    return {
        "idle_rss_bytes": idle,
        "open_rss_bytes": max(samples),
        "open_rss_samples": samples,
        "after_close_rss_bytes": after,
        "streams": total,
        "streams_open_while_sampling": still_open,
        "seconds_to_open_all": open_seconds,
    }


def section_memory(bench: Bench) -> SectionResult:
    section = SectionResult()
    profile = bench.profile
    with bench.venna() as venna:
        section.raw["venna"] = asyncio.run(
            _hold_streams(venna.grpc_target, venna.key, venna.process, profile, section, "Venna")
        )
    with bench.baseline("grpc") as bare:
        section.raw["bare"] = asyncio.run(
            _hold_streams(bare.address, "", bare.process, profile, section, "bare")
        )
    mib = 1024 * 1024
    v, b = section.raw["venna"], section.raw["bare"]
    streams = profile.memory_streams
    section.rows.append(Row("server RSS idle", "MiB", v["idle_rss_bytes"] / mib, b["idle_rss_bytes"] / mib))
    open_row = Row(
        f"server RSS with {streams} open streams", "MiB", v["open_rss_bytes"] / mib, b["open_rss_bytes"] / mib
    )
    if streams >= 1_000:
        open_row.target, open_row.met = "< 300 MB", v["open_rss_bytes"] < 300 * 1000 * 1000
    section.rows.append(open_row)
    section.rows.append(
        Row(
            "RSS per open stream",
            "KiB",
            (v["open_rss_bytes"] - v["idle_rss_bytes"]) / streams / 1024,
            (b["open_rss_bytes"] - b["idle_rss_bytes"]) / streams / 1024,
        )
    )
    return section


async def _background(venna: VennaHandle, profile: Profile, section: SectionResult) -> None:
    metadata = auth(venna.key)
    count, concurrency = profile.background_count, profile.background_concurrency
    async with open_channel(venna.grpc_target) as channel:
        stub = stub_for(channel)

        def request(background: bool) -> service_pb2.CreateResponseRequest:
            return service_pb2.CreateResponseRequest(
                model="echo", input=[user_message(UNARY_TEXT)], background=background
            )

        async def fixed_count(background: bool, total: int, ids: list[str]) -> float:
            """Seconds to create ``total`` responses with ``concurrency`` callers."""
            remaining = total
            message = request(background)

            async def caller() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    reply = await stub.CreateResponse(message, metadata=metadata)
                    ids.append(reply.id)

            began = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return time.perf_counter() - began

        await fixed_count(False, max(20, count // 10), [])  # warm-up
        foreground = await fixed_count(False, count, [])

        # Completion is watched in the store (from this process, read-only in effect), not by
        # polling the server: polls would compete with the runner for the server's one core.
        # A background response is stored queued before CreateResponse returns, so once every
        # submission has returned, no unfinished response left means all have finished.
        ids: list[str] = []
        store = Store(venna.db_path)
        try:
            began = time.perf_counter()
            submitted = await fixed_count(True, count, ids)
            checks = 0
            while store.pending_responses():
                checks += 1
                if time.perf_counter() - began > 300:
                    raise RuntimeError("background responses still unfinished after 300 s")
                await asyncio.sleep(0.005)
            finished = time.perf_counter() - began
        finally:
            store.close()

        # Then every response is read back through the API, untimed.
        statuses: dict[str, int] = {}
        pending = list(ids)

        async def check() -> None:
            while pending:
                reply = await stub.GetResponse(
                    service_pb2.GetResponseRequest(response_id=pending.pop()), metadata=metadata
                )
                name = response_pb2.ResponseStatus.Name(reply.status)
                statuses[name] = statuses.get(name, 0) + 1

        await asyncio.gather(*(check() for _ in range(concurrency)))
    completed = statuses.get("RESPONSE_STATUS_COMPLETED", 0)
    if completed != count:
        section.errors.append(f"background: {count - completed} of {count} did not complete: {statuses}")
    section.raw.update(
        {
            "count": count,
            "concurrency": concurrency,
            "foreground_seconds": foreground,
            "foreground_per_s": count / foreground,
            "background_submit_seconds": submitted,
            "background_submit_per_s": count / submitted,
            "background_all_done_seconds": finished,
            "background_per_s": count / finished,
            "statuses": statuses,
            "store_checks": checks,
        }
    )
    section.rows.append(
        Row(
            f"background: {count} submitted at c{concurrency}, to all completed",
            "resp/s",
            count / finished,
            count / foreground,
            baseline_label="foreground",
        )
    )
    section.rows.append(
        Row(
            f"background: CreateResponse (queued) accept rate, c{concurrency}",
            "req/s",
            count / submitted,
            count / foreground,
            baseline_label="foreground",
        )
    )


def section_background(bench: Bench) -> SectionResult:
    section = SectionResult()
    with bench.venna() as venna:
        asyncio.run(_background(venna, bench.profile, section))
    return section


RUNNERS: dict[str, Callable[[Bench], SectionResult]] = {
    "grpc_unary": section_grpc_unary,
    "grpc_stream": section_grpc_stream,
    "http_unary": section_http_unary,
    "http_sse": section_http_sse,
    "chain": section_chain,
    "memory": section_memory,
    "background": section_background,
}


# ------------------------------------------------------------------------------ output


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 0.1 else f"{value:.3f}"


def render_table(results: dict[str, SectionResult]) -> str:
    header = ("metric", "unit", "Venna", "baseline", "base is", "ratio", "target", "")
    lines: list[tuple[str, ...]] = []
    for name, section in results.items():
        lines.append((f"[{name}]", "", "", "", "", "", "", ""))
        for row in section.rows:
            mark = "" if row.met is None else ("met" if row.met else "MISSED")
            ratio = row.ratio
            lines.append(
                (
                    "  " + row.metric,
                    row.unit,
                    _number(row.venna),
                    _number(row.baseline),
                    row.baseline_label if row.baseline is not None else "",
                    f"{ratio:.2f}" if ratio is not None else "",
                    row.target,
                    mark,
                )
            )
    widths = [max(len(line[index]) for line in [header, *lines]) for index in range(len(header))]
    right = {2, 3, 5}

    def render(line: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(widths[index]) if index in right else cell.ljust(widths[index])
            for index, cell in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(render(tuple("-" * width for width in widths)))
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so that the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("grpcio", "protobuf", "httpx", "uvicorn", "starlette"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
    }


# ------------------------------------------------------------------------------ main


def parse_sections(value: str) -> list[str]:
    chosen = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)}; got {value!r}")
    return [name for name in SECTIONS if name in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--only", type=parse_sections, default=list(SECTIONS), metavar="SECTION[,SECTION]")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"), metavar="PATH")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        metavar="N",
        help="spread throughput load over N client processes (default 1)",
    )
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="seconds per closed-loop point")
    options = parser.parse_args(argv)
    profile = QUICK if options.quick else Profile()
    if options.duration:
        profile = replace(profile, duration=options.duration)

    print(f"venna bench: sections {', '.join(options.only)}{' (quick)' if options.quick else ''}", flush=True)
    print(f"note: {CLIENT_NOTE}", flush=True)
    load_at_start = os.getloadavg()
    if load_at_start[0] > 0.5:
        print(
            f"warning: the load average is {load_at_start[0]:.2f} before starting; other work on this "
            "machine will distort the figures",
            flush=True,
        )
    started = time.perf_counter()
    results: dict[str, SectionResult] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="venna-bench-") as scratch:
        bench = Bench(Path(scratch), profile, options.client_processes)
        for name in options.only:
            began = time.perf_counter()
            load = os.getloadavg()[0]
            print(f"-- {name} ... (load average {load:.2f})", flush=True)
            try:
                results[name] = RUNNERS[name](bench)
            except KeyboardInterrupt:
                # Every server of the section has been stopped on the way out.
                print(f"-- {name} interrupted; stopped every process started", file=sys.stderr)
                return 130
            except Exception:
                failed[name] = traceback.format_exc()
                print(f"-- {name} FAILED:\n{failed[name]}", file=sys.stderr, flush=True)
                continue
            results[name].raw["section_seconds"] = time.perf_counter() - began
            results[name].raw["load_average_at_start"] = load
            for error in results[name].errors:
                print(f"   error: {error}", file=sys.stderr, flush=True)
            print(f"-- {name} done in {time.perf_counter() - began:.1f} s", flush=True)
        server_logs = bench.server_logs
    wall = time.perf_counter() - started

    print()
    print(render_table(results))
    print()
    print("ratio = Venna / baseline (for latencies and memory, lower is better).")
    print(f"note: {CLIENT_NOTE}")
    for server, text in server_logs.items():
        lines = text.splitlines()
        print(f"server log {server} ({len(lines)} lines), first lines:", file=sys.stderr)
        for line in lines[:10]:
            print(f"    {line}", file=sys.stderr)

    document = {
        "machine": machine_info(),
        "profile": asdict(profile) | {"quick": options.quick, "client_processes": options.client_processes},
        "wall_seconds": wall,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "note": CLIENT_NOTE,
        "sections": {
            name: {
                "rows": [asdict(row) | {"ratio": row.ratio} for row in section.rows],
                "raw": section.raw,
                "errors": section.errors,
            }
            for name, section in results.items()
        },
        "failed_sections": failed,
        "server_logs": server_logs,
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(finite(document), indent=2, default=str, allow_nan=False) + "\n")
    print(f"wall time {wall:.1f} s; results written to {options.json.resolve()}")
    errors = failed or any(section.errors for section in results.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
