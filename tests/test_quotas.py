"""Limits per workspace through the real server: a burst over the requests-per-minute limit is
answered 429 (RESOURCE_EXHAUSTED on gRPC) with the seconds to wait, and a client that waits that
long gets through; tokens per minute and the monthly budget refuse the next response once
reached; two replicas on one PostgreSQL database share one count."""

from __future__ import annotations

import asyncio
import calendar
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.http_harness import HttpVenna, running
from tests.process_harness import create_key
from tests.test_replicas import two_replicas
from venna.responses.v1 import service_pb2, service_pb2_grpc
from venna.server.quotas import WINDOW_SECONDS, next_month_start, seconds_until_allowed


@pytest.fixture
def venna(tmp_path: Path) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path / "venna.db"))


class Clock:
    """The server's clock for limits, moved by the test instead of waited for."""

    def __init__(self) -> None:
        # One second into a window: a burst cannot straddle two.
        self.now = math.floor(time.time() / WINDOW_SECONDS) * WINDOW_SECONDS + 1.0

    def __call__(self) -> float:
        return self.now


def set_limits(venna: HttpVenna, workspace: str, **limits: int) -> None:
    reply = httpx.post(
        f"{venna.base_url}/admin/workspaces/{workspace}/limits",
        json=limits,
        headers={"authorization": f"Bearer {venna.admin}"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text


def create(venna: HttpVenna, key: str, text: str = "one two three") -> httpx.Response:
    return httpx.post(
        f"{venna.base_url}/responses",
        json={"model": "echo", "input": text},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def venna_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "venna.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_wait_is_until_the_sliding_minute_has_room() -> None:
    # Room in this window once enough of the previous one has slid out.
    assert seconds_until_allowed(10, previous=10, current=5, elapsed=0.25) == pytest.approx(15.0)
    assert seconds_until_allowed(10, previous=0, current=5, elapsed=0.5) == 0.0
    # Full: the rest of this window, then until this one has slid out far enough.
    assert seconds_until_allowed(10, previous=0, current=10, elapsed=0.5) == pytest.approx(30.0)
    assert seconds_until_allowed(10, previous=0, current=20, elapsed=0.5) == pytest.approx(60.0)
    december = calendar.timegm((2026, 12, 7, 12, 0, 0))
    assert next_month_start(december) == calendar.timegm((2027, 1, 1, 0, 0, 0))


def test_a_burst_over_the_request_limit_gets_429_and_recovers_after_the_wait(venna: HttpVenna) -> None:
    assert venna.server is not None
    clock = Clock()
    venna.server.quotas.clock = clock
    set_limits(venna, "alpha", requests_per_minute=5)
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda _: create(venna, venna.alpha), range(10)))
    assert sorted(reply.status_code for reply in replies) == [200] * 5 + [429] * 5
    refused = [reply for reply in replies if reply.status_code == 429]
    for reply in refused:
        error = reply.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "5 requests per minute" in error["message"]
    wait = int(refused[0].headers["retry-after"])
    assert 1 <= wait <= 60
    # Another workspace is not limited by alpha's burst.
    assert create(venna, venna.beta).status_code == 200
    # Reads are not counted.
    first = next(reply for reply in replies if reply.status_code == 200).json()["id"]
    headers = {"authorization": f"Bearer {venna.alpha}"}
    assert httpx.get(f"{venna.base_url}/responses/{first}", headers=headers).status_code == 200

    clock.now += wait - 1
    assert create(venna, venna.alpha).status_code == 429  # a second early: still full
    clock.now += 1
    assert create(venna, venna.alpha).status_code == 200  # as told: there is room again
    clock.now += 2 * WINDOW_SECONDS
    statuses = [create(venna, venna.alpha).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]  # a quiet minute later, the whole limit again

    set_limits(venna, "alpha", requests_per_minute=0)  # removed
    assert all(create(venna, venna.alpha).status_code == 200 for _ in range(3))


def test_tokens_per_minute_and_the_monthly_budget(venna: HttpVenna) -> None:
    assert venna.server is not None
    clock = Clock()
    venna.server.quotas.clock = clock
    set_limits(venna, "alpha", tokens_per_minute=20)
    statuses = []
    for _ in range(12):
        reply = create(venna, venna.alpha)
        statuses.append(reply.status_code)
        if reply.status_code == 429:
            break
        time.sleep(0.05)  # the finished response's tokens are counted just after it ends
    assert statuses[-1] == 429 and 200 in statuses
    error = reply.json()["error"]
    assert error["type"] == "rate_limit_error" and "20 tokens per minute" in error["message"]
    assert 1 <= int(reply.headers["retry-after"]) <= 2 * WINDOW_SECONDS + 1
    clock.now += 2 * WINDOW_SECONDS
    assert create(venna, venna.alpha).status_code == 200

    set_limits(venna, "alpha", tokens_per_minute=0, monthly_tokens=1)
    over = create(venna, venna.alpha)
    assert over.status_code == 429, over.text
    assert over.json()["error"]["type"] == "insufficient_quota"
    assert over.json()["error"]["code"] == "insufficient_quota"
    until_next_month = next_month_start(clock.now) - clock.now
    assert abs(int(over.headers["retry-after"]) - until_next_month) <= 2
    set_limits(venna, "alpha", monthly_tokens=10**9)
    assert create(venna, venna.alpha).status_code == 200


def test_grpc_callers_get_resource_exhausted_with_a_retry_delay(venna: HttpVenna) -> None:
    assert venna.server is not None
    venna.server.quotas.clock = Clock()
    set_limits(venna, "beta", requests_per_minute=1)
    metadata = (("authorization", f"Bearer {venna.beta}"),)
    request = service_pb2.CreateResponseRequest(model="echo")
    with grpc.insecure_channel(venna.grpc_address) as channel:
        responses = service_pb2_grpc.ResponsesServiceStub(channel)
        responses.CreateResponse(request, metadata=metadata)
        with pytest.raises(grpc.RpcError) as refused:
            list(responses.StreamResponse(request, metadata=metadata))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
    assert info.reason == "RATE_LIMIT_EXCEEDED" and info.metadata["limit"] == "requests_per_minute"
    assert retry.retry_delay.seconds == int(info.metadata["retry_after"]) >= 1


async def test_two_replicas_share_one_request_count(postgres_url: str, tmp_path: Path) -> None:
    # A burst that straddles a minute's end may pass the limit by what slid out: start early in one.
    if time.time() % WINDOW_SECONDS > 40:
        await asyncio.sleep(WINDOW_SECONDS - time.time() % WINDOW_SECONDS + 0.5)
    key = create_key(postgres_url, "shared")
    limits = await asyncio.to_thread(
        venna_cli,
        "limits",
        "set",
        "--workspace",
        "shared",
        "--requests-per-minute",
        "8",
        "--db",
        postgres_url,
    )
    assert limits.returncode == 0, limits.stderr
    with two_replicas(postgres_url, tmp_path) as (first, second):
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {key}"}, timeout=30) as http:

            async def one(base_url: str) -> int:
                reply = await http.post(f"{base_url}/responses", json={"model": "echo", "input": "hi"})
                return reply.status_code

            statuses = await asyncio.gather(
                *(one(server.base_url) for server in (first, second) for _ in range(10))
            )
    assert sorted(statuses) == [200] * 8 + [429] * 12
