"""scripts/bench.py and scripts/bench_peers.py run end to end in their quick modes and report
real numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "grpc_unary",
    "grpc_stream",
    "http_unary",
    "http_sse",
    "chain",
    "memory",
    "background",
    "postgres",
}
# Rows whose figure is a difference of two measurements, which noise may make negative.
DIFFERENCES = ("shim: added latency",)


@pytest.mark.timeout(180)
def test_quick_benchmark_reports_every_section(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(results)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert str(results) in run.stdout

    document = json.loads(results.read_text())
    assert document["machine"]["cpu_count"] >= 1
    assert document["machine"]["grpcio"]
    assert document["failed_sections"] == {}
    assert set(document["sections"]) == SECTIONS
    for name, section in document["sections"].items():
        assert section["errors"] == [], name
        assert section["rows"], name
        for row in section["rows"]:
            if row["metric"].startswith(DIFFERENCES):
                continue
            assert row["venna"] > 0, (name, row)
            assert row["baseline"] is None or row["baseline"] > 0, (name, row)


@pytest.mark.timeout(120)
def test_quick_peer_benchmark_measures_venna_in_front_of_an_upstream(tmp_path: Path) -> None:
    """Without LiteLLM: the upstream directly, and Venna (storing and not) in front of it."""
    results = tmp_path / "peers.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_peers.py"),
            "--quick",
            "--litellm",
            "",
            "--json",
            str(results),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    document = json.loads(results.read_text())
    assert document["gateways"] == ["direct", "Venna (store)", "Venna (store: false)"]
    assert document["errors"] == []
    assert len(document["rows"]) == 10  # per Venna setting: req/s and p50 at c1 and c16, SSE events/s
    for row in document["rows"]:
        assert row["venna"] > 0 and row["baseline"] > 0, row
