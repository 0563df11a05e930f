"""Limits per workspace: requests per minute, tokens per minute, tokens per calendar month.

The counts live in the store, so every replica on it enforces the same limits. A minute's
requests and tokens are counted in fixed windows of the store (``take_requests`` counts
requests only while the window is under its bound, atomically for every replica); what the
previous window used is carried into the current one in proportion to the part of it still
within the last 60 seconds, so that a burst across a window's end is not let through twice.
The monthly budget is read from the usage records.

Requests are creations (and compactions): the calls that reach a model. Tokens are known only
when a response finishes, so a response already running when a limit is reached finishes,
and the next one waits. A workspace without limits costs nothing but a cached lookup.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

from venna.backends.store import ResponseStore, WindowUse, WorkspaceLimits
from venna.responses.v1 import response_pb2
from venna.server.errors import ServiceError

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
# Rate windows older than this are dropped (the previous one is all admission reads).
_KEEP_WINDOWS = 3


@dataclass(slots=True)
class _Cached:
    limits: WorkspaceLimits
    expires: float
    # Tokens of the month as last read from the store, plus those of responses finished here
    # since; None until read.
    month_tokens: int | None = None
    month_start: int = 0
    month_expires: float = 0.0


@dataclass(slots=True)
class _Batch:
    """Requests of one workspace counted by one update of its rate window, under one bound."""

    window: int
    max_requests: int | None
    max_tokens: int | None
    waiters: list[asyncio.Future[tuple[bool, WindowUse]]] = field(default_factory=list)


def seconds_until_allowed(limit: int, previous: int, current: int, elapsed: float) -> float:
    """How long until one more unit fits under ``limit`` in the sliding minute, given the
    previous window's use, the current window's, and the fraction of the current window gone
    (0 to 1)."""
    room = limit - current
    if room > 0:
        if previous <= 0:
            return 0.0
        # previous * (1 - f) < room once f passes this fraction of the window.
        fraction = 1.0 - room / previous
        return max(0.0, fraction - elapsed) * WINDOW_SECONDS
    # Full for the rest of this window; in the next, this window is the previous one.
    fraction = max(0.0, 1.0 - limit / current) if current > 0 else 0.0
    return (1.0 - elapsed + fraction) * WINDOW_SECONDS


def next_month_start(now: float) -> int:
    """Unix seconds of the first moment of the next calendar month (UTC)."""
    today = datetime.fromtimestamp(now, UTC)
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


def month_start(now: float) -> int:
    today = datetime.fromtimestamp(now, UTC)
    return calendar.timegm((today.year, today.month, 1, 0, 0, 0))


def _retry_after(seconds: float) -> str:
    """Whole seconds, strictly past the moment computed (a client that waits exactly that long
    must find room)."""
    return str(max(1, math.floor(seconds) + 1))


class Quotas:
    """Admits or refuses a workspace's creations by its limits, and counts what it used."""

    def __init__(
        self, store: ResponseStore, cache_seconds: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        # How long limits (and the month's tokens) are trusted without asking the store: a
        # change made elsewhere applies here within this long.
        self._cache_seconds = cache_seconds
        # Wall-clock seconds; replaceable, so that a window can be moved past without waiting.
        self.clock = clock
        self._cache: dict[str, _Cached] = {}
        # The previous window's use, by workspace: closed, so read once.
        self._previous: dict[str, tuple[int, WindowUse]] = {}
        self._pruned_before = 0
        self._writes: set[asyncio.Task[None]] = set()
        # By workspace: the batch of requests waiting to be counted, and the update under way.
        self._batches: dict[str, _Batch] = {}
        self._sending: dict[str, asyncio.Task[Any]] = {}
        # Tokens of finished responses not yet written, by workspace and window; and, by
        # workspace, the addition under way.
        self._unwritten_tokens: dict[tuple[str, int], int] = {}
        self._adding: dict[str, asyncio.Task[Any]] = {}

    def forget(self, workspace_id: str) -> None:
        """Drops what is cached of the workspace (its limits were just changed here)."""
        self._cache.pop(workspace_id, None)

    async def _entry(self, workspace_id: str) -> _Cached:
        entry = self._cache.get(workspace_id)
        if entry is None or entry.expires <= time.monotonic():
            limits = await self._store.get_limits(workspace_id)
            if entry is None:
                entry = _Cached(limits, 0.0)
                if len(self._cache) >= 100_000:
                    self._cache.clear()
                self._cache[workspace_id] = entry
            entry.limits = limits
            entry.expires = time.monotonic() + self._cache_seconds
        return entry

    async def admit(self, workspace_id: str) -> None:
        """Returns when the workspace may create one more response now (and counts it);
        raises RESOURCE_EXHAUSTED, with the seconds to wait, when a limit is reached."""
        now = self.clock()
        entry = await self._entry(workspace_id)
        limits = entry.limits
        if not limits.any:
            return
        if limits.monthly_tokens is not None:
            await self._check_month(workspace_id, entry, limits.monthly_tokens, now)
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return
        window = int(now // WINDOW_SECONDS) * WINDOW_SECONDS
        elapsed = (now - window) / WINDOW_SECONDS
        previous = await self._previous_use(workspace_id, window)
        carried = 1.0 - elapsed
        max_requests = max_tokens = None
        if limits.requests_per_minute is not None:
            max_requests = limits.requests_per_minute - math.floor(previous.requests * carried)
        if limits.tokens_per_minute is not None:
            max_tokens = limits.tokens_per_minute - math.floor(previous.tokens * carried)
        if (max_requests is not None and max_requests <= 0) or (max_tokens is not None and max_tokens <= 0):
            taken, use = False, await self._store.window_use(workspace_id, window)
        else:
            taken, use = await self._take(workspace_id, _Batch(window, max_requests, max_tokens))
        if window - WINDOW_SECONDS * _KEEP_WINDOWS > self._pruned_before:
            self._pruned_before = window - WINDOW_SECONDS * _KEEP_WINDOWS
            self._spawn(self._store.prune_windows(self._pruned_before))
        if taken:
            return
        self._refuse(limits, previous, use, elapsed)

    def _refuse(self, limits: WorkspaceLimits, previous: WindowUse, use: WindowUse, elapsed: float) -> None:
        """Raises for the limit the workspace is at: requests if that one, else tokens."""
        rpm = limits.requests_per_minute
        if rpm is not None and use.requests + math.floor(previous.requests * (1 - elapsed)) >= rpm:
            bound, unit, before, now = rpm, "requests", previous.requests, use.requests
        else:
            assert limits.tokens_per_minute is not None
            bound, unit, before, now = limits.tokens_per_minute, "tokens", previous.tokens, use.tokens
        wait = _retry_after(seconds_until_allowed(bound, before, now, elapsed))
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Rate limit reached for this workspace: {bound} {unit} per minute. Try again in {wait}s.",
            reason="RATE_LIMIT_EXCEEDED",
            metadata={"retry_after": wait, "limit": f"{unit}_per_minute"},
        )

    async def _take(self, workspace_id: str, batch: _Batch) -> tuple[bool, WindowUse]:
        """Counts one request, together with the workspace's others arriving meanwhile: a
        process sends one update of a workspace's window at a time, for every request that came
        while the previous one was under way, rather than one each that would queue on the
        window's row lock. Whether this request was counted, and the window's use after."""
        waiting = self._batches.get(workspace_id)
        if waiting is None or (waiting.window, waiting.max_requests, waiting.max_tokens) != (
            batch.window,
            batch.max_requests,
            batch.max_tokens,
        ):
            # The first of a batch (or bounds that moved on): a batch of its own, sent in turn.
            waiting = batch
            self._batches[workspace_id] = batch
            self._spawn(self._send(workspace_id, batch))
        answer: asyncio.Future[tuple[bool, WindowUse]] = asyncio.get_running_loop().create_future()
        waiting.waiters.append(answer)
        return await answer

    async def _send(self, workspace_id: str, batch: _Batch) -> None:
        """Sends ``batch`` once the workspace's previous update is done, and tells its waiters."""
        previous = self._sending.get(workspace_id)
        this = asyncio.current_task()
        assert this is not None
        self._sending[workspace_id] = this
        try:
            if previous is not None:
                await asyncio.wait((previous,))
            if self._batches.get(workspace_id) is batch:
                del self._batches[workspace_id]  # closed: whoever comes now starts the next one
            try:
                taken, use = await self._store.take_requests(
                    workspace_id,
                    batch.window,
                    len(batch.waiters),
                    max_requests=batch.max_requests,
                    max_tokens=batch.max_tokens,
                )
            except BaseException as error:
                for waiter in batch.waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
                if not isinstance(error, Exception):
                    raise
                return
            for index, waiter in enumerate(batch.waiters):
                if not waiter.done():  # a caller that left: its place was counted all the same
                    waiter.set_result((index < taken, use))
        finally:
            if self._batches.get(workspace_id) is batch:
                del self._batches[workspace_id]
            if self._sending.get(workspace_id) is this:
                del self._sending[workspace_id]

    async def _previous_use(self, workspace_id: str, window: int) -> WindowUse:
        known = self._previous.get(workspace_id)
        if known is not None and known[0] == window - WINDOW_SECONDS:
            return known[1]
        use = await self._store.window_use(workspace_id, window - WINDOW_SECONDS)
        # Tokens of responses finishing just after the window closed may still arrive: keep
        # re-reading during the first seconds.
        if self.clock() - window > 5:
            self._previous[workspace_id] = (window - WINDOW_SECONDS, use)
        return use

    async def _check_month(self, workspace_id: str, entry: _Cached, budget: int, now: float) -> None:
        start = month_start(now)
        if (
            entry.month_tokens is None
            or entry.month_start != start
            or entry.month_expires <= time.monotonic()
        ):
            totals = await self._store.usage_totals(workspace_id, since=start)
            entry.month_tokens = sum(total.total_tokens for total in totals)
            entry.month_start = start
            entry.month_expires = time.monotonic() + self._cache_seconds
        if entry.month_tokens >= budget:
            wait = next_month_start(now) - now
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"This workspace has used its monthly budget of {budget} tokens; it renews at the"
                " start of next month (UTC).",
                reason="INSUFFICIENT_QUOTA",
                metadata={"retry_after": _retry_after(wait), "limit": "monthly_tokens"},
            )

    def record(self, workspace_id: str, response: response_pb2.Response) -> None:
        """Counts a finished response's tokens against its workspace's limits (listener of
        finished responses)."""
        entry = self._cache.get(workspace_id)
        if entry is None or not entry.limits.any or not response.HasField("usage"):
            return
        tokens = response.usage.input_tokens + response.usage.output_tokens
        if tokens <= 0:
            return
        if entry.month_tokens is not None:
            entry.month_tokens += tokens
        if entry.limits.tokens_per_minute is not None:
            window = int(self.clock() // WINDOW_SECONDS) * WINDOW_SECONDS
            key = (workspace_id, window)
            # Tokens finishing while the workspace's previous addition is under way go together.
            if key in self._unwritten_tokens:
                self._unwritten_tokens[key] += tokens
            else:
                self._unwritten_tokens[key] = tokens
                self._spawn(self._add_tokens(key))

    async def _add_tokens(self, key: tuple[str, int]) -> None:
        """Adds the tokens gathered for ``key`` once the workspace's previous addition is done."""
        previous = self._adding.get(key[0])
        this = asyncio.current_task()
        assert this is not None
        self._adding[key[0]] = this
        try:
            if previous is not None:
                await asyncio.wait((previous,))
            tokens = self._unwritten_tokens.pop(key)
            await self._store.add_window_tokens(key[0], key[1], tokens)
        finally:
            if self._adding.get(key[0]) is this:
                del self._adding[key[0]]

    def _spawn(self, write: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await write
            except Exception:  # a lost count must not fail anything else; the next one counts
                log.warning("could not write a rate window", exc_info=True)

        task = asyncio.get_running_loop().create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def close(self) -> None:
        """Waits for the counts still being written."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
