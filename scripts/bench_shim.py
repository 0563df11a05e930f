#!/usr/bin/env python3
"""What the HTTP shim adds per request, measured against calling gRPC directly in the same run.

Starts ``venna serve`` (gRPC + in-process shim) on free loopback ports over a scratch database,
sends the same sequential ``CreateResponse`` (echo, store=true) over gRPC and as JSON over
HTTP, and prints the latencies and the shim's added cost. Bounded: a few thousand requests,
then everything it started is stopped.

    python scripts/bench_shim.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc.aio
import httpx

from venna.responses.v1 import response_pb2, service_pb2, service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure_grpc(address: str, key: str, count: int) -> list[float]:
    message = response_pb2.Item()
    message.message.role = response_pb2.ROLE_USER
    message.message.content.add().input_text.text = "hello benchmark world"
    request = service_pb2.CreateResponseRequest(model="echo", input=[message])
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.ResponsesServiceStub(channel)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            await stub.CreateResponse(request, metadata=metadata)
            samples.append(time.perf_counter() - started)
    return samples


async def measure_http(base_url: str, key: str, count: int) -> list[float]:
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "echo", "input": "hello benchmark world"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            reply = await client.post("/responses", json=body)
            reply.raise_for_status()
            samples.append(time.perf_counter() - started)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        db = Path(scratch) / "bench.db"
        venna = [sys.executable, "-m", "server.cli"]
        key = subprocess.run(
            [*venna, "keys", "create", "--workspace", "bench", "--db", str(db)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        server = subprocess.Popen(
            [
                *venna,
                "serve",
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            match = re.search(r"gRPC on (\S+), HTTP on (\S+),", server.stdout.readline())
            assert match, "venna serve did not start"
            grpc_address, base_url = match.groups()
            warmup = max(50, options.requests // 10)
            asyncio.run(measure_grpc(grpc_address, key, warmup))
            asyncio.run(measure_http(base_url, key, warmup))
            grpc_samples = asyncio.run(measure_grpc(grpc_address, key, options.requests))
            http_samples = asyncio.run(measure_http(base_url, key, options.requests))
        finally:
            server.terminate()
            server.wait(timeout=30)
            if server.stdout is not None:
                server.stdout.close()

    rows = []
    for name, samples in (("gRPC CreateResponse", grpc_samples), ("HTTP POST /v1/responses", http_samples)):
        rows.append(
            (name, statistics.median(samples), percentile(samples, 0.99), len(samples) / sum(samples))
        )
    print(f"{'path':<26}{'p50 µs':>10}{'p99 µs':>10}{'req/s':>10}")
    for name, p50, p99, rate in rows:
        print(f"{name:<26}{p50 * 1e6:>10.0f}{p99 * 1e6:>10.0f}{rate:>10.0f}")
    added = rows[1][1] - rows[0][1]
    print(
        f"shim adds {added * 1e6:.0f} µs per request at p50 ({rows[1][1] / rows[0][1]:.2f}x the gRPC latency)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
