"""``POST /v1/responses/input_tokens`` and gRPC ``CountInputTokens``: the input tokens a create
request would send to its model, counted without generating or storing anything. Echo counts
exactly (the count its usage reports); an ``openai``-dialect upstream is asked its own count; where
nobody can count, the documented estimate, marked ``estimated``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from tests.conftest import error_info, serving
from tests.fake_venice import INPUT_TOKENS_PATH, RESPONSES_PATH, FakeVenice
from tests.http_harness import HttpVenna, running
from tests.openai_schema import validate
from venna.backends.base import Backend
from venna.backends.echo import EchoBackend
from venna.backends.responses import ResponsesUpstream
from venna.backends.token_estimate import CHARACTERS_PER_TOKEN, TOKENS_PER_ITEM, TOKENS_PER_REQUEST
from venna.responses.v1 import response_pb2, service_pb2
from venna.server.routing import Router


def router(fake: FakeVenice) -> Router:
    upstreams: dict[str, Backend] = {
        "echo": EchoBackend(),
        "up": ResponsesUpstream(fake.base_url, None, prefix="up/", dialect="openai"),
        "chat": ResponsesUpstream(fake.base_url, None, prefix="chat/", dialect="chat"),
    }
    return Router(upstreams)


@pytest.fixture
def http_venna(tmp_path: Path, fake: FakeVenice) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path / "venna.db", router=router(fake)))


@pytest.fixture
def sdk(http_venna: HttpVenna) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=http_venna.base_url, api_key=http_venna.alpha, max_retries=0) as client:
        yield client


def count(http_venna: HttpVenna, key: str | None = None, **fields: Any) -> httpx.Response:
    return httpx.post(
        f"{http_venna.base_url}/responses/input_tokens",
        json=fields,
        headers={"authorization": f"Bearer {key or http_venna.alpha}"},
        timeout=10,
    )


def test_echo_counts_exactly_what_its_usage_reports(sdk: openai.OpenAI) -> None:
    """The count of a would-be request equals the input tokens the same request is then billed,
    a continued conversation included."""
    counted = sdk.responses.input_tokens.count(model="echo", input="Tell me a joke.", instructions="Be brief")
    assert counted.object == "response.input_tokens"
    created = sdk.responses.create(model="echo", input="Tell me a joke.", instructions="Be brief")
    assert created.usage is not None
    assert counted.input_tokens == created.usage.input_tokens == 6
    counted_again = sdk.responses.input_tokens.count(
        model="echo", input="And another one", previous_response_id=created.id
    )
    continued = sdk.responses.create(model="echo", input="And another one", previous_response_id=created.id)
    assert continued.usage is not None
    assert counted_again.input_tokens == continued.usage.input_tokens
    assert counted_again.input_tokens > counted.input_tokens


def test_a_conversation_is_counted_as_a_create_in_it_is_billed(sdk: openai.OpenAI) -> None:
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "What came before"}])
    counted = sdk.responses.input_tokens.count(model="echo", input="and now", conversation=conversation.id)
    created = sdk.responses.create(model="echo", input="and now", conversation=conversation.id)
    assert created.usage is not None
    assert counted.input_tokens == created.usage.input_tokens == 5  # 3 words before, 2 now
    with pytest.raises(openai.BadRequestError):  # not both ways of continuing at once
        sdk.responses.input_tokens.count(
            model="echo", input="x", conversation=conversation.id, previous_response_id=created.id
        )
    with pytest.raises(openai.NotFoundError):
        sdk.responses.input_tokens.count(model="echo", input="x", conversation="conv_" + "0" * 48)


def test_counting_stores_and_generates_nothing(http_venna: HttpVenna, fake: FakeVenice) -> None:
    """No response, no usage record, no generation upstream: the workspace's usage stays empty."""
    for model in ("echo", "up/gpt-5"):
        reply = count(http_venna, model=model, input="nothing kept")
        assert reply.status_code == 200, reply.text
        assert reply.json()["object"] == "response.input_tokens"
    assert not [record for record in fake.requests if record.path == RESPONSES_PATH]
    usage = httpx.get(f"{http_venna.base_url}/usage", headers={"authorization": f"Bearer {http_venna.alpha}"})
    assert usage.status_code == 200
    assert usage.json()["buckets"] == []


def test_without_a_model_the_count_is_the_documented_estimate(http_venna: HttpVenna) -> None:
    text = "Seventeen letters"  # 17 characters
    reply = count(http_venna, input=text)
    assert reply.status_code == 200, reply.text
    expected = TOKENS_PER_REQUEST + TOKENS_PER_ITEM + math.ceil(len(text) / CHARACTERS_PER_TOKEN)
    assert reply.json() == {"object": "response.input_tokens", "input_tokens": expected, "estimated": True}
    validate(reply.json(), "TokenCountsResource")


def test_an_upstream_is_asked_its_own_count(http_venna: HttpVenna, fake: FakeVenice) -> None:
    fake.input_tokens = 1234
    reply = count(http_venna, model="up/gpt-5", input="count me", instructions="briefly")
    assert reply.json() == {"object": "response.input_tokens", "input_tokens": 1234}
    (asked,) = [record for record in fake.requests if record.path == INPUT_TOKENS_PATH]
    assert asked.body["model"] == "gpt-5"
    assert "stream" not in asked.body and "store" not in asked.body


def test_an_upstream_without_counting_gets_an_estimate(http_venna: HttpVenna, fake: FakeVenice) -> None:
    fake.input_tokens = None  # its /responses/input_tokens answers 404
    reply = count(http_venna, model="up/gpt-5", input="count me")
    assert reply.status_code == 200
    assert reply.json()["estimated"] is True
    chat = count(http_venna, model="chat/llama3.2", input="count me")
    assert chat.json()["estimated"] is True
    assert not [record for record in fake.requests if record.path.endswith("/chat/completions")]


@pytest.mark.parametrize(
    ("fields", "status", "param", "code"),
    [
        ({"model": "nope", "input": "x"}, 400, "model", "model_not_found"),
        ({"model": "echo", "input": "x", "stream": True}, 400, "stream", "unknown_parameter"),
        ({"model": "echo", "input": "x", "store": False}, 400, "store", "unknown_parameter"),
        (
            {"model": "echo", "input": "x", "previous_response_id": "resp_nope"},
            400,
            "previous_response_id",
            "previous_response_not_found",
        ),
        ({"model": "echo", "input": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    ],
)
def test_a_bad_count_request_gets_openais_error(
    http_venna: HttpVenna, fields: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    reply = count(http_venna, **fields)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    validate(reply.json(), "ErrorResponse")
    if param is not None:
        assert (error["param"], error["code"]) == (param, code)


def test_another_workspaces_response_cannot_be_counted_on(http_venna: HttpVenna) -> None:
    created = httpx.post(
        f"{http_venna.base_url}/responses",
        json={"model": "echo", "input": "mine"},
        headers={"authorization": f"Bearer {http_venna.alpha}"},
    ).json()
    theirs = count(http_venna, http_venna.beta, model="echo", input="x", previous_response_id=created["id"])
    assert theirs.status_code == 400
    assert theirs.json()["error"]["code"] == "previous_response_not_found"


async def test_count_over_grpc(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db") as venna:
        request = service_pb2.CountInputTokensRequest(
            model="echo",
            input=[
                response_pb2.Item(
                    message=response_pb2.Message(
                        role=response_pb2.ROLE_USER,
                        content=[
                            response_pb2.ContentPart(input_text=response_pb2.InputText(text="one two three"))
                        ],
                    )
                )
            ],
        )
        counted = await venna.alpha.stub.CountInputTokens(request, metadata=venna.alpha.metadata)
        assert (counted.object, counted.input_tokens, counted.HasField("estimated")) == (
            "response.input_tokens",
            3,
            False,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await venna.alpha.stub.CountInputTokens(
                service_pb2.CountInputTokensRequest(model="nope"), metadata=venna.alpha.metadata
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(refused.value).metadata["param"] == "model"
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await venna.alpha.stub.CountInputTokens(request)
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
