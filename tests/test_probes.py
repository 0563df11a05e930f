"""Probes and shutdown, on real ``venna serve`` and ``venna http`` processes: ``/livez``,
``/readyz`` (not ready while draining, or when the gRPC target is unreachable), the drain delay
that reports NOT_SERVING while still serving, and gRPC health ``List``; and CORS for browser
clients of the configured origins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.http_harness import HttpVenna, running
from tests.process_harness import ROOT, create_key, read_startup_line, serving
from tests.test_venice_backend import free_port


async def test_a_serving_process_is_live_and_ready_and_lists_its_health(tmp_path: Path) -> None:
    with serving(tmp_path / "venna.db", tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(server.http_root + "/livez")).status_code == 200
            ready = await http.get(server.http_root + "/readyz")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            listed = await health_pb2_grpc.HealthStub(channel).List(
                health_pb2.HealthListRequest(), timeout=10
            )
        assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
        assert (
            listed.statuses["venna.responses.v1.ResponsesService"].status
            == health_pb2.HealthCheckResponse.SERVING
        )


async def test_sigterm_reports_not_ready_for_the_drain_delay_while_still_serving(tmp_path: Path) -> None:
    db = tmp_path / "venna.db"
    key = create_key(db, "alpha")
    with serving(db, tmp_path / "serve.log", "--drain-seconds", "3", "--shutdown-grace", "1") as server:
        began = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        async with httpx.AsyncClient(timeout=10) as http:
            deadline = time.monotonic() + 2
            while (await http.get(server.http_root + "/readyz")).status_code != 503:
                assert time.monotonic() < deadline, "never reported not ready"
            assert (await http.get(server.http_root + "/livez")).status_code == 200
            # Still serving calls while it drains.
            answered = await http.post(
                server.base_url + "/responses",
                json={"model": "echo", "input": "during the drain"},
                headers={"authorization": f"Bearer {key}"},
            )
            assert answered.status_code == 200
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - began >= 3


@pytest.mark.parametrize("drain", ["0", "1"])
async def test_an_open_health_watch_is_told_and_ended_without_holding_the_shutdown(
    tmp_path: Path, drain: str
) -> None:
    with serving(
        tmp_path / "venna.db", tmp_path / "serve.log", "--drain-seconds", drain, "--shutdown-grace", "30"
    ) as server:
        async with grpc.aio.insecure_channel(server.grpc_address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            began = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)
            statuses = []
            while (message := await watch.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # not in grpc-stubs
                statuses.append(message.status)
            assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
            assert await watch.code() == grpc.StatusCode.OK
        assert server.process.wait(timeout=15) == 0
        # The drain delay, not the 30 s grace an endless Watch used to hold it for.
        assert time.monotonic() - began < float(drain) + 5


def test_the_shim_alone_is_ready_only_while_its_grpc_target_serves(tmp_path: Path) -> None:
    with serving(tmp_path / "venna.db", tmp_path / "serve.log") as server:
        for target, expected in ((server.grpc_address, 200), (f"127.0.0.1:{free_port()}", 503)):
            shim = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "venna.cli",
                    "http",
                    "--grpc-target",
                    target,
                    "--http-listen",
                    "127.0.0.1:0",
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                line = read_startup_line(shim, 30).decode()
                root = line.split("HTTP on ")[1].split("/v1")[0]
                assert httpx.get(root + "/readyz", timeout=10).status_code == expected
                assert httpx.get(root + "/livez", timeout=10).status_code == 200
            finally:
                shim.kill()
                shim.wait(timeout=10)
                if shim.stdout is not None:
                    shim.stdout.close()


# ------------------------------------------------------------------ CORS


@pytest.fixture
def cors_venna(tmp_path: Path) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path / "venna.db", cors_origins=("https://app.example",)))


def test_a_configured_origin_gets_cors(cors_venna: HttpVenna) -> None:
    """A browser page of an allowed origin: its preflight is answered, and the reply's request
    id is readable by the page."""
    preflight = httpx.options(
        f"{cors_venna.base_url}/responses",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    created = httpx.post(
        f"{cors_venna.base_url}/responses",
        json={"model": "echo", "input": "from a page"},
        headers={"origin": "https://app.example", "authorization": f"Bearer {cors_venna.alpha}"},
    )
    assert created.status_code == 200
    assert created.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in created.headers["access-control-expose-headers"]


def test_another_origin_gets_no_cors(cors_venna: HttpVenna) -> None:
    preflight = httpx.options(
        f"{cors_venna.base_url}/responses",
        headers={"origin": "https://elsewhere.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers


def test_without_origins_there_is_no_cors(tmp_path: Path) -> None:
    for venna in running(HttpVenna(tmp_path / "venna.db")):
        preflight = httpx.options(
            f"{venna.base_url}/responses",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 405
        assert "access-control-allow-origin" not in preflight.headers
