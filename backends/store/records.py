"""Records as every engine stores them: protobuf bodies, the rows of new records (built at the
call, so that what is written is the records as they were then), key hashes, and decoding that
fails per record."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from venna.backends.store.protocol import (
    Lease,
    PendingResponse,
    UnreadableRecord,
    WorkspaceLimits,
    item_id,
    unreadable_response,
)
from venna.responses.v1 import events_pb2, response_pb2, service_pb2

INPUT, OUTPUT = 0, 1
# Every workspace key begins so, every admin key with ADMIN_KEY_PREFIX: anything else is
# refused without a lookup.
KEY_PREFIX = "vk_"
ADMIN_KEY_PREFIX = "vka_"

_M = TypeVar("_M", bound=Message)


def decode(message_type: type[_M], body: bytes) -> _M | None:
    """The decoded message, or None if ``body`` cannot be decoded."""
    try:
        return message_type.FromString(body)
    except DecodeError:
        return None


# The members of ResponseStreamEvent's union that end a response's stream.
_TERMINAL_EVENT_FIELDS = frozenset(
    events_pb2.ResponseStreamEvent.DESCRIPTOR.fields_by_name[name].number
    for name in ("completed", "incomplete", "failed")
)


def is_terminal_event(body: bytes) -> bool:
    """Whether a stored event is terminal, read from its top-level fields only: this works
    even when the event's snapshot is nested too deeply to decode."""
    try:
        shallow = empty_pb2.Empty.FromString(body)  # every field is unknown, none is descended into
    except DecodeError:
        return False
    fields = UnknownFieldSet(shallow)
    return any(fields[index].field_number in _TERMINAL_EVENT_FIELDS for index in range(len(fields)))


def decode_item(body: bytes, response_id: str, item_id: str | None = None) -> response_pb2.Item:
    """A stored item; UnreadableRecord (naming its response, and the item if known) if it
    cannot be decoded."""
    item = decode(response_pb2.Item, body)
    if item is None:
        raise UnreadableRecord(response_id, item_id=item_id)
    return item


def decode_events(response_id: str, bodies: Iterable[bytes]) -> list[events_pb2.ResponseStreamEvent]:
    """Stored events in order; UnreadableRecord at the first that cannot be decoded, with the
    events before it in ``readable``."""
    events: list[events_pb2.ResponseStreamEvent] = []
    for body in bodies:
        event = decode(events_pb2.ResponseStreamEvent, body)
        if event is None:
            raise UnreadableRecord(response_id, readable=events)
        events.append(event)
    return events


def terminal_event_of(response_id: str, last_body: bytes | None) -> events_pb2.ResponseStreamEvent | None:
    """The response's last stored event if it ends the stream, else None; UnreadableRecord if
    it is terminal but cannot be decoded."""
    if last_body is None or not is_terminal_event(last_body):
        return None
    event = decode(events_pb2.ResponseStreamEvent, last_body)
    if event is None:
        raise UnreadableRecord(response_id)
    return event


def pending_response(
    workspace_id: str,
    response_id: str,
    status: int,
    background: bool,
    created_at: int,
    body: bytes,
    request: bytes | None,
    cancelling: bool = False,
) -> PendingResponse:
    """An unfinished response as a claim sees it: ``unreadable`` (with a placeholder body)
    rather than an error when its body or request cannot be decoded."""
    response = decode(response_pb2.Response, body)
    kept = decode(service_pb2.CreateResponseRequest, request) if request else None
    unreadable = response is None or (request is not None and kept is None)
    if response is None:
        response = unreadable_response(response_id, created_at, background=background, status=status)
    return PendingResponse(workspace_id, response, kept, unreadable=unreadable, cancelling=cancelling)


def new_secret(prefix: str) -> str:
    """A new key: the prefix and 256 random bits."""
    return prefix + secrets.token_urlsafe(32)


def key_hint(key: str) -> str:
    """Enough of a key to tell it from others in a listing, never enough to use it."""
    return key[: key.index("_") + 5] + "…" + key[-4:]


def new_workspace_id() -> str:
    return "ws_" + secrets.token_hex(12)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def new_admin_key_id() -> str:
    return "akey_" + secrets.token_hex(8)


def limit_columns(limits: WorkspaceLimits) -> tuple[int | None, int | None, int | None]:
    return (limits.requests_per_minute, limits.tokens_per_minute, limits.monthly_tokens)


def limits_of(row: Sequence[int | None] | None) -> WorkspaceLimits:
    """The limits of a row of limit_columns (none for no row)."""
    return WorkspaceLimits(*row) if row else WorkspaceLimits()


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a fast unsalted hash cannot be brute-forced.
    return hashlib.sha256(key.encode()).hexdigest()


# A usage record's status by the response's: "completed", "failed", ...
_STATUS_NAMES = {
    value: name.removeprefix("RESPONSE_STATUS_").lower()
    for name, value in response_pb2.ResponseStatus.items()
}


def usage_row(
    workspace_id: str, response: response_pb2.Response, finished_at: int
) -> tuple[str, str, str, str, int, int, int, int, int, int]:
    usage = response.usage
    return (
        response.id,
        workspace_id,
        response.model,
        _STATUS_NAMES[response.status],
        usage.input_tokens,
        usage.output_tokens,
        usage.output_tokens_details.reasoning_tokens,
        usage.input_tokens_details.cached_tokens,
        response.created_at,
        finished_at,
    )


@dataclass(slots=True)
class NewRows:
    """Rows of new records, built by the caller and inserted by an engine in one go.

    Only inserts of records nobody can know of yet (a new response, its items and events, a
    usage record), so that inserts queued together can be merged into one statement per table
    without changing what anyone reads.
    """

    usage: list[tuple[object, ...]] = field(default_factory=list)
    responses: list[tuple[object, ...]] = field(default_factory=list)
    items: list[tuple[object, ...]] = field(default_factory=list)
    events: list[tuple[object, ...]] = field(default_factory=list)

    def add(self, other: NewRows) -> None:
        self.usage += other.usage
        self.responses += other.responses
        self.items += other.items
        self.events += other.events


def new_response_rows(
    workspace_id: str,
    response: response_pb2.Response,
    input_items: Sequence[response_pb2.Item],
    *,
    request: service_pb2.CreateResponseRequest | None = None,
    events: Sequence[events_pb2.ResponseStreamEvent] = (),
    finished: bool = False,
    lease: Lease | None = None,
) -> NewRows:
    """The rows of a new response with its input and output items (and, for background runs,
    its request and first events); ``finished`` adds its usage record. A response row ends
    with its lease's owner and length (None, None without one): the engine turns the length
    into an expiry by its own clock."""
    return NewRows(
        usage=[usage_row(workspace_id, response, int(time.time()))] if finished else [],
        responses=[
            (
                response.id,
                workspace_id,
                response.previous_response_id if response.HasField("previous_response_id") else None,
                response.status,
                int(response.background),
                response.created_at,
                body_without_output(response),
                request.SerializeToString() if request is not None else None,
                lease.owner if lease is not None else None,
                lease.milliseconds if lease is not None else None,
            )
        ],
        items=item_rows(workspace_id, response.id, input_items, response.output),
        events=event_tuples(response.id, events),
    )


def usage_rows(workspace_id: str, response: response_pb2.Response) -> NewRows:
    """The usage record of a finished response that is not stored (``store: false``)."""
    return NewRows(usage=[usage_row(workspace_id, response, int(time.time()))])


def item_rows(
    workspace_id: str,
    response_id: str,
    input_items: Sequence[response_pb2.Item],
    output_items: Sequence[response_pb2.Item],
) -> list[tuple[object, ...]]:
    return [
        (workspace_id, response_id, item_id(item), kind, position, item.SerializeToString())
        for kind, items in ((INPUT, input_items), (OUTPUT, output_items))
        for position, item in enumerate(items)
    ]


def event_rows(response_id: str, events: Sequence[events_pb2.ResponseStreamEvent]) -> NewRows:
    """Stream events of a stored response, in addition to those it has."""
    return NewRows(events=event_tuples(response_id, events))


def event_tuples(
    response_id: str, events: Sequence[events_pb2.ResponseStreamEvent]
) -> list[tuple[object, ...]]:
    return [(response_id, event.sequence_number, event.SerializeToString()) for event in events]


def body_without_output(response: response_pb2.Response) -> bytes:
    body = response_pb2.Response()
    body.CopyFrom(response)
    body.ClearField("output")
    return body.SerializeToString()
