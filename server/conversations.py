"""Conversations: stored, ordered item lists that responses read as their context (``conversation``
on a create) and extend with their input and output once they are over.

Every call is scoped to the caller's workspace: another workspace's conversation is "not found",
exactly like one that never existed.
"""

from __future__ import annotations

import time

import grpc

from venna.backends.store import InputItemsPage, ResponseStore, UnreadableRecord, item_id
from venna.responses.v1 import conversations_pb2, response_pb2, service_pb2
from venna.server import auth, errors
from venna.server.creation import Creation
from venna.server.ids import new_id
from venna.server.validation import validate_conversation_items

DEFAULT_ITEMS_LIMIT = 20
MAX_ITEMS_LIMIT = 100


def _unreadable(conversation_id: str) -> errors.ServiceError:
    return errors.ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"Conversation '{conversation_id}' has an item that could not be read from the store.",
        reason="STORED_ITEM_UNREADABLE",
    )


def _item_list(page: InputItemsPage) -> conversations_pb2.ConversationItemList:
    listed = conversations_pb2.ConversationItemList(object="list", data=page.items, has_more=page.has_more)
    if page.items:
        listed.first_id = item_id(page.items[0])
        listed.last_id = item_id(page.items[-1])
    return listed


def _item_not_found(item: str) -> errors.ServiceError:
    return errors.ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"Item with id '{errors.quoted(item)}' not found in this conversation.",
        reason="ITEM_NOT_FOUND",
        param="item_id",
    )


class ConversationsService:
    """The ConversationsService RPCs, over the store (and the create pipeline's item checks)."""

    def __init__(self, store: ResponseStore, creation: Creation) -> None:
        self._store = store
        self._creation = creation

    async def _items(self, items: list[response_pb2.Item]) -> list[response_pb2.Item]:
        """Items as a conversation stores them: references resolved, ids and statuses given."""
        request = service_pb2.CreateResponseRequest(input=items)
        _, normalized = await self._creation.context_of(auth.workspace_id(), request)
        return normalized

    async def CreateConversation(
        self, request: conversations_pb2.CreateConversationRequest, context: auth.Context
    ) -> conversations_pb2.Conversation:
        validate_conversation_items(request.items, request.metadata)
        items = await self._items(list(request.items))
        conversation = conversations_pb2.Conversation(
            id=new_id("conv"), object="conversation", created_at=int(time.time()), metadata=request.metadata
        )
        await self._store.create_conversation(auth.workspace_id(), conversation, items)
        return conversation

    async def GetConversation(
        self, request: conversations_pb2.GetConversationRequest, context: auth.Context
    ) -> conversations_pb2.Conversation:
        found = await self._store.get_conversation(auth.workspace_id(), request.conversation_id)
        if found is None:
            raise errors.conversation_not_found(request.conversation_id)
        return found

    async def UpdateConversation(
        self, request: conversations_pb2.UpdateConversationRequest, context: auth.Context
    ) -> conversations_pb2.Conversation:
        validate_conversation_items([], request.metadata)
        updated = await self._store.update_conversation(
            auth.workspace_id(), request.conversation_id, request.metadata
        )
        if updated is None:
            raise errors.conversation_not_found(request.conversation_id)
        return updated

    async def DeleteConversation(
        self, request: conversations_pb2.DeleteConversationRequest, context: auth.Context
    ) -> conversations_pb2.DeleteConversationResponse:
        if not await self._store.delete_conversation(auth.workspace_id(), request.conversation_id):
            raise errors.conversation_not_found(request.conversation_id)
        return conversations_pb2.DeleteConversationResponse(
            id=request.conversation_id, object="conversation.deleted", deleted=True
        )

    async def ListConversationItems(
        self, request: conversations_pb2.ListConversationItemsRequest, context: auth.Context
    ) -> conversations_pb2.ConversationItemList:
        limit = request.limit if request.HasField("limit") else DEFAULT_ITEMS_LIMIT
        if not 1 <= limit <= MAX_ITEMS_LIMIT:
            raise errors.invalid_argument(
                "limit", f"Invalid 'limit': expected an integer from 1 to {MAX_ITEMS_LIMIT}, got {limit}."
            )
        try:
            page = await self._store.conversation_items(
                auth.workspace_id(),
                request.conversation_id,
                limit=limit,
                ascending=request.order == service_pb2.ORDER_ASC,
                after=request.after if request.HasField("after") else None,
            )
        except LookupError:
            raise errors.invalid_argument(
                "after",
                f"Invalid 'after': item '{errors.quoted(request.after)}' is not in this conversation.",
            ) from None
        except UnreadableRecord:
            raise _unreadable(request.conversation_id) from None
        if page is None:
            raise errors.conversation_not_found(request.conversation_id)
        return _item_list(page)

    async def CreateConversationItems(
        self, request: conversations_pb2.CreateConversationItemsRequest, context: auth.Context
    ) -> conversations_pb2.ConversationItemList:
        validate_conversation_items(request.items)
        items = await self._items(list(request.items))
        if not await self._store.add_conversation_items(auth.workspace_id(), request.conversation_id, items):
            raise errors.conversation_not_found(request.conversation_id)
        return _item_list(InputItemsPage(items=items, has_more=False))

    async def GetConversationItem(
        self, request: conversations_pb2.GetConversationItemRequest, context: auth.Context
    ) -> response_pb2.Item:
        workspace_id = auth.workspace_id()
        try:
            item = await self._store.get_conversation_item(
                workspace_id, request.conversation_id, request.item_id
            )
        except UnreadableRecord:
            raise _unreadable(request.conversation_id) from None
        if item is None:
            if await self._store.get_conversation(workspace_id, request.conversation_id) is None:
                raise errors.conversation_not_found(request.conversation_id)
            raise _item_not_found(request.item_id)
        return item

    async def DeleteConversationItem(
        self, request: conversations_pb2.DeleteConversationItemRequest, context: auth.Context
    ) -> conversations_pb2.Conversation:
        workspace_id = auth.workspace_id()
        conversation = await self._store.get_conversation(workspace_id, request.conversation_id)
        if conversation is None:
            raise errors.conversation_not_found(request.conversation_id)
        if not await self._store.delete_conversation_item(
            workspace_id, request.conversation_id, request.item_id
        ):
            raise _item_not_found(request.item_id)
        return conversation
