"""The durable background runner: runs ``background: true`` responses, keeps their streams,
and holds what this process runs through leases.

Durability comes from the store: a background response is stored (with its request and its
first events) before CreateResponse returns, and every later event is persisted *before*
followers see it, so no client can have seen an event that a crash loses.

Ownership comes from leases (see the store's protocol). This process holds every unfinished
response it runs (background ones, and streamed ones being generated) and renews the lease
every third of its length; each write of a run carries the lease, so a process that lost a
response (its lease expired and another process claimed it) writes nothing more of it. A
maintenance loop claims what nobody holds, on every replica with room:

* a response still **queued** never produced anything, so it is run again from its stored
  request;
* a response **in progress** had already streamed events that cannot be reproduced, so it is
  marked **failed** (``server_error``) with a final ``response.failed`` event;
* a response whose stored stream already ended (a database written before the end of a stream
  and the final state were stored together) is settled from its last event, never given a
  second one;
* a response somebody asked to cancel is stored cancelled;
* a response whose stored body, request or context cannot be decoded is marked failed in
  place, with one warning: one such row never stops the server from starting.

At start, a store used by this process alone (SQLite) is claimed whole at once; on a shared
store (PostgreSQL) only what no live replica holds is.

The terminal event (completed, incomplete or failed) is stored in the same transaction as the
response's final state, and published only once that committed: a stored response has at most
one terminal event, always its last, and no follower sees it before it is durable. A cancelled
response has none: its stream simply ends. A cancel asked of another process reaches the owner
through the store (a flag and a notification); an owner that does not answer in time loses the
response to the process that asked.

Nothing is left queued or in progress forever. A graceful shutdown waits for running
responses up to a grace period, fails the ones still running and releases queued ones to the
other replicas (or to the next start).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncGenerator, Callable

from venna.backends import base
from venna.backends.store import UNREADABLE_MESSAGE, Lease, PendingResponse, ResponseStore, UnreadableRecord
from venna.responses.v1 import response_pb2, service_pb2
from venna.server.builder import ENCRYPTED_REASONING, UNFINISHED, Event, ResponseBuilder
from venna.server.execution import Execution
from venna.server.generation import generation_request
from venna.server.routing import Router
from venna.server.turns import append_turn

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "The server shut down before the response finished."
RESTART_MESSAGE = "The server restarted before the response finished."
UNREADABLE_CONTEXT_MESSAGE = (
    "The response could not be run: a stored response it continues could not be read."
)
# How long a cancel asked of another process waits for that process to store the response
# cancelled, before taking the response over and cancelling it here.
CANCEL_WAIT_SECONDS = 5.0
# How often a waiting cancel reads the store when no wake-up comes.
_CANCEL_POLL_SECONDS = 0.5


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
        # Another process holds the response now: this one stops and writes nothing more.
        self.lost = False
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

    def __init__(
        self, store: ResponseStore, router: Router, concurrency: int = 64, *, lease_seconds: float = 30.0
    ) -> None:
        self._store = store
        self._router = router
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._live: dict[str, LiveResponse] = {}
        # Told of every response this runner finished and stored (usage metrics).
        self._finished_listeners: list[Callable[[str, response_pb2.Response], None]] = []
        # Live responses (queued or running here) per workspace.
        self._per_workspace: collections.Counter[str] = collections.Counter()
        # This process's hold on what it runs; a new owner name at each start.
        self.lease = Lease(
            owner="srv_" + secrets.token_hex(8), milliseconds=max(1, int(lease_seconds * 1000))
        )
        # Streamed (not background) responses being generated here, held by the lease too.
        self._streaming: set[str] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._cancels: set[asyncio.Task[object]] = set()
        # Queued responses left unstarted by a shutdown, released when it ends.
        self._released: list[str] = []
        store.on_cancel_requested(self._cancel_requested)

    @property
    def renew_interval(self) -> float:
        """Seconds between renewals (and claims): a third of the lease, so that one late or
        failed renewal does not lose it."""
        return self.lease.milliseconds / 3000

    def hold(self, response_id: str) -> None:
        """Keeps the lease on a streamed response renewed while it is generated here."""
        self._streaming.add(response_id)

    def let_go(self, response_id: str) -> None:
        self._streaming.discard(response_id)

    def active(self, workspace_id: str) -> int:
        """How many background responses of the workspace this process has queued or running."""
        return self._per_workspace[workspace_id]

    def on_finished(self, listener: Callable[[str, response_pb2.Response], None]) -> None:
        """``listener(workspace_id, response)`` for each response finished and stored here."""
        self._finished_listeners.append(listener)

    def counts(self) -> dict[str, int]:
        """The background responses this process holds, by state (queued or running)."""
        counts = {"queued": 0, "running": 0}
        for live in self._live.values():
            if live.builder.response.status == response_pb2.RESPONSE_STATUS_QUEUED:
                counts["queued"] += 1
            elif not live.builder.finished:
                counts["running"] += 1
        return counts

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

    async def start(self) -> None:
        """Settles or re-runs what a previous process left (all of it on a store of this process
        alone), then keeps leases renewed and claims lost work until shutdown."""
        await self._claim(expired_only=self._store.shared)
        self._maintenance = asyncio.create_task(self._maintain(), name="venna-leases")

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval)
            try:
                await self._renew()
                await self._claim(expired_only=True)
            except Exception:
                # The store is unreachable for now: the next round tries again. Leases not
                # renewed in time are lost to other replicas, whose writes then win.
                log.exception("could not renew leases or claim work")

    async def _renew(self) -> None:
        held = [*self._live, *self._streaming]
        if not held:
            return
        renewal = await self._store.renew_leases(self.lease, held)
        self._streaming -= renewal.lost
        for response_id in renewal.lost:
            live = self._live.get(response_id)
            if live is not None and not live.builder.finished and live.task is not None:
                log.warning("lost background response %s to another process; stopped here", response_id)
                live.lost = True
                live.task.cancel()
        for response_id in renewal.cancelling:
            self._cancel_requested(response_id)

    async def _claim(self, *, expired_only: bool) -> None:
        """Claims the unfinished responses nobody holds: queued ones up to the room here, or
        all of them on a store nobody else uses."""
        room = max(0, self._concurrency - len(self._live)) if self._store.shared else 2**31 - 1
        for pending in await self._store.claim_responses(self.lease, queued=room, expired_only=expired_only):
            try:
                await self._recover(pending)
            except Exception:
                log.exception("could not settle interrupted response %s", pending.response.id)

    def _cancel_requested(self, response_id: str) -> None:
        """Somebody (maybe another process) asked to cancel a response: if it runs here, stop it."""
        live = self._live.get(response_id)
        if live is None or live.task is None or live.builder.finished:
            return
        task: asyncio.Task[object] = asyncio.ensure_future(self.cancel(live.workspace_id, response_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def cancel_elsewhere(self, workspace_id: str, response_id: str) -> response_pb2.Response | None:
        """Cancels an unfinished response this process does not run: its owner is asked and
        given CANCEL_WAIT_SECONDS to store it cancelled; then it is taken over and stored
        cancelled here. The response as stored at the end; None if it is gone."""
        if self._store.shared and await self._store.request_cancel(workspace_id, response_id):
            # An owner whose lease has expired will not answer: claimed now, the response is
            # settled as cancelled at once instead of after the wait.
            try:
                await self._claim(expired_only=True)
            except Exception:
                log.exception("could not claim lost work")
            watch = self._store.watch_events(response_id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + CANCEL_WAIT_SECONDS
            try:
                while (left := deadline - loop.time()) > 0:
                    current = await self._store.get_response(workspace_id, response_id)
                    if current is None or current.status not in UNFINISHED:
                        return current
                    await watch.wait(min(left, _CANCEL_POLL_SECONDS))
            finally:
                watch.close()
        if await self._store.take_over(self.lease, workspace_id, response_id):
            current = await self._store.get_response(workspace_id, response_id)
            if current is not None:
                current.status = response_pb2.RESPONSE_STATUS_CANCELLED
                await self._store.save_response(workspace_id, current, finished=True, lease=self.lease)
            return current
        return await self._store.get_response(workspace_id, response_id)

    async def _recover(self, pending: PendingResponse) -> None:
        """Settles or re-runs one claimed response (held by this process's lease)."""
        response = pending.response
        if pending.cancelling:
            response.status = response_pb2.RESPONSE_STATUS_CANCELLED
            await self._store.save_response(pending.workspace_id, response, finished=True, lease=self.lease)
            log.info("settled response %s as cancelled, as asked before its owner was lost", response.id)
            return
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
            await self._store.save_response(pending.workspace_id, final, finished=True, lease=self.lease)
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
        await self._store.save_response(
            pending.workspace_id, builder.response, events=events, finished=True, lease=self.lease
        )

    async def generation_for(
        self, workspace_id: str, response: response_pb2.Response, request: service_pb2.CreateResponseRequest
    ) -> base.GenerationRequest:
        """The generation request of a stored response: its stored chain is its context."""
        context = await self._store.load_context(workspace_id, response.id)
        return generation_request(request, model=request.model, context=context or [])

    async def shutdown(self, grace: float) -> None:
        """Lets running responses finish for ``grace`` seconds, then fails the rest; queued
        ones are released to the other replicas (or the next start)."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        tasks = {live.task for live in self._live.values() if live.task is not None}
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=grace)
            for live in list(self._live.values()):
                if live.task in still_running and not live.builder.finished:
                    live.shutting_down = True
                    live.task.cancel()
            if still_running:
                await asyncio.wait(still_running)
        if self._released:
            released, self._released = self._released, []
            try:
                await self._store.release_leases(self.lease, released)
            except Exception:
                log.exception("could not release queued responses; they are claimed when the lease expires")

    # ------------------------------------------------------------------ one response

    async def _execute(self, live: LiveResponse, generation: base.GenerationRequest) -> None:
        builder = live.builder
        started = False
        try:
            async with self._slots:
                started = True
                start = builder.started()
                if not await self._store.save_response(
                    live.workspace_id, builder.response, events=start, lease=self.lease
                ):
                    self._lose(live)
                    return
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
            # Also when the response was taken over or deleted (``live.lost``): the final save
            # below is then refused if another process holds it, and records only the usage
            # if it is gone.
            if live.shutting_down and not started:
                # Never started: stays queued in the store, for another replica or the next start.
                self._released.append(live.response_id)
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
            if await self._store.save_response(
                live.workspace_id,
                live.builder.response,
                events=live.terminal,
                finished=True,
                lease=self.lease,
            ):
                await append_turn(self._store, live.workspace_id, live.builder.response)
                for listener in self._finished_listeners:
                    listener(live.workspace_id, live.builder.response)
                live.publish(live.terminal)
            else:
                log.info("background response %s was taken over or deleted before its end", live.response_id)
                live.lost = True
        except Exception:
            log.exception("could not store the end of background response %s", live.response_id)
        finally:
            self._forget(live)

    def _lose(self, live: LiveResponse) -> None:
        """Another process holds the response (or it is gone): nothing more is written here."""
        live.lost = True
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
        while live.unpublished and not live.lost:
            batch, live.unpublished = live.unpublished, []
            if not await self._store.append_events(live.response_id, batch, lease=self.lease):
                # Claimed by another process (or deleted): stop generating here.
                live.lost = True
                live.unpublished = []
                if live.task is not None and not live.builder.finished:
                    live.task.cancel()
                return
            live.publish(batch)

    async def _drain(self, live: LiveResponse) -> None:
        """Waits until every staged event is stored and published."""
        if live.flush_task is not None:
            await asyncio.shield(live.flush_task)
        await self._flush(live)
