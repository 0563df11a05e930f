"""The durable background runner: runs ``background: true`` responses and keeps their streams.

Durability comes from the store: a background response is stored (with its request and its
first events) before CreateResponse returns, and every later event is persisted *before*
followers see it, so no client can have seen an event that a crash loses. After a crash or
restart, ``recover()`` settles what the previous process left:

* a response still **queued** never produced anything, so it is run again from its stored
  request;
* a response **in progress** had already streamed events that cannot be reproduced, so it is
  marked **failed** (``server_error``) with a final ``response.failed`` event;
* a response whose stored stream already ended (a database written before the end of a stream
  and the final state were stored together) is settled from its last event, never given a
  second one;
* a response whose stored body, request or context cannot be decoded is marked failed in
  place, with one warning: one such row never stops the server from starting.

The terminal event (completed, incomplete or failed) is stored in the same transaction as the
response's final state, and published only once that committed: a stored response has at most
one terminal event, always its last, and no follower sees it before it is durable. A cancelled
response has none: its stream simply ends.

Nothing is left queued or in progress forever. A graceful shutdown waits for running
responses up to a grace period, fails the ones still running and leaves queued ones queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator

from venna.backends import base
from venna.backends.store import UNREADABLE_MESSAGE, PendingResponse, ResponseStore, UnreadableRecord
from venna.responses.v1 import response_pb2, service_pb2
from venna.server.builder import ENCRYPTED_REASONING, Event, ResponseBuilder
from venna.server.execution import Execution
from venna.server.generation import generation_request
from venna.server.routing import Router

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "The server shut down before the response finished."
RESTART_MESSAGE = "The server restarted before the response finished."
UNREADABLE_CONTEXT_MESSAGE = (
    "The response could not be run: a stored response it continues could not be read."
)


class LiveResponse:
    """A background response owned by this process: its builder and every event so far."""

    def __init__(self, workspace_id: str, builder: ResponseBuilder, events: list[Event]) -> None:
        self.workspace_id = workspace_id
        self.builder = builder
        # Published events, all of them stored: events[n].sequence_number == n, from
        # response.created on.
        self.events = events
        # Events produced but not yet stored, hence not yet shown to followers.
        self.unpublished: list[Event] = []
        # The terminal event, once produced: stored with the final state, then published.
        self.terminal: list[Event] = []
        self.done = False
        self.shutting_down = False
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        # The task storing and then publishing ``unpublished``, if one is running.
        self.flush_task: asyncio.Task[None] | None = None

    @property
    def response_id(self) -> str:
        return self.builder.response_id

    async def settled(self) -> None:
        """Returns once the response's run is over and its final state stored (or given up)."""
        if self.task is not None:
            await asyncio.wait({self.task})

    def publish(self, events: list[Event]) -> None:
        self.events.extend(events)
        self._wake()

    def close(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        # Followers wait on the Event they saw; swap in a fresh one for the next change.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, after: int) -> AsyncGenerator[Event, None]:
        """Events with sequence_number > after, then each new one until the response ends."""
        index = max(after + 1, 0)
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.done:
                return
            await self._changed.wait()


class BackgroundRunner:
    """Runs background responses with bounded concurrency and streams them to followers."""

    def __init__(self, store: ResponseStore, router: Router, concurrency: int = 64) -> None:
        self._store = store
        self._router = router
        self._slots = asyncio.Semaphore(concurrency)
        self._live: dict[str, LiveResponse] = {}
        # Live responses (queued or running here) per workspace.
        self._per_workspace: collections.Counter[str] = collections.Counter()

    def active(self, workspace_id: str) -> int:
        """How many background responses of the workspace this process has queued or running."""
        return self._per_workspace[workspace_id]

    def live(self, workspace_id: str, response_id: str) -> LiveResponse | None:
        live = self._live.get(response_id)
        return live if live is not None and live.workspace_id == workspace_id else None

    def submit(
        self,
        workspace_id: str,
        builder: ResponseBuilder,
        generation: base.GenerationRequest,
        events: list[Event],
    ) -> LiveResponse:
        """Starts a stored, queued response; ``events`` are those already stored for it."""
        live = LiveResponse(workspace_id, builder, events)
        self._live[live.response_id] = live
        self._per_workspace[workspace_id] += 1
        live.task = asyncio.create_task(
            self._execute(live, generation), name=f"background {live.response_id}"
        )
        return live

    async def cancel(self, workspace_id: str, response_id: str) -> response_pb2.Response | None:
        """Stops a live response and returns its final snapshot; None if it is not live here."""
        live = self.live(workspace_id, response_id)
        if live is None or live.task is None:
            return None
        # A response that has just finished is only being stored: let that complete.
        if not live.builder.finished:
            live.task.cancel()
        await asyncio.wait({live.task})
        return live.builder.response

    async def recover(self) -> None:
        """Settles the background responses a previous process left unfinished; whatever one
        stored row holds, the others are settled and the server starts."""
        for pending in await self._store.pending_responses():
            try:
                await self._recover(pending)
            except Exception:
                log.exception("could not settle interrupted response %s", pending.response.id)

    async def _recover(self, pending: PendingResponse) -> None:
        response = pending.response
        try:
            ended = await self._store.last_terminal_event(response.id)
        except UnreadableRecord:
            log.warning("response %s: its stream ended but cannot be read; marked failed", response.id)
            await self._settle_failed(pending, UNREADABLE_MESSAGE, append=False)
            return
        if ended is not None:
            member = ended.WhichOneof("event")
            assert member is not None
            final: response_pb2.Response = getattr(ended, member).response
            await self._store.save_response(pending.workspace_id, final, finished=True)
            log.info("settled response %s from its stored %s event", response.id, member)
            return
        if pending.unreadable:
            log.warning("response %s cannot be read from the store; marked failed", response.id)
            await self._settle_failed(pending, UNREADABLE_MESSAGE)
            return
        queued = response.status == response_pb2.RESPONSE_STATUS_QUEUED
        if queued and pending.request is not None and response.background:
            try:
                generation = await self.generation_for(pending.workspace_id, response, pending.request)
                events = await self._store.events_after(pending.workspace_id, response.id, -1)
            except UnreadableRecord as error:
                log.warning(
                    "response %s cannot be run again: stored response %s cannot be read; marked failed",
                    response.id,
                    error.response_id,
                )
                await self._settle_failed(pending, UNREADABLE_CONTEXT_MESSAGE)
                return
            except Exception:
                log.exception("cannot re-run %s", response.id)
            else:
                included = pending.request.include
                builder = ResponseBuilder(
                    response,
                    next_sequence_number=events[-1].sequence_number + 1 if events else 0,
                    expose_encrypted=ENCRYPTED_REASONING in included,
                )
                self.submit(pending.workspace_id, builder, generation, events)
                log.info("re-queued background response %s", response.id)
                return
        await self._settle_failed(pending, RESTART_MESSAGE)
        log.info("marked interrupted response %s failed", response.id)

    async def _settle_failed(self, pending: PendingResponse, message: str, *, append: bool = True) -> None:
        """Stores ``pending`` as failed with ``message``, its stream ended by one
        ``response.failed`` (background responses only, unless ``append`` is False: their
        stream has ended already); foreground streams are not kept."""
        response = pending.response
        last = await self._store.last_sequence_number(response.id)
        builder = ResponseBuilder(response, next_sequence_number=last + 1)
        events = builder.failed("server_error", message)
        if not response.background or not append:
            events = []
        await self._store.save_response(pending.workspace_id, builder.response, events=events, finished=True)

    async def generation_for(
        self, workspace_id: str, response: response_pb2.Response, request: service_pb2.CreateResponseRequest
    ) -> base.GenerationRequest:
        """The generation request of a stored response: its stored chain is its context."""
        context = await self._store.load_context(workspace_id, response.id)
        return generation_request(request, model=request.model, context=context or [])

    async def shutdown(self, grace: float) -> None:
        """Lets running responses finish for ``grace`` seconds, then fails the rest."""
        tasks = {live.task for live in self._live.values() if live.task is not None}
        if not tasks:
            return
        _, still_running = await asyncio.wait(tasks, timeout=grace)
        for live in list(self._live.values()):
            if live.task in still_running and not live.builder.finished:
                live.shutting_down = True
                live.task.cancel()
        if still_running:
            await asyncio.wait(still_running)

    # ------------------------------------------------------------------ one response

    async def _execute(self, live: LiveResponse, generation: base.GenerationRequest) -> None:
        builder = live.builder
        started = False
        try:
            async with self._slots:
                started = True
                start = builder.started()
                await self._store.save_response(live.workspace_id, builder.response, events=start)
                live.publish(start)
                route = self._router.resolve(generation.model)
                generation = dataclasses.replace(generation, model=route.model)
                execution = Execution(builder, route.backend, generation)
                try:
                    async for batch in execution.batches():
                        self._stage(live, batch)
                except base.BackendError as error:
                    self._stage(live, builder.failed(error.code, error.message))
        except asyncio.CancelledError:
            if live.shutting_down and not started:
                # Never started: stays queued in the store and runs after the next start.
                self._forget(live)
                return
            if not builder.finished:
                if live.shutting_down:
                    self._stage(live, builder.failed("server_error", SHUTDOWN_MESSAGE))
                else:
                    builder.cancelled()
        except Exception:
            log.exception("background response %s crashed", live.response_id)
            if not builder.finished:
                self._stage(
                    live, builder.failed("server_error", "The response failed because of an internal error.")
                )
        # The end is stored and published even if this task is cancelled meanwhile.
        ending = asyncio.ensure_future(self._finish(live))
        while not ending.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(ending)

    async def _finish(self, live: LiveResponse) -> None:
        """Stores the final state with the terminal event in one transaction, then publishes it."""
        try:
            await self._drain(live)
            await self._store.save_response(
                live.workspace_id,
                live.builder.response,
                events=live.terminal,
                finished=True,
            )
            live.publish(live.terminal)
        except Exception:
            log.exception("could not store the end of background response %s", live.response_id)
        finally:
            self._forget(live)

    def _forget(self, live: LiveResponse) -> None:
        live.close()
        if self._live.pop(live.response_id, None) is not None:
            self._per_workspace[live.workspace_id] -= 1
            if not self._per_workspace[live.workspace_id]:
                del self._per_workspace[live.workspace_id]

    def _stage(self, live: LiveResponse, events: list[Event]) -> None:
        """Queues events to be stored, then published; generation does not wait for the write,
        and one write gathers whatever piled up while the previous one ran.

        The event that finishes the response (always the last of its batch) is kept apart:
        it is stored with the final state (``_finish``).
        """
        if live.builder.finished and events and not live.terminal:
            live.terminal = events[-1:]
            events = events[:-1]
        live.unpublished.extend(events)
        if live.flush_task is None or live.flush_task.done():
            live.flush_task = asyncio.create_task(self._flush(live))

    async def _flush(self, live: LiveResponse) -> None:
        while live.unpublished:
            batch, live.unpublished = live.unpublished, []
            await self._store.append_events(live.response_id, batch)
            live.publish(batch)

    async def _drain(self, live: LiveResponse) -> None:
        """Waits until every staged event is stored and published."""
        if live.flush_task is not None:
            await asyncio.shield(live.flush_task)
        await self._flush(live)
