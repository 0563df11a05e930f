"""A real Venna — gRPC service and HTTP shim — on loopback, in a thread with its own event loop,
so that blocking clients (the sync openai SDK, httpx) can call it from the test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.loop_thread import LoopThread, Shutdown
from venna.gateway_http.app import create_app
from venna.gateway_http.client import ChannelClient, InProcessClient, ServiceClient, open_channel
from venna.gateway_http.server import DEFAULT_LIMITS, ConnectionLimits, HttpServer
from venna.server.app import ServerConfig, VennaServer
from venna.server.routing import Router

TRANSPORTS = ("in_process", "channel")


@dataclass
class HttpVenna(LoopThread):
    db_path: Path
    transport: str = "in_process"
    keepalive_seconds: float = 15.0
    max_body_bytes: int | None = None
    limits: ConnectionLimits = DEFAULT_LIMITS
    base_url: str = ""
    http_port: int = 0
    grpc_address: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    # The server, once started (its store, its quotas).
    server: VennaServer | None = None
    # Browser origins the shim answers CORS for; none: no CORS.
    cors_origins: tuple[str, ...] = ()
    # How long a WebSocket connection may last; None: the shim's default (an hour).
    websocket_max_seconds: float | None = None
    # The backends to serve; None: the default routing table (echo, and Venice from VENICE_*).
    router: Router | None = None
    thread_name = "venna-http-test"

    def __post_init__(self) -> None:
        LoopThread.__init__(self)

    @property
    def alpha(self) -> str:
        return self.keys["alpha"]

    @property
    def beta(self) -> str:
        return self.keys["beta"]

    @property
    def admin(self) -> str:
        return self.keys["admin"]

    async def startup(self) -> Shutdown:
        server = VennaServer(
            ServerConfig(grpc_listen="127.0.0.1:0", db_path=self.db_path, shutdown_grace=1.0), self.router
        )
        await server.start()
        channel = None
        client: ServiceClient
        if self.transport == "channel":
            channel = open_channel(server.address)
            client = ChannelClient(channel)
        else:
            client = InProcessClient(server.handler, check_key=server.authenticator.verify)
        options: dict[str, object] = {
            "keepalive_seconds": self.keepalive_seconds,
            "metrics": server.metrics.exposition,
            "cors_origins": self.cors_origins,
        }
        if self.max_body_bytes is not None:
            options["max_body_bytes"] = self.max_body_bytes
        if self.websocket_max_seconds is not None:
            options["websocket_max_seconds"] = self.websocket_max_seconds
        http = HttpServer(
            create_app(client, **options), "127.0.0.1:0", shutdown_grace=1.0, limits=self.limits
        )
        await http.start()
        for workspace in ("alpha", "beta"):
            self.keys[workspace], _ = await server.store.create_key(workspace)
        self.keys["admin"], _ = await server.store.create_admin_key()
        self.server = server
        self.base_url = f"http://127.0.0.1:{http.port}/v1"
        self.http_port = http.port
        self.grpc_address = server.address

        async def shutdown() -> None:
            await asyncio.gather(http.stop(), server.drain(grace=0.5))
            if channel is not None:
                await channel.close(grace=None)
            await server.close()

        return shutdown


def running(venna: HttpVenna) -> Iterator[HttpVenna]:
    """Starts ``venna`` for a fixture to yield from, and stops it when the fixture ends."""
    venna.start()
    try:
        yield venna
    finally:
        venna.stop()


@pytest.fixture(params=TRANSPORTS)
def http_venna(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HttpVenna]:
    """Venna over HTTP, once with the shim calling the service in process, once over a channel."""
    yield from running(HttpVenna(tmp_path / "venna.db", transport=request.param))
