"""Measuring Venna and a baseline under the same load, alternating rounds, and summarizing."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from benchkit.config import SectionResult
from benchkit.load import LoadResult, LoadSpec, run_load
from benchkit.processes import Bench, PeakRss, ServerProcess
from benchkit.stats import median, percentile


def alternate(
    bench: Bench, specs: list[LoadSpec], servers: list[ServerProcess | None] | None = None
) -> list[LoadResult]:
    """Runs the specs one after another in ``rounds`` rounds, each doing 1/rounds of a
    closed-loop duration, so that a change in the machine's load during the run falls on every
    side alike. Where ``servers`` names a spec's server, its peak RSS is recorded."""
    rounds = bench.profile.rounds
    specs = [replace(spec, duration=spec.duration / rounds) if spec.duration else spec for spec in specs]
    watched = servers or [None] * len(specs)
    results = [LoadResult() for _ in specs]
    for _ in range(rounds):
        for spec, server, result in zip(specs, watched, results, strict=True):
            with PeakRss(server) as rss:
                measured = run_load(spec, bench.client_processes)
            measured.peak_rss = rss.peak
            result.then(measured)
    return results


def measure_pair(
    bench: Bench,
    spec: LoadSpec,
    bare_target: str,
    servers: tuple[ServerProcess, ServerProcess] | None = None,
) -> tuple[LoadResult, LoadResult]:
    """Venna and the baseline under the same load, alternating."""
    bare_spec = replace(spec, target=bare_target, key="")
    venna, bare = alternate(bench, [spec, bare_spec], list(servers) if servers else None)
    return venna, bare


def check_result(result: LoadResult, what: str, section: SectionResult) -> None:
    if result.errors:
        section.errors.append(f"{what}: {result.errors} failed calls, e.g. {result.error_samples[:3]}")
    if not result.calls:
        section.errors.append(f"{what}: no call succeeded")


def summarize(result: LoadResult) -> dict[str, Any]:
    return {
        "calls": result.calls,
        "events": result.events,
        "errors": result.errors,
        "error_samples": result.error_samples,
        "elapsed_s": result.elapsed,
        "calls_per_s": result.calls / result.elapsed,
        "events_per_s": result.events / result.elapsed,
        "p50_ms": median(result.latencies) * 1e3,
        "p90_ms": percentile(result.latencies, 0.90) * 1e3,
        "p99_ms": percentile(result.latencies, 0.99) * 1e3,
        "max_ms": max(result.latencies, default=math.nan) * 1e3,
    }
