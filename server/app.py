"""Assembles and runs the gRPC server: store, router, runner, service, auth, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from backends.store import AsyncStore, Store
from server.auth import Authenticator
from server.routing import Router, default_router
from server.runner import BackgroundRunner
from server.service import ResponsesService
from server.usage import UsageService
from venna.responses.v1 import service_pb2, service_pb2_grpc, usage_pb2, usage_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["ResponsesService"].full_name
USAGE_SERVICE_NAME = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name


@dataclass(slots=True)
class ServerConfig:
    grpc_listen: str = "127.0.0.1:50051"
    db_path: Path = field(default_factory=lambda: Path("venna.db"))
    # Seconds in-flight calls and background responses get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    background_concurrency: int = 64
    # The routing table (upstreams, aliases); ./venna.toml when unset and that file exists.
    routing_config: Path | None = None
    # How long an accepted key is trusted without asking the store: a revoked key keeps
    # working in a running server for at most this long.
    key_cache_seconds: float = 5.0


class _HandlerRecorder:
    """Receives what the generated add_…_to_server registers, so that the handlers can be
    wrapped once and in-process callers use exactly the handlers the gRPC server serves."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.services.setdefault(service, {}).update(handlers)


class VennaServer:
    """A running server; ``start()`` binds, ``stop()`` drains and closes."""

    def __init__(self, config: ServerConfig, router: Router | None = None) -> None:
        self.config = config
        self.db = AsyncStore(Store(config.db_path))
        self.router = router or default_router(config.routing_config)
        self.runner = BackgroundRunner(self.db, self.router, config.background_concurrency)
        self.service = ResponsesService(self.db, self.router, self.runner)
        self.usage = UsageService(self.db)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # untyped package
        self.authenticator = Authenticator(self.db, config.key_cache_seconds)
        self.server = grpc.aio.server(
            # Requests may carry long histories and inline files; gRPC's default is 4 MiB.
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # gRPC shares ports by default: a second server on a busy port would silently
                # take half the calls (with its own database) instead of failing to start.
                ("grpc.so_reuseport", 0),
            ],
        )
        # Every method of our services needs a key: each handler is wrapped once, here.
        recorder = _HandlerRecorder()
        service_pb2_grpc.add_ResponsesServiceServicer_to_server(self.service, recorder)  # type: ignore[arg-type]
        usage_pb2_grpc.add_UsageServiceServicer_to_server(self.usage, recorder)  # type: ignore[arg-type]
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for service, handlers in recorder.services.items():
            wrapped = {name: self.authenticator.wrap(handler) for name, handler in handlers.items()}
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            self.server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]  # not in grpc-stubs
            self._handlers.update({f"/{service}/{name}": handler for name, handler in wrapped.items()})
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, USAGE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> None:
        try:
            self.port = self.server.add_insecure_port(self.config.grpc_listen)
        except RuntimeError:
            self.port = 0  # grpc's way of saying the address is taken or invalid
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.grpc_listen} (in use, or not a local address)")
        await self.server.start()
        await self.runner.recover()
        for name in ("", SERVICE_NAME, USAGE_SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC listening on %s", self.address)

    async def handler(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler of a method as the gRPC server runs it, authentication included."""
        return self._handlers.get(method_path)

    @property
    def address(self) -> str:
        host = self.config.grpc_listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def drain(self, grace: float | None = None) -> None:
        """Stops taking calls and lets in-flight ones (and background work) finish within ``grace``."""
        grace = self.config.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), self.runner.shutdown(grace))
        await self.service.drain()
        await self.router.aclose()

    def close(self) -> None:
        self.db.close()

    async def stop(self, grace: float | None = None) -> None:
        await self.drain(grace)
        self.close()


async def wait_for_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
