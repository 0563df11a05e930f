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
    postgres     CreateResponse with the store on PostgreSQL (a throwaway local cluster) vs on
                 SQLite: req/s and p50 at concurrency 1, 16, 64; and, with two replicas on
                 that database, how much later a follower on the other replica receives each
                 event of a background response than a follower on the replica running it

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
import itertools
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
from benchkit.config import CLIENT_NOTE, QUICK, SECTIONS, UNARY_TEXT, Profile, Row, SectionResult
from benchkit.load import LoadSpec, auth, open_channel, stub_for, user_message, words_text
from benchkit.measure import alternate, check_result, measure_pair, summarize
from benchkit.processes import BaselineHandle, Bench, ServerProcess, VennaHandle
from benchkit.report import finite, machine_info, render_table
from benchkit.stats import median, percentile

from venna.backends.store.sqlite.queries import Store
from venna.backends.store.sqlite.schema import UNFINISHED_STATUSES

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    # The throwaway PostgreSQL cluster of the tests, for the postgres section.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.postgres_harness import throwaway_cluster
from venna.responses.v1 import response_pb2, service_pb2

# ------------------------------------------------------------------------------ sections


def unary_rows(
    bench: Bench, kind: str, label: str, venna_target: str, key: str, bare_target: str, section: SectionResult
) -> None:
    """Closed-loop req/s and latency of Venna and the baseline at each concurrency."""
    profile = bench.profile
    for concurrency in profile.concurrency:
        spec = LoadSpec(kind, venna_target, key, concurrency, profile.duration, profile.warmup)
        venna, bare = measure_pair(bench, spec, bare_target)
        check_result(venna, f"Venna {label} c{concurrency}", section)
        check_result(bare, f"bare {label} c{concurrency}", section)
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
        check_result(mine, f"Venna {title}", section)
        check_result(theirs, f"bare {title}", section)
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
    check_result(http, "Venna HTTP c1 (shim comparison)", section)
    check_result(direct, "Venna gRPC c1 (shim comparison)", section)
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
            while store.db.execute(
                f"SELECT 1 FROM responses WHERE status IN ({UNFINISHED_STATUSES}) LIMIT 1"
            ).fetchone():
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


def section_postgres(bench: Bench) -> SectionResult:
    """gRPC CreateResponse with the store on PostgreSQL (a throwaway local cluster) against the
    same on SQLite, alternating in one run: what the shared store costs."""
    section = SectionResult()
    with throwaway_cluster() as server:
        url = server.url("venna_bench")
        asyncio.run(_create_database(server.url("postgres"), "venna_bench"))
        with bench.venna(database=url) as on_postgres, bench.venna() as on_sqlite:
            profile = bench.profile
            for concurrency in profile.concurrency:
                spec = LoadSpec(
                    "grpc_unary",
                    on_postgres.grpc_target,
                    on_postgres.key,
                    concurrency,
                    profile.duration,
                    profile.warmup,
                )
                sqlite_spec = replace(spec, target=on_sqlite.grpc_target, key=on_sqlite.key)
                pg, lite = alternate(bench, [spec, sqlite_spec])
                check_result(pg, f"PostgreSQL c{concurrency}", section)
                check_result(lite, f"SQLite c{concurrency}", section)
                section.raw[f"c{concurrency}"] = {"postgres": summarize(pg), "sqlite": summarize(lite)}
                rate = Row(
                    f"gRPC CreateResponse on PostgreSQL c{concurrency} throughput",
                    "req/s",
                    pg.calls / pg.elapsed,
                    lite.calls / lite.elapsed,
                    baseline_label="SQLite",
                )
                if concurrency == 16:
                    rate.target = "ratio >= 0.7"
                    rate.met = rate.ratio is not None and rate.ratio >= 0.7
                p50 = Row(
                    f"gRPC CreateResponse on PostgreSQL c{concurrency} p50",
                    "ms",
                    median(pg.latencies) * 1e3,
                    median(lite.latencies) * 1e3,
                    baseline_label="SQLite",
                )
                section.rows += [rate, p50]
            # A second replica on the same database: followers of A's responses on B.
            with bench.venna(database=url) as second:
                delays = asyncio.run(_follow_delays(on_postgres, second, 3 if profile is QUICK else 12))
        section.raw["follow_delays_ms"] = [round(delay * 1e3, 3) for delay in delays]
        if not delays:
            section.errors.append("no event was followed on both replicas")
        else:
            delay_p50 = median(delays) * 1e3
            section.rows += [
                Row(
                    "follow on another replica: delay p50",
                    "ms",
                    delay_p50,
                    None,
                    target="< 20 ms",
                    met=delay_p50 < 20,
                ),
                Row("follow on another replica: delay p99", "ms", percentile(delays, 0.99) * 1e3, None),
            ]
    return section


async def _follow_delays(owner: VennaHandle, other: VennaHandle, responses: int) -> list[float]:
    """Per event of background responses run by ``owner``: when a follower on ``other``
    received it, less when a follower on ``owner`` did. The owner publishes an event to its own
    followers once it is stored, so the difference is the time from stored to received
    elsewhere (a notification, then a read). Events stored before the followers joined are
    left out."""
    delays: list[float] = []
    async with open_channel(owner.grpc_target) as to_owner, open_channel(other.grpc_target) as to_other:
        for _ in range(responses):
            request = service_pb2.CreateResponseRequest(
                model="echo:delay_ms=10", background=True, input=[user_message(words_text(150))]
            )
            made = await stub_for(to_owner).CreateResponse(request, metadata=auth(owner.key))

            on_owner, on_other = await asyncio.gather(
                _arrivals(to_owner, owner.key, made.id), _arrivals(to_other, other.key, made.id)
            )
            joined = max(min(on_owner.values()), min(on_other.values())) + 0.05
            delays += [
                on_other[number] - at for number, at in on_owner.items() if at > joined and number in on_other
            ]
    return delays


async def _arrivals(channel: grpc.aio.Channel, key: str, response_id: str) -> dict[int, float]:
    """When each event of the response reached a follower on ``channel``, by sequence number."""
    seen: dict[int, float] = {}
    resume = service_pb2.ResumeResponseStreamRequest(response_id=response_id)
    async for event in stub_for(channel).ResumeResponseStream(resume, metadata=auth(key)):
        seen[event.sequence_number] = time.perf_counter()
    return seen


async def _create_database(admin_url: str, name: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


RUNNERS: dict[str, Callable[[Bench], SectionResult]] = {
    "grpc_unary": section_grpc_unary,
    "grpc_stream": section_grpc_stream,
    "http_unary": section_http_unary,
    "http_sse": section_http_sse,
    "chain": section_chain,
    "memory": section_memory,
    "background": section_background,
    "postgres": section_postgres,
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
