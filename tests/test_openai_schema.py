"""Tests of the OpenAI schema helper itself, so that it cannot silently accept everything.

Each rejection test checks the message too: a helper that fails for the wrong reason would hide the real
problem in the shim's tests.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.openai_schema import (
    FIXTURE,
    event_schemas,
    open_responses_event_schemas,
    validate,
    validate_event,
    validate_response,
    validate_stream_event,
)

RESPONSE_REQUIRED = (
    "id",
    "object",
    "created_at",
    "error",
    "incomplete_details",
    "instructions",
    "model",
    "tools",
    "output",
    "parallel_tool_calls",
    "metadata",
    "tool_choice",
    "temperature",
    "top_p",
)


def minimal_response() -> dict[str, Any]:
    """Exactly the fields the spec requires on a Response, nothing more."""
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1765552663,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": "gpt-4o",
        "tools": [],
        "output": [],
        "parallel_tool_calls": True,
        "metadata": {},
        "tool_choice": "auto",
        "temperature": 1,
        "top_p": 1,
    }


def text_delta_event() -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": "Hel",
        "sequence_number": 4,
        "logprobs": [],
    }


def output_message() -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}],
    }


def test_minimal_response_validates() -> None:
    validate(minimal_response(), "Response")


@pytest.mark.parametrize("field", RESPONSE_REQUIRED)
def test_response_without_a_required_field_fails(field: str) -> None:
    response = minimal_response()
    del response[field]
    with pytest.raises(AssertionError, match=re.escape(f"'{field}' is a required property")):
        validate(response, "Response")


def test_response_with_wrong_object_fails() -> None:
    response = minimal_response() | {"object": "chat.completion"}
    with pytest.raises(
        AssertionError, match=r"at \$\.object: 'chat\.completion' is not one of \['response'\]"
    ):
        validate(response, "Response")


def test_response_status_is_not_nullable() -> None:
    """The spec makes ``status`` optional but never null; the encoder must omit it rather than send null."""
    validate(minimal_response() | {"status": "completed"}, "Response")
    with pytest.raises(AssertionError, match=r"at \$\.status: None is not of type 'string'"):
        validate(minimal_response() | {"status": None}, "Response")


def test_response_with_typical_output_items_validates() -> None:
    """The output item union is a oneOf: items the shim emits must match exactly one branch."""
    function_call = {
        "id": "fc_1",
        "type": "function_call",
        "call_id": "call_1",
        "name": "calculator",
        "arguments": '{"a": 1}',
        "status": "completed",
    }
    reasoning = {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "Thinking."}],
    }
    usage = {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    response = minimal_response() | {
        "status": "completed",
        "output": [reasoning, output_message(), function_call],
        "usage": usage,
    }
    validate(response, "Response")


def test_union_errors_come_from_the_branch_named_by_type() -> None:
    """A broken output message must be reported as a message error, not as 'not valid under any of'."""
    message = output_message()
    del message["status"]
    response = minimal_response() | {"output": [message]}
    with pytest.raises(AssertionError) as failure:
        validate(response, "Response")
    first_line = str(failure.value).splitlines()[0]
    assert "at $.output[0]: 'status' is a required property" in first_line, first_line


def test_nested_union_errors_descend_to_the_content_part() -> None:
    message = output_message()
    del message["content"][0]["annotations"]
    with pytest.raises(
        AssertionError, match=re.escape("at $.output[0].content[0]: 'annotations' is a required")
    ):
        validate(minimal_response() | {"output": [message]}, "Response")


def test_text_delta_event_validates() -> None:
    validate_event(text_delta_event())


def test_text_delta_event_without_sequence_number_fails() -> None:
    event = text_delta_event()
    del event["sequence_number"]
    with pytest.raises(
        AssertionError, match=r"ResponseTextDeltaEvent.*'sequence_number' is a required property"
    ):
        validate_event(event)


def test_text_delta_event_with_wrong_field_type_fails() -> None:
    with pytest.raises(AssertionError, match=r"at \$\.delta: 5 is not of type 'string'"):
        validate_event(text_delta_event() | {"delta": 5})


def test_unknown_event_type_fails() -> None:
    with pytest.raises(AssertionError, match=r"event type 'response\.output_text\.bogus' is not one of"):
        validate_event(text_delta_event() | {"type": "response.output_text.bogus"})


def test_event_without_type_fails() -> None:
    event = text_delta_event()
    del event["type"]
    with pytest.raises(AssertionError, match="event type None is not one of"):
        validate_event(event)


def test_output_item_added_event_validates_its_item() -> None:
    event = {"type": "response.output_item.added", "output_index": 0, "sequence_number": 2}
    validate_event(event | {"item": output_message() | {"status": "in_progress", "content": []}})
    with pytest.raises(AssertionError, match=re.escape("at $.item: 'role' is a required property")):
        validate_event(
            event | {"item": {"id": "msg_1", "type": "message", "status": "in_progress", "content": []}}
        )


def test_every_stream_event_schema_has_its_own_type() -> None:
    """The type -> schema map covers the whole ResponseStreamEvent union, one schema per type."""
    union = json.loads(FIXTURE.read_text(encoding="utf-8"))["schemas"]["ResponseStreamEvent"]["anyOf"]
    assert len(event_schemas()) == len(union)
    assert event_schemas()["response.output_text.delta"] == "ResponseTextDeltaEvent"
    assert event_schemas()["error"] == "ResponseErrorEvent"


def test_error_response_validates() -> None:
    body = {"error": {"message": "x", "type": "invalid_request_error", "param": None, "code": None}}
    validate(body, "ErrorResponse")


def test_error_response_without_param_fails() -> None:
    body = {"error": {"message": "x", "type": "invalid_request_error", "code": None}}
    with pytest.raises(AssertionError, match=re.escape("at $.error: 'param' is a required property")):
        validate(body, "ErrorResponse")


def test_item_list_with_an_input_message_validates() -> None:
    item = {
        "id": "msg_1",
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_text", "text": "hi"}],
    }
    body = {"object": "list", "data": [item], "has_more": False, "first_id": "msg_1", "last_id": "msg_1"}
    validate(body, "ResponseItemList")


def test_unknown_schema_name_is_an_error_not_a_pass() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        validate({}, "NoSuchSchema")


def test_fixture_is_self_contained_valid_json_schema() -> None:
    """Every schema is valid Draft 2020-12 and every $ref points inside the fixture."""
    document = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert document["source"]["commit"] == "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"
    assert document["source"]["licence"]["identifier"] == "MIT"
    schemas = document["schemas"]
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    refs = re.findall(r'"\$ref": "([^"]*)"', json.dumps(schemas))
    assert refs
    dangling = {ref for ref in refs if ref.removeprefix("#/schemas/") not in schemas}
    assert not dangling, dangling


def test_open_responses_check_is_real() -> None:
    """The Open Responses half of the combined check fails where only that document is strict: a
    response valid under OpenAI's schema but without the penalties it requires."""
    response = minimal_response()
    validate(response, "Response")
    with pytest.raises(AssertionError, match="not a valid Open Responses ResponseResource"):
        validate_response(response)


def test_open_responses_events_are_mapped_by_type() -> None:
    assert (
        open_responses_event_schemas()["response.output_text.delta"]
        == "ResponseOutputTextDeltaStreamingEvent"
    )
    assert open_responses_event_schemas()["error"] == "ErrorStreamingEvent"
    with pytest.raises(AssertionError, match="ErrorStreamingEvent"):
        validate_stream_event(
            {"type": "error", "code": "x", "message": "m", "param": None, "sequence_number": 1}
        )
