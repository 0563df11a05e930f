"""Assembles and runs the gRPC server: store, router, runner, service, auth, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from venna.responses.v1 import service_pb2, service_pb2_grpc

from backends.store import AsyncStore, Store
from server.auth import AuthInterceptor
from server.routing import Router, default_router
from server.runner import BackgroundRunner
from server.service import ResponsesService

log = logging.getLogger(__name__)

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["ResponsesService"].full_name


@dataclass(slots=True)
class ServerConfig:
    grpc_listen: str = "127.0.0.1:50051"
    db_path: Path = field(default_factory=lambda: Path("venna.db"))
    # Seconds in-flight calls and background responses get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    background_concurrency: int = 64


class VennaServer:
    """A running server; ``start()`` binds, ``stop()`` drains and closes."""

    def __init__(self, config: ServerConfig, router: Router | None = None) -> None:
        self.config = config
        self.db = AsyncStore(Store(config.db_path))
        self.router = router or default_router()
        self.runner = BackgroundRunner(self.db, self.router, config.background_concurrency)
        self.service = ResponsesService(self.db, self.router, self.runner)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # untyped package
        self.server = grpc.aio.server(interceptors=[AuthInterceptor(self.db)])
        service_pb2_grpc.add_ResponsesServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> None:
        self.port = self.server.add_insecure_port(self.config.grpc_listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.grpc_listen}")
        await self.server.start()
        await self.runner.recover()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC listening on %s", self.address)

    @property
    def address(self) -> str:
        host = self.config.grpc_listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish within ``grace``, then closes the store."""
        grace = self.config.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), self.runner.shutdown(grace))
        await self.service.drain()
        self.db.close()


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    server = VennaServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"venna: gRPC on {server.address}, database {config.db_path}", flush=True)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", config.shutdown_grace)
    await server.stop()
