"""Generated requests against a real Venna, over HTTP and gRPC: whatever a client sends, the
server answers with a clear client error or a correct result, never a server error, and keeps
serving. The cases and properties are in tests/fuzzing.py; scripts/fuzz.py runs them for longer.

The run is deterministic (derandomized, no example database) and bounded: 1,200 cases per
transport, some ten seconds each on a laptop. ``VENNA_FUZZ_EXAMPLES`` changes the number for a
local run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import GrpcProbe, HttpProbe, Known, grpc_cases, http_cases, iter_failures, make_known
from tests.http_harness import HttpVenna
from venna.backends.echo import MODEL_NAMES, EchoBackend
from venna.server.routing import Router

# Hypothesis notes the size of the strategies' descriptions; that is not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

HTTP_EXAMPLES = int(os.environ.get("VENNA_FUZZ_EXAMPLES", "1200"))
GRPC_EXAMPLES = int(os.environ.get("VENNA_FUZZ_EXAMPLES", "1200"))
# Deterministic: derandomized and without an example database, so CI runs the same cases each time.
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpVenna, Known]]:
    """One Venna (gRPC and HTTP) serving only the echo model, so no case leaves the machine."""
    router = Router(dict.fromkeys(MODEL_NAMES, EchoBackend()))
    venna = HttpVenna(tmp_path_factory.mktemp("fuzz") / "venna.db", router=router)
    venna.start()
    try:
        yield venna, make_known(venna.base_url, venna.alpha, venna.beta)
    finally:
        venna.stop()


@pytest.fixture(scope="module")
def http_probe(target: tuple[HttpVenna, Known]) -> Iterator[HttpProbe]:
    venna, known = target
    probe = HttpProbe(venna.base_url, known, timeout=20)
    try:
        yield probe
    finally:
        probe.close()


@pytest.fixture(scope="module")
def grpc_probe(target: tuple[HttpVenna, Known]) -> Iterator[GrpcProbe]:
    venna, known = target
    probe = GrpcProbe(venna.grpc_address, known, timeout=20)
    try:
        yield probe
    finally:
        probe.close()


@pytest.mark.timeout(300)  # a failure is shrunk to its smallest case, which takes longer
@settings(FUZZ_SETTINGS, max_examples=HTTP_EXAMPLES)
@given(data=st.data())
def test_http_requests_get_a_clear_answer(http_probe: HttpProbe, data: st.DataObject) -> None:
    case = data.draw(http_cases(http_probe.known), label="case")
    outcome = http_probe.run(case)
    assert not outcome.failures, "\n".join([case.reproducer(), *iter_failures(outcome)])


@pytest.mark.timeout(300)
@settings(FUZZ_SETTINGS, max_examples=GRPC_EXAMPLES)
@given(data=st.data())
def test_grpc_requests_get_a_clear_status(grpc_probe: GrpcProbe, data: st.DataObject) -> None:
    case = data.draw(grpc_cases(grpc_probe.known), label="case")
    outcome = grpc_probe.run(case)
    assert not outcome.failures, "\n".join([case.reproducer(), *iter_failures(outcome)])


@pytest.mark.timeout(120)
def test_the_long_run_script_reports_its_figures(tmp_path: Path) -> None:
    """scripts/fuzz.py against its own `venna serve`: a short run, every figure reported."""
    figures_path = tmp_path / "fuzz.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "fuzz.py"
    run = subprocess.run(
        [sys.executable, str(script), "--examples", "100", "--json", str(figures_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    figures = json.loads(figures_path.read_text())
    assert figures["cases"] == 100
    assert {kind.split(".")[0] for kind in figures["cases_by_kind"]} == {"http", "grpc"}
    assert figures["http_5xx"] == figures["grpc_internal_or_unknown"] == 0
    assert figures["failures"] == []
    assert figures["restart_on_the_same_database"] == "ok"
    assert figures["exit_status_after_SIGTERM"] == 0
    assert figures["tracebacks_in_the_server_log"] == 0
