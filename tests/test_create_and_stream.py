"""Creating responses over gRPC: unary, streamed, chained, and the stream's conformance rules."""

from __future__ import annotations

import json
import sqlite3

import grpc
import grpc.aio
import pytest

from tests.conftest import Venna, error_info, event_type, output_text, user_message
from tests.streams import MESSAGE_EVENTS
from venna.responses.v1 import events_pb2, response_pb2

COMPLETED = response_pb2.RESPONSE_STATUS_COMPLETED


async def test_create_answers_with_the_last_user_message(venna: Venna) -> None:
    response = await venna.alpha.create(input="hello gRPC world", metadata={"trace": "t-1"})

    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == COMPLETED
    assert response.completed_at >= response.created_at > 0
    assert output_text(response) == "hello gRPC world"
    [item] = response.output
    assert item.message.id.startswith("msg_")
    assert item.message.role == response_pb2.ROLE_ASSISTANT
    assert item.message.status == response_pb2.ITEM_STATUS_COMPLETED
    assert response.usage.input_tokens == 3
    assert response.usage.output_tokens == 3
    assert response.usage.total_tokens == 6
    assert dict(response.metadata) == {"trace": "t-1"}
    assert response.store and not response.background
    assert response.tool_choice.mode == response_pb2.TOOL_CHOICE_MODE_AUTO
    assert response.text.format.HasField("text")

    assert await venna.alpha.get(response.id) == response


async def test_venna_1_is_the_echo_model(venna: Venna) -> None:
    response = await venna.alpha.create(model="venna-1", input="same answer")
    assert response.model == "venna-1"
    assert output_text(response) == "same answer"


async def test_stream_follows_the_canonical_order(venna: Venna) -> None:
    events = await venna.alpha.stream(input="one two three")

    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [event_type(event) for event in events] == MESSAGE_EVENTS
    deltas = [event.output_text_delta.delta for event in events if event.HasField("output_text_delta")]
    assert deltas == ["one", " two", " three"]
    added = events[2].output_item_added
    assert added.output_index == 0
    assert added.item.message.status == response_pb2.ITEM_STATUS_IN_PROGRESS
    assert list(added.item.message.content) == []
    done = events[9].output_item_done
    assert done.item.message.status == response_pb2.ITEM_STATUS_COMPLETED
    assert done.item.message.id == added.item.message.id
    assert events[7].output_text_done.text == "one two three"
    created = events[0].created.response
    assert created.status == response_pb2.RESPONSE_STATUS_IN_PROGRESS
    assert list(created.output) == []

    final = events[-1].completed.response
    assert final.id == created.id
    assert final.output[0] == done.item
    assert await venna.alpha.get(final.id) == final


async def test_chaining_rebuilds_the_context_three_deep(venna: Venna) -> None:
    first = await venna.alpha.create(input="alpha beta gamma", instructions="answer tersely please")
    # Instructions count for this response only.
    assert first.usage.input_tokens == 3 + 3

    second = await venna.alpha.create(input="delta epsilon", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert not second.HasField("instructions")
    # previous input (3) + previous output (3) + new input (2); instructions not carried over
    assert second.usage.input_tokens == 8
    assert output_text(second) == "delta epsilon"

    third = await venna.alpha.create(input="zeta", previous_response_id=second.id)
    assert third.usage.input_tokens == 8 + 2 + 1
    assert output_text(third) == "zeta"

    # Each response lists only its own input.
    listing = await venna.alpha.input_items(third.id)
    assert [part.input_text.text for item in listing.data for part in item.message.content] == ["zeta"]


async def test_storage_grows_linearly_with_a_conversation(venna: Venna) -> None:
    response = await venna.alpha.create(input="turn 0")
    for turn in range(1, 30):
        response = await venna.alpha.create(input=f"turn {turn}", previous_response_id=response.id)
    assert response.usage.input_tokens == 30 * 2 + 29 * 2  # the whole history is the context

    with sqlite3.connect(venna.db_path) as db:
        per_response = db.execute(
            "SELECT COUNT(*), MAX(LENGTH(body)) FROM items GROUP BY response_id"
        ).fetchall()
        body_sizes = [row[0] for row in db.execute("SELECT LENGTH(body) FROM responses ORDER BY created_at")]
    # One input and one output item per turn, never a copy of the history.
    assert [count for count, _ in per_response] == [2] * 30
    assert max(size for _, size in per_response) < 200
    assert max(body_sizes) - min(body_sizes) < 100


async def test_unknown_previous_response_is_not_found_with_a_reason(venna: Venna) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input="hi", previous_response_id="resp_doesnotexist")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info.reason == "PREVIOUS_RESPONSE_NOT_FOUND"
    assert info.metadata["param"] == "previous_response_id"


async def test_unstored_responses_cannot_be_fetched_or_chained(venna: Venna) -> None:
    response = await venna.alpha.create(input="forget me", store=False)
    assert response.status == COMPLETED and not response.store
    assert output_text(response) == "forget me"

    with pytest.raises(grpc.aio.AioRpcError) as fetched:
        await venna.alpha.get(response.id)
    assert fetched.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as chained:
        await venna.alpha.create(input="again", previous_response_id=response.id)
    assert chained.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(chained.value).reason == "PREVIOUS_RESPONSE_NOT_FOUND"


async def test_max_output_tokens_ends_incomplete(venna: Venna) -> None:
    words = " ".join(f"w{n}" for n in range(40))
    events = await venna.alpha.stream(input=words, max_output_tokens=16)

    assert event_type(events[-1]) == "response.incomplete"
    final = events[-1].incomplete.response
    assert final.status == response_pb2.RESPONSE_STATUS_INCOMPLETE
    assert final.incomplete_details.reason == response_pb2.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS
    assert final.usage.output_tokens == 16
    assert output_text(final) == " ".join(f"w{n}" for n in range(16))
    assert final.output[0].message.status == response_pb2.ITEM_STATUS_INCOMPLETE
    assert not final.HasField("completed_at")
    assert await venna.alpha.get(final.id) == final


def weather_tool() -> response_pb2.Tool:
    tool = response_pb2.Tool()
    tool.function.name = "get_weather"
    tool.function.description = "Weather of a city"
    tool.function.parameters.update({"type": "object", "properties": {"input": {"type": "string"}}})
    return tool


async def test_function_call_round_trip(venna: Venna) -> None:
    choice = response_pb2.ToolChoice(mode=response_pb2.TOOL_CHOICE_MODE_REQUIRED)
    events = await venna.alpha.stream(input="Paris today", tools=[weather_tool()], tool_choice=choice)

    types = [event_type(event) for event in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in types
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1].completed.response
    [item] = final.output
    call = item.function_call
    assert call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"input": "Paris today"}
    arguments_done = next(e for e in events if e.HasField("function_call_arguments_done"))
    assert arguments_done.function_call_arguments_done.arguments == call.arguments
    assert arguments_done.function_call_arguments_done.name == "get_weather"
    deltas = "".join(
        e.function_call_arguments_delta.delta for e in events if e.HasField("function_call_arguments_delta")
    )
    assert deltas == call.arguments

    result = response_pb2.Item()
    result.function_call_output.call_id = call.call_id
    result.function_call_output.output = "sunny and 21 degrees"
    follow_up = await venna.alpha.create(
        input=[result], tools=[weather_tool()], previous_response_id=final.id
    )
    assert output_text(follow_up) == "sunny and 21 degrees"


async def test_named_tool_choice_must_exist(venna: Venna) -> None:
    choice = response_pb2.ToolChoice()
    choice.function.name = "missing"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input="x", tools=[weather_tool()], tool_choice=choice)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["param"] == "tool_choice"


async def test_input_items_get_ids_and_assistant_text_becomes_output_text(venna: Venna) -> None:
    assistant = response_pb2.Item()
    assistant.message.role = response_pb2.ROLE_ASSISTANT
    assistant.message.content.add().input_text.text = "earlier answer"
    response = await venna.alpha.create(input=[user_message("question"), assistant, user_message("again")])

    listing = await venna.alpha.input_items(response.id)
    ids = [item.message.id for item in listing.data]
    assert all(item_id.startswith("msg_") for item_id in ids) and len(set(ids)) == 3
    # Newest first by default.
    assert [item.message.role for item in listing.data] == [
        response_pb2.ROLE_USER,
        response_pb2.ROLE_ASSISTANT,
        response_pb2.ROLE_USER,
    ]
    assert listing.data[1].message.content[0].output_text.text == "earlier answer"
    assert all(item.message.status == response_pb2.ITEM_STATUS_COMPLETED for item in listing.data)


async def test_images_are_stored_with_an_explicit_detail(venna: Venna) -> None:
    message = user_message("what is in this picture")
    message.message.content.add().input_image.image_url = "data:image/png;base64,iVBORw0KGgo="
    response = await venna.alpha.create(input=[message])
    [item] = (await venna.alpha.input_items(response.id)).data
    image = item.message.content[1].input_image
    assert image.image_url.startswith("data:image/png")
    assert image.detail == response_pb2.IMAGE_DETAIL_AUTO


async def test_item_reference_resolves_a_stored_item(venna: Venna) -> None:
    first = await venna.alpha.create(input="remember this sentence")
    reference = response_pb2.Item()
    reference.item_reference.id = first.output[0].message.id
    second = await venna.alpha.create(input=[reference, user_message("and answer")])
    # The referenced assistant message (3 words) is part of the context.
    assert second.usage.input_tokens == 3 + 2

    foreign = response_pb2.Item()
    foreign.item_reference.id = first.output[0].message.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.beta.create(input=[foreign])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_events_are_typed_with_the_api_names(venna: Venna) -> None:
    """Every event member of the contract carries its Responses API type string."""
    members = events_pb2.ResponseStreamEvent.DESCRIPTOR.oneofs_by_name["event"].fields
    from venna.responses.v1 import options_pb2

    names = set()
    for field in members:
        assert field.message_type is not None
        names.add(field.message_type.GetOptions().Extensions[options_pb2.json_type])
    assert len(names) == len(members)
    assert all(name == "error" or name.startswith("response.") for name in names)
