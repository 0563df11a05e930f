"""Real `venna serve` processes killed with SIGKILL under load, and the checks of what survives.

Shared by tests/test_crash.py (a few short rounds) and scripts/crash_soak.py (many long ones).
Everything here talks to the server the way a client does (gRPC, HTTP and SSE) or reads the
SQLite file it leaves behind; the only process it ever signals is one it started itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from venna.responses.v1 import events_pb2, response_pb2, service_pb2, service_pb2_grpc
from venna.server.ids import new_id

ROOT = Path(__file__).resolve().parent.parent
STARTUP_LINE = re.compile(r"gRPC on (\S+), HTTP on (http://\S+)/v1,")
UNFINISHED = (response_pb2.RESPONSE_STATUS_QUEUED, response_pb2.RESPONSE_STATUS_IN_PROGRESS)
# The stream events that end a response, by the status they report.
TERMINAL_EVENTS = {
    "completed": response_pb2.RESPONSE_STATUS_COMPLETED,
    "incomplete": response_pb2.RESPONSE_STATUS_INCOMPLETE,
    "failed": response_pb2.RESPONSE_STATUS_FAILED,
}
# Errors a loaded server may answer by design (a limit reached): the client waits and retries.
_BUSY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
_BUSY_STATUSES = (429, 503)


def status_name(status: int) -> str:
    return response_pb2.ResponseStatus.Name(status).removeprefix("RESPONSE_STATUS_").lower()  # type: ignore[arg-type]


def create_key(db: str | Path, workspace: str) -> str:
    """A new key from `venna keys create`, as an operator makes one."""
    created = subprocess.run(
        [sys.executable, "-m", "venna.cli", "keys", "create", "--workspace", workspace, "--db", str(db)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if created.returncode != 0:
        raise RuntimeError(f"venna keys create failed ({created.returncode}):\n{created.stderr}")
    return created.stdout.strip()


class StartFailed(Exception):
    """`venna serve` exited, or printed no start-up line in time."""


@dataclass
class ServeProcess:
    """One `venna serve` process, serving gRPC and HTTP on free loopback ports."""

    process: subprocess.Popen[bytes]
    grpc_address: str
    http_root: str  # http://host:port, without /v1
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.http_root + "/v1"

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the server."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._close()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit status (SIGKILL if it does not exit in time)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._close()

    def _close(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()


def spawn_serve(db: str | Path, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`venna serve` on free loopback ports; its log (stderr) is appended to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "venna.cli",
                "serve",
                "--db",
                str(db),
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "VENNA_LOG_LEVEL": "WARNING"},
        )


def read_startup_line(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The first line the process prints, or b"" if it exits or stays silent for ``timeout``."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return b""
            chunk = os.read(fd, 4096)
            if not chunk:
                return b""
            line += chunk
    return line


def log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def start_serve(db: str | Path, log_path: Path, *extra: str, timeout: float = 30.0) -> ServeProcess:
    """A started `venna serve`; raises StartFailed (with its log's tail) if it does not start."""
    return await_startup(spawn_serve(db, log_path, *extra), log_path, timeout)


def await_startup(process: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0) -> ServeProcess:
    """The started server, once ``process`` printed its start-up line; otherwise the process is
    killed and StartFailed raised with its log's tail."""
    match = None
    line = ""
    try:
        line = read_startup_line(process, timeout).decode(errors="replace")
        match = STARTUP_LINE.search(line)
    finally:
        if match is None:  # no start-up line, or interrupted while waiting for it
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            code = process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
    if match is None:
        raise StartFailed(f"exit status {code}, start-up line {line!r}, log:\n{log_tail(log_path)}")
    return ServeProcess(process, match.group(1), match.group(2), log_path)


@contextlib.contextmanager
def serving(db: str | Path, log_path: Path, *extra: str) -> Iterator[ServeProcess]:
    """start_serve, and the process killed at the end whatever happened."""
    server = start_serve(db, log_path, *extra)
    try:
        yield server
    finally:
        server.kill()


async def check_health(server: ServeProcess) -> None:
    """Both transports answer: gRPC health says SERVING, the shim's /healthz says ok."""
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(server.http_root + "/healthz")
        assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------------------------- load


@dataclass
class Load:
    """What clients saw before and around a kill."""

    # (key, response id) of each foreground stream whose response.completed a client received.
    acknowledged: list[tuple[str, str]] = field(default_factory=list)
    # (key, response id) of each background response whose creation was answered.
    background: list[tuple[str, str]] = field(default_factory=list)
    # (key, response id) of each background response a follower saw complete.
    background_completed: list[tuple[str, str]] = field(default_factory=list)
    # Calls answered with a busy error (a limit) before the kill, by kind.
    busy: Counter[str] = field(default_factory=Counter)
    # Other errors before the kill, by kind: each is a defect of the server under load.
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class LoadShape:
    """How many clients of each kind run at once."""

    grpc_streams: int = 0
    sse_streams: int = 0
    grpc_background: int = 0
    http_background: int = 0
    # Background responses created with StreamResponse and followed to their end.
    followed_background: int = 0
    # Share of background responses on the slow model (2 ms a word, 10 to 60 words).
    slow_share: float = 0.3


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(low, high)))


def _message(text: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.role = response_pb2.ROLE_USER
    item.message.content.add().input_text.text = text
    return item


class _Clients:
    """The clients of one load round: a gRPC channel, an HTTP client, and the round's state."""

    def __init__(self, server: ServeProcess, keys: Sequence[str], load: Load) -> None:
        self.server = server
        self.keys = list(keys)
        self.load = load
        self.killed = asyncio.Event()
        # Set: the next response.completed a client receives kills the server at once.
        self.kill_armed = False
        self.channel = grpc.aio.insecure_channel(server.grpc_address)
        self.stub = service_pb2_grpc.ResponsesServiceStub(self.channel)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(20.0), limits=httpx.Limits(max_connections=256))

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.channel.close(grace=None)

    def metadata(self, key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)

    def kill_now(self) -> None:
        if not self.killed.is_set():
            os.kill(self.server.process.pid, signal.SIGKILL)
            self.killed.set()

    def completed(self, into: list[tuple[str, str]], key: str, response_id: str) -> None:
        """Records a response.completed a client received; an armed kill fires right here, in
        the moment between the client seeing the answer and anything the server does next."""
        into.append((key, response_id))
        if self.kill_armed:
            self.kill_now()

    async def failed(self, kind: str, busy: bool) -> bool:
        """Records an error; True if the worker should stop (the server is gone)."""
        if self.killed.is_set():
            return True
        (self.load.busy if busy else self.load.errors)[kind] += 1
        await asyncio.sleep(0.02)
        return False

    async def grpc_streams(self, rng: random.Random) -> None:
        while not self.killed.is_set():
            key = rng.choice(self.keys)
            request = service_pb2.CreateResponseRequest(
                model="echo", input=[_message(_words(rng, 1, 6))], store=True
            )
            try:
                async for event in self.stub.StreamResponse(request, metadata=self.metadata(key)):
                    if event.WhichOneof("event") == "completed":
                        self.completed(self.load.acknowledged, key, event.completed.response.id)
            except grpc.aio.AioRpcError as error:
                if await self.failed(f"grpc stream {error.code().name}", error.code() in _BUSY_CODES):
                    return

    async def sse_streams(self, rng: random.Random) -> None:
        while not self.killed.is_set():
            key = rng.choice(self.keys)
            body = {"model": "echo", "input": _words(rng, 1, 6), "stream": True, "store": True}
            try:
                async with self.http.stream(
                    "POST",
                    self.server.base_url + "/responses",
                    json=body,
                    headers={"authorization": f"Bearer {key}"},
                ) as reply:
                    if reply.status_code != 200:
                        await reply.aread()
                        if await self.failed(f"sse {reply.status_code}", reply.status_code in _BUSY_STATUSES):
                            return
                        continue
                    async for line in reply.aiter_lines():
                        if line.startswith("data: ") and '"response.completed"' in line:
                            data = json.loads(line.removeprefix("data: "))
                            if data.get("type") == "response.completed":
                                self.completed(self.load.acknowledged, key, data["response"]["id"])
            except httpx.HTTPError as error:
                if await self.failed(f"sse {type(error).__name__}", busy=False):
                    return

    def _background_request(self, rng: random.Random, shape: LoadShape) -> tuple[str, str]:
        if rng.random() < shape.slow_share:
            return "echo:delay_ms=2", _words(rng, 10, 60)
        return "echo", _words(rng, 1, 6)

    async def grpc_background(self, rng: random.Random, shape: LoadShape) -> None:
        while not self.killed.is_set():
            key = rng.choice(self.keys)
            model, text = self._background_request(rng, shape)
            request = service_pb2.CreateResponseRequest(model=model, input=[_message(text)], background=True)
            try:
                response = await self.stub.CreateResponse(request, metadata=self.metadata(key))
            except grpc.aio.AioRpcError as error:
                if await self.failed(f"grpc background {error.code().name}", error.code() in _BUSY_CODES):
                    return
                continue
            self.load.background.append((key, response.id))

    async def followed_background(self, rng: random.Random, shape: LoadShape) -> None:
        while not self.killed.is_set():
            key = rng.choice(self.keys)
            model, text = self._background_request(rng, shape)
            request = service_pb2.CreateResponseRequest(model=model, input=[_message(text)], background=True)
            try:
                async for event in self.stub.StreamResponse(request, metadata=self.metadata(key)):
                    kind = event.WhichOneof("event")
                    if kind == "created":
                        self.load.background.append((key, event.created.response.id))
                    elif kind == "completed":
                        self.completed(self.load.background_completed, key, event.completed.response.id)
            except grpc.aio.AioRpcError as error:
                if await self.failed(f"followed background {error.code().name}", error.code() in _BUSY_CODES):
                    return

    async def http_background(self, rng: random.Random, shape: LoadShape) -> None:
        while not self.killed.is_set():
            key = rng.choice(self.keys)
            model, text = self._background_request(rng, shape)
            body = {"model": model, "input": text, "background": True}
            try:
                reply = await self.http.post(
                    self.server.base_url + "/responses", json=body, headers={"authorization": f"Bearer {key}"}
                )
            except httpx.HTTPError as error:
                if await self.failed(f"http background {type(error).__name__}", busy=False):
                    return
                continue
            if reply.status_code != 200:
                if await self.failed(
                    f"http background {reply.status_code}", reply.status_code in _BUSY_STATUSES
                ):
                    return
                continue
            self.load.background.append((key, reply.json()["id"]))


async def load_and_kill(
    server: ServeProcess,
    keys: Sequence[str],
    shape: LoadShape,
    kill_after: float,
    rng: random.Random,
    *,
    on_completion: bool = False,
) -> Load:
    """Runs the load against ``server``, SIGKILLs it after ``kill_after`` seconds with every kind
    of call in flight, and returns what the clients saw (including what reached them after the
    kill: bytes the server had sent before it died).

    ``on_completion``: the kill comes instead as soon as a client receives a response.completed
    after ``kill_after``: the moment a save that followed the answer would be lost.
    """
    load = Load()
    clients = _Clients(server, keys, load)
    workers: list[asyncio.Task[None]] = []
    try:
        for count, work in (
            (shape.grpc_streams, lambda seed: clients.grpc_streams(random.Random(seed))),
            (shape.sse_streams, lambda seed: clients.sse_streams(random.Random(seed))),
            (shape.grpc_background, lambda seed: clients.grpc_background(random.Random(seed), shape)),
            (shape.http_background, lambda seed: clients.http_background(random.Random(seed), shape)),
            (shape.followed_background, lambda seed: clients.followed_background(random.Random(seed), shape)),
        ):
            workers += [asyncio.create_task(work(rng.randrange(2**32))) for _ in range(count)]
        await asyncio.sleep(kill_after)
        if on_completion:
            clients.kill_armed = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(clients.killed.wait(), timeout=5)
        clients.kill_now()
        server.kill()
        done, pending = await asyncio.wait(workers, timeout=30)
        assert not pending, f"{len(pending)} clients still running 30 s after the kill"
        for task in done:
            task.result()
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await clients.aclose()
    return load


# ---------------------------------------------------------------------------------- checks


async def lost_answers(server: ServeProcess, acknowledged: Sequence[tuple[str, str]]) -> list[str]:
    """The acknowledged responses that GET does not report ``completed``: "id: what GET said"."""
    lost: list[str] = []
    limit = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.ResponsesServiceStub(channel)

        async def check(key: str, response_id: str) -> None:
            async with limit:
                try:
                    response = await stub.GetResponse(
                        service_pb2.GetResponseRequest(response_id=response_id),
                        metadata=(("authorization", f"Bearer {key}"),),
                        timeout=30,
                    )
                except grpc.aio.AioRpcError as error:
                    lost.append(f"{response_id}: {error.code().name} {error.details()}")
                    return
                if response.status != response_pb2.RESPONSE_STATUS_COMPLETED:
                    lost.append(f"{response_id}: {status_name(response.status)} {response.error.message}")

        await asyncio.gather(*(check(key, response_id) for key, response_id in acknowledged))
    return sorted(lost)


def _connect(db: Path) -> sqlite3.Connection:
    if not db.exists():
        raise FileNotFoundError(db)
    conn = sqlite3.connect(db, timeout=10)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def unfinished_count(db: Path) -> int:
    with contextlib.closing(_connect(db)) as conn:
        marks = ",".join("?" * len(UNFINISHED))
        (count,) = conn.execute(
            f"SELECT COUNT(*) FROM responses WHERE status IN ({marks})", list(UNFINISHED)
        ).fetchone()
    return int(count)


async def wait_settled(db: Path, timeout: float = 30.0) -> None:
    """Waits until no response in the file is queued or in progress (recovery has run them)."""
    deadline = time.monotonic() + timeout
    while (left := unfinished_count(db)) > 0:
        assert time.monotonic() < deadline, f"{left} responses still queued or in progress"
        await asyncio.sleep(0.05)


def event_problems(
    response_id: str, status: int, events: Sequence[events_pb2.ResponseStreamEvent]
) -> list[str]:
    """What is wrong with a finished background response's stream: it must be numbered 0, 1, …
    without gaps, hold exactly one terminal event, last, and that event must say the status."""
    problems = []
    numbers = [event.sequence_number for event in events]
    if numbers != list(range(len(events))):
        problems.append(f"{response_id}: sequence numbers {numbers[:5]}…{numbers[-3:]}")
    kinds = [event.WhichOneof("event") or "" for event in events]
    terminal = [index for index, kind in enumerate(kinds) if kind in TERMINAL_EVENTS]
    if len(terminal) != 1:
        problems.append(f"{response_id}: {len(terminal)} terminal events {[kinds[i] for i in terminal]}")
    if terminal and terminal[-1] != len(events) - 1:
        problems.append(
            f"{response_id}: terminal {kinds[terminal[-1]]} followed by {kinds[terminal[-1] + 1 :]}"
        )
    if terminal:
        last = kinds[terminal[-1]]
        reported = getattr(events[terminal[-1]], last).response.status
        if TERMINAL_EVENTS[last] != status or reported != status:
            problems.append(
                f"{response_id}: status {status_name(status)}, terminal event {last}"
                f" reporting {status_name(reported)}"
            )
    return problems


def background_problems(db: Path, skip: Collection[str] = ()) -> tuple[int, list[str]]:
    """Every background response in the file but those in ``skip``, checked by event_problems;
    (how many, problems)."""
    with contextlib.closing(_connect(db)) as conn:
        rows = conn.execute("SELECT id, status FROM responses WHERE background = 1").fetchall()
        statuses = {response_id: status for response_id, status in rows if response_id not in skip}
        streams: dict[str, list[events_pb2.ResponseStreamEvent]] = {}
        for response_id, body in conn.execute(
            "SELECT e.response_id, e.body FROM events e JOIN responses r ON r.id = e.response_id"
            " WHERE r.background = 1 ORDER BY e.response_id, e.sequence_number"
        ):
            if response_id in statuses:
                streams.setdefault(response_id, []).append(events_pb2.ResponseStreamEvent.FromString(body))
    problems = []
    for response_id, status in statuses.items():
        if status in UNFINISHED:
            problems.append(f"{response_id}: still {status_name(status)}")
            continue
        problems += event_problems(response_id, status, streams.get(response_id, []))
    return len(statuses), sorted(problems)


async def resumed_problems(server: ServeProcess, created: Sequence[tuple[str, str]]) -> list[str]:
    """The same checks through the API: each response's stream replayed from the start
    (ResumeResponseStream, starting_after -1) against its status from GetResponse."""
    problems: list[str] = []
    limit = asyncio.Semaphore(16)
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.ResponsesServiceStub(channel)

        async def check(key: str, response_id: str) -> None:
            metadata = (("authorization", f"Bearer {key}"),)
            async with limit:
                try:
                    response = await stub.GetResponse(
                        service_pb2.GetResponseRequest(response_id=response_id), metadata=metadata, timeout=30
                    )
                    request = service_pb2.ResumeResponseStreamRequest(
                        response_id=response_id, starting_after=-1
                    )
                    events = [event async for event in stub.ResumeResponseStream(request, metadata=metadata)]
                except grpc.aio.AioRpcError as error:
                    problems.append(f"{response_id}: {error.code().name} {error.details()}")
                    return
            problems.extend(event_problems(response_id, response.status, events))

        await asyncio.gather(*(check(key, response_id) for key, response_id in created))
    return sorted(problems)


def _nested_schema(levels: int) -> dict[str, Any]:
    """A JSON Schema nested ``levels`` objects deep (twice as many JSON levels)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"inner": schema}}
    return schema


def write_poison_rows(db: Path, workspace: str) -> list[str]:
    """Unfinished background responses that cannot be read back, written (while no server runs)
    as a bug or a damaged disk might leave them: a body of garbage, a body nested past
    protobuf's recursion limit, and a queued one whose kept request is garbage. Their ids."""
    now = int(time.time())
    deep = response_pb2.Response(
        id=new_id("resp"),
        object="response",
        created_at=now,
        status=response_pb2.RESPONSE_STATUS_IN_PROGRESS,
        model="echo",
        background=True,
        store=True,
    )
    deep.text.format.json_schema.name = "deep"
    deep.text.format.json_schema.schema.update(_nested_schema(30))
    readable_queued = response_pb2.Response(
        id=new_id("resp"),
        object="response",
        created_at=now,
        status=response_pb2.RESPONSE_STATUS_QUEUED,
        model="echo",
        background=True,
        store=True,
    )
    garbage = bytes(range(256))[::-1] * 4
    rows = [
        (new_id("resp"), response_pb2.RESPONSE_STATUS_IN_PROGRESS, garbage, None),
        (deep.id, response_pb2.RESPONSE_STATUS_IN_PROGRESS, deep.SerializeToString(), None),
        (
            readable_queued.id,
            response_pb2.RESPONSE_STATUS_QUEUED,
            readable_queued.SerializeToString(),
            garbage,
        ),
    ]
    with contextlib.closing(_connect(db)) as conn, conn:
        (workspace_id,) = conn.execute("SELECT id FROM workspaces WHERE name = ?", [workspace]).fetchone()
        conn.executemany(
            "INSERT INTO responses (id, workspace_id, status, background, created_at, body, request)"
            " VALUES (?, ?, ?, 1, ?, ?, ?)",
            [(rid, workspace_id, status, now, body, request) for rid, status, body, request in rows],
        )
    return [row[0] for row in rows]
