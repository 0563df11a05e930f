"""Compaction: ``POST /v1/responses/compact`` (gRPC ``CompactResponse``) summarizes a conversation
by its own model into one compaction item, and a later turn given that item works from the
summary instead of what it replaced, on every backend (echo deterministically, a chat upstream
seen from the upstream's side).
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
from tests.fake_venice import FakeVenice
from tests.http_harness import HttpVenna, running
from tests.openai_schema import validate, validate_open_responses, validate_response, validate_stream_event
from tests.test_chat_backend import chat_stream
from tests.test_http_wire import client_for, post_stream
from venna.backends.base import Backend
from venna.backends.echo import EchoBackend
from venna.backends.responses import ResponsesUpstream
from venna.responses.v1 import service_pb2
from venna.server.compaction import COMPACTION_INSTRUCTIONS, SUMMARY_HEADING, decode_summary
from venna.server.routing import Router


def router(fake: FakeVenice) -> Router:
    upstreams: dict[str, Backend] = {
        "echo": EchoBackend(),
        "local": ResponsesUpstream(fake.base_url, None, prefix="local/", dialect="chat", backoff_base=0.01),
    }
    return Router(upstreams)


@pytest.fixture
def http_venna(tmp_path: Path, fake: FakeVenice) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path / "venna.db", router=router(fake)))


def post(venna: HttpVenna, path: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{venna.base_url}{path}",
        json=body,
        headers={"authorization": f"Bearer {key or venna.alpha}"},
        timeout=10,
    )


def test_compacting_keeps_the_user_messages_and_summarizes_everything(http_venna: HttpVenna) -> None:
    first = post(http_venna, "/responses", {"model": "echo", "input": "plan the launch"}).json()
    reply = post(
        http_venna,
        "/responses/compact",
        {"model": "echo", "input": "and the budget", "previous_response_id": first["id"]},
    )
    assert reply.status_code == 200, reply.text
    compacted = reply.json()
    validate_open_responses(compacted, "CompactResource")
    validate(compacted, "CompactResource")
    assert compacted["object"] == "response.compaction"
    *kept, item = compacted["output"]
    assert [message["content"][0]["text"] for message in kept] == ["plan the launch", "and the budget"]
    assert all(message["role"] == "user" for message in kept)
    assert item["type"] == "compaction" and item["id"].startswith("cmp_")
    # Echo's summary is the transcript itself: every turn, the assistant's included.
    assert decode_summary(item["encrypted_content"]) == (
        "[user] plan the launch [assistant] plan the launch [user] and the budget"
    )
    assert compacted["usage"]["input_tokens"] > 0
    usage = httpx.get(f"{http_venna.base_url}/usage", headers={"authorization": f"Bearer {http_venna.alpha}"})
    assert usage.json()["total"]["input_tokens"] >= compacted["usage"]["input_tokens"]
    # Nothing stored under the compaction's id.
    gone = httpx.get(
        f"{http_venna.base_url}/responses/{compacted['id']}",
        headers={"authorization": f"Bearer {http_venna.alpha}"},
    )
    assert gone.status_code == 404


def test_a_later_turn_works_from_the_summary(http_venna: HttpVenna, fake: FakeVenice) -> None:
    """The upstream of the next turn receives the summary as a system message, the kept user
    messages and the new one, and nothing of what the summary replaced."""
    first = post(http_venna, "/responses", {"model": "echo", "input": "the secret word is plum"}).json()
    fake.queue(chat_stream({"content": "The user told me the secret word: plum."}))
    compacted = post(
        http_venna, "/responses/compact", {"model": "local/llama3.2", "previous_response_id": first["id"]}
    ).json()
    summarizing = fake.body(-1)
    assert "the secret word is plum" in summarizing["messages"][-1]["content"]
    fake.queue(chat_stream({"content": "plum"}))
    turn = post(
        http_venna,
        "/responses",
        {
            "model": "local/llama3.2",
            "input": [*compacted["output"], {"role": "user", "content": "what was it?"}],
        },
    )
    assert turn.status_code == 200, turn.text
    validate_response(turn.json())
    messages = fake.body(-1)["messages"]
    assert messages == [
        {"role": "user", "content": "the secret word is plum"},
        {"role": "system", "content": f"{SUMMARY_HEADING}\n\nThe user told me the secret word: plum."},
        {"role": "user", "content": "what was it?"},
    ]
    # The compaction item is part of the stored input, and of the context of a continuation.
    listed = httpx.get(
        f"{http_venna.base_url}/responses/{turn.json()['id']}/input_items?order=asc",
        headers={"authorization": f"Bearer {http_venna.alpha}"},
    ).json()
    assert [item["type"] for item in listed["data"]] == ["message", "compaction", "message"]
    fake.queue(chat_stream({"content": "still plum"}))
    again = post(
        http_venna,
        "/responses",
        {"model": "local/llama3.2", "input": "and now?", "previous_response_id": turn.json()["id"]},
    )
    assert again.status_code == 200
    assert fake.body(-1)["messages"][1]["content"].startswith(SUMMARY_HEADING)


def test_echo_counts_the_summary_in_place_of_the_history(http_venna: HttpVenna) -> None:
    words = " ".join(f"w{index}" for index in range(50))
    first = post(http_venna, "/responses", {"model": "echo", "input": words}).json()
    compacted = post(
        http_venna, "/responses/compact", {"model": "echo", "previous_response_id": first["id"]}
    ).json()
    counted = post(
        http_venna, "/responses/input_tokens", {"model": "echo", "input": compacted["output"]}
    ).json()["input_tokens"]
    # The kept user message (50 words), then the summary heading and the summary:
    # "[user]" + 50 words + "[assistant]" + 50 words.
    assert counted == 50 + len(SUMMARY_HEADING.split()) + 102


def test_a_compaction_item_not_made_here_is_refused(http_venna: HttpVenna) -> None:
    forged = {"type": "compaction", "encrypted_content": "gAAAAABpM0Yj-not-ours"}
    reply = post(
        http_venna, "/responses", {"model": "echo", "input": [forged, {"role": "user", "content": "hi"}]}
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "input[0].encrypted_content"


def test_compacting_another_workspaces_response_is_not_found(http_venna: HttpVenna) -> None:
    mine = post(http_venna, "/responses", {"model": "echo", "input": "mine"}).json()
    theirs = post(
        http_venna,
        "/responses/compact",
        {"model": "echo", "previous_response_id": mine["id"]},
        http_venna.beta,
    )
    assert theirs.status_code == 400
    assert theirs.json()["error"]["code"] == "previous_response_not_found"


def test_the_official_sdk_compacts(http_venna: HttpVenna) -> None:
    with openai.OpenAI(base_url=http_venna.base_url, api_key=http_venna.alpha, max_retries=0) as client:
        compacted = client.responses.compact(model="echo", input="remember the milk")
        assert compacted.object == "response.compaction"
        assert compacted.output[-1].type == "compaction"
        # The compacted items go back as they came (as dicts: the SDK types them as output).
        items: list[Any] = [item.model_dump(exclude_none=True, warnings=False) for item in compacted.output]
        follow = client.responses.create(model="echo", input=[*items, {"role": "user", "content": "ok"}])
    assert follow.status == "completed"


async def test_compact_over_grpc(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db") as venna:
        created = await venna.alpha.create(input="over grpc")
        compacted = await venna.alpha.stub.CompactResponse(
            service_pb2.CompactResponseRequest(model="echo", previous_response_id=created.id),
            metadata=venna.alpha.metadata,
        )
        assert compacted.object == "response.compaction"
        assert compacted.output[-1].HasField("compaction")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await venna.alpha.stub.CompactResponse(
                service_pb2.CompactResponseRequest(model="echo", previous_response_id="resp_nope"),
                metadata=venna.alpha.metadata,
            )
        assert error_info(refused.value).reason == "PREVIOUS_RESPONSE_NOT_FOUND"


# ------------------------------------------------------------------ context management

LONG = " ".join(f"w{index}" for index in range(1200))


def test_context_management_compacts_a_long_context_first(http_venna: HttpVenna) -> None:
    """Over the threshold, the compaction item opens the output (with its own added and done
    events), the model answers from the summary, and the usage is both passes together."""
    management = [{"type": "compaction", "compact_threshold": 1000}]
    with client_for(http_venna, http_venna.alpha) as http:
        # post_stream checks the framing, the numbering and each event against both schemas.
        events = post_stream(http, model="echo", input=LONG, context_management=management).events
    for event in events:
        validate_stream_event(event)
    added = [event for event in events if event["type"] == "response.output_item.added"]
    assert [(event["output_index"], event["item"]["type"]) for event in added] == [
        (0, "compaction"),
        (1, "message"),
    ]
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert [item["type"] for item in final["output"]] == ["compaction", "message"]
    assert decode_summary(final["output"][0]["encrypted_content"]) == f"[user] {LONG}"
    # Echo: the summarizing pass read its instructions and the transcript (1201 words), the
    # answer pass the kept message, the summary heading and the summary.
    heading = len(SUMMARY_HEADING.split())
    summarizing = len(COMPACTION_INSTRUCTIONS.split()) + 1201
    assert final["usage"]["input_tokens"] == summarizing + (1200 + heading + 1201)


def test_below_the_threshold_nothing_is_compacted(http_venna: HttpVenna) -> None:
    management = [{"type": "compaction", "compact_threshold": 5000}]
    created = post(
        http_venna, "/responses", {"model": "echo", "input": LONG, "context_management": management}
    )
    assert [item["type"] for item in created.json()["output"]] == ["message"]


def test_a_continuation_starts_from_the_last_compaction(http_venna: HttpVenna) -> None:
    """What a compaction replaced is not sent again: a later turn's context is the kept user
    messages, the summary and what followed it."""
    management = [{"type": "compaction", "compact_threshold": 1000}]
    first = post(
        http_venna, "/responses", {"model": "echo", "input": LONG, "context_management": management}
    ).json()
    counted = post(
        http_venna,
        "/responses/input_tokens",
        {"model": "echo", "input": "next", "previous_response_id": first["id"]},
    ).json()["input_tokens"]
    heading = len(SUMMARY_HEADING.split())
    # kept message (1200) + summary (heading + 1201) + the answer (1200) + "next" (1)
    assert counted == 1200 + heading + 1201 + 1200 + 1


def test_a_background_response_compacts_too(http_venna: HttpVenna) -> None:
    management = [{"type": "compaction", "compact_threshold": 1000}]
    queued = post(
        http_venna,
        "/responses",
        {"model": "echo", "input": LONG, "context_management": management, "background": True},
    ).json()
    deadline = time.monotonic() + 10
    while True:
        current = httpx.get(
            f"{http_venna.base_url}/responses/{queued['id']}",
            headers={"authorization": f"Bearer {http_venna.alpha}"},
        ).json()
        if current["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert current["status"] == "completed"
    assert [item["type"] for item in current["output"]] == ["compaction", "message"]


@pytest.mark.parametrize(
    ("management", "param"),
    [
        ([{"type": "truncation"}], "context_management[0].type"),
        ([{"type": "compaction", "compact_threshold": 10}], "context_management[0].compact_threshold"),
        ([{"type": "compaction"}, {"type": "compaction"}], "context_management"),
    ],
)
def test_bad_context_management_is_400(http_venna: HttpVenna, management: list[Any], param: str) -> None:
    reply = post(http_venna, "/responses", {"model": "echo", "input": "x", "context_management": management})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
