"""The HTTP shim driven by the official openai SDK, as JSON clients use it."""

from __future__ import annotations

import openai
import pytest

from tests.http_harness import HttpVenna


def sdk(venna: HttpVenna, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=venna.base_url, api_key=key or venna.alpha, max_retries=0)


def test_create_and_retrieve(http_venna: HttpVenna) -> None:
    client = sdk(http_venna)
    response = client.responses.create(model="echo", input="hello sdk world")
    assert response.status == "completed"
    assert response.output_text == "hello sdk world"
    assert response.usage is not None
    assert response.usage.input_tokens == 3
    assert client.responses.retrieve(response.id) == response


def test_stream_helper_final_response(http_venna: HttpVenna) -> None:
    client = sdk(http_venna)
    with client.responses.stream(model="echo", input="one two three") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["one", " two", " three"]
    assert final.output_text == "one two three"
    assert client.responses.retrieve(final.id) == final


def test_not_found_is_typed(http_venna: HttpVenna) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(http_venna).responses.retrieve("resp_missing")
    assert caught.value.status_code == 404
