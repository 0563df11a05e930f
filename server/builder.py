"""Turns a backend's events into the canonical Responses event stream and the final Response.

One place owns the rules strict clients check: sequence numbers from 0 without gaps; for each
item ``output_item.added`` → content/part events → ``output_item.done``; ``output_index`` equal
to the item's final position; a part's ``.done`` events before its item's; lifecycle snapshots
that agree with each other and with what is stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from venna.backends import base
from venna.responses.v1 import events_pb2, response_pb2
from venna.server.ids import new_id

Event = events_pb2.ResponseStreamEvent
# What a quiet builder returns for each event: nobody reads it.
_UNREAD = Event()
_LIFECYCLE_EVENTS: dict[str, Any] = {
    "created": events_pb2.ResponseCreatedEvent,
    "queued": events_pb2.ResponseQueuedEvent,
    "in_progress": events_pb2.ResponseInProgressEvent,
    "completed": events_pb2.ResponseCompletedEvent,
    "incomplete": events_pb2.ResponseIncompleteEvent,
    "failed": events_pb2.ResponseFailedEvent,
}

# OpenAI's ResponseErrorCode: the codes a failed response may report.
RESPONSE_ERROR_CODES = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "data_residency_mismatch",
        "bio_policy",
        "vector_store_timeout",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)


@dataclass(slots=True)
class _OpenItem:
    """The output item currently being written, and its open sub-part."""

    kind: str  # the Item oneof member: message, function_call, reasoning, web_search_call
    index: int
    part: str | None = None  # message: output_text | refusal; reasoning: summary | reasoning_text
    summary_part: int = -1


ENCRYPTED_REASONING = "reasoning.encrypted_content"
# The statuses of a response that has not finished (queued, or being generated).
UNFINISHED = (response_pb2.RESPONSE_STATUS_QUEUED, response_pb2.RESPONSE_STATUS_IN_PROGRESS)


def without_encrypted_reasoning(response: response_pb2.Response) -> response_pb2.Response:
    """``response`` as a client sees it unless it asked for ``reasoning.encrypted_content``:
    the opaque reasoning state stays with Venna, which sends it back upstream itself."""
    if not any(item.reasoning.HasField("encrypted_content") for item in response.output):
        return response
    redacted = response_pb2.Response()
    redacted.CopyFrom(response)
    _clear_encrypted(redacted)
    return redacted


def _clear_encrypted(response: response_pb2.Response) -> None:
    for item in response.output:
        # Checked first: clearing a field of an unset union member would set that member.
        if item.WhichOneof("item") == "reasoning":
            item.reasoning.ClearField("encrypted_content")


_TERMINAL_KINDS = {
    response_pb2.RESPONSE_STATUS_COMPLETED: "completed",
    response_pb2.RESPONSE_STATUS_INCOMPLETE: "incomplete",
    response_pb2.RESPONSE_STATUS_FAILED: "failed",
}
_TERMINAL_NAMES = frozenset(_TERMINAL_KINDS.values())


def ends_stream(event: Event) -> bool:
    """Whether ``event`` is a terminal one (completed, incomplete or failed)."""
    return event.WhichOneof("event") in _TERMINAL_NAMES


def terminal_event(response: response_pb2.Response, sequence_number: int) -> Event | None:
    """The event that ends the stream of a finished ``response`` as it stands; None for one
    that was cancelled (its stream simply ends) or has not finished."""
    kind = _TERMINAL_KINDS.get(response.status)
    if kind is None:
        return None
    event = Event(sequence_number=sequence_number, **{kind: _LIFECYCLE_EVENTS[kind]()})
    snapshot = getattr(event, kind).response
    snapshot.CopyFrom(response)
    _clear_encrypted(snapshot)
    return event


class ResponseBuilder:
    """Folds backend events into ``response`` and returns the stream events they cause.

    ``response`` keeps everything (it is what is stored); the events leave reasoning's
    ``encrypted_content`` out unless ``expose_encrypted`` (the request included it).
    """

    def __init__(
        self,
        response: response_pb2.Response,
        next_sequence_number: int = 0,
        *,
        expose_encrypted: bool = False,
        quiet: bool = False,
    ) -> None:
        # Events are numbered but not built: for a caller that reads only the final response.
        self.quiet = quiet
        self._response = response
        self.response_id = response.id
        self.next_sequence_number = next_sequence_number
        self.expose_encrypted = expose_encrypted
        self._open: _OpenItem | None = None
        # Text deltas not yet appended to the snapshot, and where they go. Appending to a
        # protobuf string copies the whole string, so a long answer is appended to in one go
        # when something reads it, instead of once per delta.
        self._pending: list[str] = []
        self._pending_key: tuple[int, str, int] | None = None
        self._pending_target: Any = None
        self._pending_field = ""
        # While an output_text part is open: its delta event with everything but the sequence
        # number and the text filled in, so that the commonest event costs one copy.
        self._text_delta: Event | None = None

    @property
    def response(self) -> response_pb2.Response:
        """The response as it stands, every delta so far included."""
        self._sync()
        return self._response

    def _buffer(self, key: tuple[int, str, int], target: Any, field: str, text: str) -> None:
        """Appends ``text`` to ``target.field`` (a string), lazily; ``key`` names the target."""
        if key != self._pending_key:
            self._sync()
            self._text_delta = None
            self._pending_key, self._pending_target, self._pending_field = key, target, field
        self._pending.append(text)

    def _sync(self) -> None:
        if self._pending:
            target, field = self._pending_target, self._pending_field
            setattr(target, field, getattr(target, field) + "".join(self._pending))
            self._pending.clear()

    # ------------------------------------------------------------------ lifecycle

    def created(self) -> list[Event]:
        """The first events: response.created, and response.queued for a queued response."""
        events = [self._lifecycle("created")]
        if self._response.status == response_pb2.RESPONSE_STATUS_QUEUED:
            events.append(self._lifecycle("queued"))
        return events

    def started(self) -> list[Event]:
        self._response.status = response_pb2.RESPONSE_STATUS_IN_PROGRESS
        return [self._lifecycle("in_progress")]

    def completed(self) -> list[Event]:
        events = self._close_item(response_pb2.ITEM_STATUS_COMPLETED)
        self._response.status = response_pb2.RESPONSE_STATUS_COMPLETED
        self._response.completed_at = int(time.time())
        self._ensure_usage()
        events.append(self._lifecycle("completed"))
        return events

    def incomplete(self, reason: response_pb2.IncompleteReason.ValueType) -> list[Event]:
        events = self._close_item(response_pb2.ITEM_STATUS_INCOMPLETE)
        self._response.status = response_pb2.RESPONSE_STATUS_INCOMPLETE
        self._response.incomplete_details.reason = reason
        self._ensure_usage()
        events.append(self._lifecycle("incomplete"))
        return events

    def failed(self, code: str, message: str) -> list[Event]:
        """``code`` outside OpenAI's ResponseErrorCode list (an upstream's own) becomes
        ``server_error``, which clients know; the message keeps the upstream's code."""
        self._response.status = response_pb2.RESPONSE_STATUS_FAILED
        if code not in RESPONSE_ERROR_CODES:
            message = f"{message} ({code})" if code else message
            code = "server_error"
        self._response.error.code = code
        self._response.error.message = message
        return [self._lifecycle("failed")]

    def cancelled(self) -> None:
        """Cancellation has no stream event of its own: the stream simply ends."""
        self._response.status = response_pb2.RESPONSE_STATUS_CANCELLED

    @property
    def finished(self) -> bool:
        return self._response.status not in (
            response_pb2.RESPONSE_STATUS_QUEUED,
            response_pb2.RESPONSE_STATUS_IN_PROGRESS,
        )

    # ------------------------------------------------------------------ backend events

    def apply(self, event: base.BackendEvent) -> list[Event]:
        """The stream events caused by one backend event (terminal ones are handled by the caller)."""
        if self._text_delta is not None and type(event) is base.TextDelta and event.text:
            return self._next_text_delta(event.text)
        match event:
            case base.TextDelta(text=text):
                return self._message_delta("output_text", text)
            case base.RefusalDelta(text=text):
                return self._message_delta("refusal", text)
            case base.TextAnnotation(annotation=annotation):
                return self._annotation(annotation)
            case base.ReasoningSummaryDelta():
                return self._reasoning_summary(event)
            case base.ReasoningTextDelta(text=text):
                return self._reasoning_text(text)
            case base.ReasoningEncryptedContent(content=content):
                # Upstreams may send it once later items have begun: it belongs to the last
                # reasoning item, not to a new one.
                reasoning = self._latest("reasoning")
                if reasoning is not None:
                    reasoning.reasoning.encrypted_content = content
                    return []
                events = self._open_item("reasoning")
                self._item().reasoning.encrypted_content = content  # the added event has a copy
                return events
            case base.FunctionCallStart(name=name, call_id=call_id):
                events = self._close_item(response_pb2.ITEM_STATUS_COMPLETED)
                events += self._open_item("function_call", name=name, call_id=call_id)
                return events
            case base.FunctionCallArgumentsDelta(text=text):
                return self._arguments(text)
            case base.WebSearchProgress():
                return self._web_search(event)
            case base.EndItem():
                return self._close_item(response_pb2.ITEM_STATUS_COMPLETED)
            case base.UsageReport():
                usage = self._response.usage
                usage.input_tokens = event.input_tokens
                usage.output_tokens = event.output_tokens
                usage.total_tokens = event.input_tokens + event.output_tokens
                usage.input_tokens_details.cached_tokens = event.cached_tokens
                usage.output_tokens_details.reasoning_tokens = event.reasoning_tokens
                return []
            case base.Compacted(compaction=compaction):
                return self._finished_item(response_pb2.Item(compaction=compaction))
            case base.Incomplete():
                raise ValueError("Incomplete is terminal: call incomplete()")
        raise TypeError(f"unknown backend event {event!r}")

    # ------------------------------------------------------------------ messages

    def _message_delta(self, part_kind: str, text: str) -> list[Event]:
        events = self._open_item("message")
        events += self._open_part(part_kind)
        if not text:
            return events
        assert self._open is not None
        message = self._item().message
        content_index = len(message.content) - 1
        part = message.content[content_index]
        common: dict[str, Any] = {
            "item_id": message.id,
            "output_index": self._open.index,
            "content_index": content_index,
        }
        key = (self._open.index, part_kind, content_index)
        if part_kind == "output_text":
            self._buffer(key, part.output_text, "text", text)
            events.append(
                self._emit("output_text_delta", events_pb2.OutputTextDeltaEvent, delta=text, **common)
            )
            self._text_delta = (
                _UNREAD if self.quiet else Event(output_text_delta=events_pb2.OutputTextDeltaEvent(**common))
            )
        else:
            self._buffer(key, part.refusal, "refusal", text)
            events.append(self._emit("refusal_delta", events_pb2.RefusalDeltaEvent, delta=text, **common))
        return events

    def _next_text_delta(self, text: str) -> list[Event]:
        """Another delta of the open output_text part (what ``_message_delta`` would return)."""
        assert self._text_delta is not None
        self._pending.append(text)
        number = self.next_sequence_number
        self.next_sequence_number = number + 1
        if self.quiet:
            return [_UNREAD]
        event = Event()
        event.CopyFrom(self._text_delta)
        event.sequence_number = number
        event.output_text_delta.delta = text
        return [event]

    def _annotation(self, annotation: response_pb2.Annotation) -> list[Event]:
        if self._open is None or self._open.kind != "message":
            # A late citation of a message already closed: it belongs to that message's text.
            latest = self._latest("message")
            if latest is not None and latest.message.content:
                latest.message.content[-1].output_text.annotations.append(annotation)
                return []
        events = self._open_item("message")
        events += self._open_part("output_text")
        assert self._open is not None
        message = self._item().message
        content_index = len(message.content) - 1
        annotations = message.content[content_index].output_text.annotations
        annotations.append(annotation)
        events.append(
            self._emit(
                "output_text_annotation_added",
                events_pb2.OutputTextAnnotationAddedEvent,
                item_id=message.id,
                output_index=self._open.index,
                content_index=content_index,
                annotation_index=len(annotations) - 1,
                annotation=annotation,
            )
        )
        return events

    def _open_part(self, part_kind: str) -> list[Event]:
        assert self._open is not None
        if self._open.part == part_kind:
            return []
        events = self._close_part()
        message = self._item().message
        part = message.content.add()
        if part_kind == "output_text":
            part.output_text.SetInParent()
        else:
            part.refusal.SetInParent()
        self._open.part = part_kind
        events.append(
            self._emit(
                "content_part_added",
                events_pb2.ContentPartAddedEvent,
                item_id=message.id,
                output_index=self._open.index,
                content_index=len(message.content) - 1,
                part=part,
            )
        )
        return events

    # ------------------------------------------------------------------ reasoning

    def _reasoning_summary(self, event: base.ReasoningSummaryDelta) -> list[Event]:
        events = self._open_item("reasoning")
        assert self._open is not None
        reasoning = self._item().reasoning
        common: dict[str, Any] = {"item_id": reasoning.id, "output_index": self._open.index}
        if self._open.part != "summary" or event.part != self._open.summary_part:
            events += self._close_part()
            reasoning.summary.add()
            self._open.part, self._open.summary_part = "summary", event.part
            events.append(
                self._emit(
                    "reasoning_summary_part_added",
                    events_pb2.ReasoningSummaryPartAddedEvent,
                    summary_index=len(reasoning.summary) - 1,
                    part=response_pb2.SummaryText(),
                    **common,
                )
            )
        if event.text:
            summary_index = len(reasoning.summary) - 1
            key = (self._open.index, "summary", summary_index)
            self._buffer(key, reasoning.summary[summary_index], "text", event.text)
            events.append(
                self._emit(
                    "reasoning_summary_text_delta",
                    events_pb2.ReasoningSummaryTextDeltaEvent,
                    summary_index=summary_index,
                    delta=event.text,
                    **common,
                )
            )
        return events

    def _reasoning_text(self, text: str) -> list[Event]:
        events = self._open_item("reasoning")
        assert self._open is not None
        reasoning = self._item().reasoning
        if self._open.part != "reasoning_text":
            events += self._close_part()
            reasoning.content.add()
            self._open.part = "reasoning_text"
        content_index = len(reasoning.content) - 1
        key = (self._open.index, "reasoning_text", content_index)
        self._buffer(key, reasoning.content[content_index], "text", text)
        events.append(
            self._emit(
                "reasoning_text_delta",
                events_pb2.ReasoningTextDeltaEvent,
                item_id=reasoning.id,
                output_index=self._open.index,
                content_index=content_index,
                delta=text,
            )
        )
        return events

    # ------------------------------------------------------------------ tools

    def _arguments(self, text: str) -> list[Event]:
        if self._open is None or self._open.kind != "function_call":
            raise ValueError("function call arguments without FunctionCallStart")
        call = self._item().function_call
        self._buffer((self._open.index, "arguments", 0), call, "arguments", text)
        return [
            self._emit(
                "function_call_arguments_delta",
                events_pb2.FunctionCallArgumentsDeltaEvent,
                item_id=call.id,
                output_index=self._open.index,
                delta=text,
            )
        ]

    def _web_search(self, event: base.WebSearchProgress) -> list[Event]:
        events: list[Event] = []
        if event.phase is base.WebSearchPhase.IN_PROGRESS or (
            self._open is None or self._open.kind != "web_search_call"
        ):
            events += self._close_item(response_pb2.ITEM_STATUS_COMPLETED)
            events += self._open_item("web_search_call")
        assert self._open is not None
        call = self._item().web_search_call
        if event.action is not None:
            call.action.CopyFrom(event.action)
        common: dict[str, Any] = {"item_id": call.id, "output_index": self._open.index}
        if event.phase is base.WebSearchPhase.IN_PROGRESS:
            events.append(
                self._emit("web_search_call_in_progress", events_pb2.WebSearchCallInProgressEvent, **common)
            )
        elif event.phase is base.WebSearchPhase.SEARCHING:
            call.status = response_pb2.WEB_SEARCH_CALL_STATUS_SEARCHING
            events.append(
                self._emit("web_search_call_searching", events_pb2.WebSearchCallSearchingEvent, **common)
            )
        else:
            events.append(
                self._emit("web_search_call_completed", events_pb2.WebSearchCallCompletedEvent, **common)
            )
            events += self._close_item(response_pb2.ITEM_STATUS_COMPLETED)
        return events

    # ------------------------------------------------------------------ items

    def _latest(self, kind: str) -> response_pb2.Item | None:
        """The last output item of ``kind``, open or closed."""
        for item in reversed(self._response.output):
            if item.WhichOneof("item") == kind:
                return item
        return None

    def _item(self) -> response_pb2.Item:
        assert self._open is not None
        return self._response.output[self._open.index]

    def _open_item(self, kind: str, *, name: str = "", call_id: str = "") -> list[Event]:
        """Opens an item of ``kind`` unless one is open already (closing one of another kind)."""
        if self._open is not None and self._open.kind == kind and kind != "function_call":
            return []
        events = self._close_item(response_pb2.ITEM_STATUS_COMPLETED)
        item = self._response.output.add()
        if kind == "message":
            item.message.id = new_id("msg")
            item.message.role = response_pb2.ROLE_ASSISTANT
            item.message.status = response_pb2.ITEM_STATUS_IN_PROGRESS
        elif kind == "function_call":
            item.function_call.id = new_id("fc")
            item.function_call.call_id = call_id
            item.function_call.name = name
            item.function_call.status = response_pb2.ITEM_STATUS_IN_PROGRESS
        elif kind == "reasoning":
            item.reasoning.id = new_id("rs")
            item.reasoning.status = response_pb2.ITEM_STATUS_IN_PROGRESS
        elif kind == "web_search_call":
            item.web_search_call.id = new_id("ws")
            item.web_search_call.status = response_pb2.WEB_SEARCH_CALL_STATUS_IN_PROGRESS
            # The action is required; a search it is, until the backend says more.
            item.web_search_call.action.search.SetInParent()
        else:
            raise ValueError(f"unknown item kind {kind}")
        self._open = _OpenItem(kind=kind, index=len(self._response.output) - 1)
        events.append(
            self._emit(
                "output_item_added", events_pb2.OutputItemAddedEvent, output_index=self._open.index, item=item
            )
        )
        return events

    def _finished_item(self, item: response_pb2.Item) -> list[Event]:
        """An item that arrives whole (a compaction): added and done at once."""
        events = self._close_item(response_pb2.ITEM_STATUS_COMPLETED)
        self._response.output.append(item)
        index = len(self._response.output) - 1
        events.append(
            self._emit("output_item_added", events_pb2.OutputItemAddedEvent, output_index=index, item=item)
        )
        events.append(
            self._emit("output_item_done", events_pb2.OutputItemDoneEvent, output_index=index, item=item)
        )
        return events

    def _close_part(self) -> list[Event]:
        """The .done events of the open sub-part of the open item."""
        self._sync()
        self._text_delta = None
        open_item = self._open
        if open_item is None or open_item.part is None:
            return []
        item = self._item()
        events: list[Event] = []
        if open_item.kind == "message":
            message = item.message
            content_index = len(message.content) - 1
            part = message.content[content_index]
            common: dict[str, Any] = {
                "item_id": message.id,
                "output_index": open_item.index,
                "content_index": content_index,
            }
            if open_item.part == "output_text":
                events.append(
                    self._emit(
                        "output_text_done",
                        events_pb2.OutputTextDoneEvent,
                        text=part.output_text.text,
                        **common,
                    )
                )
            else:
                events.append(
                    self._emit(
                        "refusal_done", events_pb2.RefusalDoneEvent, refusal=part.refusal.refusal, **common
                    )
                )
            events.append(
                self._emit("content_part_done", events_pb2.ContentPartDoneEvent, part=part, **common)
            )
        elif open_item.part == "summary":
            reasoning = item.reasoning
            summary_index = len(reasoning.summary) - 1
            summary = reasoning.summary[summary_index]
            common = {
                "item_id": reasoning.id,
                "output_index": open_item.index,
                "summary_index": summary_index,
            }
            events.append(
                self._emit(
                    "reasoning_summary_text_done",
                    events_pb2.ReasoningSummaryTextDoneEvent,
                    text=summary.text,
                    **common,
                )
            )
            events.append(
                self._emit(
                    "reasoning_summary_part_done",
                    events_pb2.ReasoningSummaryPartDoneEvent,
                    part=summary,
                    **common,
                )
            )
        else:
            reasoning = item.reasoning
            content_index = len(reasoning.content) - 1
            events.append(
                self._emit(
                    "reasoning_text_done",
                    events_pb2.ReasoningTextDoneEvent,
                    item_id=reasoning.id,
                    output_index=open_item.index,
                    content_index=content_index,
                    text=reasoning.content[content_index].text,
                )
            )
        open_item.part = None
        return events

    def _close_item(self, status: response_pb2.ItemStatus.ValueType) -> list[Event]:
        """The .done events of the open item, which takes ``status``."""
        if self._open is None:
            return []
        events = self._close_part()  # syncs the text
        item = self._item()
        kind = self._open.kind
        if kind == "function_call":
            call = item.function_call
            events.append(
                self._emit(
                    "function_call_arguments_done",
                    events_pb2.FunctionCallArgumentsDoneEvent,
                    item_id=call.id,
                    output_index=self._open.index,
                    name=call.name,
                    arguments=call.arguments,
                )
            )
            call.status = status
        elif kind == "message":
            item.message.status = status
        elif kind == "reasoning":
            item.reasoning.status = status
        elif kind == "web_search_call":
            item.web_search_call.status = (
                response_pb2.WEB_SEARCH_CALL_STATUS_COMPLETED
                if status == response_pb2.ITEM_STATUS_COMPLETED
                else response_pb2.WEB_SEARCH_CALL_STATUS_FAILED
            )
        done = self._emit(
            "output_item_done", events_pb2.OutputItemDoneEvent, output_index=self._open.index, item=item
        )
        if kind == "reasoning" and not self.expose_encrypted and not self.quiet:
            done.output_item_done.item.reasoning.ClearField("encrypted_content")
        events.append(done)
        self._open = None
        return events

    # ------------------------------------------------------------------ plumbing

    def _ensure_usage(self) -> None:
        usage = self._response.usage  # reading a submessage does not set it; touch it so it is present
        usage.SetInParent()
        usage.input_tokens_details.SetInParent()
        usage.output_tokens_details.SetInParent()

    def _lifecycle(self, kind: str) -> Event:
        event = self._emit(kind, _LIFECYCLE_EVENTS[kind])
        if self.quiet:
            return event
        # Copied in, not passed to the constructor: that one parses what it is given, and
        # protobuf's parser refuses nesting (deep tool parameters) that copying accepts.
        snapshot = getattr(event, kind).response
        snapshot.CopyFrom(self.response)  # the property: synced
        if not self.expose_encrypted:
            _clear_encrypted(snapshot)
        return event

    def _emit(self, member: str, event_type: Any, **fields: Any) -> Event:
        """Wraps one event in the envelope with the next sequence number.

        The event is built only if someone will read it (``quiet`` builders number events
        without building them). Building copies the message fields given, so an event never
        aliases the live snapshot that later deltas keep changing.
        """
        sequence_number = self.next_sequence_number
        self.next_sequence_number += 1
        if self.quiet:
            return _UNREAD
        return Event(sequence_number=sequence_number, **{member: event_type(**fields)})
