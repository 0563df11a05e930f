#!/usr/bin/env python3
"""Venna's HTTP shim against LiteLLM's proxy, both in front of the same upstream, in one run.

A gateway is judged by what it adds to the model's own latency and throughput. Both gateways
are put in front of the bare OpenAI-compatible Responses server of ``bench_baselines.py http``
(it answers at once, so the gateways' own work is all there is to see), and one Python client
(``scripts/bench.py``'s load generator: asyncio, one keep-alive connection per caller) drives,
in turns, the same ``POST /v1/responses`` calls against:

- direct: the upstream itself;
- Venna: ``venna serve`` with the upstream as an ``openai``-dialect routing-table entry,
  storing each response (its default) and, separately, with ``"store": false``;
- LiteLLM: ``litellm --config`` with the upstream as an ``openai/`` model (no database, so it
  stores nothing).

Every figure is reported next to the direct call's, measured in the same run. LiteLLM is not a
dependency of Venna; install it into a virtual environment of its own (it pins many packages)
and name its command:

    python -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'
    python scripts/bench_peers.py --litellm /tmp/litellm/bin/litellm [--quick] [--json PATH]

Without ``--litellm`` (or a ``litellm`` on PATH) it measures Venna and the upstream alone.
Everything it starts binds to 127.0.0.1 on free ports and is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from benchkit.config import Profile, Row, SectionResult
from benchkit.load import LoadResult, LoadSpec
from benchkit.measure import alternate, summarize
from benchkit.processes import Bench
from benchkit.report import machine_info, render_table
from benchkit.stats import median

# LiteLLM's proxy refuses to start without a master key; any long one will do on loopback.
LITELLM_KEY = "sk-bench-0123456789abcdef0123456789"
STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Gateway:
    """A server under load: its base URL (ending in /v1), key, model name and request fields."""

    name: str
    base_url: str
    key: str
    model: str
    body: tuple[tuple[str, Any], ...] = ()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[Any], log: Path) -> None:
    """Polls ``url`` until it answers at all (any status), or fails if the process exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited at start-up: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=2)
            return
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not start within {STARTUP_TIMEOUT:.0f} s")


@contextlib.contextmanager
def litellm(command: str, scratch: Path, upstream_url: str) -> Iterator[str]:
    """LiteLLM's proxy serving model ``echo`` from the upstream; yields its base URL."""
    config = scratch / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: echo\n"
        "    litellm_params:\n"
        "      model: openai/echo\n"
        f"      api_base: {upstream_url}\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )
    port = free_port()
    log = scratch / "litellm.log"
    # The model cost map is read from the package, not fetched from the network.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                command,
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            cwd=scratch,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health/liveliness", process, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(bench: Bench, gateways: list[Gateway], spec: LoadSpec) -> list[LoadResult]:
    specs = [
        replace(spec, target=gateway.base_url, key=gateway.key, model=gateway.model, body=gateway.body)
        for gateway in gateways
    ]
    return alternate(bench, specs)


def compare(bench: Bench, gateways: list[Gateway], quick: bool) -> SectionResult:
    """Unary JSON at concurrency 1 and 16, and concurrent SSE streams, each against direct."""
    profile = bench.profile
    section = SectionResult()
    direct = gateways[0]
    for concurrency in (1, 16):
        spec = LoadSpec("http_unary", "", "", concurrency, profile.duration, profile.warmup)
        results = measure(bench, gateways, spec)
        section.raw[f"unary_c{concurrency}"] = {
            gateway.name: summarize(result) for gateway, result in zip(gateways, results, strict=True)
        }
        base = results[0]
        for gateway, result in zip(gateways[1:], results[1:], strict=True):
            _errors(section, gateway, result, f"unary c{concurrency}")
            section.rows.append(
                Row(
                    f"{gateway.name}: POST /v1/responses c{concurrency}",
                    "req/s",
                    result.calls / result.elapsed,
                    base.calls / base.elapsed,
                    direct.name,
                )
            )
            section.rows.append(
                Row(
                    f"{gateway.name}: POST /v1/responses c{concurrency} p50",
                    "ms",
                    median(result.latencies) * 1e3,
                    median(base.latencies) * 1e3,
                    direct.name,
                )
            )
    streams, words = (4, 100) if quick else (16, 500)
    spec = LoadSpec("http_sse", "", "", streams, words=words)
    results = measure(bench, gateways, spec)
    section.raw["sse"] = {
        gateway.name: summarize(result) for gateway, result in zip(gateways, results, strict=True)
    }
    base = results[0]
    for gateway, result in zip(gateways[1:], results[1:], strict=True):
        _errors(section, gateway, result, "SSE")
        section.rows.append(
            Row(
                f"{gateway.name}: SSE, {streams} streams x {words} words",
                "events/s",
                result.events / result.elapsed,
                base.events / base.elapsed,
                direct.name,
            )
        )
    return section


def _errors(section: SectionResult, gateway: Gateway, result: LoadResult, what: str) -> None:
    if result.errors or not result.calls:
        section.errors.append(
            f"{gateway.name} {what}: {result.errors} failed calls, e.g. {result.error_samples[:2]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--litellm",
        default=shutil.which("litellm"),
        help="LiteLLM's command (see above); '' measures without it",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench-peers.json"),
        metavar="PATH",
        help="where to write every figure",
    )
    options = parser.parse_args(argv)
    profile = (
        Profile(duration=0.6, warmup=0.2, rounds=1)
        if options.quick
        else Profile(duration=4.0, warmup=0.5, rounds=2)
    )
    if not options.litellm:
        print("note: LiteLLM not found; measuring Venna alone (see --help to add LiteLLM)", file=sys.stderr)
    started = time.time()
    # The routing table names the variable that holds the upstream's key; this one takes any.
    os.environ.setdefault("BENCH_UPSTREAM_KEY", "unused")
    with tempfile.TemporaryDirectory(prefix="venna-peers-") as directory, contextlib.ExitStack() as stack:
        scratch = Path(directory)
        bench = Bench(scratch, profile, client_processes=1)
        upstream_url = f"http://{stack.enter_context(bench.baseline('http')).address}/v1"
        config = scratch / "venna.toml"
        config.write_text(
            f'[upstreams.local]\nbase_url = "{upstream_url}"\napi_key_env = "BENCH_UPSTREAM_KEY"\n'
            'dialect = "openai"\n'
        )
        venna = stack.enter_context(bench.venna(config))
        gateways = [
            Gateway("direct", upstream_url, "", "echo"),
            Gateway("Venna (store)", venna.http_base, venna.key, "local/echo"),
            Gateway("Venna (store: false)", venna.http_base, venna.key, "local/echo", (("store", False),)),
        ]
        if options.litellm:
            litellm_url = stack.enter_context(litellm(options.litellm, scratch, upstream_url))
            gateways.append(Gateway("LiteLLM", litellm_url, LITELLM_KEY, "echo"))
        section = compare(bench, gateways, options.quick)
    print(render_table({"peers": section}))
    print("ratio = gateway / direct call to the same upstream (for latencies, lower is better).")
    for error in section.errors:
        print(f"error: {error}", file=sys.stderr)
    report = {
        "machine": machine_info(),
        "wall_seconds": time.time() - started,
        "gateways": [gateway.name for gateway in gateways],
        "rows": [asdict(row) for row in section.rows],
        "raw": section.raw,
        "errors": section.errors,
    }
    options.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"wall time {report['wall_seconds']:.1f} s; results written to {options.json}")
    return 1 if section.errors else 0


if __name__ == "__main__":
    sys.exit(main())
