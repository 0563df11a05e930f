"""Runs the shim's ASGI app with uvicorn inside an existing event loop.

uvicorn bounds neither how long a client may take to send a request nor how many connections
it may hold, so a handful of slow or idle clients could pin any number of sockets. The
connections here are uvicorn's h11 protocol with those bounds added:

* request headers must arrive within ``header_timeout`` seconds of their first byte (of the
  connection's opening, for its first request), else the connection is closed;
* a request body must arrive within ``body_timeout`` seconds of its headers, else the client
  gets a 408 and the connection is closed;
* between requests, a connection stays open ``keep_alive_timeout`` seconds;
* connections beyond ``max_connections`` get a 503 and are closed at once;
* request headers larger than ``max_header_bytes`` get a 431.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import orjson
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from venna.gateway_http.tls import HttpTls

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How long and how many: the bounds every HTTP connection is held to."""

    # Enough for any real client on a slow network; a stalled or trickling one is let go.
    header_timeout: float = 10.0
    # A 32 MiB body at about 4 Mbit/s; bodies this size come from programs, not people typing.
    body_timeout: float = 60.0
    # Longer than the 60 s idle timeout of common load balancers (AWS ALB, nginx's upstream
    # keep-alive), so that the proxy, not this server, closes an idle pooled connection: the
    # other way round, a proxy may send a request on a connection just being closed (a 502).
    keep_alive_timeout: float = 75.0
    # Open connections per process, streams included; beyond it a client is turned away at once.
    max_connections: int = 2048
    # h11's own default, far above what any client of this API sends.
    max_header_bytes: int = 16 * 1024


DEFAULT_LIMITS = ConnectionLimits()


def _error_reply(status: int, reason: bytes, message: str, type_: str, code: str) -> bytes:
    """A complete HTTP/1.1 reply carrying an OpenAI error, for replies made outside the app."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            b"x-request-id: req_" + secrets.token_hex(16).encode() + b"\r\n",
            b"\r\n",
            body,
        )
    )


class _LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with read deadlines and a cap on connections.

    One deadline at a time runs per connection: for the headers while a request is awaited
    and bytes of it have come (or the connection just opened), for the body once the headers
    are in. Between requests, uvicorn's keep-alive timer applies.
    """

    limits: ClassVar[ConnectionLimits] = DEFAULT_LIMITS
    _REFUSED_LINGER_SECONDS = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout  # type: ignore[assignment]  # uvicorn says int
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting: str | None = None  # "headers" or "body" while a deadline runs
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse()
            return
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # whatever it sends, it is not served
        if self.conn.their_state is h11.IDLE:
            if self._awaiting is None:
                self._arm("headers")
            if self._header_bytes(data) > self.limits.max_header_bytes:
                self._reply_and_close(self._headers_too_large())
                return
        super().data_received(data)

    def _header_bytes(self, data: bytes) -> int:
        """The size of the request head received so far (h11 checks only heads still incomplete)."""
        pending = self.conn.trailing_data[0] + data
        ends = [end for end in (pending.find(b"\r\n\r\n"), pending.find(b"\n\n")) if end >= 0]
        return min(ends) if ends else len(pending)

    def _headers_too_large(self) -> bytes:
        return _error_reply(
            431,
            b"Request Header Fields Too Large",
            f"The request headers exceed {self.limits.max_header_bytes} bytes.",
            "invalid_request_error",
            "request_headers_too_large",
        )

    def _reply_and_close(self, reply: bytes) -> None:
        self._disarm()
        self.transport.write(reply)
        self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._awaiting != "body":
                self._arm("body")
        elif state is not h11.IDLE:
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot read: an OpenAI error, 431 when its headers were too large."""
        if len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            self._reply_and_close(self._headers_too_large())
        else:
            self._reply_and_close(
                _error_reply(
                    400,
                    b"Bad Request",
                    "The request is not valid HTTP/1.1.",
                    "invalid_request_error",
                    "invalid_http_request",
                )
            )

    # ------------------------------------------------------------------ deadlines

    def _arm(self, awaiting: str) -> None:
        self._disarm()
        seconds = self.limits.header_timeout if awaiting == "headers" else self.limits.body_timeout
        self._awaiting = awaiting
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._awaiting = None

    def _expired(self) -> None:
        awaiting, self._deadline, self._awaiting = self._awaiting, None, None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if awaiting == "body" and cycle is not None and not cycle.response_started:
            self.transport.write(
                _error_reply(
                    408,
                    b"Request Timeout",
                    f"The request body did not arrive within {self.limits.body_timeout:g} seconds.",
                    "invalid_request_error",
                    "request_timeout",
                )
            )
            # The app, still waiting for the body, learns the client is gone; anything it
            # would still send is dropped.
            cycle.response_started = cycle.response_complete = cycle.disconnected = True
            cycle.message_event.set()
        log.debug("closing a connection whose request %s did not arrive in time", awaiting)
        self.transport.close()

    def _refuse(self) -> None:
        """Turns the connection away with a 503, then lets the client read it before closing."""
        self._refused = True
        self.transport.write(
            _error_reply(
                503,
                b"Service Unavailable",
                f"The server has too many open connections (at most {self.limits.max_connections}); "
                "retry shortly.",
                "server_error",
                "too_many_connections",
            )
        )
        # Half-close, and close fully a moment later: closing at once while the client's request
        # is still arriving would reset the connection and could lose the reply.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(self._REFUSED_LINGER_SECONDS, self.transport.close)


def _protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    """The connection class of one server: uvicorn instantiates it with its own arguments."""
    return type("LimitedH11Protocol", (_LimitedH11Protocol,), {"limits": limits})


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the process that embeds it owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got '{address}'")
    return host.strip("[]"), int(port)


class HttpServer:
    """The shim on HOST:PORT; port 0 picks a free one (see ``port`` after start). With ``tls``,
    it serves HTTPS (and requires client certificates when ``tls`` names a client CA)."""

    def __init__(
        self,
        app: Starlette,
        listen: str,
        shutdown_grace: float = 10.0,
        limits: ConnectionLimits = DEFAULT_LIMITS,
        tls: HttpTls | None = None,
    ) -> None:
        host, port = split_address(listen)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=_protocol_class(limits),
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=int(shutdown_grace) or None,
            h11_max_incomplete_event_size=limits.max_header_bytes,
            **(tls.uvicorn_settings() if tls else {}),
        )
        self._tls = tls
        self._backlog = config.backlog
        self._server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task[None] | None = None
        self.host = host
        self.port = port

    async def start(self) -> None:
        """Listens, then serves; OSError (never uvicorn's SystemExit, which would escape the
        event loop) when the address cannot be listened on; TlsFileError (a ValueError) names a
        TLS file that cannot serve, before anything listens."""
        if self._tls is not None:
            self._tls.check()
        listening = self._listen()
        self.port = listening.getsockname()[1]
        self._task = asyncio.create_task(self._serve(listening))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"{self.host}:{self.port}: the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    def _listen(self) -> socket.socket:
        """The listening socket, bound here rather than by uvicorn, which exits the process
        when it cannot bind."""
        try:
            family, kind, protocol, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except (OSError, UnicodeError) as error:
            raise OSError(f"{self.host}:{self.port}: cannot resolve the host ({error})") from None
        listening = socket.socket(family, kind, protocol)
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.bind(address)
            listening.listen(self._backlog)
        except OSError as error:
            listening.close()
            raise OSError(f"{self.host}:{self.port}: cannot listen ({error.strerror or error})") from None
        listening.setblocking(False)
        return listening

    async def _serve(self, listening: socket.socket) -> None:
        try:
            await self._server.serve(sockets=[listening])
        except SystemExit:
            raise OSError(f"{self.host}:{self.port}: the HTTP server could not start") from None
        finally:
            listening.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    async def stop(self) -> None:
        """Stops accepting, lets open requests finish (streams are ended by the service)."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
