"""`venna serve` killed with SIGKILL: what a client was told survives, streams end exactly once,
and the server always starts again, whatever its database holds.

Each test runs real server processes on a real SQLite file and kills them while clients are
mid-call. Randomness is seeded; how many calls complete before a kill varies from run to run,
the invariants checked after it do not. scripts/crash_soak.py runs the same rounds for longer.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import grpc
import grpc.aio
import httpx

from tests.conftest import async_stub
from tests.process_harness import (
    LoadShape,
    ServeProcess,
    background_problems,
    check_health,
    create_key,
    load_and_kill,
    lost_answers,
    read_startup_line,
    resumed_problems,
    serving,
    spawn_serve,
    start_serve,
    unfinished_count,
    wait_settled,
    write_poison_rows,
)
from venna.responses.v1 import response_pb2, service_pb2, service_pb2_grpc


async def restarted(db: Path, log: Path, *extra: str) -> ServeProcess:
    """A restart that must succeed: the start-up line, then both transports healthy."""
    server = start_serve(db, log, *extra)
    try:
        await check_health(server)
    except BaseException:
        server.kill()
        raise
    return server


async def test_acknowledged_answers_survive_kill_9(tmp_path: Path) -> None:
    """Every foreground response a client saw complete (gRPC stream or SSE) is stored completed
    after a SIGKILL at any moment: the final save comes before response.completed is sent."""
    db, log = tmp_path / "venna.db", tmp_path / "serve.log"
    keys = [create_key(db, "alpha"), create_key(db, "beta")]
    rng = random.Random(10)
    # Background work keeps the store busy, as it would be in production: a write that trails
    # the answer waits longer.
    shape = LoadShape(grpc_streams=12, sse_streams=12, grpc_background=4)
    server = await restarted(db, log)
    try:
        # Killed the instant a client has an answer, then at a moment chosen by chance alone.
        for on_completion in (True, False, True, True):
            kill_after = rng.uniform(0.6, 1.2)
            seen = await load_and_kill(server, keys, shape, kill_after, rng, on_completion=on_completion)
            assert not seen.errors, f"errors before the kill: {seen.errors}"
            assert seen.acknowledged, "no stream completed before the kill"
            server = await restarted(db, log)
            assert await lost_answers(server, seen.acknowledged) == []
            await wait_settled(db)
    finally:
        server.kill()


async def test_background_responses_end_with_exactly_one_terminal_event(tmp_path: Path) -> None:
    """Background responses killed at every stage (queued, running, finishing) are settled by the
    restart: each ends with exactly one terminal event, last, matching its final status, and
    every creation a client was answered is stored."""
    db, log = tmp_path / "venna.db", tmp_path / "serve.log"
    keys = [create_key(db, "alpha"), create_key(db, "beta")]
    rng = random.Random(20)
    shape = LoadShape(grpc_background=4, http_background=4, followed_background=8, slow_share=0.3)
    server = await restarted(db, log)
    try:
        for on_completion in (True, False):
            kill_after = rng.uniform(0.8, 1.5)
            seen = await load_and_kill(server, keys, shape, kill_after, rng, on_completion=on_completion)
            assert not seen.errors, f"errors before the kill: {seen.errors}"
            assert seen.background, "no background response created before the kill"
            server = await restarted(db, log)
            # What a follower saw complete stays completed: recovery does not fail it.
            assert await lost_answers(server, seen.background_completed) == []
            await wait_settled(db)
            checked, problems = background_problems(db)
            assert problems == []
            assert checked >= len(seen.background)
            # The same through the API, for a sample of what clients were told exists.
            sample = rng.sample(seen.background, min(60, len(seen.background)))
            assert await resumed_problems(server, sample) == []
    finally:
        server.kill()


async def test_a_killed_server_always_restarts(tmp_path: Path) -> None:
    """Killed during start-up (migrations, recovery re-running queued work) or right after it,
    the server still starts the next time, and recovery then settles everything."""
    db, log = tmp_path / "venna.db", tmp_path / "serve.log"
    key = create_key(db, "alpha")
    rng = random.Random(30)
    with serving(db, log, "--background-concurrency", "2") as server:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = service_pb2_grpc.ResponsesServiceStub(channel)
            for index in range(40):
                request = service_pb2.CreateResponseRequest(
                    model="echo:delay_ms=5",
                    input=[_message(" ".join(f"w{n}" for n in range(20 + index)))],
                    background=True,
                )
                await stub.CreateResponse(request, metadata=(("authorization", f"Bearer {key}"),))
        server.kill()
    assert unfinished_count(db) > 0

    for attempt in range(5):
        process = spawn_serve(db, log, "--background-concurrency", "2")
        try:
            if attempt % 2:
                # After the start-up line: recovery has re-queued work, which is running.
                assert read_startup_line(process, 30), f"no start-up line:\n{log.read_text()}"
            await asyncio.sleep(rng.uniform(0.0, 0.5))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            assert process.stdout is not None
            process.stdout.close()

    server = await restarted(db, log)
    try:
        await wait_settled(db)
        checked, problems = background_problems(db)
        assert checked == 40
        assert problems == []
    finally:
        server.kill()


def _message(text: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.role = response_pb2.ROLE_USER
    item.message.content.add().input_text.text = text
    return item


async def _get(
    stub: service_pb2_grpc.ResponsesServiceAsyncStub, response_id: str, key: str
) -> response_pb2.Response:
    request = service_pb2.GetResponseRequest(response_id=response_id)
    return await stub.GetResponse(request, metadata=(("authorization", f"Bearer {key}"),))


async def _get_or_error(
    stub: service_pb2_grpc.ResponsesServiceAsyncStub, response_id: str, key: str
) -> response_pb2.Response | grpc.aio.AioRpcError:
    try:
        return await _get(stub, response_id, key)
    except grpc.aio.AioRpcError as error:
        return error


async def test_a_poison_row_never_stops_a_restart(tmp_path: Path) -> None:
    """Rows that cannot be decoded fail on their own: the server starts (after SIGKILL and after
    SIGTERM alike), the other responses are as they were, and the bad ones answer cleanly."""
    db, log = tmp_path / "venna.db", tmp_path / "serve.log"
    key = create_key(db, "alpha")
    metadata = (("authorization", f"Bearer {key}"),)
    headers = {"authorization": f"Bearer {key}"}
    words = " ".join(f"w{n}" for n in range(200))

    with serving(db, log, "--background-concurrency", "1") as server:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            stub = async_stub(channel)

            async def create(model: str, text: str, background: bool = False) -> response_pb2.Response:
                request = service_pb2.CreateResponseRequest(
                    model=model, input=[_message(text)], background=background
                )
                return await stub.CreateResponse(request, metadata=metadata)

            completed = await create("echo", "kept as it was")
            # One slow response runs (and is in progress at the kill), the next waits its turn.
            running = await create("echo:delay_ms=20", words, background=True)
            queued = await create("echo", "run after", background=True)
            deadline = time.monotonic() + 10
            while (await _get(stub, running.id, key)).status != response_pb2.RESPONSE_STATUS_IN_PROGRESS:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        server.kill()

    poison = write_poison_rows(db, "alpha")

    for stop in ("SIGKILL", "SIGTERM", "SIGKILL"):
        server = await restarted(db, log)
        try:
            await wait_settled(db)
            async with grpc.aio.insecure_channel(server.grpc_address) as channel:
                stub = async_stub(channel)
                kept = await _get(stub, completed.id, key)
                assert kept.status == response_pb2.RESPONSE_STATUS_COMPLETED
                assert kept.output[0].message.content[0].output_text.text == "kept as it was"
                interrupted = await _get(stub, running.id, key)
                assert interrupted.status == response_pb2.RESPONSE_STATUS_FAILED
                assert interrupted.error.code == "server_error"
                rerun = await _get(stub, queued.id, key)
                assert rerun.status == response_pb2.RESPONSE_STATUS_COMPLETED
                assert rerun.output[0].message.content[0].output_text.text == "run after"
                assert await resumed_problems(server, [(key, running.id), (key, queued.id)]) == []

                for response_id in poison:
                    # Either a clean error, or the response, failed: never an internal error.
                    outcome = await _get_or_error(stub, response_id, key)
                    if isinstance(outcome, grpc.aio.AioRpcError):
                        assert outcome.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                            outcome.code(),
                            outcome.details(),
                        )
                    else:
                        assert outcome.status == response_pb2.RESPONSE_STATUS_FAILED, outcome

            async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10) as http:
                for response_id in poison:
                    for method, path, body in (
                        ("GET", f"/responses/{response_id}", None),
                        ("GET", f"/responses/{response_id}?stream=true", None),
                        (
                            "POST",
                            "/responses",
                            {"model": "echo", "input": "on", "previous_response_id": response_id},
                        ),
                    ):
                        reply = await http.request(method, path, json=body)
                        assert reply.status_code < 500, (method, path, reply.status_code, reply.text)
        finally:
            if stop == "SIGTERM":
                assert server.terminate() == 0
            else:
                server.kill()
