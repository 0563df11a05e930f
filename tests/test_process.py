"""The `venna` command as a user runs it: keys, serve, crash recovery, graceful shutdown,
health, reflection, and the generated code's freshness."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import Client, Venna, async_stub, event_type, output_text, user_message
from tests.process_harness import serving, spawn_serve
from venna.responses.v1 import response_pb2, service_pb2

ROOT = Path(__file__).resolve().parent.parent


def venna_command(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "venna.cli", *args, "--db", str(db)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    created = venna_command("keys", "create", "--workspace", "team-a", db=db)
    assert created.returncode == 0, created.stderr
    [key] = created.stdout.splitlines()
    assert re.fullmatch(r"vk_[A-Za-z0-9_-]{40,}", key)

    listing = venna_command("keys", "list", db=db)
    assert listing.returncode == 0
    assert "team-a" in listing.stdout and key not in listing.stdout
    key_id = re.search(r"key_[0-9a-f]+", listing.stdout)
    assert key_id is not None

    assert venna_command("keys", "revoke", key_id.group(0), db=db).returncode == 0
    assert "team-a" in venna_command("keys", "list", db=db).stdout
    again = venna_command("keys", "revoke", key_id.group(0), db=db)
    assert again.returncode == 1
    assert "no active key" in again.stderr


@contextmanager
def running(*argv: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A `venna` command that serves; yields the process and its start-up line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "venna.cli", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "VENNA_LOG_LEVEL": "WARNING"},
    )
    try:
        assert process.stdout is not None
        yield process, process.stdout.readline()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@contextmanager
def running_server(db: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`venna serve` (gRPC only) on a free loopback port; yields the process and its address."""
    argv = ("serve", "--grpc-listen", "127.0.0.1:0", "--no-http", "--db", str(db), *extra)
    with running(*argv) as (process, line):
        match = re.search(r"gRPC on (\S+),", line)
        assert match, f"unexpected start-up line: {line!r}"
        yield process, match.group(1)


@asynccontextmanager
async def client_for(address: str, key: str) -> AsyncIterator[Client]:
    channel = grpc.aio.insecure_channel(address)
    try:
        yield Client(async_stub(channel), key)
    finally:
        await channel.close(grace=None)


async def wait_until(client: Client, response_id: str, *statuses: int) -> response_pb2.Response:
    deadline = time.monotonic() + 15
    while True:
        response = await client.get(response_id)
        if response.status in statuses:
            return response
        assert time.monotonic() < deadline, f"stuck in status {response.status}"
        await asyncio.sleep(0.05)


async def test_a_crash_leaves_nothing_queued_or_in_progress(tmp_path: Path) -> None:
    db = tmp_path / "venna.db"
    key = venna_command("keys", "create", "--workspace", "alpha", db=db).stdout.strip()
    words = " ".join(f"w{n}" for n in range(300))

    with running_server(db, "--background-concurrency", "1") as (process, address):
        async with client_for(address, key) as client:
            running = await client.create(input=words, model="echo:delay_ms=20", background=True)
            waiting = await client.create(input="run me after the restart", background=True)
            await wait_until(client, running.id, response_pb2.RESPONSE_STATUS_IN_PROGRESS)
            seen = []
            async for event in client.stub.ResumeResponseStream(
                service_pb2.ResumeResponseStreamRequest(response_id=running.id), metadata=client.metadata
            ):
                seen.append(event)
                if len(seen) == 12:
                    break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    with running_server(db) as (_, address):
        async with client_for(address, key) as client:
            failed = await client.get(running.id)
            assert failed.status == response_pb2.RESPONSE_STATUS_FAILED
            assert failed.error.code == "server_error"
            replay = await client.resume(running.id)
            assert [event.sequence_number for event in replay] == list(range(len(replay)))
            assert replay[: len(seen)] == seen
            assert event_type(replay[-1]) == "response.failed"

            rerun = await wait_until(client, waiting.id, response_pb2.RESPONSE_STATUS_COMPLETED)
            assert output_text(rerun) == "run me after the restart"
            rerun_events = await client.resume(waiting.id)
            assert [event.sequence_number for event in rerun_events] == list(range(len(rerun_events)))
            assert [event_type(event) for event in rerun_events[:3]] == [
                "response.created",
                "response.queued",
                "response.in_progress",
            ]


async def test_sigterm_lets_in_flight_calls_finish(tmp_path: Path) -> None:
    db = tmp_path / "venna.db"
    key = venna_command("keys", "create", "--workspace", "alpha", db=db).stdout.strip()
    words = " ".join(f"w{n}" for n in range(20))

    with running_server(db, "--shutdown-grace", "5") as (process, address):
        async with client_for(address, key) as client:
            call = asyncio.ensure_future(client.create(input=words, model="echo:delay_ms=30"))
            await asyncio.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            response = await call
            assert response.status == response_pb2.RESPONSE_STATUS_COMPLETED
            assert output_text(response) == words
        assert process.wait(timeout=10) == 0


def test_serve_runs_grpc_and_http_and_the_shim_runs_alone(tmp_path: Path) -> None:
    import openai

    db = tmp_path / "venna.db"
    key = venna_command("keys", "create", "--workspace", "alpha", db=db).stdout.strip()
    argv = ("serve", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--db", str(db))
    with running(*argv) as (_, line):
        match = re.search(r"gRPC on (\S+), HTTP on (\S+),", line)
        assert match, line
        grpc_address, base_url = match.groups()
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        first = client.responses.create(model="echo", input="through the in-process shim")
        assert first.output_text == "through the in-process shim"

        # The same service behind a standalone shim that dials it.
        with running("http", "--grpc-target", grpc_address, "--http-listen", "127.0.0.1:0") as (
            shim,
            shim_line,
        ):
            shim_match = re.search(r"HTTP on (\S+),", shim_line)
            assert shim_match, shim_line
            remote = openai.OpenAI(base_url=shim_match.group(1), api_key=key, max_retries=0)
            second = remote.responses.create(
                model="echo", input="via the channel", previous_response_id=first.id
            )
            assert second.output_text == "via the channel"
            assert second.usage is not None
            assert second.usage.input_tokens == 4 + 4 + 3
            assert remote.responses.retrieve(first.id).id == first.id
            shim.send_signal(signal.SIGTERM)
            assert shim.wait(timeout=10) == 0


async def test_serve_limit_flags_and_the_shims_key_check_take_effect(tmp_path: Path) -> None:
    import httpx

    db = tmp_path / "venna.db"
    key = venna_command("keys", "create", "--workspace", "alpha", db=db).stdout.strip()
    argv = ("serve", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--db", str(db))
    with running(*argv, "--max-input-items", "2", "--max-concurrent-per-key", "1") as (_, line):
        match = re.search(r"gRPC on (\S+), HTTP on (\S+),", line)
        assert match, line
        grpc_address, base_url = match.groups()
        async with client_for(grpc_address, key) as client:
            three = [user_message(word) for word in ("one", "two", "three")]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.create(input=three)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 2 items" in (caught.value.details() or "")
            # One stream runs: a second call of the same key, over HTTP, is turned away.
            held = client.stub.StreamResponse(
                service_pb2.CreateResponseRequest(
                    model="echo:delay_ms=200", input=[user_message(" ".join(["word"] * 30))]
                ),
                metadata=client.metadata,
            )
            await held.read()
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                busy = await http.post(
                    "/responses",
                    json={"model": "echo", "input": "hi"},
                    headers={"authorization": f"Bearer {key}"},
                )
                assert busy.status_code == 429, busy.text
                assert busy.json()["error"]["type"] == "rate_limit_error"
                # No key and a broken body: the key is checked first, by the server's own authenticator.
                anonymous = await http.post(
                    "/responses", content=b"{not json", headers={"content-type": "application/json"}
                )
                assert anonymous.status_code == 401, anonymous.text
            held.cancel()


async def test_health_and_reflection(venna: Venna) -> None:
    health = health_pb2_grpc.HealthStub(venna.channel)
    for service in ("", "venna.responses.v1.ResponsesService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def reflect() -> list[str]:
        with grpc.insecure_channel(venna.server.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = database.get_services()
            method_names = [
                method.name
                for method in database.FindFileContainingSymbol("venna.responses.v1.ResponsesService")
                .service[0]
                .method
            ]
            return [*services, *method_names]

    found = await asyncio.to_thread(reflect)
    assert "venna.responses.v1.ResponsesService" in found
    assert "grpc.health.v1.Health" in found
    for method in ("CreateResponse", "StreamResponse", "ResumeResponseStream", "ListInputItems"):
        assert method in found


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_both_reflection_protocols_answer_a_real_client(venna: Venna, protocol: str) -> None:
    """buf curl, asked for one reflection protocol only, lists the services and their methods."""
    buf = Path(sys.executable).parent / "buf"

    def buf_curl(*args: str) -> subprocess.CompletedProcess[str]:
        reflecting = ["--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", protocol]
        return subprocess.run(
            [str(buf), "curl", *reflecting, *args, f"http://{venna.server.address}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # In a thread: the server answers on this test's event loop.
    services = await asyncio.to_thread(buf_curl, "--list-services")
    assert services.returncode == 0, services.stderr
    listed = services.stdout.split()
    for name in (
        "venna.responses.v1.ResponsesService",
        "venna.responses.v1.AdminService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        assert name in listed
    methods = await asyncio.to_thread(buf_curl, "--list-methods")
    assert methods.returncode == 0, methods.stderr
    assert "venna.responses.v1.ResponsesService/CreateResponse" in methods.stdout.split()
    assert "grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in methods.stdout.split()


def test_generated_code_is_up_to_date() -> None:
    check = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_rpc_has_an_http_route() -> None:
    from google.api import annotations_pb2

    descriptor = service_pb2.DESCRIPTOR.services_by_name["ResponsesService"]
    routes = {}
    for method in descriptor.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        assert verb, f"{method.name} has no google.api.http route"
        routes[method.name] = (verb.upper(), getattr(rule, verb))
    assert routes["CreateResponse"] == ("POST", "/v1/responses")
    assert routes["ListInputItems"] == ("GET", "/v1/responses/{response_id}/input_items")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["serve", "--grpc-listen", "256.0.0.1:1"], "--grpc-listen 256.0.0.1:1: cannot resolve the host"),
        (["serve", "--grpc-listen", "127.0.0.1:TAKEN"], "--grpc-listen 127.0.0.1:TAKEN: cannot listen"),
        (["serve", "--http-listen", "127.0.0.1:TAKEN"], "--http-listen 127.0.0.1:TAKEN: cannot listen"),
        (["http", "--http-listen", "127.0.0.1:TAKEN"], "--http-listen 127.0.0.1:TAKEN: cannot listen"),
        (["serve", "--http-listen", "nowhere"], "--http-listen nowhere: expected HOST:PORT"),
        (["serve", "--db", "/proc/no/such/dir/venna.db"], "/proc/no"),
        (["keys", "list", "--db", "/proc/no/such/dir/venna.db"], "--db /proc/no/such/dir/venna.db"),
        (["usage", "--db", "NOT_A_DATABASE"], "file is not a database"),
        (["serve", "--config", "NOT_TOML"], "Expected '='"),
    ],
)
def test_a_setting_it_cannot_start_with_is_one_line_and_status_2(
    tmp_path: Path, taken_port: int, argv: list[str], complaint: str
) -> None:
    """Taken ports, unusable databases and broken config files: one line naming the setting,
    exit status 2, nothing started (the gRPC server is not left running while HTTP fails)."""
    not_a_database = tmp_path / "not.db"
    not_a_database.write_bytes(b"this is not SQLite" * 100)
    not_toml = tmp_path / "venna.toml"
    not_toml.write_text("this is [ not toml")

    def fill(text: str) -> str:
        return (
            text.replace("TAKEN", str(taken_port))
            .replace("NOT_A_DATABASE", str(not_a_database))
            .replace("NOT_TOML", str(not_toml))
        )

    argv, complaint = [fill(part) for part in argv], fill(complaint)
    defaults: list[str] = []
    if argv[0] == "serve":
        defaults += [] if "--grpc-listen" in argv else ["--grpc-listen", "127.0.0.1:0"]
        defaults += [] if "--http-listen" in argv else ["--http-listen", "127.0.0.1:0"]
        defaults += [] if "--db" in argv else ["--db", str(tmp_path / "venna.db")]
    if argv[0] == "http":
        defaults += ["--grpc-target", "127.0.0.1:1"]
    result = subprocess.run(
        [sys.executable, "-m", "venna.cli", *argv, *defaults],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("venna: ") and complaint in lines[0], lines[0]


@pytest.mark.parametrize(
    ("environment", "argv", "complaint"),
    [
        ({"VENNA_SHUTDOWN_GRACE": "abc"}, ["serve"], "VENNA_SHUTDOWN_GRACE"),
        ({"VENNA_GRPC_MAX_CONNECTIONS": "many"}, ["serve"], "VENNA_GRPC_MAX_CONNECTIONS"),
        ({"VENNA_HTTP_BODY_TIMEOUT": "soon"}, ["http"], "VENNA_HTTP_BODY_TIMEOUT"),
        ({}, ["serve", "--log-level", "loud"], "expected one of DEBUG"),
        ({"VENNA_LOG_LEVEL": "loud"}, ["http"], "expected one of DEBUG"),
        ({}, ["serve", "--http-max-connections", "0"], "--http-max-connections must be positive"),
    ],
)
def test_a_bad_setting_is_a_one_line_complaint_not_a_traceback(
    tmp_path: Path, environment: dict[str, str], argv: list[str], complaint: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "venna.cli",
            *argv,
            "--grpc-listen" if argv[0] == "serve" else "--grpc-target",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]
        + (["--db", str(tmp_path / "venna.db")] if argv[0] == "serve" else []),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **environment},
    )
    assert result.returncode != 0
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_serve_setting_in_the_environment_does_not_break_other_commands(tmp_path: Path) -> None:
    """`venna keys list` has nothing to do with the server's settings."""
    result = subprocess.run(
        [sys.executable, "-m", "venna.cli", "keys", "list", "--db", str(tmp_path / "venna.db")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "VENNA_SHUTDOWN_GRACE": "abc", "VENNA_LOG_LEVEL": "loud"},
    )
    assert result.returncode == 0, result.stderr
    assert "WORKSPACE" in result.stdout


def test_a_second_server_on_one_sqlite_file_is_refused_while_the_tools_still_work(tmp_path: Path) -> None:
    """Two servers on one SQLite file would each take the other's unfinished work for its own:
    the second is refused in one line (status 2); `venna keys` still works beside the first,
    and once the first is killed, a new server starts on the file."""
    db = tmp_path / "venna.db"
    with serving(db, tmp_path / "first.log"):
        second = spawn_serve(db, tmp_path / "second.log")
        assert second.stdout is not None
        second.stdout.close()
        status = second.wait(timeout=30)
        stderr = (tmp_path / "second.log").read_text()
        assert status == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "another venna serve is running on this database file" in lines[0], lines
        assert venna_command("keys", "create", "--workspace", "alpha", db=db).returncode == 0
    with serving(db, tmp_path / "again.log"):  # the first one's lock went with it
        pass
