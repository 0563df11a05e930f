#!/usr/bin/env python3
"""A long fuzz run against a real ``venna serve``: the properties of tests/test_fuzz.py, for
minutes instead of seconds, with figures at the end.

    python scripts/fuzz.py [--minutes N | --examples N] [--seed N] [--only http|grpc] [--json PATH]

It starts ``venna serve`` over a fresh database in a scratch directory, on free loopback ports,
with two workspace keys made by ``venna keys create``; sends generated HTTP and gRPC requests
(tests/fuzzing.py) in turns; then shrinks each distinct failure to a small reproducer, restarts
the server on the same database (a stored row must never stop a start) and stops what it
started. Printed: cases by kind, statuses seen, 5xx and INTERNAL/UNKNOWN counts, tracebacks in
the server's log, and every distinct failure with its smallest case. Exit status 1 when any
property failed, the restart failed, or the server logged a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

try:
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("scripts/fuzz.py needs hypothesis: pip install -e '.[dev]'")

import httpx  # noqa: E402

from tests.fuzzing import (  # noqa: E402 - after the path is set
    GrpcCase,
    GrpcProbe,
    HttpCase,
    HttpProbe,
    Outcome,
    WireCase,
    grpc_cases,
    http_cases,
    make_known,
)

STARTUP_LINE = re.compile(r"gRPC on (\S+), HTTP on (http://\S+),")
BATCH = 50  # examples per hypothesis run; the clock is checked between runs


@dataclass
class Server:
    process: subprocess.Popen[str]
    grpc_address: str
    base_url: str


def venna(*args: str) -> list[str]:
    return [sys.executable, "-m", "venna.cli", *args]


def create_key(db: Path, workspace: str) -> str:
    made = subprocess.run(
        venna("keys", "create", "--workspace", workspace, "--db", str(db)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return made.stdout.strip()


@contextmanager
def serving(db: Path, config: Path, log: Path) -> Iterator[Server]:
    """``venna serve`` on free ports; stopped (SIGTERM, then SIGKILL) by its pid when done."""
    env = {
        **os.environ,
        "VENNA_LOG_LEVEL": "WARNING",
        # Nothing listens on the discard port: no request can reach a real upstream.
        "VENICE_BASE_URL": "http://127.0.0.1:9/v1",
        "VENICE_API_KEY": "",
    }
    argv = venna("serve", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0")
    argv += ["--db", str(db), "--config", str(config)]
    with log.open("a") as log_file:
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env
        )
    try:
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=60):
            raise RuntimeError("venna serve printed no start-up line within 60 s")
        line = process.stdout.readline()
        match = STARTUP_LINE.search(line)
        if match is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            raise RuntimeError(f"venna serve did not start (exit status {process.poll()}): {line!r}")
        yield Server(process, match.group(1), match.group(2))
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


# ------------------------------------------------------------------------------------ figures


@dataclass
class Failure:
    """One distinct failure: a property, the kind of case, and the status it got."""

    prop: str
    kind: str
    status: str
    detail: str
    case: HttpCase | GrpcCase | WireCase
    seed: int
    count: int = 1
    smallest: str = ""


@dataclass
class Figures:
    started: float = field(default_factory=time.monotonic)
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    properties: Counter[str] = field(default_factory=Counter)
    failures: dict[tuple[str, str, str], Failure] = field(default_factory=dict)
    server_errors: int = 0  # HTTP 5xx other than 501 for unknown paths
    internal: int = 0  # gRPC INTERNAL or UNKNOWN

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def record(self, case: HttpCase | GrpcCase | WireCase, outcome: Outcome, batch_seed: int) -> None:
        self.cases[outcome.kind] += 1
        transport = outcome.kind.split(".")[0]
        self.statuses[transport, outcome.status] += 1
        for prop, detail in outcome.failures:
            self.properties[prop] += 1
            self.server_errors += prop == "server_error"
            self.internal += prop == "grpc_internal"
            signature = (prop, outcome.kind, outcome.status)
            if signature in self.failures:
                self.failures[signature].count += 1
            else:
                self.failures[signature] = Failure(
                    prop, outcome.kind, outcome.status, detail, case, batch_seed
                )


def run_batch(
    cases: st.SearchStrategy[Any],
    probe: Callable[[Any], Outcome],
    batch_seed: int,
    examples: int,
    visit: Callable[[Any, Outcome], bool],
    phases: tuple[Phase, ...] = (Phase.generate,),
) -> None:
    """Runs ``examples`` generated cases; ``visit`` returning True fails the example (used to
    shrink one failure), so the main run never fails."""

    @seed(batch_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(data=st.data())
    def batch(data: st.DataObject) -> None:
        case = data.draw(cases)
        if visit(case, probe(case)):
            raise AssertionError("target failure")

    batch()


def shrink(
    failure: Failure, cases: st.SearchStrategy[Any], probe: Callable[[Any], Outcome], budget: float
) -> str:
    """The smallest case found within ``budget`` seconds that fails the same way, printed."""
    deadline = time.monotonic() + budget
    best: list[Any] = [failure.case]

    def size(case: Any) -> int:
        return len(repr(case))

    def visit(case: Any, outcome: Outcome) -> bool:
        if time.monotonic() > deadline:
            return False
        same = outcome.kind == failure.kind and outcome.status == failure.status
        if same and any(prop == failure.prop for prop, _ in outcome.failures):
            if size(case) < size(best[0]):
                best[0] = case
            return True
        return False

    def bounded(case: Any) -> Outcome:
        if time.monotonic() > deadline:
            return Outcome("timed out", "")
        return probe(case)

    # It ends with the target failure, or with hypothesis noting that the budget ran out.
    with contextlib.suppress(Exception):
        run_batch(cases, bounded, failure.seed, BATCH, visit, (Phase.generate, Phase.shrink))
    case = best[0]
    return case.reproducer() if isinstance(case, HttpCase | GrpcCase | WireCase) else repr(case)


def print_figures(figures: Figures, elapsed: float, extra: dict[str, Any]) -> None:
    print(f"\nfuzz: {figures.total} cases in {elapsed:.0f} s ({figures.total / max(elapsed, 1e-9):.1f}/s)")
    print("cases by kind:")
    for kind, count in sorted(figures.cases.items()):
        print(f"  {kind:<22} {count:>7}")
    print("statuses seen:")
    for (transport, status), count in sorted(figures.statuses.items()):
        print(f"  {transport:<5} {status:<22} {count:>7}")
    print(f"HTTP 5xx (other than 501 for unserved paths): {figures.server_errors}")
    print(f"gRPC INTERNAL or UNKNOWN: {figures.internal}")
    for key, value in extra.items():
        print(f"{key}: {value}")
    if not figures.failures:
        print("failures: none")
        return
    print(f"failures by property: {dict(figures.properties)}")
    print(f"{len(figures.failures)} distinct failures (property, kind, status):")
    for failure in figures.failures.values():
        print(f"\n- {failure.prop} / {failure.kind} / {failure.status}: {failure.count} cases")
        print(f"  {failure.detail}")
        print(f"  smallest case: {failure.smallest or failure.case.reproducer()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=None, help="run for this long (default 5)")
    parser.add_argument("--examples", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--seed", type=int, default=0, help="first hypothesis seed (default 0)")
    parser.add_argument("--only", choices=("http", "grpc"), help="one transport only")
    parser.add_argument(
        "--shrink-seconds", type=float, default=20.0, help="time to shrink each failure (default 20)"
    )
    parser.add_argument(
        "--shrink-total", type=float, default=180.0, help="time to shrink all failures (default 180)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here too")
    options = parser.parse_args(argv)
    warnings.filterwarnings("ignore", "Generating overly large repr")
    minutes = options.minutes if options.minutes is not None else (None if options.examples else 5.0)
    stop_at = time.monotonic() + minutes * 60 if minutes is not None else float("inf")
    limit = options.examples if options.examples is not None else 1 << 62

    with tempfile.TemporaryDirectory(prefix="venna-fuzz-") as scratch:
        directory = Path(scratch)
        db, config, log = directory / "venna.db", directory / "venna.toml", directory / "serve.log"
        config.write_text("# echo only: no upstream is configured\n")
        alpha, beta = create_key(db, "alpha"), create_key(db, "beta")
        figures = Figures()
        extra: dict[str, Any] = {}
        with serving(db, config, log) as server:
            print(
                f"fuzz: venna serve pid {server.process.pid}, gRPC {server.grpc_address}, {server.base_url}"
            )
            known = make_known(server.base_url, alpha, beta)
            # A response no case names, to find again after the restart.
            sentinel = httpx.post(
                server.base_url + "/responses",
                json={"model": "echo", "input": "kept"},
                headers={"authorization": f"Bearer {alpha}"},
                timeout=30,
            ).json()["id"]
            http, grpc_probe = HttpProbe(server.base_url, known), GrpcProbe(server.grpc_address, known)
            runs: list[tuple[str, st.SearchStrategy[Any], Callable[[Any], Outcome]]] = []
            if options.only != "grpc":
                runs.append(("http", http_cases(known), http.run))
            if options.only != "http":
                runs.append(("grpc", grpc_cases(known), grpc_probe.run))
            strategies = {name: (cases, probe) for name, cases, probe in runs}
            batch_seed = options.seed
            reported = time.monotonic()
            try:
                while time.monotonic() < stop_at and figures.total < limit:
                    for _, cases, probe in runs:
                        this_seed = batch_seed

                        def visit(case: Any, outcome: Outcome, batch: int = this_seed) -> bool:
                            figures.record(case, outcome, batch)
                            return False

                        def bounded(case: Any, probe: Callable[[Any], Outcome] = probe) -> Outcome:
                            if time.monotonic() >= stop_at or figures.total >= limit:
                                return Outcome("skipped", "")
                            return probe(case)

                        def counted(case: Any, outcome: Outcome, batch: int = this_seed) -> bool:
                            return False if outcome.kind == "skipped" else visit(case, outcome, batch)

                        run_batch(cases, bounded, this_seed, BATCH, counted)
                        batch_seed += 1
                    if time.monotonic() - reported > 30:
                        reported = time.monotonic()
                        print(
                            f"fuzz: {figures.total} cases, {len(figures.failures)} distinct failures",
                            flush=True,
                        )
                elapsed = time.monotonic() - figures.started
                shrink_until = time.monotonic() + options.shrink_total
                for failure in figures.failures.values():
                    budget = min(options.shrink_seconds, shrink_until - time.monotonic())
                    if budget > 0:
                        cases, probe = strategies[failure.kind.split(".")[0]]
                        failure.smallest = shrink(failure, cases, probe, budget)
            finally:
                http.close()
                grpc_probe.close()
            os.kill(server.process.pid, signal.SIGTERM)
            extra["exit status after SIGTERM"] = server.process.wait(timeout=30)
        extra["restart on the same database"] = restart_check(db, config, log, alpha, sentinel)
        log_text = log.read_text(errors="replace")
        extra["tracebacks in the server log"] = log_text.count("Traceback (most recent call last)")
        extra["ERROR lines in the server log"] = sum(" ERROR " in line for line in log_text.splitlines())
        print_figures(figures, elapsed, extra)
        if options.json is not None:
            options.json.write_text(json.dumps(_as_json(figures, elapsed, extra), indent=2))
        restarted_ok = extra["restart on the same database"] == "ok"
        clean_log = extra["tracebacks in the server log"] == 0
        return 1 if figures.failures or not restarted_ok or not clean_log else 0


def restart_check(db: Path, config: Path, log: Path, key: str, sentinel: str) -> str:
    """Whether ``venna serve`` starts again on the database the run left, and answers."""
    try:
        with serving(db, config, log) as server:
            reply = httpx.post(
                server.base_url + "/responses",
                json={"model": "echo", "input": "after the restart"},
                headers={"authorization": f"Bearer {key}"},
                timeout=30,
            )
            if reply.status_code != 200:
                return f"answered {reply.status_code}: {reply.text[:200]}"
            stored = httpx.get(
                f"{server.base_url}/responses/{sentinel}",
                headers={"authorization": f"Bearer {key}"},
                timeout=30,
            )
            return "ok" if stored.status_code == 200 else f"a stored response answered {stored.status_code}"
    except (RuntimeError, httpx.HTTPError) as error:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return f"failed: {error}; the log ends: {' | '.join(lines[-3:])[-600:]}"


def _as_json(figures: Figures, elapsed: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "seconds": round(elapsed, 1),
        "cases": figures.total,
        "cases_by_kind": dict(figures.cases),
        "statuses": {
            f"{transport} {status}": count for (transport, status), count in figures.statuses.items()
        },
        "http_5xx": figures.server_errors,
        "grpc_internal_or_unknown": figures.internal,
        **{key.replace(" ", "_"): value for key, value in extra.items()},
        "failures": [
            {
                "property": failure.prop,
                "kind": failure.kind,
                "status": failure.status,
                "count": failure.count,
                "detail": failure.detail,
                "smallest_case": failure.smallest or failure.case.reproducer(),
            }
            for failure in figures.failures.values()
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
