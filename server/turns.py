"""A finished response joins its conversation: its input and output are appended to it."""

from __future__ import annotations

from venna.backends.store import ResponseStore
from venna.responses.v1 import response_pb2

# Statuses whose turn joins its conversation (a failed or cancelled one does not).
_JOINING = frozenset({response_pb2.RESPONSE_STATUS_COMPLETED, response_pb2.RESPONSE_STATUS_INCOMPLETE})


async def append_turn(
    store: ResponseStore,
    workspace_id: str,
    response: response_pb2.Response,
    input_items: list[response_pb2.Item] | None = None,
) -> None:
    """Appends a finished response's input and output to its conversation, if it has one and
    ended completed or incomplete. ``input_items`` None: the response is stored, and its own
    items are read back (it has no previous response, so its context is exactly those)."""
    if not response.HasField("conversation") or response.status not in _JOINING:
        return
    if input_items is None:
        items = await store.load_context(workspace_id, response.id) or []
    else:
        items = [*input_items, *response.output]
    await store.add_conversation_items(workspace_id, response.conversation.id, items)
