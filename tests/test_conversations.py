"""Conversations over HTTP (the official SDK's ``client.conversations``) and gRPC: the eight
routes, ``conversation`` on a create (its items are the context; the turn's input and output are
appended once it is over, foreground, streamed or in the background), and workspace isolation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from tests.conftest import error_info, serving
from tests.http_harness import TRANSPORTS, HttpVenna, running
from tests.openai_schema import validate, validate_response
from venna.responses.v1 import conversations_pb2, conversations_pb2_grpc


@pytest.fixture(scope="module", params=TRANSPORTS)
def http_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path_factory.mktemp("venna") / "venna.db", transport=str(request.param)))


@pytest.fixture
def sdk(http_venna: HttpVenna) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=http_venna.base_url, api_key=http_venna.alpha, max_retries=0) as client:
        yield client


def texts(items: Any) -> list[tuple[str, str]]:
    """(role, text) of each message item."""
    return [(item.role, item.content[0].text) for item in items if item.type == "message"]


def test_the_sdk_drives_every_route(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create(
        metadata={"topic": "launch"}, items=[{"role": "user", "content": "hello"}]
    )
    assert made.object == "conversation" and made.id.startswith("conv_")
    assert sdk.conversations.retrieve(made.id).metadata == {"topic": "launch"}
    updated = sdk.conversations.update(made.id, metadata={"topic": "budget"})
    assert updated.metadata == {"topic": "budget"}
    added = sdk.conversations.items.create(
        made.id, items=[{"type": "message", "role": "user", "content": "second"}]
    )
    assert [item.type for item in added.data] == ["message"]
    listed = sdk.conversations.items.list(made.id, order="asc")
    assert texts(listed.data) == [("user", "hello"), ("user", "second")]
    first_id = listed.data[0].id
    assert first_id is not None
    assert sdk.conversations.items.retrieve(first_id, conversation_id=made.id).id == first_id
    after_delete = sdk.conversations.items.delete(first_id, conversation_id=made.id)
    assert after_delete.id == made.id
    assert texts(sdk.conversations.items.list(made.id).data) == [("user", "second")]
    deleted = sdk.conversations.delete(made.id)
    assert deleted.deleted and deleted.id == made.id
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve(made.id)


def test_items_page_newest_first_by_default(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create(items=[{"role": "user", "content": f"m{index}"} for index in range(5)])
    page = sdk.conversations.items.list(made.id, limit=2)
    assert texts(page.data) == [("user", "m4"), ("user", "m3")]
    assert page.has_more
    every = [text for _, text in texts(sdk.conversations.items.list(made.id, limit=2))]
    assert every == ["m4", "m3", "m2", "m1", "m0"]  # the SDK follows the pages


def test_a_turn_in_a_conversation_reads_it_and_joins_it(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create(items=[{"role": "user", "content": "one two three"}])
    raw = sdk.responses.with_raw_response.create(model="echo", input="four", conversation=made.id)
    validate_response(raw.http_response.json())
    first = raw.parse()
    assert first.conversation is not None and first.conversation.id == made.id
    assert first.usage is not None and first.usage.input_tokens == 4  # the conversation, then the input
    second = sdk.responses.create(model="echo", input="five", conversation={"id": made.id})
    assert second.usage is not None and second.usage.input_tokens == 4 + 1 + 1
    items = sdk.conversations.items.list(made.id, order="asc").data
    assert texts(items) == [
        ("user", "one two three"),
        ("user", "four"),
        ("assistant", "four"),
        ("user", "five"),
        ("assistant", "five"),
    ]


def test_a_streamed_turn_has_joined_when_its_end_arrives(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create()
    with sdk.responses.stream(model="echo", input="streamed", conversation=made.id) as stream:
        final = stream.get_final_response()
        # The end was seen: the conversation has the turn already.
        assert texts(sdk.conversations.items.list(made.id, order="asc").data) == [
            ("user", "streamed"),
            ("assistant", "streamed"),
        ]
    assert final.conversation is not None and final.conversation.id == made.id


def test_a_background_turn_joins_once_it_is_over(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create()
    queued = sdk.responses.create(model="echo", input="later", conversation=made.id, background=True)
    deadline = time.monotonic() + 10
    while (
        sdk.responses.retrieve(queued.id).status in ("queued", "in_progress") and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert texts(sdk.conversations.items.list(made.id, order="asc").data) == [
        ("user", "later"),
        ("assistant", "later"),
    ]


def test_a_failed_turn_does_not_join(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create()
    with pytest.raises(openai.APIError):
        sdk.responses.create(model="echo:fail_after=0", input="doomed", conversation=made.id)
    assert sdk.conversations.items.list(made.id).data == []


def test_conversation_and_previous_response_id_are_exclusive(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create()
    first = sdk.responses.create(model="echo", input="x")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model="echo", input="y", conversation=made.id, previous_response_id=first.id)
    assert refused.value.body["param"] == "conversation"  # type: ignore[index]


def test_an_unknown_conversation_is_not_found(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.create(model="echo", input="x", conversation="conv_nope")
    assert missing.value.body["param"] == "conversation"  # type: ignore[index]


def test_another_workspace_learns_nothing(http_venna: HttpVenna, sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create(items=[{"role": "user", "content": "secret"}])
    item_id = sdk.conversations.items.list(made.id).data[0].id
    assert item_id is not None
    with openai.OpenAI(base_url=http_venna.base_url, api_key=http_venna.beta, max_retries=0) as other:
        for attempt in (
            lambda: other.conversations.retrieve(made.id),
            lambda: other.conversations.update(made.id, metadata={"x": "y"}),
            lambda: other.conversations.items.list(made.id),
            lambda: other.conversations.items.retrieve(item_id, conversation_id=made.id),
            lambda: other.conversations.items.create(made.id, items=[{"role": "user", "content": "x"}]),
            lambda: other.conversations.items.delete(item_id, conversation_id=made.id),
            lambda: other.responses.create(model="echo", input="x", conversation=made.id),
            lambda: other.conversations.delete(made.id),
        ):
            with pytest.raises(openai.NotFoundError):
                attempt()
    assert texts(sdk.conversations.items.list(made.id).data) == [("user", "secret")]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"items": [{"role": "user", "content": f"m{index}"} for index in range(21)]}, "items"),
        ({"metadata": {f"k{index}": "v" for index in range(17)}}, "metadata"),
        ({"items": [{"type": "message", "content": "no role"}]}, "items[0].role"),
    ],
)
def test_a_bad_conversation_is_400(http_venna: HttpVenna, body: dict[str, Any], param: str) -> None:
    reply = httpx.post(
        f"{http_venna.base_url}/conversations",
        json=body,
        headers={"authorization": f"Bearer {http_venna.alpha}"},
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_an_unknown_after_is_400(sdk: openai.OpenAI) -> None:
    made = sdk.conversations.create(items=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.conversations.items.list(made.id, after="msg_nope")
    assert refused.value.body["param"] == "after"  # type: ignore[index]


async def test_conversations_over_grpc(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db") as venna:
        stub = conversations_pb2_grpc.ConversationsServiceStub(venna.channel)
        metadata = venna.alpha.metadata
        made = await stub.CreateConversation(conversations_pb2.CreateConversationRequest(), metadata=metadata)
        found = await stub.GetConversation(
            conversations_pb2.GetConversationRequest(conversation_id=made.id), metadata=metadata
        )
        assert found == made
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetConversation(
                conversations_pb2.GetConversationRequest(conversation_id=made.id),
                metadata=venna.beta.metadata,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(missing.value).reason == "CONVERSATION_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await stub.GetConversation(conversations_pb2.GetConversationRequest(conversation_id=made.id))
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_route_answers_in_openais_shape(http_venna: HttpVenna) -> None:
    """The raw bodies, validated against OpenAI's published schemas (the SDK is lenient)."""
    with httpx.Client(
        base_url=http_venna.base_url, headers={"authorization": f"Bearer {http_venna.alpha}"}, timeout=10
    ) as http:
        made = http.post("/conversations", json={"items": [{"role": "user", "content": "hi"}]}).json()
        validate(made, "ConversationResource")
        validate(http.get(f"/conversations/{made['id']}").json(), "ConversationResource")
        validate(
            http.post(f"/conversations/{made['id']}", json={"metadata": {"a": "b"}}).json(),
            "ConversationResource",
        )
        added = http.post(
            f"/conversations/{made['id']}/items", json={"items": [{"role": "user", "content": "x"}]}
        )
        validate(added.json(), "ConversationItemList")
        listed = http.get(f"/conversations/{made['id']}/items").json()
        validate(listed, "ConversationItemList")
        item = http.get(f"/conversations/{made['id']}/items/{listed['first_id']}").json()
        validate(item, "ConversationItem")
        validate(
            http.delete(f"/conversations/{made['id']}/items/{listed['first_id']}").json(),
            "ConversationResource",
        )
        validate(http.delete(f"/conversations/{made['id']}").json(), "DeletedConversationResource")
