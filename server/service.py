"""The Responses service: the RPCs, each a thin adapter over the create pipeline
(creation.py), the background runner and the store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc

from venna.backends import base
from venna.backends.store import ResponseStore, UnreadableRecord, item_id, unreadable_response
from venna.responses.v1 import response_pb2, service_pb2, service_pb2_grpc
from venna.server import auth, errors
from venna.server.builder import (
    ENCRYPTED_REASONING,
    UNFINISHED,
    Event,
    ends_stream,
    terminal_event,
    without_encrypted_reasoning,
)
from venna.server.creation import Creation, report_defaults
from venna.server.execution import Execution
from venna.server.runner import BackgroundRunner, LiveResponse
from venna.server.validation import Violation, check_include, raise_if_any

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# How often a follower of another process's response reads the store when no wake-up comes.
FOLLOW_POLL_SECONDS = 1.0


class ResponsesService(service_pb2_grpc.ResponsesServiceServicer):
    """The Responses RPCs: thin adapters over the create pipeline, the runner and the store."""

    def __init__(self, store: ResponseStore, runner: BackgroundRunner, creation: Creation) -> None:
        self._store = store
        self._runner = runner
        self.creation = creation
        # Stored responses found unreadable, each reported once (a client may poll one).
        self._reported_unreadable: set[str] = set()

    # ------------------------------------------------------------------ RPCs

    async def CreateResponse(
        self, request: service_pb2.CreateResponseRequest, context: auth.Context
    ) -> response_pb2.Response:
        # The caller reads only the final response; a background run keeps its events.
        run = await self.creation.prepare(request, quiet=not request.background)
        if run.builder.response.background:
            await self.creation.start_background(run)
            return run.builder.response
        # Nobody knows this response's id before the reply: it is stored once, when it is over.
        execution = Execution(run.builder, run.backend, run.generation)
        try:
            await execution.run()
        except base.BackendError as error:
            raise await self.creation.failed(run, error) from None
        except asyncio.CancelledError:
            self.creation.abandoned(run)
            raise
        await self.creation.save(run)
        await self.creation.extend_conversation(run)
        if execution.error is not None:
            raise errors.from_backend(execution.error, run.builder.response.id)
        if run.builder.expose_encrypted:
            return run.builder.response
        return without_encrypted_reasoning(run.builder.response)

    async def StreamResponse(
        self, request: service_pb2.CreateResponseRequest, context: auth.Context
    ) -> AsyncGenerator[Event, None]:
        run = await self.creation.prepare(request)
        if run.builder.response.background:
            # The response runs on whether or not this caller stays; it may resume later.
            live = await self.creation.start_background(run)
            async with aclosing(self._follow_live(live, -1)) as events:
                async for event in events:
                    yield event
            return
        execution = Execution(run.builder, run.backend, run.generation)
        async with aclosing(self.creation.foreground(run, execution)) as events:
            async for event in events:
                yield event

    async def CompactResponse(
        self, request: service_pb2.CompactResponseRequest, context: auth.Context
    ) -> service_pb2.CompactResponseResponse:
        return await self.creation.compact(request)

    async def CountInputTokens(
        self, request: service_pb2.CountInputTokensRequest, context: auth.Context
    ) -> service_pb2.CountInputTokensResponse:
        return await self.creation.count_input_tokens(request)

    async def GetResponse(
        self, request: service_pb2.GetResponseRequest, context: auth.Context
    ) -> response_pb2.Response:
        violations: list[Violation] = []
        check_include(list(request.include), violations)
        raise_if_any(violations)
        response = await self._get(request.response_id)
        return response if ENCRYPTED_REASONING in request.include else without_encrypted_reasoning(response)

    async def ResumeResponseStream(
        self, request: service_pb2.ResumeResponseStreamRequest, context: auth.Context
    ) -> AsyncGenerator[Event, None]:
        workspace_id = auth.workspace_id()
        response = await self._get(request.response_id)
        _require_background(response, "streamed after creation", param="stream")
        after = request.starting_after if request.HasField("starting_after") else -1
        live = self._runner.live(workspace_id, response.id)
        if live is not None:
            async with aclosing(self._follow_live(live, after)) as events:
                async for event in events:
                    yield event
            return
        if response.status in UNFINISHED:
            # Run by another process (a replica): follow what it stores, to the end.
            async with aclosing(self._follow_stored(workspace_id, response.id, after)) as events:
                async for event in events:
                    yield event
            return
        try:
            stored = await self._store.events_after(workspace_id, response.id, after)
        except UnreadableRecord as error:
            # The stream as far as it can be read, then its end as the stored response has it.
            self._report_unreadable(response.id, "a stored stream event of response")
            for event in error.readable:
                yield event
            last = error.readable[-1].sequence_number if error.readable else after
            end = terminal_event(response, max(last, after) + 1)
            if end is not None:
                yield end
            return
        for event in stored:
            yield event

    async def _follow_live(self, live: LiveResponse, after: int) -> AsyncGenerator[Event, None]:
        """The events of a response running here; should another process take it over, the
        rest as that process stores it."""
        async with aclosing(live.follow(after)) as events:
            async for event in events:
                yield event
                after = event.sequence_number
        if live.lost:
            async with aclosing(self._follow_stored(live.workspace_id, live.response_id, after)) as events:
                async for event in events:
                    yield event

    async def _follow_stored(
        self, workspace_id: str, response_id: str, after: int
    ) -> AsyncGenerator[Event, None]:
        """The stored events of a response another process runs, as they are stored, until its
        terminal event, or until it is over without one (cancelled) or gone (deleted).

        The stored events are the source of truth; the store's wake-ups only say when to read
        them again, and a slow poll covers a wake-up that never comes. The watch begins before
        the first read, so that nothing stored in between is waited for in vain."""
        watch = self._store.watch_events(response_id)
        try:
            while True:
                stored = await self._store.events_after(workspace_id, response_id, after)
                for event in stored:
                    yield event
                    after = event.sequence_number
                    if ends_stream(event):
                        return
                if not stored:
                    current = await self._store.get_response(workspace_id, response_id)
                    if current is None or current.status not in UNFINISHED:
                        # Its end and its last events were stored together: read them once more.
                        for event in await self._store.events_after(workspace_id, response_id, after):
                            yield event
                        return
                await watch.wait(FOLLOW_POLL_SECONDS)
        finally:
            watch.close()

    async def DeleteResponse(
        self, request: service_pb2.DeleteResponseRequest, context: auth.Context
    ) -> service_pb2.DeleteResponseResponse:
        workspace_id = auth.workspace_id()
        if await self._runner.cancel(workspace_id, request.response_id) is None and self._store.shared:
            # Run by another process, perhaps: its owner stops generating it (and storing it).
            await self._store.request_cancel(workspace_id, request.response_id)
        if not await self._store.delete_response(workspace_id, request.response_id):
            raise errors.response_not_found(request.response_id)
        return service_pb2.DeleteResponseResponse(id=request.response_id, object="response", deleted=True)

    async def CancelResponse(
        self, request: service_pb2.CancelResponseRequest, context: auth.Context
    ) -> response_pb2.Response:
        workspace_id = auth.workspace_id()
        response = await self._get(request.response_id)
        _require_background(response, "cancelled", param="response_id")
        cancelled = await self._runner.cancel(workspace_id, response.id)
        if cancelled is not None:
            return without_encrypted_reasoning(cancelled)
        if response.status in UNFINISHED:
            # Run by another process: its owner stores it cancelled, or, if it does not answer,
            # it is taken over and cancelled here.
            settled = await self._runner.cancel_elsewhere(workspace_id, response.id)
            if settled is None:
                raise errors.response_not_found(response.id)
            response = settled
        return without_encrypted_reasoning(response)

    async def ListInputItems(
        self, request: service_pb2.ListInputItemsRequest, context: auth.Context
    ) -> service_pb2.ListInputItemsResponse:
        workspace_id = auth.workspace_id()
        violations: list[Violation] = []
        limit = request.limit if request.HasField("limit") else DEFAULT_PAGE_SIZE
        if not 1 <= limit <= MAX_PAGE_SIZE:
            violations.append(
                Violation("limit", f"Invalid 'limit': expected 1 to {MAX_PAGE_SIZE}, got {limit}.")
            )
        check_include(list(request.include), violations)
        raise_if_any(violations)
        after = request.after if request.HasField("after") else None
        try:
            page = await self._store.list_input_items(
                workspace_id,
                request.response_id,
                limit=limit,
                ascending=request.order == service_pb2.ORDER_ASC,
                after=after,
            )
        except LookupError:
            raise errors.invalid_argument(
                "after",
                f"Invalid 'after': no input item '{errors.quoted(after or '')}' "
                f"in response '{errors.quoted(request.response_id)}'.",
            ) from None
        except UnreadableRecord:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"The input items of response '{errors.quoted(request.response_id)}' "
                "could not be read from the store.",
                reason="STORED_RESPONSE_UNREADABLE",
                param="response_id",
            ) from None
        if page is None:
            raise errors.response_not_found(request.response_id)
        listing = service_pb2.ListInputItemsResponse(object="list", data=page.items, has_more=page.has_more)
        if page.items:
            listing.first_id = item_id(page.items[0])
            listing.last_id = item_id(page.items[-1])
        return listing

    async def _get(self, response_id: str) -> response_pb2.Response:
        workspace_id = auth.workspace_id()
        live = self._runner.live(workspace_id, response_id)
        if live is not None and live.builder.finished:
            # Its final state is being stored: report it once it is durable, from the store.
            await live.settled()
            live = None
        if live is not None:
            snapshot = response_pb2.Response()
            snapshot.CopyFrom(live.builder.response)
            return snapshot
        try:
            response = await self._store.get_response(workspace_id, response_id)
        except UnreadableRecord as error:
            # Failed, as far as anyone can tell: what a response that cannot be read answers.
            self._report_unreadable(response_id, "stored response")
            response = unreadable_response(response_id, error.created_at, background=error.background)
        if response is None:
            raise errors.response_not_found(response_id)
        report_defaults(response)  # a response stored before they were reported has none
        return response

    def _report_unreadable(self, response_id: str, what: str) -> None:
        """One warning per response (and process) about stored data that cannot be decoded."""
        if response_id in self._reported_unreadable or len(self._reported_unreadable) >= 10_000:
            return
        self._reported_unreadable.add(response_id)
        log.warning("%s %s cannot be read; answered as failed", what, response_id)

    async def drain(self) -> None:
        """Waits for detached writes (at shutdown)."""
        await self.creation.drain()


def _require_background(response: response_pb2.Response, action: str, *, param: str) -> None:
    if not response.background:
        raise errors.ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Only responses created with 'background': true can be {action}.",
            reason="NOT_BACKGROUND",
            param=param,
        )
