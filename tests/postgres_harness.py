"""A throwaway PostgreSQL server for the tests: a cluster made with the installed ``initdb`` in
a temporary directory, started with ``pg_ctl`` on a free loopback port, stopped and removed at
the end of the session. Each test gets a database of its own.

``VENNA_TEST_POSTGRES_URL`` (a URL of a server whose user may create databases) uses that
server instead. As root, the cluster runs as the ``postgres`` user, which PostgreSQL requires.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest


@dataclass(frozen=True)
class PostgresServer:
    """A server tests may create databases on: ``url(name)`` names one of its databases."""

    host: str
    port: int
    user: str
    password: str | None = None

    def url(self, database: str) -> str:
        auth = self.user if self.password is None else f"{self.user}:{urllib.parse.quote(self.password)}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"


def _binaries() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError(
            "PostgreSQL is not installed (no pg_ctl): install it, or set VENNA_TEST_POSTGRES_URL"
        )
    return versions[-1].parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[PostgresServer]:
    """initdb, pg_ctl start on a free port; stop (immediately) and remove at the end."""
    binaries = _binaries()
    root = Path(tempfile.mkdtemp(prefix="venna-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: its files and process belong to "postgres".
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*argv: str) -> None:
        done = subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log_text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}{log_text}")

    try:
        run(
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        run(
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "start",
        )
        try:
            yield PostgresServer("127.0.0.1", port, "postgres")
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    given = os.environ.get("VENNA_TEST_POSTGRES_URL")
    if given:
        parts = urllib.parse.urlsplit(given)
        yield PostgresServer(
            parts.hostname or "127.0.0.1", parts.port or 5432, parts.username or "postgres", parts.password
        )
        return
    with throwaway_cluster() as server:
        yield server


def _admin(server: PostgresServer, statement: str) -> None:
    """Runs ``statement`` on the server's maintenance database, from a thread of its own (the
    caller may be inside a running event loop)."""

    async def run() -> None:
        connection = await asyncpg.connect(server.url("postgres"))
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result(timeout=60)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new, empty database on the test server (dropped afterwards); its URL."""
    name = "venna_test_" + secrets.token_hex(6)
    _admin(postgres_server, f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.url(name)
    finally:
        _admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
