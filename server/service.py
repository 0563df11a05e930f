"""The Responses service: validate → route → load history → run → persist → emit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from venna.backends import base
from venna.backends.store import (
    ChainTooDeep,
    ResponseStore,
    UnreadableRecord,
    item_id,
    unreadable_response,
)
from venna.responses.v1 import response_pb2, service_pb2, service_pb2_grpc
from venna.server import auth, errors
from venna.server.builder import (
    ENCRYPTED_REASONING,
    Event,
    ResponseBuilder,
    new_id,
    terminal_event,
    without_encrypted_reasoning,
)
from venna.server.execution import Execution
from venna.server.generation import generation_request
from venna.server.routing import Router
from venna.server.runner import BackgroundRunner, LiveResponse
from venna.server.validation import Violation, check_include, raise_if_any, validate_create

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# At most this many responses may precede a new one in its previous_response_id chain.
DEFAULT_MAX_CHAIN_DEPTH = 10_000
# At most this many background responses of one workspace queued or running in this process.
DEFAULT_MAX_BACKGROUND_PER_WORKSPACE = 1_000
_ITEM_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "web_search_call": "ws",
}
_UNFINISHED = (response_pb2.RESPONSE_STATUS_QUEUED, response_pb2.RESPONSE_STATUS_IN_PROGRESS)


@dataclass(slots=True)
class _Run:
    """A validated create request, ready to generate."""

    workspace_id: str
    builder: ResponseBuilder
    backend: base.Backend
    generation: base.GenerationRequest
    # The create request as received: stored, so that queued work can run again after a restart.
    request: service_pb2.CreateResponseRequest
    input_items: list[response_pb2.Item]
    # Whether a stored response was written as in progress before it ran; if not, it is
    # written once, with its input and output, when it is over.
    announced: bool = False
    # Whether the final write is queued: it happens even if the caller goes away meanwhile.
    saved: bool = False

    @property
    def stored(self) -> bool:
        return self.builder.response.store


class ResponsesService(service_pb2_grpc.ResponsesServiceServicer):
    def __init__(
        self,
        store: ResponseStore,
        router: Router,
        runner: BackgroundRunner,
        *,
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
        max_background_per_workspace: int = DEFAULT_MAX_BACKGROUND_PER_WORKSPACE,
    ) -> None:
        self._store = store
        self._router = router
        self._runner = runner
        self.max_chain_depth = max_chain_depth
        self.max_background_per_workspace = max_background_per_workspace
        # Background creates of each workspace between their admission and the runner taking
        # them: counted against the cap like the runner's own.
        self._admitting: dict[str, int] = {}
        # Stored responses found unreadable, each reported once (a client may poll one).
        self._reported_unreadable: set[str] = set()
        # Writes that must outlive a cancelled call.
        self._detached: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ RPCs

    async def CreateResponse(
        self, request: service_pb2.CreateResponseRequest, context: auth.Context
    ) -> response_pb2.Response:
        # The caller reads only the final response; a background run keeps its events.
        run = await self._prepare(request, quiet=not request.background)
        if run.builder.response.background:
            await self._start_background(run)
            return run.builder.response
        # Nobody knows this response's id before the reply: it is stored once, when it is over.
        execution = Execution(run.builder, run.backend, run.generation)
        try:
            await execution.run()
        except base.BackendError as error:
            raise await self._failed(run, error) from None
        except asyncio.CancelledError:
            self._abandoned(run)
            raise
        await self._save(run)
        if execution.error is not None:
            raise errors.from_backend(execution.error, run.builder.response.id)
        if run.builder.expose_encrypted:
            return run.builder.response
        return without_encrypted_reasoning(run.builder.response)

    async def StreamResponse(
        self, request: service_pb2.CreateResponseRequest, context: auth.Context
    ) -> AsyncGenerator[Event, None]:
        run = await self._prepare(request)
        if run.builder.response.background:
            # The response runs on whether or not this caller stays; it may resume later.
            live = await self._start_background(run)
            async with aclosing(live.follow(-1)) as events:
                async for event in events:
                    yield event
            return
        execution = Execution(run.builder, run.backend, run.generation)
        async with aclosing(self._foreground(run, execution)) as events:
            async for event in events:
                yield event

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
            async with aclosing(live.follow(after)) as events:
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

    async def DeleteResponse(
        self, request: service_pb2.DeleteResponseRequest, context: auth.Context
    ) -> service_pb2.DeleteResponseResponse:
        workspace_id = auth.workspace_id()
        await self._runner.cancel(workspace_id, request.response_id)
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
        if response.status in _UNFINISHED:
            # Unfinished but run by no one here (another process owned it): settle it in place.
            response.status = response_pb2.RESPONSE_STATUS_CANCELLED
            await self._store.save_response(workspace_id, response, finished=True)
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

    # ------------------------------------------------------------------ creation

    async def _prepare(self, request: service_pb2.CreateResponseRequest, *, quiet: bool = False) -> _Run:
        """Validates a create request and gathers everything its run needs; stores nothing.

        ``quiet``: no one will read the stream events, so they are not built.
        """
        workspace_id = auth.workspace_id()
        validate_create(request)
        route = self._router.resolve(request.model)
        history: list[response_pb2.Item] = []
        if request.HasField("previous_response_id"):
            history = await self._history(workspace_id, request.previous_response_id)
        references = [item.item_reference.id for item in request.input if item.HasField("item_reference")]
        if references:
            await self._resolve_references(workspace_id, request, references)
        input_items = _normalize_input(request)
        generation = generation_request(request, model=route.model, context=[*history, *input_items])
        try:
            route.backend.validate(generation)
        except base.BackendError as error:
            raise errors.from_backend(error) from None
        response = _initial_response(request)
        builder = ResponseBuilder(
            response, expose_encrypted=ENCRYPTED_REASONING in request.include, quiet=quiet
        )
        return _Run(workspace_id, builder, route.backend, generation, request, input_items)

    async def _history(self, workspace_id: str, previous_response_id: str) -> list[response_pb2.Item]:
        try:
            previous = await self._store.get_response(workspace_id, previous_response_id)
        except UnreadableRecord as error:
            raise _unreadable_previous(previous_response_id, error) from None
        if previous is None:
            raise errors.ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"Previous response with id '{errors.quoted(previous_response_id)}' not found.",
                reason="PREVIOUS_RESPONSE_NOT_FOUND",
                param="previous_response_id",
            )
        if previous.status in _UNFINISHED:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Previous response '{previous_response_id}' has not finished yet.",
                reason="PREVIOUS_RESPONSE_IN_PROGRESS",
                param="previous_response_id",
            )
        try:
            history = await self._store.load_context(
                workspace_id, previous_response_id, max_depth=self.max_chain_depth
            )
        except ChainTooDeep as error:
            raise errors.invalid_argument(
                "previous_response_id",
                f"The conversation of previous response '{previous_response_id}' is too long: at most"
                f" {error.limit} responses may precede a response (max_chain_depth).",
                reason="CHAIN_TOO_DEEP",
            ) from None
        except UnreadableRecord as error:
            raise _unreadable_previous(previous_response_id, error) from None
        return history or []

    async def _resolve_references(
        self, workspace_id: str, request: service_pb2.CreateResponseRequest, references: list[str]
    ) -> None:
        """Replaces each item reference of the input (their ids: ``references``) with the stored
        item it names, in place."""
        try:
            found = await self._store.find_items(workspace_id, references)
        except UnreadableRecord as error:
            position = next(
                index
                for index, item in enumerate(request.input)
                if item.HasField("item_reference") and item.item_reference.id == error.item_id
            )
            raise errors.invalid_argument(
                f"input[{position}].id",
                f"Item with id '{error.item_id}' could not be read from the store.",
                reason="STORED_ITEM_UNREADABLE",
            ) from None
        for index, item in enumerate(request.input):
            if item.HasField("item_reference"):
                referenced = found.get(item.item_reference.id)
                if referenced is None:
                    raise errors.invalid_argument(
                        f"input[{index}].id",
                        f"Item with id '{errors.quoted(item.item_reference.id)}' not found.",
                    )
                item.CopyFrom(referenced)

    async def _start_background(self, run: _Run) -> LiveResponse:
        workspace_id = run.workspace_id
        self._admit_background(workspace_id)
        self._admitting[workspace_id] = self._admitting.get(workspace_id, 0) + 1
        try:
            builder = run.builder
            events = builder.created()
            await self._store.create_response(
                workspace_id, builder.response, run.input_items, request=run.request, events=events
            )
            # The caller gets the queued snapshot; the runner mutates its own copy.
            running = response_pb2.Response()
            running.CopyFrom(builder.response)
            return self._runner.submit(
                workspace_id,
                ResponseBuilder(
                    running,
                    next_sequence_number=builder.next_sequence_number,
                    expose_encrypted=builder.expose_encrypted,
                ),
                run.generation,
                list(events),
            )
        finally:
            self._admitting[workspace_id] -= 1
            if not self._admitting[workspace_id]:
                del self._admitting[workspace_id]

    def _admit_background(self, workspace_id: str) -> None:
        """Refuses a background response over the workspace's cap, before anything is stored."""
        active = self._runner.active(workspace_id) + self._admitting.get(workspace_id, 0)
        if active >= self.max_background_per_workspace:
            raise errors.ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Too many background responses: this workspace has {active} queued or running, and"
                f" the limit is {self.max_background_per_workspace} (max_background_per_workspace)."
                " Retry once some have finished.",
                reason="TOO_MANY_BACKGROUND_RESPONSES",
                param="background",
            )

    async def _foreground(self, run: _Run, execution: Execution) -> AsyncGenerator[Event, None]:
        """The events of a response streamed to its caller while it is generated.

        Lifecycle events are held back until the backend produced something, so a backend that
        fails at once becomes an error status instead of a stream that starts and fails. The
        response is stored as in progress first: the caller learns its id from
        response.created while it runs. Its terminal event is sent once its final state is
        stored, so that no crash can lose an answer the caller saw end.
        """
        builder = run.builder
        response = builder.response
        if run.stored:
            await self._store.create_response(run.workspace_id, response, run.input_items)
            run.announced = True
        head = builder.created() + builder.started()
        try:
            async with aclosing(execution.batches()) as batches:
                async for batch in batches:
                    for event in head:
                        yield event
                    head = []
                    if not builder.finished:
                        for event in batch:
                            yield event
                        continue
                    # The terminal event (the batch's last) reaches the caller only once the
                    # final state is stored: what a caller saw end is never lost.
                    for event in batch[:-1]:
                        yield event
                    await self._save(run)
                    yield batch[-1]
        except base.BackendError as error:
            raise await self._failed(run, error) from None
        except (asyncio.CancelledError, GeneratorExit):
            self._abandoned(run)
            raise
        if not run.saved:
            await self._save(run)

    async def _failed(self, run: _Run, error: base.BackendError) -> errors.ServiceError:
        """Settles a response whose backend failed before producing anything; the error to raise."""
        run.builder.failed(error.code, error.message)
        await self._save(run)
        return errors.from_backend(error, run.builder.response.id)

    def _abandoned(self, run: _Run) -> None:
        """The caller went away (cancelled, deadline, disconnected): the work stops here, and
        the response is settled without making anyone wait."""
        if run.saved:
            return  # the final write is queued already
        if not run.builder.finished:
            run.builder.cancelled()
        self._save_detached(run)

    async def _save(self, run: _Run) -> None:
        """The final write of a finished response. An unstored one leaves only its usage
        record, which nothing in the reply depends on: that is written without waiting."""
        if run.stored:
            await self._write(run)
        else:
            self._save_detached(run)

    def _write(self, run: _Run) -> Awaitable[object]:
        """Queues the final write of a finished response; await it to know it is stored."""
        run.saved = True
        response = run.builder.response
        if run.stored and not run.announced:
            return self._store.create_response(run.workspace_id, response, run.input_items, finished=True)
        if run.stored:
            # The usage record is written in the same transaction.
            return self._store.save_response(run.workspace_id, response, finished=True)
        return self._store.record_usage(run.workspace_id, response)

    async def _write_detached(self, run: _Run) -> None:
        try:
            await self._write(run)
        except Exception:
            log.exception("could not store the end of response %s", run.builder.response.id)

    def _save_detached(self, run: _Run) -> None:
        task = asyncio.get_running_loop().create_task(self._write_detached(run))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

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
            return unreadable_response(response_id, error.created_at, background=error.background)
        if response is None:
            raise errors.response_not_found(response_id)
        return response

    def _report_unreadable(self, response_id: str, what: str) -> None:
        """One warning per response (and process) about stored data that cannot be decoded."""
        if response_id in self._reported_unreadable or len(self._reported_unreadable) >= 10_000:
            return
        self._reported_unreadable.add(response_id)
        log.warning("%s %s cannot be read; answered as failed", what, response_id)

    async def drain(self) -> None:
        """Waits for detached writes (at shutdown)."""
        while self._detached:
            await asyncio.wait(set(self._detached))


def _unreadable_previous(previous_response_id: str, error: UnreadableRecord) -> errors.ServiceError:
    """The error of a create that continues a conversation one of whose stored responses
    cannot be read: it cannot be continued, but nothing is wrong with the server."""
    which = "it" if error.response_id == previous_response_id else f"response '{error.response_id}' of it"
    return errors.ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"Previous response '{previous_response_id}' cannot be continued: {which} could not be read"
        " from the store.",
        reason="PREVIOUS_RESPONSE_UNREADABLE",
        param="previous_response_id",
    )


def _require_background(response: response_pb2.Response, action: str, *, param: str) -> None:
    if not response.background:
        raise errors.ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Only responses created with 'background': true can be {action}.",
            reason="NOT_BACKGROUND",
            param=param,
        )


def _normalize_input(request: service_pb2.CreateResponseRequest) -> list[response_pb2.Item]:
    """Gives every input item an id and a status, in place: the request is this call's own,
    and copying every item would cost as much again.

    The result is what is stored and listed by ListInputItems, so clients can page through
    items they sent without ids.
    """
    items = request.input
    for item in items:
        kind = item.WhichOneof("item")
        assert kind is not None  # validated
        member = getattr(item, kind)
        if not member.id:
            member.id = new_id(_ITEM_ID_PREFIXES[kind])
        if kind == "message":
            _normalize_message(item.message)
        elif kind in ("function_call", "function_call_output") and not member.status:
            member.status = response_pb2.ITEM_STATUS_COMPLETED
    return list(items)


def _normalize_message(message: response_pb2.Message) -> None:
    """Stored messages are completed, an assistant's text is output text, and an image's
    detail is explicit (``auto`` unless given), as the API reports them."""
    if not message.status:
        message.status = response_pb2.ITEM_STATUS_COMPLETED
    for part in message.content:
        if message.role == response_pb2.ROLE_ASSISTANT and part.HasField("input_text"):
            part.output_text.text = part.input_text.text
        elif part.HasField("input_image") and not part.input_image.detail:
            part.input_image.detail = response_pb2.IMAGE_DETAIL_AUTO


# The Response as it stands before a request's settings are applied: every default resolved.
_RESPONSE_DEFAULTS = response_pb2.Response(
    object="response",
    store=True,
    parallel_tool_calls=True,
    temperature=1.0,
    top_p=1.0,
    truncation=response_pb2.TRUNCATION_DISABLED,
    service_tier=response_pb2.SERVICE_TIER_AUTO,
    tool_choice=response_pb2.ToolChoice(mode=response_pb2.TOOL_CHOICE_MODE_AUTO),
    text=response_pb2.TextConfig(format=response_pb2.TextFormat(text=response_pb2.TextFormatText())),
)
_RESPONSE_FIELDS = response_pb2.Response.DESCRIPTOR.fields_by_name
# The request's settings that the response reports (both messages name them alike), by how they
# are copied: a scalar is assigned, a message replaces the default, a list or map is extended.
_REPORTED_SETTINGS: dict[str, str] = {
    field.name: (
        "map"
        if field.message_type is not None and field.message_type.GetOptions().map_entry
        else "list"
        if field.is_repeated
        else "message"
        if field.message_type is not None
        else "scalar"
    )
    for field in service_pb2.CreateResponseRequest.DESCRIPTOR.fields
    if field.name in _RESPONSE_FIELDS
}


def _initial_response(request: service_pb2.CreateResponseRequest) -> response_pb2.Response:
    """The Response as it stands before generation: every setting resolved to its default."""
    response = response_pb2.Response()
    response.CopyFrom(_RESPONSE_DEFAULTS)
    for field, value in request.ListFields():  # only the fields the request sets
        how = _REPORTED_SETTINGS.get(field.name)
        if how == "scalar":
            setattr(response, field.name, value)
        elif how == "message":
            getattr(response, field.name).CopyFrom(value)
        elif how == "list":
            getattr(response, field.name).extend(value)
        elif how == "map":
            getattr(response, field.name).update(value)
    response.id = new_id("resp")
    response.created_at = int(time.time())
    if request.background:
        response.status = response_pb2.RESPONSE_STATUS_QUEUED
    else:
        response.status = response_pb2.RESPONSE_STATUS_IN_PROGRESS
    if not response.text.format.WhichOneof("format"):
        response.text.format.text.SetInParent()
    return response
