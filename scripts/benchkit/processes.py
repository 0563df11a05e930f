"""The servers a run starts (Venna and the bare baselines), each in its own process on a free
loopback port, and their memory."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchkit.config import BASELINES, ROOT, STARTUP_TIMEOUT, Profile


def child_env() -> dict[str, str]:
    """The environment of the processes this script starts: the project importable from its
    checkout, output unbuffered."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}


def venna_cli(*args: str) -> str:
    """What a ``venna`` command prints (a key, say); raises if it fails."""
    return subprocess.run(
        [sys.executable, "-m", "venna.cli", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


class ServerProcess:
    """A server in its own process whose first stdout line says where it listens."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("w")
        try:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True, env=child_env()
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def first_line(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """Waits for the start-up line; raises if the process exits or stays silent."""
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.log_text()[-2000:]}")
        return line.strip()

    def rss_bytes(self) -> int:
        """Resident set size, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within a few seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


class PeakRss:
    """Samples a server's RSS every few milliseconds on a thread, keeping the largest."""

    def __init__(self, server: ServerProcess | None, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.server is not None
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, self.server.rss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        if self.server is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self._stop.set()
            self._thread.join()


@dataclass(slots=True)
class VennaHandle:
    grpc_target: str
    http_base: str  # ends in /v1
    key: str
    db_path: str | Path  # a SQLite file, or a postgresql:// URL
    process: ServerProcess


@dataclass(slots=True)
class BaselineHandle:
    address: str
    process: ServerProcess


class Bench:
    """Runs the sections: owns the scratch directory, the profile and every server started."""

    def __init__(self, scratch: Path, profile: Profile, client_processes: int) -> None:
        self.scratch = scratch
        self.profile = profile
        self.client_processes = client_processes
        self._count = 0
        # Non-empty server logs (warnings, errors), by server name.
        self.server_logs: dict[str, str] = {}

    def _next(self, name: str) -> str:
        self._count += 1
        return f"{self._count:02d}-{name}"

    @contextlib.contextmanager
    def venna(self, config: Path | None = None, database: str | None = None) -> Iterator[VennaHandle]:
        """A fresh ``venna serve`` over a new database (a SQLite file, or the empty PostgreSQL
        ``database`` URL), with one workspace key (and the routing table ``config``, if given)."""
        name = self._next("venna")
        db: str | Path = database if database is not None else self.scratch / f"{name}.db"
        command = [sys.executable, "-m", "venna.cli"]
        key = venna_cli("keys", "create", "--workspace", "bench", "--db", str(db))
        server = ServerProcess(
            name,
            [
                *command,
                "serve",
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                "--log-level",
                "WARNING",
                "--shutdown-grace",
                "2",
                *(["--config", str(config)] if config is not None else []),
            ],
            self.scratch / f"{name}.log",
        )
        try:
            line = server.first_line()
            match = re.search(r"gRPC on (\S+), HTTP on (\S+),", line)
            if match is None:
                raise RuntimeError(f"unexpected start-up line from venna serve: {line!r}")
            yield VennaHandle(match.group(1), match.group(2), key, db, server)
        finally:
            server.stop()
            self._keep_log(server)

    @contextlib.contextmanager
    def baseline(self, kind: str) -> Iterator[BaselineHandle]:
        """A bare ``grpc`` or ``http`` server from bench_baselines.py."""
        name = self._next(f"bare-{kind}")
        server = ServerProcess(
            name,
            [sys.executable, str(BASELINES), kind, "--listen", "127.0.0.1:0"],
            self.scratch / f"{name}.log",
        )
        try:
            yield BaselineHandle(server.first_line(), server)
        finally:
            server.stop()
            self._keep_log(server)

    def _keep_log(self, server: ServerProcess) -> None:
        text = server.log_text().strip()
        if text:
            self.server_logs[server.name] = text
