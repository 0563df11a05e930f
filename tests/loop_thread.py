"""Servers for tests that run in a thread with their own event loop, so that blocking clients
(the sync openai SDK, httpx) and the servers they call never share a loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

Shutdown = Callable[[], Awaitable[None]]


class LoopThread:
    """``start()`` runs ``startup()`` in a new thread and loop; ``stop()`` runs the shutdown it
    returned, in that loop, and joins the thread."""

    thread_name = "test-server"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    async def startup(self) -> Shutdown:
        raise NotImplementedError

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.thread_name, daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise TimeoutError(f"{self.thread_name} did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as error:  # reported to the test thread
            self._error = error
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        shutdown = await self.startup()
        ready.set()
        await self._stop.wait()
        await shutdown()
