#!/usr/bin/env python3
"""What Venna adds to a streamed Venice answer, measured against calling the upstream directly.

Starts the fake Venice of ``tests/fake_venice.py`` in a child process (so that serving it never
competes with the measuring client for one interpreter lock) and ``venna serve`` on free loopback
ports over a scratch database, with ``VENICE_BASE_URL`` pointing at the fake. Then it streams
the same realistic text answer (created, item and part added, one text delta per word, the done
events, completed, ``[DONE]``; no artificial delay unless ``--delta-delay``) sequentially over
three paths:

- direct: an httpx streaming ``POST /api/v1/responses`` to the fake, with the body Venna sends;
- gRPC: ``StreamResponse`` with model ``venice/<model>``;
- HTTP shim: ``POST /v1/responses`` with ``"stream": true`` (SSE).

The paths take turns request by request (the order rotating each round), so a drift of the
machine during the run affects them alike. For each request it records, from the moment the
client starts sending: when the fake upstream had read the request, the first event (SSE
``data:`` frame or gRPC message), the first ``output_text.delta`` and the completed event. All
timestamps come from ``time.monotonic()``, the same system-wide clock the fake records with, so
the upstream's arrival time can be set against the client's. It prints p50/p90/p99 per path and
metric, and Venna's added latency (Venna p50 - direct p50) and ratio (Venna p50 / direct p50).

    python scripts/bench_venice.py [--requests 300] [--warmup 30] [--words 40] [--no-store]
                                   [--delta-delay MS] [--json PATH]

Run from the repository root with the project's environment. Everything it starts is stopped
on exit, on errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import grpc.aio
import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # tests.fake_venice is imported from the repository, not from an installed package.
    sys.path.insert(0, str(ROOT))

from venna.responses.v1 import response_pb2, service_pb2, service_pb2_grpc  # noqa: E402

UPSTREAM_MODEL = "zai-org-glm-5-1"
MODEL = f"venice/{UPSTREAM_MODEL}"
UPSTREAM_KEY = "bench-upstream-key"
PROMPT = "Why is the sky blue? Answer in one paragraph."
ANSWER = (
    "The sky looks blue because sunlight is scattered by the molecules of the air, and short "
    "wavelengths scatter far more than long ones: Rayleigh scattering grows with the inverse "
    "fourth power of the wavelength, so blue light is scattered about five times as strongly as "
    "red. Violet is scattered even more, but the sun emits less of it, some is absorbed high in "
    "the atmosphere, and our eyes are less sensitive to it, so the scattered light we see from "
    "every direction of the sky is mostly blue. At sunrise and sunset the light crosses much more "
    "air, most of the blue is scattered away before it reaches us, and the sun and the clouds "
    "near it turn orange and red."
)
DELTA = "response.output_text.delta"
COMPLETED = "response.completed"
FAILURES = {"response.failed", "response.incomplete", "error"}
REQUEST_TIMEOUT = 10.0
START_TIMEOUT = 30.0
METRICS = ("upstream", "first_event", "first_delta", "completed")
METRIC_LABELS = {
    "upstream": "upstream has request",
    "first_event": "first event",
    "first_delta": "first text delta",
    "completed": "completed event",
}
DIRECT, GRPC, SHIM = "direct (fake Venice)", "Venna gRPC", "Venna HTTP shim (SSE)"
PATHS = (DIRECT, GRPC, SHIM)


class BenchError(RuntimeError):
    """A path did not answer as expected; the run stops rather than report skewed numbers."""


def answer_words(count: int) -> list[str]:
    """The first ``count`` words of the answer, each with its leading space (one delta each)."""
    words = ANSWER.split(" ")
    if count < 1:
        raise ValueError("--words must be at least 1")
    words = (words * (1 + count // len(words)))[:count]
    return [words[0], *(f" {word}" for word in words[1:])]


# ---------------------------------------------------------------------------------------------
# The fake upstream, in a child process driven by lines on stdin:
#   queue N -> "queued <pending>"   (N more copies of the answer scenario)
#   dump    -> JSON {"received": [...], "unanswered": n, "pending": n}
# End of stdin stops it.


def run_fake_upstream(words: int, delay: float) -> int:
    """The child's side: a started fake Venice, its base URL on the first line of stdout."""
    from tests.fake_venice import RESPONSES_PATH, running, text_stream

    scenario = text_stream(answer_words(words), model=UPSTREAM_MODEL, delay=delay)
    with running() as fake:
        print(f"ready {fake.base_url} {len(scenario.frames)}", flush=True)
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "queue":
                fake.queue(*[scenario] * int(argument))
                print(f"queued {fake.pending}", flush=True)
            elif command == "dump":
                posts = [r for r in list(fake.requests) if r.path == RESPONSES_PATH and r.method == "POST"]
                report = {
                    "received": [record.received_at for record in posts],
                    "unanswered": sum(record.scenario is None for record in posts),
                    "pending": fake.pending,
                }
                print(json.dumps(report), flush=True)
            else:
                print(f"error unknown command {command!r}", flush=True)
    return 0


class LineReader:
    """Reads a child's stdout in a thread, so that waiting for a line can time out."""

    def __init__(self, stream: IO[str], name: str) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._name = name
        self._thread = threading.Thread(target=self._pump, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout: float = REQUEST_TIMEOUT) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self._name}: no answer within {timeout:.0f}s") from None
        if line is None:
            raise BenchError(f"{self._name}: exited")
        return line


def stop_process(process: subprocess.Popen[str], grace: float) -> None:
    """Terminates ``process`` (if still running), then kills it if it outlives ``grace``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class FakeUpstream:
    """The parent's handle on the fake Venice child."""

    def __init__(self, words: int, delay_ms: float) -> None:
        script = str(Path(__file__).resolve())
        self.process = subprocess.Popen(
            [
                sys.executable,
                script,
                "--fake-upstream",
                "--words",
                str(words),
                "--delta-delay",
                str(delay_ms),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self._reader = LineReader(self.process.stdout, "fake Venice")
        ready = self._reader.line(START_TIMEOUT).split()
        if len(ready) != 3 or ready[0] != "ready":
            raise BenchError(f"fake Venice did not start: {ready}")
        self.base_url = ready[1]
        self.frames = int(ready[2])

    def _ask(self, command: str) -> str:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except OSError as error:
            raise BenchError(f"fake Venice: {error}") from None
        return self._reader.line()

    def queue(self, count: int) -> None:
        answer = self._ask(f"queue {count}")
        if not answer.startswith("queued "):
            raise BenchError(f"fake Venice: {answer}")

    def dump(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self._ask("dump"))
        return report

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        # Its end of input stops it; if it does not go, it is terminated.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        stop_process(self.process, 5)


# ---------------------------------------------------------------------------------------------
# Venna


@dataclass(slots=True)
class Venna:
    """A running ``venna serve`` child, its addresses and a workspace key."""

    process: subprocess.Popen[str]
    grpc_address: str
    base_url: str
    key: str


@contextlib.contextmanager
def venna_serving(scratch: Path, upstream_url: str) -> Iterator[Venna]:
    """``venna serve`` on free loopback ports, routed to ``upstream_url``; stopped on exit."""
    # The scratch directory as working directory: no venna.toml of the checkout is picked up.
    env = {name: value for name, value in os.environ.items() if not name.startswith("VENNA_")}
    env.update(VENICE_BASE_URL=upstream_url, VENICE_API_KEY=UPSTREAM_KEY, NO_PROXY="127.0.0.1,localhost")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    db = scratch / "bench.db"
    command = [sys.executable, "-m", "venna.cli"]
    created = subprocess.run(
        [*command, "keys", "create", "--workspace", "bench", "--db", str(db)],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=START_TIMEOUT,
    )
    key = created.stdout.strip()
    process = subprocess.Popen(
        [
            *command,
            "serve",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--db",
            str(db),
            "--shutdown-grace",
            "1",
            "--log-level",
            "WARNING",
        ],
        cwd=scratch,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = LineReader(process.stdout, "venna serve").line(START_TIMEOUT)
        match = re.search(r"gRPC on (\S+), HTTP on (\S+),", first)
        if match is None:
            raise BenchError(f"venna serve did not start: {first!r}")
        yield Venna(process, match.group(1), match.group(2), key)
    finally:
        stop_process(process, 10)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass(slots=True)
class Sample:
    """Monotonic timestamps of one request; ``upstream`` is filled in from the fake's records."""

    started: float
    first_event: float
    first_delta: float
    completed: float
    upstream: float = 0.0

    def offsets(self) -> dict[str, float]:
        """Seconds from the start of the request to each milestone."""
        return {metric: getattr(self, metric) - self.started for metric in METRICS}


@dataclass(slots=True)
class Milestones:
    """What a stream reader notes while it reads one answer."""

    started: float
    first_event: float | None = None
    first_delta: float | None = None
    completed: float | None = None
    deltas: int = 0

    def event(self, kind: str, now: float) -> None:
        if self.first_event is None:
            self.first_event = now
        if kind == DELTA:
            self.deltas += 1
            if self.first_delta is None:
                self.first_delta = now
        elif kind == COMPLETED:
            self.completed = now
        elif kind in FAILURES:
            raise BenchError(f"the stream ended with {kind}")

    def sample(self, path: str, words: int) -> Sample:
        if self.first_event is None or self.first_delta is None or self.completed is None:
            raise BenchError(f"{path}: the stream had no delta or no completed event")
        if self.deltas != words:
            raise BenchError(f"{path}: {self.deltas} text deltas, expected {words}")
        return Sample(self.started, self.first_event, self.first_delta, self.completed)


async def read_sse(lines: AsyncIterator[str], seen: Milestones) -> None:
    """Notes the milestones of an SSE body, reading it to its end so the connection is reused."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        now = time.monotonic()
        payload = line[5:].strip()
        if payload == "[DONE]":
            continue
        kind = json.loads(payload).get("type", "")
        seen.event(kind, now)


@dataclass(slots=True)
class Clients:
    """One connection pool per path, kept for the whole run as a real client would."""

    direct: httpx.AsyncClient
    shim: httpx.AsyncClient
    stub: service_pb2_grpc.ResponsesServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]
    direct_body: bytes
    shim_body: bytes
    grpc_request: service_pb2.CreateResponseRequest
    words: int


async def stream_direct(clients: Clients) -> Sample:
    seen = Milestones(time.monotonic())
    async with clients.direct.stream("POST", "/responses", content=clients.direct_body) as reply:
        if reply.status_code != 200:
            raise BenchError(f"direct: HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        await read_sse(reply.aiter_lines(), seen)
    return seen.sample(DIRECT, clients.words)


async def stream_shim(clients: Clients) -> Sample:
    seen = Milestones(time.monotonic())
    async with clients.shim.stream("POST", "/responses", content=clients.shim_body) as reply:
        if reply.status_code != 200:
            raise BenchError(f"shim: HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        await read_sse(reply.aiter_lines(), seen)
    return seen.sample(SHIM, clients.words)


async def stream_grpc(clients: Clients) -> Sample:
    seen = Milestones(time.monotonic())
    call = clients.stub.StreamResponse(
        clients.grpc_request, metadata=clients.metadata, timeout=REQUEST_TIMEOUT
    )
    async for event in call:
        now = time.monotonic()
        member = event.WhichOneof("event")
        seen.event(GRPC_KINDS.get(member or "", member or ""), now)
    return seen.sample(GRPC, clients.words)


# The gRPC oneof members whose JSON type names the milestones.
GRPC_KINDS = {
    "output_text_delta": DELTA,
    "completed": COMPLETED,
    "failed": "response.failed",
    "incomplete": "response.incomplete",
    "error": "error",
}
STREAMERS: dict[str, Callable[[Clients], Awaitable[Sample]]] = {
    DIRECT: stream_direct,
    GRPC: stream_grpc,
    SHIM: stream_shim,
}


@contextlib.asynccontextmanager
async def open_clients(upstream_url: str, venna: Venna, words: int, store: bool) -> AsyncIterator[Clients]:
    timeout = httpx.Timeout(REQUEST_TIMEOUT)
    json_headers = {"content-type": "application/json", "accept": "text/event-stream"}
    upstream_body = {
        "model": UPSTREAM_MODEL,
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT}]}],
        "stream": True,
    }
    shim_body: dict[str, Any] = {"model": MODEL, "input": PROMPT, "stream": True}
    message = response_pb2.Item()
    message.message.role = response_pb2.ROLE_USER
    message.message.content.add().input_text.text = PROMPT
    grpc_request = service_pb2.CreateResponseRequest(model=MODEL, input=[message])
    if not store:
        shim_body["store"] = False
        grpc_request.store = False
    # Loopback only: no proxy from the environment may stand in between.
    async with (
        httpx.AsyncClient(
            base_url=upstream_url,
            headers={**json_headers, "authorization": f"Bearer {UPSTREAM_KEY}"},
            timeout=timeout,
            trust_env=False,
        ) as direct,
        httpx.AsyncClient(
            base_url=venna.base_url,
            headers={**json_headers, "authorization": f"Bearer {venna.key}"},
            timeout=timeout,
            trust_env=False,
        ) as shim,
        grpc.aio.insecure_channel(venna.grpc_address, options=[("grpc.enable_http_proxy", 0)]) as channel,
    ):
        yield Clients(
            direct=direct,
            shim=shim,
            # The generated stub is typed by the kind of channel it is given.
            stub=service_pb2_grpc.ResponsesServiceStub(channel),
            metadata=(("authorization", f"Bearer {venna.key}"),),
            direct_body=json.dumps(upstream_body).encode(),
            shim_body=json.dumps(shim_body).encode(),
            grpc_request=grpc_request,
            words=words,
        )


async def run_rounds(clients: Clients, upstream: FakeUpstream, rounds: int) -> list[tuple[str, Sample]]:
    """``rounds`` requests per path, the paths taking turns (their order rotating each round)."""
    samples: list[tuple[str, Sample]] = []
    for index in range(rounds):
        shift = index % len(PATHS)
        for path in PATHS[shift:] + PATHS[:shift]:
            # One answer queued per request, just before it is sent.
            upstream.queue(1)
            sample = await STREAMERS[path](clients)
            samples.append((path, sample))
    return samples


async def measure(
    upstream: FakeUpstream, venna: Venna, words: int, requests: int, warmup: int, store: bool
) -> dict[str, list[Sample]]:
    async with open_clients(upstream.base_url, venna, words, store) as clients:
        done = await run_rounds(clients, upstream, warmup)
        measured = await run_rounds(clients, upstream, requests)
    report = upstream.dump()
    received: list[float] = report["received"]
    if report["unanswered"] or report["pending"] or len(received) != len(done) + len(measured):
        raise BenchError(
            f"the fake upstream saw {len(received)} requests for {len(done) + len(measured)} sent, "
            f"{report['unanswered']} unanswered, {report['pending']} answers left over"
        )
    # Requests are sequential, so the fake's records are in the order they were sent.
    for (_, sample), at in zip(measured, received[len(done) :], strict=True):
        sample.upstream = at
    by_path: dict[str, list[Sample]] = {path: [] for path in PATHS}
    for path, sample in measured:
        by_path[path].append(sample)
    return by_path


# ---------------------------------------------------------------------------------------------
# Reporting


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks."""
    ordered = sorted(samples)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(by_path: dict[str, list[Sample]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per path and metric: p50/p90/p99/mean in milliseconds."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for path, samples in by_path.items():
        offsets = [sample.offsets() for sample in samples]
        summary[path] = {}
        for metric in METRICS:
            values = [offset[metric] * 1000 for offset in offsets]
            summary[path][metric] = {
                "p50": percentile(values, 0.50),
                "p90": percentile(values, 0.90),
                "p99": percentile(values, 0.99),
                "mean": sum(values) / len(values),
            }
    return summary


def compare(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Venna's paths against the direct one at p50: added milliseconds and ratio."""
    direct = summary[DIRECT]
    return {
        path: {
            metric: {
                "added_ms": summary[path][metric]["p50"] - direct[metric]["p50"],
                "ratio": summary[path][metric]["p50"] / direct[metric]["p50"],
            }
            for metric in METRICS
        }
        for path in (GRPC, SHIM)
    }


def print_report(
    summary: dict[str, dict[str, dict[str, float]]],
    versus: dict[str, dict[str, dict[str, float]]],
    setup: dict[str, Any],
) -> None:
    delay = f"{setup['delta_delay_ms']:g} ms before each delta" if setup["delta_delay_ms"] else "no delay"
    print(
        f"{setup['requests']} requests per path after {setup['warmup']} warm-up rounds, paths interleaved; "
        f"upstream: fake Venice, {setup['frames']} SSE frames ({setup['words']} text deltas), "
        f"{delay}; store={str(setup['store']).lower()}"
    )
    print("times in ms from the start of the request")
    print(f"{'path':<24}{'metric':<22}{'p50':>9}{'p90':>9}{'p99':>9}")
    for path in PATHS:
        for index, metric in enumerate(METRICS):
            stats = summary[path][metric]
            name = path if index == 0 else ""
            print(
                f"{name:<24}{METRIC_LABELS[metric]:<22}"
                f"{stats['p50']:>9.3f}{stats['p90']:>9.3f}{stats['p99']:>9.3f}"
            )
    print()
    print(f"{'Venna vs direct (p50)':<24}{'metric':<22}{'added ms':>9}{'ratio':>9}")
    for path in (GRPC, SHIM):
        for index, metric in enumerate(METRICS):
            row = versus[path][metric]
            name = path if index == 0 else ""
            print(f"{name:<24}{METRIC_LABELS[metric]:<22}{row['added_ms']:>+9.3f}{row['ratio']:>8.2f}x")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: requests/10, ≥20)")
    parser.add_argument("--words", type=int, default=40, help="text deltas in the answer")
    parser.add_argument(
        "--delta-delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="the upstream waits this long before each text delta (default 0: no delay)",
    )
    parser.add_argument("--no-store", action="store_true", help="create the responses with store=false")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results")
    parser.add_argument("--fake-upstream", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.fake_upstream:
        return run_fake_upstream(options.words, options.delta_delay / 1000)
    if options.requests < 1:
        parser.error("--requests must be at least 1")
    if options.delta_delay < 0:
        parser.error("--delta-delay cannot be negative")
    answer_words(options.words)  # rejects a bad --words before anything starts
    warmup = options.warmup if options.warmup is not None else max(20, options.requests // 10)
    store = not options.no_store

    # A terminated run stops its children too: the signal unwinds through the finally blocks.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    started = time.monotonic()
    try:
        upstream = FakeUpstream(options.words, options.delta_delay)
        try:
            with (
                tempfile.TemporaryDirectory() as scratch,
                venna_serving(Path(scratch), upstream.base_url) as venna,
            ):
                by_path = asyncio.run(
                    measure(upstream, venna, options.words, options.requests, warmup, store)
                )
        finally:
            upstream.close()
    except (BenchError, subprocess.CalledProcessError) as error:
        print(f"bench_venice: {error}", file=sys.stderr)
        return 1

    summary = summarize(by_path)
    versus = compare(summary)
    setup = {
        "requests": options.requests,
        "warmup": warmup,
        "words": options.words,
        "frames": upstream.frames,
        "delta_delay_ms": options.delta_delay,
        "store": store,
        "model": MODEL,
        "seconds": round(time.monotonic() - started, 1),
    }
    print_report(summary, versus, setup)
    print(f"\n(run took {setup['seconds']} s)")
    if options.json is not None:
        options.json.write_text(
            json.dumps({"setup": setup, "latency_ms": summary, "venna_vs_direct": versus}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
