#!/usr/bin/env python3
"""Bare servers that scripts/bench.py measures Venna against.

Each serves the routes Venna serves — the gRPC methods ``CreateResponse`` and
``StreamResponse`` of ``venna.responses.v1.ResponsesService``, or ``POST /v1/responses`` as
JSON and SSE — so that one client drives both sides, and does only what any server of that
kind must: decode the request, answer with messages of the size Venna's answers have. There is
no authentication, validation, store or model; the answer is built once per distinct input
text and reused. The gap between Venna and these servers is what Venna's own work costs.

    python scripts/bench_baselines.py grpc --listen 127.0.0.1:0
    python scripts/bench_baselines.py http --listen 127.0.0.1:0

The first line on stdout is the bound ``HOST:PORT``. Both run until SIGTERM or SIGINT.

Like Venna's echo model, a stream carries one text delta per word of the last user message,
and a model suffix ``:delay_ms=N`` waits N ms before every delta after the first (so streams
can be held open).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from venna.responses.v1 import events_pb2, response_pb2, service_pb2

SERVICE = "venna.responses.v1.ResponsesService"
# Venna accepts messages this large; the baseline accepts the same.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Ids shaped like Venna's: a prefix and 48 hex digits.
RESPONSE_ID = "resp_" + "0" * 48
MESSAGE_ID = "msg_" + "0" * 48


def delay_seconds(model: str) -> float:
    """The ``:delay_ms=N`` suffix of a model name, in seconds (0 without one)."""
    for option in model.split(":")[1:]:
        key, _, value = option.partition("=")
        if key == "delay_ms" and value.isdigit():
            return int(value) / 1000
    return 0.0


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ---------------------------------------------------------------------------------------- gRPC


def last_user_text(request: service_pb2.CreateResponseRequest) -> str:
    for item in reversed(request.input):
        if item.WhichOneof("item") == "message" and item.message.role == response_pb2.ROLE_USER:
            return "".join(part.input_text.text for part in item.message.content)
    return ""


def _response(text: str, *, completed: bool) -> response_pb2.Response:
    """A Response with the fields Venna's echo responses carry."""
    now = int(time.time())
    response = response_pb2.Response(
        id=RESPONSE_ID,
        object="response",
        created_at=now,
        status=response_pb2.RESPONSE_STATUS_COMPLETED
        if completed
        else response_pb2.RESPONSE_STATUS_IN_PROGRESS,
        model="echo",
        store=True,
        parallel_tool_calls=True,
        temperature=1.0,
        top_p=1.0,
        truncation=response_pb2.TRUNCATION_DISABLED,
        service_tier=response_pb2.SERVICE_TIER_AUTO,
    )
    response.tool_choice.mode = response_pb2.TOOL_CHOICE_MODE_AUTO
    response.text.format.text.SetInParent()
    if completed:
        response.completed_at = now
        response.output.append(_message(text))
        words = len(text.split())
        response.usage.input_tokens = words
        response.usage.output_tokens = words
        response.usage.total_tokens = 2 * words
    return response


def _message(text: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.id = MESSAGE_ID
    item.message.role = response_pb2.ROLE_ASSISTANT
    item.message.status = response_pb2.ITEM_STATUS_COMPLETED
    item.message.content.add().output_text.text = text
    return item


@functools.lru_cache(maxsize=64)
def unary_reply(text: str) -> response_pb2.Response:
    return _response(text, completed=True)


@dataclass(frozen=True, slots=True)
class GrpcStream:
    """The events of one stream: lifecycle events around ``count`` copies of one delta."""

    head: list[events_pb2.ResponseStreamEvent]
    delta: events_pb2.ResponseStreamEvent
    count: int
    tail: list[events_pb2.ResponseStreamEvent]


@functools.lru_cache(maxsize=64)
def grpc_stream(text: str) -> GrpcStream:
    """The same sequence of events Venna streams for an echo of ``text``, built once."""
    words = text.split()
    head = [events_pb2.ResponseStreamEvent() for _ in range(4)]
    head[0].created.response.CopyFrom(_response(text, completed=False))
    head[1].in_progress.response.CopyFrom(_response(text, completed=False))
    added = head[2].output_item_added.item.message
    added.id = MESSAGE_ID
    added.role = response_pb2.ROLE_ASSISTANT
    added.status = response_pb2.ITEM_STATUS_IN_PROGRESS
    head[3].content_part_added.item_id = MESSAGE_ID
    head[3].content_part_added.part.output_text.text = ""
    delta = events_pb2.ResponseStreamEvent(sequence_number=len(head) + len(words) // 2)
    delta.output_text_delta.item_id = MESSAGE_ID
    delta.output_text_delta.delta = " " + (words[len(words) // 2] if words else "")
    tail = [events_pb2.ResponseStreamEvent() for _ in range(4)]
    tail[0].output_text_done.item_id = MESSAGE_ID
    tail[0].output_text_done.text = text
    tail[1].content_part_done.item_id = MESSAGE_ID
    tail[1].content_part_done.part.output_text.text = text
    tail[2].output_item_done.item.CopyFrom(_message(text))
    tail[3].completed.response.CopyFrom(_response(text, completed=True))
    for number, event in enumerate(head):
        event.sequence_number = number
    for number, event in enumerate(tail, start=len(head) + len(words)):
        event.sequence_number = number
    return GrpcStream(head, delta, len(words), tail)


async def create_response(
    request: service_pb2.CreateResponseRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> response_pb2.Response:
    return unary_reply(last_user_text(request))


async def stream_response(
    request: service_pb2.CreateResponseRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[events_pb2.ResponseStreamEvent]:
    stream = grpc_stream(last_user_text(request))
    delay = delay_seconds(request.model)
    for event in stream.head:
        yield event
    for index in range(stream.count):
        if index and delay:
            await asyncio.sleep(delay)
        yield stream.delta
    for event in stream.tail:
        yield event


def _serializer(message: Any) -> bytes:
    return bytes(message.SerializeToString())


async def serve_grpc(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    deserialize: Callable[[bytes], service_pb2.CreateResponseRequest] = (
        service_pb2.CreateResponseRequest.FromString
    )
    handlers = {
        "CreateResponse": grpc.unary_unary_rpc_method_handler(
            create_response, request_deserializer=deserialize, response_serializer=_serializer
        ),
        "StreamResponse": grpc.unary_stream_rpc_method_handler(
            stream_response, request_deserializer=deserialize, response_serializer=_serializer
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    print(f"{listen.rsplit(':', 1)[0]}:{port}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await server.stop(0)


# ---------------------------------------------------------------------------------------- HTTP


def _json_response(text: str, *, completed: bool) -> dict[str, Any]:
    """A response object in the JSON shape Venna's shim writes."""
    now = int(time.time())
    words = len(text.split())
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": now,
        "completed_at": now if completed else None,
        "status": "completed" if completed else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": "echo",
        "output": [_json_message(text)] if completed else [],
        "metadata": {},
        "previous_response_id": None,
        "background": False,
        "store": True,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_output_tokens": None,
        "text": {"format": {"type": "text"}, "verbosity": None},
        "reasoning": None,
        "truncation": "disabled",
        "service_tier": "auto",
        "safety_identifier": None,
        "prompt_cache_key": None,
        "max_tool_calls": None,
        "top_logprobs": None,
        "system_fingerprint": None,
        **(
            {
                "usage": {
                    "input_tokens": words,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": words,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 2 * words,
                }
            }
            if completed
            else {}
        ),
    }


def _json_message(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": MESSAGE_ID,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        "status": "completed",
    }


@functools.lru_cache(maxsize=64)
def json_reply(text: str) -> dict[str, Any]:
    return _json_response(text, completed=True)


def _frame(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True, slots=True)
class SseStream:
    """The frames of one SSE stream: lifecycle frames around ``count`` copies of one delta."""

    head: list[bytes]
    delta: bytes
    count: int
    tail: list[bytes]


@functools.lru_cache(maxsize=64)
def sse_stream(text: str) -> SseStream:
    """The same sequence of frames Venna's shim writes for an echo of ``text``, built once."""
    words = text.split()
    part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": MESSAGE_ID, "output_index": 0, "content_index": 0}
    head: list[dict[str, Any]] = [
        {"type": "response.created", "response": _json_response(text, completed=False)},
        {"type": "response.in_progress", "response": _json_response(text, completed=False)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**_json_message(""), "content": [], "status": "in_progress"},
        },
        {"type": "response.content_part.added", **where, "part": part},
    ]
    delta = {
        "type": "response.output_text.delta",
        **where,
        "delta": " " + (words[len(words) // 2] if words else ""),
        "logprobs": [],
        "sequence_number": len(head) + len(words) // 2,
    }
    tail: list[dict[str, Any]] = [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": _json_message(text)},
        {"type": "response.completed", "response": _json_response(text, completed=True)},
    ]
    for number, data in enumerate(head):
        data["sequence_number"] = number
    for number, data in enumerate(tail, start=len(head) + len(words)):
        data["sequence_number"] = number
    return SseStream(
        [_frame(data) for data in head], _frame(delta), len(words), [_frame(data) for data in tail]
    )


async def _frames(stream: SseStream, delay: float) -> AsyncIterator[bytes]:
    for frame in stream.head:
        yield frame
    for index in range(stream.count):
        if index and delay:
            await asyncio.sleep(delay)
        yield stream.delta
    for frame in stream.tail:
        yield frame


def last_user_text_of(value: Any) -> str:
    """The text to echo from a JSON ``input``: the string itself, or the last user message's
    text (the form a gateway in front of this server sends)."""
    if isinstance(value, str):
        return value
    for item in reversed(value if isinstance(value, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return "".join(part.get("text", "") for part in content or () if isinstance(part, dict))
    return ""


async def responses(request: Request) -> Response:
    body = json.loads(await request.body())
    text = last_user_text_of(body.get("input"))
    if body.get("stream"):
        return StreamingResponse(
            _frames(sse_stream(text), delay_seconds(str(body.get("model", "")))),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )
    return JSONResponse(json_reply(text))


def http_app() -> Starlette:
    return Starlette(routes=[Route("/v1/responses", responses, methods=["POST"])])


async def serve_http(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    # The same uvicorn settings, and the same way of binding, as Venna's shim (gateway_http/server.py).
    config = uvicorn.Config(
        http_app(),
        host=host.strip("[]"),
        port=int(port),
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise OSError(f"cannot listen on {listen}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    print(f"{host}:{bound}", flush=True)
    await task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("kind", choices=("grpc", "http"))
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    options = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_grpc(options.listen) if options.kind == "grpc" else serve_http(options.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
