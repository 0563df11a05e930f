"""Runs the shim's ASGI app with uvicorn inside an existing event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger(__name__)


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
    """The shim on HOST:PORT; port 0 picks a free one (see ``port`` after start)."""

    def __init__(self, app: Starlette, listen: str, shutdown_grace: float = 10.0) -> None:
        host, port = split_address(listen)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=int(shutdown_grace) or None,
        )
        self._server = _EmbeddedUvicorn(config)
        self._task: asyncio.Task[None] | None = None
        self.host = host
        self.port = port

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                # uvicorn logs the reason and exits; turn that into an error of ours.
                with contextlib.suppress(SystemExit):
                    self._task.result()
                raise OSError(f"cannot listen on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        sockets = [sock for server in self._server.servers for sock in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stops accepting, lets open requests finish (streams are ended by the service)."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
