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
from grpc_reflection.v1alpha import reflection_pb2_grpc

from venna.backends.store import open_store
from venna.backends.tracing import traced_store
from venna.responses.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    conversations_pb2,
    conversations_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    service_pb2,
    service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from venna.server import tracing
from venna.server.admin import AdminService
from venna.server.auth import DEFAULT_MAX_CONCURRENT_PER_KEY, Authenticator, open_handler
from venna.server.conversations import ConversationsService
from venna.server.creation import DEFAULT_MAX_BACKGROUND_PER_WORKSPACE, DEFAULT_MAX_CHAIN_DEPTH, Creation
from venna.server.metrics import Metrics
from venna.server.models import ModelsService
from venna.server.quotas import Quotas
from venna.server.reflection import V1_SERVICE_NAME, reflection_servicer, v1_handlers
from venna.server.routing import Router, default_router
from venna.server.runner import BackgroundRunner
from venna.server.service import ResponsesService
from venna.server.tls import TlsFiles
from venna.server.usage import UsageService
from venna.server.validation import Limits, check_limits

log = logging.getLogger(__name__)

# How long the store may take to answer a readiness probe's ping.
READY_STORE_TIMEOUT = 1.0

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["ResponsesService"].full_name
USAGE_SERVICE_NAME = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
MODELS_SERVICE_NAME = models_pb2.DESCRIPTOR.services_by_name["ModelsService"].full_name
CONVERSATIONS_SERVICE_NAME = conversations_pb2.DESCRIPTOR.services_by_name["ConversationsService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# The calls that reach a model: each is admitted within its workspace's limits.
METERED_METHODS = frozenset(
    {(SERVICE_NAME, "CreateResponse"), (SERVICE_NAME, "StreamResponse"), (SERVICE_NAME, "CompactResponse")}
)


@dataclass(slots=True)
class ServerConfig:
    grpc_listen: str = "127.0.0.1:50051"
    # A SQLite file, or a postgresql:// URL.
    db_path: str | Path = field(default_factory=lambda: Path("venna.db"))
    # Seconds in-flight calls and background responses get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    background_concurrency: int = 64
    # How long this process holds an unfinished response without renewing its lease: after a
    # crash, another replica settles or re-runs the response within about this long.
    lease_seconds: float = 30.0
    # The routing table (upstreams, aliases); ./venna.toml when unset and that file exists.
    routing_config: Path | None = None
    # How long an accepted key is trusted without asking the store: a revoked key keeps
    # working in a running server for at most this long.
    key_cache_seconds: float = 5.0
    # The largest request message (and HTTP body) accepted; gRPC's own default is 4 MiB,
    # too small for long histories and inline files.
    max_request_bytes: int = 32 * 1024 * 1024
    # Responses that may precede a new one in its previous_response_id chain.
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    # Background responses one workspace may have queued or running in this process.
    max_background_per_workspace: int = DEFAULT_MAX_BACKGROUND_PER_WORKSPACE
    # Size limits of one create request (input items, model name).
    limits: Limits = field(default_factory=Limits)
    # Calls and streams one key may run at once in this process; more get RESOURCE_EXHAUSTED.
    max_concurrent_per_key: int = DEFAULT_MAX_CONCURRENT_PER_KEY
    # Calls and streams the process runs at once, every key together.
    max_concurrent_rpcs: int = 4096
    # gRPC connections: open connections at once; streams at once on one connection (above
    # them, a client's new calls wait for one to end).
    max_connections: int = 1000
    max_streams_per_connection: int = 1024
    # Seconds a new connection gets to finish its HTTP/2 handshake.
    handshake_timeout: float = 10.0
    # Idle seconds (no call running) after which a connection is closed.
    max_connection_idle: float = 300.0
    # Seconds after which a connection is asked to go away (clients reconnect), and the grace
    # its running calls then get before it is closed.
    max_connection_age: float = 3600.0
    max_connection_age_grace: float = 600.0
    # A ping after this many seconds without traffic, and the connection is closed when its
    # answer takes longer than keepalive_timeout: dead peers do not hold connections.
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    # The gRPC port's certificate and key (and client CA, for mutual TLS); None: plaintext.
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        counts = (
            "max_request_bytes",
            "max_chain_depth",
            "max_background_per_workspace",
            "max_concurrent_per_key",
            "max_concurrent_rpcs",
            "max_connections",
        )
        durations = (
            "handshake_timeout",
            "max_connection_idle",
            "max_connection_age",
            "max_connection_age_grace",
            "keepalive_time",
            "keepalive_timeout",
            "lease_seconds",
        )
        for name in (*counts, "max_streams_per_connection", *durations):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments for these settings."""

        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        return [
            ("grpc.max_receive_message_length", self.max_request_bytes),
            # gRPC shares ports by default: a second server on a busy port would silently
            # take half the calls (with its own database) instead of failing to start.
            ("grpc.so_reuseport", 0),
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout)),
            ("grpc.max_connection_idle_ms", ms(self.max_connection_idle)),
            ("grpc.max_connection_age_ms", ms(self.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace)),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout)),
            # grpc 1.85 closes a connection on an unanswered ping only after this one (one
            # minute by default), whatever keepalive_timeout_ms says.
            ("grpc.http2.ping_timeout_ms", ms(self.keepalive_timeout)),
            # Idle connections too: a vanished peer's connection goes long before max idle.
            ("grpc.keepalive_permit_without_calls", 1),
        ]


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
        # With tracing on, a span per store operation (the store itself otherwise).
        self.store = traced_store(open_store(config.db_path), config.db_path)
        self.metrics = Metrics()
        self.store.observe_commits(self.metrics.store_committed)
        self.router = router or default_router(config.routing_config, observer=self.metrics)
        self.runner = BackgroundRunner(
            self.store, self.router, config.background_concurrency, lease_seconds=config.lease_seconds
        )
        creation = Creation(
            self.store,
            self.router,
            self.runner,
            max_chain_depth=config.max_chain_depth,
            max_background_per_workspace=config.max_background_per_workspace,
        )
        self.metrics.watch_background(self.runner.counts)
        creation.on_finished(self.metrics.count_usage)
        self.runner.on_finished(self.metrics.count_usage)
        self.quotas = Quotas(self.store, config.key_cache_seconds)
        creation.on_finished(self.quotas.record)
        self.runner.on_finished(self.quotas.record)
        self.service = ResponsesService(self.store, self.runner, creation)
        self.usage = UsageService(self.store)
        self.models = ModelsService(self.router)
        self.conversations = ConversationsService(self.store, creation)
        self.admin = AdminService(self.store, self.quotas)
        self.health = _Health()
        self.authenticator = Authenticator(
            self.store, config.key_cache_seconds, config.max_concurrent_per_key, self.quotas
        )
        self.server = grpc.aio.server(
            options=config.grpc_options(), maximum_concurrent_rpcs=config.max_concurrent_rpcs
        )
        # Every method of our services needs a key: each handler is wrapped once, here.
        recorder = _HandlerRecorder()
        service_pb2_grpc.add_ResponsesServiceServicer_to_server(self.service, recorder)  # type: ignore[arg-type]
        usage_pb2_grpc.add_UsageServiceServicer_to_server(self.usage, recorder)  # type: ignore[arg-type]
        models_pb2_grpc.add_ModelsServiceServicer_to_server(self.models, recorder)  # type: ignore[arg-type]
        conversations_pb2_grpc.add_ConversationsServiceServicer_to_server(self.conversations, recorder)  # type: ignore[arg-type]
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, recorder)  # type: ignore[arg-type]
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

        def within_limits(request: service_pb2.CreateResponseRequest) -> None:
            check_limits(request, config.limits)

        checks = {
            (SERVICE_NAME, "CreateResponse"): within_limits,
            (SERVICE_NAME, "StreamResponse"): within_limits,
        }
        for service, handlers in recorder.services.items():
            wrapped = {
                name: self.metrics.wrap(
                    service,
                    name,
                    self.authenticator.wrap(
                        handler,
                        checks.get((service, name)),
                        metered=(service, name) in METERED_METHODS,
                        admin=service == ADMIN_SERVICE_NAME,
                    ),
                )
                for name, handler in handlers.items()
            }
            # Outermost: a call's span covers all of it, and parents the store's and upstream's.
            wrapped = {name: tracing.wrap(service, name, handler) for name, handler in wrapped.items()}
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            self.server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]  # not in grpc-stubs
            self._handlers.update({f"/{service}/{name}": handler for name, handler in wrapped.items()})
        # Health and reflection need no key; their handlers only learn to refuse what cannot
        # be decoded.
        open_services = _HandlerRecorder()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, open_services)
        reflecting = reflection_servicer(
            (
                SERVICE_NAME,
                USAGE_SERVICE_NAME,
                MODELS_SERVICE_NAME,
                CONVERSATIONS_SERVICE_NAME,
                ADMIN_SERVICE_NAME,
                health.SERVICE_NAME,
            )
        )
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflecting, open_services)
        open_services.add_registered_method_handlers(V1_SERVICE_NAME, v1_handlers(reflecting))
        for service, handlers in open_services.services.items():
            opened = {name: open_handler(handler) for name, handler in handlers.items()}
            self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, opened),))
            self.server.add_registered_method_handlers(service, opened)  # type: ignore[attr-defined]
        self.port = 0
        self.started = False
        self.draining = False

    async def start(self) -> None:
        # Read first: a bad file is reported before the store is opened or a port bound.
        credentials = self.config.tls.read().server_credentials() if self.config.tls else None
        await self.store.open(serving=True)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(self.config.grpc_listen)
            else:
                self.port = self.server.add_secure_port(self.config.grpc_listen, credentials)
        except RuntimeError:
            self.port = 0  # grpc's way of saying the address is taken or invalid
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.grpc_listen} (in use, or not a local address)")
        await self.server.start()
        await self.runner.start()
        for name in (
            "",
            SERVICE_NAME,
            USAGE_SERVICE_NAME,
            MODELS_SERVICE_NAME,
            CONVERSATIONS_SERVICE_NAME,
            ADMIN_SERVICE_NAME,
        ):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.started = True
        log.info("gRPC listening on %s%s", self.address, " (TLS)" if credentials else "")

    async def handler(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler of a method as the gRPC server runs it, authentication included."""
        return self._handlers.get(method_path)

    @property
    def address(self) -> str:
        host = self.config.grpc_listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def ready(self) -> bool:
        """Whether a load balancer should send calls here: started, not draining, and the store
        answers within a second."""
        if not self.started or self.draining:
            return False
        try:
            async with asyncio.timeout(READY_STORE_TIMEOUT):
                await self.store.ping()
        except Exception:
            return False
        return True

    async def announce_drain(self, seconds: float) -> None:
        """Reports NOT_SERVING (health, /readyz) for ``seconds`` while still serving, so that
        load balancers stop sending calls before the listeners close."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def drain(self, grace: float | None = None) -> None:
        """Stops taking calls and lets in-flight ones (and background work) finish within ``grace``."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.draining = True
        await self.health.enter_graceful_shutdown()
        await self.health.end_watches()
        await asyncio.gather(self.server.stop(grace), self.runner.shutdown(grace))
        await self.service.drain()
        await self.router.aclose()

    async def close(self) -> None:
        await self.quotas.close()
        await self.store.close()

    async def stop(self, grace: float | None = None) -> None:
        await self.drain(grace)
        await self.close()


class _WatchContext:
    """A Watch call's context that notes when the call has been told a status other than
    SERVING (the news a draining server must deliver before it ends the call)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self.told_not_serving = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if message.status != health_pb2.HealthCheckResponse.SERVING:
            self.told_not_serving.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Health(health.aio.HealthServicer):  # type: ignore[misc,name-defined]  # untyped package
    """gRPC health, with ``List`` (the package's asyncio servicer leaves it unimplemented), and
    Watch calls that end when the server closes: the package's run forever, so that one open
    Watch (a load balancer's, a sidecar's) held every shutdown for its whole grace period."""

    # How long a closing server waits for its watchers to be sent NOT_SERVING.
    TELL_WATCHERS_SECONDS = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._watches: dict[asyncio.Task[Any], _WatchContext] = {}
        self._closing = False

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        watching = _WatchContext(context)
        self._watches[task] = watching
        try:
            await super().Watch(request, watching)
        except asyncio.CancelledError:
            # Ended by end_watches (and by nothing else): the call ends OK, its last word sent.
            if not self._closing or task.cancelling() > 1 or context.cancelled():
                raise
            task.uncancel()
        finally:
            del self._watches[task]

    async def end_watches(self) -> None:
        """Ends every open Watch once it has been told NOT_SERVING (or after a second)."""
        self._closing = True
        watches = dict(self._watches)
        if not watches:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.TELL_WATCHERS_SECONDS):
                await asyncio.gather(*(watch.told_not_serving.wait() for watch in watches.values()))
        for task in watches:
            task.cancel()

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        statuses = dict(getattr(self, "_server_status", {}))
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()
            }
        )


def stop_signals() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT, its handlers installed now: a process
    installs them before it says it is ready, so that a signal sent right after is never met
    by the default action (an immediate exit, with no drain)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    await stop_signals().wait()
