"""Routing tables and generation settings: ``venna.toml`` upstreams and aliases, the settings each
backend accepts (the rest refused before anything is stored or sent), and the pass-through of
``stop``, ``seed`` and ``venice_parameters`` — end to end against the fake upstream."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.conftest import Venna, error_info, output_text, serving
from tests.fake_venice import FakeVenice, Frame, StreamReply, function_call_stream, text_stream
from venna.cli import commands as cli
from venna.responses.v1 import response_pb2, service_pb2
from venna.server.routing import ConfigError, default_router

UPSTREAM_KEY = "routing-upstream-key"
ENVIRON = {"VENICE_API_KEY": UPSTREAM_KEY, "LOCAL_KEY": "local-upstream-key"}


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "venna.toml"
    path.write_text(text)
    return path


def routing(fake: FakeVenice) -> str:
    """Venice and a second, OpenAI-dialect upstream (both the fake), and aliases to them."""
    return f"""
[upstreams.venice]
base_url = "{fake.base_url}"

[upstreams.local]
base_url = "{fake.base_url}"
api_key_env = "LOCAL_KEY"
dialect = "openai"
accepts = ["temperature", "max_output_tokens", "tools", "tool_choice", "stop"]

[aliases]
"venna-1" = "venice/zai-org-glm-5-1"
"small" = "local/qwen3-8b"
"quick" = "echo"
"""


@pytest.fixture
async def gateway(tmp_path: Path, fake: FakeVenice) -> AsyncIterator[Venna]:
    router = default_router(write_config(tmp_path, routing(fake)), ENVIRON)
    async with serving(tmp_path / "venna.db", router) as venna:
        yield venna


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def weather_tool() -> response_pb2.Tool:
    tool = response_pb2.Tool()
    tool.function.name = "get_weather"
    tool.function.description = "Weather in a city"
    tool.function.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
    return tool


# ---------------------------------------------------------------------------------------------
# Aliases and upstreams


async def test_alias_makes_venna_1_a_venice_model(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["hello", " there"]))
    response = await gateway.alpha.create(model="venna-1", input="hi")
    assert response.status == response_pb2.RESPONSE_STATUS_COMPLETED
    assert response.model == "venna-1"  # the name the caller chose
    assert output_text(response) == "hello there"
    [request] = fake.requests
    assert request.body["model"] == "zai-org-glm-5-1"
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_alias_keeps_the_options_after_it(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["ok"]))
    await gateway.alpha.create(model="venna-1:enable_web_search=on", input="hi")
    assert fake.body()["model"] == "zai-org-glm-5-1:enable_web_search=on"
    # An alias of the echo model takes the echo model's options.
    failed = await rpc_error(gateway.alpha.create(model="quick:fail_after=1", input="two words"))
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert len(fake.requests) == 1


async def test_a_background_response_on_an_alias_runs_on_its_target(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["later"]))
    queued = await gateway.alpha.create(model="venna-1", input="hi", background=True)
    events = await gateway.alpha.resume(queued.id)
    assert events[-1].HasField("completed")
    assert output_text(await gateway.alpha.get(queued.id)) == "later"
    assert fake.body()["model"] == "zai-org-glm-5-1"


async def test_second_upstream_speaks_the_openai_dialect(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(function_call_stream("get_weather", '{"city": "Oslo"}'))
    choice = response_pb2.ToolChoice()
    choice.function.name = "get_weather"
    response = await gateway.alpha.create(
        model="small", input="weather?", tools=[weather_tool()], tool_choice=choice, stop=["\n\n"]
    )
    [call] = [item.function_call for item in response.output if item.HasField("function_call")]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Oslo"}')
    request = fake.requests[0]
    assert request.headers["authorization"] == "Bearer local-upstream-key"
    body = request.body
    assert body["model"] == "qwen3-8b"
    # OpenAI's flat function tool and tool_choice, not Venice's nested ones.
    assert body["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert body["stop"] == ["\n\n"]


async def test_reasoning_history_goes_to_an_openai_upstream_as_summary_parts(
    gateway: Venna, fake: FakeVenice
) -> None:
    reasoning = response_pb2.Item()
    reasoning.reasoning.id = "rs_1"
    reasoning.reasoning.summary.add(text="thought about it")
    user = response_pb2.Item()
    user.message.role = response_pb2.ROLE_USER
    user.message.content.add().input_text.text = "and?"
    fake.queue(text_stream(["ok"]), text_stream(["ok"]))
    await gateway.alpha.create(model="small", input=[reasoning, user])
    await gateway.alpha.create(model="venna-1", input=[reasoning, user])
    openai_style, venice_style = (request.body["input"][0]["summary"] for request in fake.requests)
    assert openai_style == [{"type": "summary_text", "text": "thought about it"}]
    assert venice_style == ["thought about it"]


async def test_settings_an_upstream_does_not_accept_are_refused_before_anything_is_sent(
    gateway: Venna, fake: FakeVenice
) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("small", {"seed": 7}, "seed"),
        ("small", {"top_p": 0.5}, "top_p"),
        (
            "small",
            {"venice_parameters": service_pb2.VeniceParameters(character_slug="x")},
            "venice_parameters",
        ),
        ("venna-1", {"top_logprobs": 3}, "top_logprobs"),
        ("venna-1", {"max_tool_calls": 2}, "max_tool_calls"),
        (
            "echo",
            {
                "venice_parameters": service_pb2.VeniceParameters(
                    enable_web_search=service_pb2.VENICE_WEB_SEARCH_ON
                )
            },
            "venice_parameters",
        ),
    ]
    for model, settings, param in cases:
        error = await rpc_error(gateway.alpha.create(model=model, input="hi", **settings))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (model, param)
        info = error_info(error)
        assert (info.reason, info.metadata["param"]) == ("UNSUPPORTED_PARAMETER", param)
        assert f"'{param}'" in (error.details() or "")
    assert fake.requests == []


async def test_unknown_model_is_refused_without_listing_the_routing_table(gateway: Venna) -> None:
    error = await rpc_error(gateway.alpha.create(model="nope", input="hi"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    assert (info.reason, info.metadata["param"]) == ("MODEL_NOT_FOUND", "model")
    assert error.details() == "The requested model 'nope' does not exist."
    # A long name is quoted only in part.
    long_name = "nope-" + "x" * 250
    error = await rpc_error(gateway.alpha.create(model=long_name, input="hi"))
    assert error_info(error).reason == "MODEL_NOT_FOUND"
    assert long_name not in (error.details() or "") and len(error.details() or "") < 120


# ---------------------------------------------------------------------------------------------
# stop, seed, venice_parameters


async def test_stop_seed_and_venice_parameters_go_up_to_venice(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(text_stream(["ok"]))
    await gateway.alpha.create(
        model="venice/zai-org-glm-5-1",
        input="hi",
        stop=["END"],
        seed=42,
        venice_parameters=service_pb2.VeniceParameters(
            character_slug="alan-watts",
            enable_e2ee=False,
            enable_web_search=service_pb2.VENICE_WEB_SEARCH_AUTO,
            enable_web_citations=True,
            include_venice_system_prompt=False,
        ),
    )
    body = fake.body()
    assert body["stop"] == ["END"]
    assert body["seed"] == 42
    assert body["venice_parameters"] == {
        "character_slug": "alan-watts",
        "enable_e2ee": False,
        "enable_web_search": "auto",
        "enable_web_citations": True,
        "include_venice_system_prompt": False,
    }


async def test_end_to_end_encryption_is_refused(gateway: Venna, fake: FakeVenice) -> None:
    error = await rpc_error(
        gateway.alpha.create(
            model="venna-1", input="hi", venice_parameters=service_pb2.VeniceParameters(enable_e2ee=True)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).metadata["param"] == "venice_parameters.enable_e2ee"
    assert fake.requests == []


async def test_stop_limits(gateway: Venna) -> None:
    for stop, param in ((["a", "b", "c", "d", "e"], "stop"), ([""], "stop[0]"), (["x" * 257], "stop[0]")):
        error = await rpc_error(gateway.alpha.create(model="echo", input="hi", stop=stop))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).metadata["param"] == param


async def test_echo_stops_at_a_stop_sequence(gateway: Venna) -> None:
    response = await gateway.alpha.create(model="echo", input="one two STOP three", stop=["STOP", "two"])
    assert output_text(response) == "one"
    assert response.status == response_pb2.RESPONSE_STATUS_COMPLETED
    assert response.usage.output_tokens == 1


# ---------------------------------------------------------------------------------------------
# Content that arrives only with output_item.done


def whole_items_stream() -> StreamReply:
    """An upstream that streams no deltas: each item's content comes whole in its done event."""
    reasoning = {"type": "reasoning", "id": "rs_u", "summary": ["Checked the facts."]}
    message = {
        "type": "message",
        "id": "msg_u",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "All at once.", "annotations": []}],
    }
    frames = [
        Frame("response.created", {"type": "response.created", "response": {"id": "r", "output": []}}),
        Frame(
            "response.output_item.added",
            {"type": "response.output_item.added", "item": {**reasoning, "summary": []}},
        ),
        Frame("response.output_item.done", {"type": "response.output_item.done", "item": reasoning}),
        Frame(
            "response.output_item.added",
            {"type": "response.output_item.added", "item": {**message, "content": []}},
        ),
        Frame("response.output_item.done", {"type": "response.output_item.done", "item": message}),
        Frame(
            "response.completed",
            {"type": "response.completed", "response": {"id": "r", "output": [reasoning, message]}},
        ),
    ]
    return StreamReply(frames)


async def test_items_that_arrive_whole_keep_their_content(gateway: Venna, fake: FakeVenice) -> None:
    fake.queue(whole_items_stream())
    events = await gateway.alpha.stream(model="venna-1", input="hi")
    final = events[-1].completed.response
    assert [item.WhichOneof("item") for item in final.output] == ["reasoning", "message"]
    assert [summary.text for summary in final.output[0].reasoning.summary] == ["Checked the facts."]
    assert output_text(final) == "All at once."
    # Streamed too: a client reading only deltas sees the same text.
    deltas = [event.output_text_delta.delta for event in events if event.HasField("output_text_delta")]
    assert "".join(deltas) == "All at once."


# ---------------------------------------------------------------------------------------------
# The table itself


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    cases = {
        "[upstreams.a]\nbase_url = 1\n": "'base_url' must be a string, got 1",
        "[upstreams.a]\ndialect = 'openai'\n": "[upstreams.a]: 'base_url' is required",
        '[upstreams.a]\nkind = "nope"\n': "unknown backend kind 'nope'; known: echo, responses",
        '[upstreams.a]\nkind = "echo"\nbase_url = "http://x"\n': "unknown keys base_url for kind 'echo'",
        '[upstreams.a]\nbase_url = "http://x"\nmax_attempts = 1.5\n': "'max_attempts' must be a whole number",
        '[upstreams.a]\nbase_url = "http://x"\nurl = "y"\n': "unknown keys url",
        '[upstreams.a]\nbase_url = "http://x"\ndialect = "grpc"\n': "'dialect' must be one of venice, openai",
        '[upstreams.a]\nbase_url = "http://x"\naccepts = ["temperature", "n"]\n': "unknown settings n",
        '[upstreams.a]\nbase_url = "http://x"\nread_timeout = -1\n': "'read_timeout' must be a positive",
        '[upstreams.echo]\nbase_url = "http://x"\n': "'echo' cannot name an upstream",
        '[aliases]\nfast = "nowhere/model"\n': "which no backend serves",
        '[aliases]\na = "echo"\nb = "a"\n': "names another alias",
        '[aliases]\n"a/b" = "echo"\n': "cannot be an alias",
        "[routes]\n": "unknown sections routes",
        "[aliases\n": "venna.toml",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            default_router(write_config(tmp_path, text), {})
    with pytest.raises(ConfigError, match="No such file"):
        default_router(tmp_path / "missing.toml", {})


def test_without_a_table_the_built_in_models_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./venna.toml here
    router = default_router(None, {})
    assert router.models == ["echo", "venice", "venna-1"]
    assert router.resolve("venice/x:y").model == "venice/x:y"


def test_a_venna_toml_in_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, '[aliases]\nfast = "echo:delay_ms=1"\n')
    monkeypatch.chdir(tmp_path)
    route = default_router(None, {}).resolve("fast")
    assert route.model == "echo:delay_ms=1"


def test_serve_refuses_a_bad_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, '[aliases]\nfast = "nowhere/model"\n')
    status = cli.main(
        [
            "serve",
            "--config",
            str(config),
            "--db",
            str(tmp_path / "v.db"),
            "--grpc-listen",
            "127.0.0.1:0",
            "--no-http",
        ]
    )
    assert status == 2
    assert "alias 'fast' names 'nowhere/model'" in capsys.readouterr().err
