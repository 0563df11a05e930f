#!/usr/bin/env python3
"""Venna against bare servers and a bare upstream, driven by C load generators.

A Python client cannot saturate a bare server, which inflates Venna's ratio; here the load comes
from h2load (gRPC, over HTTP/2) and wrk (HTTP/1.1), both C programs. Each figure is a median
over alternating rounds, Venna then its baseline, in the same run:

    grpc_create   gRPC CreateResponse (echo, store on), h2load: 1 connection, 16 streams;
                  against a bare grpc.aio server answering messages of the same size
    http_create   POST /v1/responses (echo, store on) through the shim, wrk: 16 connections;
                  against a bare starlette/uvicorn server
    upstream      POST /v1/responses through Venna to a bare upstream (scripts/bench_upstream.py,
                  replaying a reasoning-plus-message answer at once) against straight at it:
                  JSON and SSE, store on and off, over the Responses dialect ("openai") and
                  over chat completions ("chat"); wrk, 16 connections

Targets (c16): every ratio >= 0.5 (store on), and p99 <= 2x the baseline's where the load
generator reports it (wrk).

    python scripts/bench_c.py [--seconds 4] [--rounds 3] [--only SECTION[,SECTION]] [--quick]

h2load and wrk are not installed by this script: on Debian, ``apt-get install nghttp2-client
wrk``. Results go to a table on stdout and to bench-c-results.json. Exit status 1 if a load
generator is missing or calls failed during a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from benchkit.config import QUICK, ROOT, UNARY_TEXT, Profile
from benchkit.load import auth, user_message
from benchkit.processes import Bench, ServerProcess, VennaHandle

from venna.responses.v1 import service_pb2, service_pb2_grpc

SECTIONS = ("grpc_create", "http_create", "upstream")
CREATE_PATH = "/venna.responses.v1.ResponsesService/CreateResponse"
UPSTREAM_SCRIPT = ROOT / "scripts" / "bench_upstream.py"
# The environment variable holding the bare upstream's (meaningless) key, for Venna.
UPSTREAM_KEY_ENV = "VENNA_BENCH_UPSTREAM_KEY"
TARGET_RATIO = 0.5


@dataclass(slots=True)
class Load:
    """One load generator run: requests per second, latencies (ms) where it reports them."""

    rate: float
    mean_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0


@dataclass(slots=True)
class Row:
    metric: str
    venna: Load
    baseline: Load
    baseline_label: str
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.venna.rate / self.baseline.rate if self.baseline.rate else 0.0

    @property
    def p99_ratio(self) -> float | None:
        if self.venna.p99_ms is None or not self.baseline.p99_ms:
            return None
        return self.venna.p99_ms / self.baseline.p99_ms

    @property
    def met(self) -> bool:
        p99 = self.p99_ratio
        return self.ratio >= TARGET_RATIO and (p99 is None or p99 <= 2.0)


# ---------------------------------------------------------------------------------- generators

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def h2load(url: str, body: bytes, headers: dict[str, str], seconds: float, streams: int) -> Load:
    """h2load on one connection with ``streams`` concurrent streams, POSTing ``body``."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as data:
        data.write(body)
        data.flush()
        argv = [
            "h2load",
            "-c",
            "1",
            "-m",
            str(streams),
            "-D",
            str(max(1, round(seconds))),
            "--warm-up-time",
            "1",
            "-d",
            data.name,
        ]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        output = _run([*argv, url])
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    counts = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", output
    )
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", output)
    if rate is None or counts is None:
        raise RuntimeError(f"unreadable h2load output:\n{output}")
    return Load(
        rate=float(rate.group(1)),
        mean_ms=_milliseconds(timing.group(3)) if timing else None,
        failed=int(counts.group(2)) + int(counts.group(3)),
    )


def wrk(url: str, body: dict[str, Any], headers: dict[str, str], seconds: float, connections: int) -> Load:
    """wrk with ``connections`` connections on one thread, POSTing ``body`` as JSON."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines += [f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write("\n".join(lines) + "\n")
        script.flush()
        output = _run(
            [
                "wrk",
                "-t",
                "1",
                "-c",
                str(connections),
                "-d",
                f"{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ]
        )
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None:
        raise RuntimeError(f"unreadable wrk output:\n{output}")
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    mean = re.search(r"Latency\s+(\S+)", output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Load(
        rate=float(rate.group(1)),
        mean_ms=_milliseconds(mean.group(1)) if mean else None,
        p50_ms=_milliseconds(percentiles["50"]) if "50" in percentiles else None,
        p99_ms=_milliseconds(percentiles["99"]) if "99" in percentiles else None,
        failed=(int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0),
    )


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} … failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def median_load(loads: list[Load]) -> Load:
    def middle(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    return Load(
        rate=statistics.median(load.rate for load in loads),
        mean_ms=middle([load.mean_ms for load in loads]),
        p50_ms=middle([load.p50_ms for load in loads]),
        p99_ms=middle([load.p99_ms for load in loads]),
        failed=sum(load.failed for load in loads),
    )


def alternate(rounds: int, venna: Callable[[], Load], baseline: Callable[[], Load]) -> tuple[Load, Load]:
    """Venna, then the baseline, ``rounds`` times; the medians."""
    ours: list[Load] = []
    theirs: list[Load] = []
    for _ in range(rounds):
        ours.append(venna())
        theirs.append(baseline())
    return median_load(ours), median_load(theirs)


# ---------------------------------------------------------------------------------- sections


def grpc_frame(message: service_pb2.CreateResponseRequest) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def check_grpc(target: str, key: str, request: service_pb2.CreateResponseRequest) -> None:
    """One call as the load makes it, through grpcio: h2load counts a gRPC error as a success."""
    with grpc.insecure_channel(target) as channel:
        service_pb2_grpc.ResponsesServiceStub(channel).CreateResponse(request, metadata=auth(key), timeout=10)


def section_grpc_create(bench: Bench, options: argparse.Namespace) -> list[Row]:
    request = service_pb2.CreateResponseRequest(model="echo", input=[user_message(UNARY_TEXT)])
    body = grpc_frame(request)
    headers = {"content-type": "application/grpc", "te": "trailers"}
    with bench.venna() as venna, bench.baseline("grpc") as bare:
        check_grpc(venna.grpc_target, venna.key, request)
        ours, theirs = alternate(
            options.rounds,
            lambda: h2load(
                f"http://{venna.grpc_target}{CREATE_PATH}",
                body,
                {**headers, "authorization": f"Bearer {venna.key}"},
                options.seconds,
                16,
            ),
            lambda: h2load(f"http://{bare.address}{CREATE_PATH}", body, headers, options.seconds, 16),
        )
    return [Row("gRPC CreateResponse, h2load 1x16", ours, theirs, "bare grpc.aio")]


def section_http_create(bench: Bench, options: argparse.Namespace) -> list[Row]:
    body = {"model": "echo", "input": UNARY_TEXT}
    json_headers = {"Content-Type": "application/json"}
    with bench.venna() as venna, bench.baseline("http") as bare:
        ours, theirs = alternate(
            options.rounds,
            lambda: wrk(
                f"{venna.http_base}/responses",
                body,
                {**json_headers, "Authorization": f"Bearer {venna.key}"},
                options.seconds,
                16,
            ),
            lambda: wrk(f"http://{bare.address}/v1/responses", body, json_headers, options.seconds, 16),
        )
    return [Row("POST /v1/responses (shim), wrk c16", ours, theirs, "bare starlette")]


@contextmanager
def bare_upstream(bench: Bench) -> Iterator[str]:
    """scripts/bench_upstream.py in its own process; its base URL (ending in /v1)."""
    server = ServerProcess(
        "bare-upstream",
        [sys.executable, str(UPSTREAM_SCRIPT), "--listen", "127.0.0.1:0"],
        bench.scratch / "upstream.log",
    )
    try:
        yield f"http://{server.first_line()}/v1"
    finally:
        server.stop()


def section_upstream(bench: Bench, options: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    with bare_upstream(bench) as upstream:
        config = bench.scratch / "venna.toml"
        config.write_text(
            f'[upstreams.replay]\nbase_url = "{upstream}"\napi_key_env = "{UPSTREAM_KEY_ENV}"\n'
            'dialect = "openai"\n\n'
            f'[upstreams.replaychat]\nbase_url = "{upstream}"\ndialect = "chat"\n'
        )
        os.environ[UPSTREAM_KEY_ENV] = "bench"  # read by the Venna process started next
        with bench.venna(config=config) as venna:
            for dialect, prefix, path in (
                ("openai", "replay", "/responses"),
                ("chat", "replaychat", "/chat/completions"),
            ):
                for stream in (False, True):
                    direct: dict[str, Any] = {"model": "m", "stream": stream}
                    if dialect == "chat":
                        direct["messages"] = [{"role": "user", "content": "hi"}]
                    else:
                        direct["input"] = "hi"
                    for store in (True, False):
                        rows.append(
                            _upstream_row(
                                venna, upstream, options, dialect, prefix, path, direct, stream, store
                            )
                        )
    return rows


def _upstream_row(
    venna: VennaHandle,
    upstream: str,
    options: argparse.Namespace,
    dialect: str,
    prefix: str,
    path: str,
    direct: dict[str, Any],
    stream: bool,
    store: bool,
) -> Row:
    through = {"model": f"{prefix}/m", "input": "hi", "stream": stream, "store": store}
    headers = {"Content-Type": "application/json"}
    ours, theirs = alternate(
        options.rounds,
        lambda: wrk(
            f"{venna.http_base}/responses",
            through,
            {**headers, "Authorization": f"Bearer {venna.key}"},
            options.seconds,
            16,
        ),
        lambda: wrk(f"{upstream}{path}", direct, headers, options.seconds, 16),
    )
    kind = "SSE" if stream else "JSON"
    return Row(
        f"upstream {dialect} {kind}, store {'on' if store else 'off'}, wrk c16", ours, theirs, "direct"
    )


RUNNERS: dict[str, Callable[[Bench, argparse.Namespace], list[Row]]] = {
    "grpc_create": section_grpc_create,
    "http_create": section_http_create,
    "upstream": section_upstream,
}


# ---------------------------------------------------------------------------------- main


def render(rows: list[Row]) -> str:
    def ms(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    head = (
        f"{'metric':<44} {'Venna/s':>9} {'base/s':>9} {'ratio':>6} {'p99 ms':>8} {'base p99':>8}"
        f" {'target':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row.metric:<44} {row.venna.rate:>9,.0f} {row.baseline.rate:>9,.0f} {row.ratio:>6.2f}"
            f" {ms(row.venna.p99_ms):>8} {ms(row.baseline.p99_ms):>8} {'met' if row.met else 'MISSED':>7}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per side (median)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="one short round each: a smoke run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-c-results.json")
    options = parser.parse_args()
    if options.quick:
        options.seconds, options.rounds = 1.0, 1
    missing = [tool for tool in ("h2load", "wrk") if shutil.which(tool) is None]
    if missing:
        print(
            f"missing: {', '.join(missing)}; on Debian: apt-get install nghttp2-client wrk", file=sys.stderr
        )
        return 1
    chosen = [name.strip() for name in options.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    began = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="venna-bench-c-") as scratch:
        bench = Bench(Path(scratch), QUICK if options.quick else Profile(), client_processes=0)
        for name in chosen:
            rows += RUNNERS[name](bench, options)
    print(render(rows))
    failed = sum(row.venna.failed + row.baseline.failed for row in rows)
    options.json.write_text(
        json.dumps({"rows": [{**asdict(row), "ratio": row.ratio, "met": row.met} for row in rows]}, indent=2)
    )
    print(f"wall time {time.monotonic() - began:.0f} s; failed calls {failed}; results in {options.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
