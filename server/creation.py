"""Creating a response: validate, route, rebuild the context, then run it in the foreground
(streamed or folded into one reply) or hand it to the background runner, and store it so that
no answer a caller saw end is lost.

The RPC adapters (service.py) decide which path a call takes; everything a create does between
the request and its stored end is here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor

from venna.backends import base
from venna.backends.store import ChainTooDeep, ResponseStore, UnreadableRecord
from venna.backends.token_estimate import estimate_input_tokens
from venna.responses.v1 import response_pb2, service_pb2
from venna.server import auth, compaction, errors
from venna.server.builder import ENCRYPTED_REASONING, UNFINISHED, Event, ResponseBuilder
from venna.server.execution import Execution
from venna.server.generation import generation_request
from venna.server.ids import new_id
from venna.server.routing import Router
from venna.server.runner import BackgroundRunner, LiveResponse
from venna.server.turns import append_turn
from venna.server.validation import conversation_id, validate_create

log = logging.getLogger(__name__)

# At most this many responses may precede a new one in its previous_response_id chain.
DEFAULT_MAX_CHAIN_DEPTH = 10_000
# At most this many background responses of one workspace queued or running in this process.
DEFAULT_MAX_BACKGROUND_PER_WORKSPACE = 1_000
# The model name a token count without a model is checked under (it is estimated, never routed).
_NO_MODEL = "-"
_ITEM_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "web_search_call": "ws",
    "compaction": "cmp",
}


@dataclass(slots=True)
class Run:
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


class Creation:
    """The create pipeline of one server: what a create call does besides answering."""

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
        # Writes that must outlive a cancelled call.
        self._detached: set[asyncio.Task[None]] = set()
        self._finished_listeners: list[Callable[[str, response_pb2.Response], None]] = []

    async def prepare(self, request: service_pb2.CreateResponseRequest, *, quiet: bool = False) -> Run:
        """Validates a create request and gathers everything its run needs; stores nothing.

        ``quiet``: no one will read the stream events, so they are not built.
        """
        workspace_id = auth.workspace_id()
        validate_create(request)
        route = self._router.resolve(request.model)
        history, input_items = await self.context_of(workspace_id, request)
        generation = generation_request(request, model=route.model, context=[*history, *input_items])
        try:
            route.backend.validate(generation)
        except base.BackendError as error:
            raise errors.from_backend(error) from None
        response = _initial_response(request)
        builder = ResponseBuilder(
            response, expose_encrypted=ENCRYPTED_REASONING in request.include, quiet=quiet
        )
        return Run(workspace_id, builder, route.backend, generation, request, input_items)

    async def context_of(
        self, workspace_id: str, request: service_pb2.CreateResponseRequest
    ) -> tuple[list[response_pb2.Item], list[response_pb2.Item]]:
        """The history a request continues and its own input items, item references resolved."""
        history: list[response_pb2.Item] = []
        if request.HasField("previous_response_id"):
            history = await self._history(workspace_id, request.previous_response_id)
        elif request.HasField("conversation"):
            history = await self._conversation_history(workspace_id, conversation_id(request))
        references = [item.item_reference.id for item in request.input if item.HasField("item_reference")]
        if references:
            await self._resolve_references(workspace_id, request, references)
        return history, _normalize_input(request)

    async def count_input_tokens(
        self, request: service_pb2.CountInputTokensRequest
    ) -> service_pb2.CountInputTokensResponse:
        """The input tokens a create request with these fields would send: the model's own
        count where its backend can tell, else an estimate (said so). Nothing is generated or
        stored; the request is checked as a create would be."""
        workspace_id = auth.workspace_id()
        create = _as_create_request(request)
        counted = request.HasField("model")
        if not counted:
            create.model = _NO_MODEL  # checked like any create, then estimated
        validate_create(create)
        history, input_items = await self.context_of(workspace_id, create)
        context = [*history, *input_items]
        tokens: int | None = None
        if counted:
            route = self._router.resolve(create.model)
            generation = generation_request(create, model=route.model, context=context)
            try:
                route.backend.validate(generation)
                if isinstance(route.backend, base.InputTokenCounter):
                    tokens = await route.backend.count_input_tokens(generation)
            except base.BackendError as error:
                raise errors.from_backend(error) from None
        else:
            generation = generation_request(create, model="", context=context)
        answer = service_pb2.CountInputTokensResponse(object="response.input_tokens")
        if tokens is None:
            answer.input_tokens = estimate_input_tokens(generation)
            answer.estimated = True
        else:
            answer.input_tokens = tokens
        return answer

    async def compact(
        self, request: service_pb2.CompactResponseRequest
    ) -> service_pb2.CompactResponseResponse:
        """The conversation of ``request`` compacted by its model: its user messages, then one
        compaction item summarizing all of it. Nothing is stored but the pass's usage record."""
        workspace_id = auth.workspace_id()
        create = _as_create_request(request)
        validate_create(create)
        route = self._router.resolve(create.model)
        history, input_items = await self.context_of(workspace_id, create)
        context = [*history, *input_items]
        generation = compaction.summarizing_request(
            route.model,
            context,
            create.instructions if create.HasField("instructions") else None,
            create.prompt_cache_key if create.HasField("prompt_cache_key") else None,
        )
        try:
            route.backend.validate(generation)
            summary = await compaction.summarize(route.backend, generation)
        except base.BackendError as error:
            raise errors.from_backend(error) from None
        usage = response_pb2.Usage(
            input_tokens=summary.usage.input_tokens,
            output_tokens=summary.usage.output_tokens,
            total_tokens=summary.usage.input_tokens + summary.usage.output_tokens,
            input_tokens_details=response_pb2.InputTokensDetails(cached_tokens=summary.usage.cached_tokens),
            output_tokens_details=response_pb2.OutputTokensDetails(
                reasoning_tokens=summary.usage.reasoning_tokens
            ),
        )
        # The pass is billed like a response that was not stored.
        billed = response_pb2.Response(
            id=new_id("resp"),
            object="response",
            created_at=compaction.created_at(),
            model=create.model,
            status=response_pb2.RESPONSE_STATUS_COMPLETED,
            usage=usage,
        )
        await self._store.record_usage(workspace_id, billed)
        for listener in self._finished_listeners:
            listener(workspace_id, billed)
        return service_pb2.CompactResponseResponse(
            id=billed.id,
            object="response.compaction",
            output=[*compaction.kept_messages(context), compaction.compaction_item(summary.text)],
            created_at=billed.created_at,
            usage=usage,
        )

    async def _conversation_history(self, workspace_id: str, conversation: str) -> list[response_pb2.Item]:
        try:
            page = await self._store.conversation_items(workspace_id, conversation)
        except UnreadableRecord:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Conversation '{conversation}' has an item that could not be read from the store.",
                reason="STORED_ITEM_UNREADABLE",
                param="conversation",
            ) from None
        if page is None:
            raise errors.conversation_not_found(conversation, param="conversation")
        return page.items

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
        if previous.status in UNFINISHED:
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

    async def start_background(self, run: Run) -> LiveResponse:
        workspace_id = run.workspace_id
        self._admit_background(workspace_id)
        self._admitting[workspace_id] = self._admitting.get(workspace_id, 0) + 1
        try:
            builder = run.builder
            events = builder.created()
            await self._store.create_response(
                workspace_id,
                builder.response,
                run.input_items,
                request=run.request,
                events=events,
                lease=self._runner.lease,
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

    async def foreground(self, run: Run, execution: Execution) -> AsyncGenerator[Event, None]:
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
            # Held by this process while it is generated: should it crash, another replica
            # settles the response as failed.
            await self._store.create_response(
                run.workspace_id, response, run.input_items, lease=self._runner.lease
            )
            run.announced = True
            self._runner.hold(response.id)
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
                    if not await self.save(run) and await self._still_stored(run):
                        raise _taken_over(response.id)
                    await self.extend_conversation(run)
                    yield batch[-1]
        except base.BackendError as error:
            raise await self.failed(run, error) from None
        except (asyncio.CancelledError, GeneratorExit):
            self.abandoned(run)
            raise
        if not run.saved:
            await self.save(run)

    async def failed(self, run: Run, error: base.BackendError) -> errors.ServiceError:
        """Settles a response whose backend failed before producing anything; the error to raise."""
        run.builder.failed(error.code, error.message)
        await self.save(run)
        return errors.from_backend(error, run.builder.response.id)

    def abandoned(self, run: Run) -> None:
        """The caller went away (cancelled, deadline, disconnected): the work stops here, and
        the response is settled without making anyone wait."""
        if run.saved:
            return  # the final write is queued already
        if not run.builder.finished:
            run.builder.cancelled()
        self._save_detached(run)

    async def save(self, run: Run) -> bool:
        """The final write of a finished response; False if another process held the
        response by then (it settled it: nothing was written here). An unstored response
        leaves only its usage record, which nothing in the reply depends on: that is written
        without waiting."""
        if run.stored:
            return await self._write(run) is not False
        self._save_detached(run)
        return True

    async def extend_conversation(self, run: Run) -> None:
        """Appends a finished turn to its conversation (if it has one) before its caller sees
        its end, so that the next turn made in the conversation reads it."""
        await append_turn(self._store, run.workspace_id, run.builder.response, run.input_items)

    async def _still_stored(self, run: Run) -> bool:
        """Whether a response whose final save was refused still exists (then another process
        holds it; otherwise it was deleted meanwhile, and its caller may see its end)."""
        try:
            return await self._store.get_response(run.workspace_id, run.builder.response.id) is not None
        except UnreadableRecord:
            return True

    def on_finished(self, listener: Callable[[str, response_pb2.Response], None]) -> None:
        """``listener(workspace_id, response)`` for each foreground response finished here, and
        for each compaction pass (its usage)."""
        self._finished_listeners.append(listener)

    def _write(self, run: Run) -> Awaitable[object]:
        """Queues the final write of a finished response; await it to know it is stored."""
        run.saved = True
        response = run.builder.response
        for listener in self._finished_listeners:
            listener(run.workspace_id, response)
        if run.stored and not run.announced:
            return self._store.create_response(run.workspace_id, response, run.input_items, finished=True)
        if run.stored:
            # The usage record is written in the same transaction; the lease ends with it.
            self._runner.let_go(response.id)
            return self._store.save_response(
                run.workspace_id, response, finished=True, lease=self._runner.lease
            )
        return self._store.record_usage(run.workspace_id, response)

    async def _write_detached(self, run: Run) -> None:
        try:
            await self._write(run)
        except Exception:
            log.exception("could not store the end of response %s", run.builder.response.id)

    def _save_detached(self, run: Run) -> None:
        task = asyncio.get_running_loop().create_task(self._write_detached(run))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def drain(self) -> None:
        """Waits for detached writes (at shutdown)."""
        while self._detached:
            await asyncio.wait(set(self._detached))


def _as_create_request(
    request: service_pb2.CountInputTokensRequest | service_pb2.CompactResponseRequest,
) -> service_pb2.CreateResponseRequest:
    """A request made of a create's fields (named alike) as the create it stands for, so that it
    is checked, routed and given its context exactly as a create would be."""
    create = service_pb2.CreateResponseRequest()
    for field, value in request.ListFields():
        target = getattr(create, field.name)
        if field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(create, field.name, value)
    return create


def _taken_over(response_id: str) -> errors.ServiceError:
    """The stream of a response that another process settled meanwhile (this one could not
    renew its lease in time): its caller is told so, never shown an end that was not stored."""
    return errors.ServiceError(
        grpc.StatusCode.ABORTED,
        f"Response '{response_id}' was settled by another server while this one generated it;"
        " retrieve it for its stored state.",
        reason="RESPONSE_TAKEN_OVER",
    )


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
    text=response_pb2.TextConfig(
        format=response_pb2.TextFormat(text=response_pb2.TextFormatText()),
        verbosity=response_pb2.VERBOSITY_MEDIUM,
    ),
    top_logprobs=0,
)
_RESPONSE_FIELDS = response_pb2.Response.DESCRIPTOR.fields_by_name


def _type_name(field: FieldDescriptor) -> str | None:
    """The message type a field holds (a map: none, its entries are each message's own)."""
    if field.message_type is None or field.message_type.GetOptions().map_entry:
        return None
    return str(field.message_type.full_name)


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
    # Reported as given only where both messages hold the same type (not `conversation`).
    and _type_name(field) == _type_name(_RESPONSE_FIELDS[field.name])
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
    if request.HasField("conversation"):
        response.conversation.id = conversation_id(request)
    report_defaults(response)
    return response


def report_defaults(response: response_pb2.Response) -> None:
    """Settings a response reports at their defaults, never null, as OpenAI does and Open
    Responses requires; also applied to responses stored before they were reported."""
    if not response.text.HasField("verbosity"):
        response.text.verbosity = response_pb2.VERBOSITY_MEDIUM
    if not response.HasField("top_logprobs"):
        response.top_logprobs = 0
    for tool in response.tools:
        kind = tool.WhichOneof("tool")
        if kind in ("web_search", "web_search_preview"):
            search = getattr(tool, kind)
            if not search.HasField("search_context_size"):
                search.search_context_size = response_pb2.SEARCH_CONTEXT_SIZE_MEDIUM
    json_schema = response.text.format.json_schema
    if response.text.format.HasField("json_schema") and not json_schema.HasField("strict"):
        json_schema.strict = False
