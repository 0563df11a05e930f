"""The table on stdout and the description of the machine in the JSON output."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from benchkit.config import SectionResult


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 0.1 else f"{value:.3f}"


def render_table(results: dict[str, SectionResult]) -> str:
    header = ("metric", "unit", "Venna", "baseline", "base is", "ratio", "target", "")
    lines: list[tuple[str, ...]] = []
    for name, section in results.items():
        lines.append((f"[{name}]", "", "", "", "", "", "", ""))
        for row in section.rows:
            mark = "" if row.met is None else ("met" if row.met else "MISSED")
            ratio = row.ratio
            lines.append(
                (
                    "  " + row.metric,
                    row.unit,
                    _number(row.venna),
                    _number(row.baseline),
                    row.baseline_label if row.baseline is not None else "",
                    f"{ratio:.2f}" if ratio is not None else "",
                    row.target,
                    mark,
                )
            )
    widths = [max(len(line[index]) for line in [header, *lines]) for index in range(len(header))]
    right = {2, 3, 5}

    def render(line: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(widths[index]) if index in right else cell.ljust(widths[index])
            for index, cell in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(render(tuple("-" * width for width in widths)))
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so that the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("grpcio", "protobuf", "httpx", "uvicorn", "starlette"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
    }
