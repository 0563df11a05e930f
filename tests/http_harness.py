"""A real Venna — gRPC service and HTTP shim — on loopback, in a thread with its own event loop,
so that blocking clients (the sync openai SDK, httpx) can call it from the test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway_http.app import create_app
from gateway_http.client import ChannelClient, InProcessClient, ServiceClient, open_channel
from gateway_http.server import HttpServer
from server.app import ServerConfig, VennaServer

TRANSPORTS = ("in_process", "channel")


@dataclass
class HttpVenna:
    db_path: Path
    transport: str = "in_process"
    keepalive_seconds: float = 15.0
    max_body_bytes: int | None = None
    base_url: str = ""
    grpc_address: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    @property
    def alpha(self) -> str:
        return self.keys["alpha"]

    @property
    def beta(self) -> str:
        return self.keys["beta"]

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="venna-test-server", daemon=True
        )
        self._thread.start()
        if not ready.wait(30):
            raise TimeoutError("Venna did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as error:  # reported to the test thread
            self._error = error
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = VennaServer(
            ServerConfig(grpc_listen="127.0.0.1:0", db_path=self.db_path, shutdown_grace=1.0)
        )
        await server.start()
        channel = None
        client: ServiceClient
        if self.transport == "channel":
            channel = open_channel(server.address)
            client = ChannelClient(channel)
        else:
            client = InProcessClient(server.handler)
        options: dict[str, object] = {"keepalive_seconds": self.keepalive_seconds}
        if self.max_body_bytes is not None:
            options["max_body_bytes"] = self.max_body_bytes
        http = HttpServer(create_app(client, **options), "127.0.0.1:0", shutdown_grace=1.0)
        await http.start()
        for workspace in ("alpha", "beta"):
            self.keys[workspace], _ = await server.db.call(server.db.store.create_key, workspace)
        self.base_url = f"http://127.0.0.1:{http.port}/v1"
        self.grpc_address = server.address
        ready.set()
        await self._stop.wait()
        await asyncio.gather(http.stop(), server.drain(grace=0.5))
        if channel is not None:
            await channel.close(grace=None)
        server.close()


@pytest.fixture(params=TRANSPORTS)
def http_venna(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HttpVenna]:
    """Venna over HTTP, once with the shim calling the service in process, once over a channel."""
    venna = HttpVenna(tmp_path / "venna.db", transport=request.param)
    venna.start()
    try:
        yield venna
    finally:
        venna.stop()
