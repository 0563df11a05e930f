#!/usr/bin/env python3
"""A bare model upstream for benchmarks: replays one recorded-shape answer (reasoning, then a
message) at once, as OpenAI's Responses API (``POST /v1/responses``) and as chat completions
(``POST /v1/chat/completions``), streamed (SSE) or whole (JSON) as the request asks.

Every answer is built once at start; a request only reads its body's ``stream`` flag. The time
through Venna against the time straight to this server is what Venna adds on the real path.

    python scripts/bench_upstream.py --listen 127.0.0.1:0

The first line on stdout is the bound ``HOST:PORT``; it runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

REASONING = [f"step {index} of thinking, " for index in range(20)]
TEXT = [f"word{index} " for index in range(60)]
USAGE = {"input_tokens": 42, "output_tokens": 80, "reasoning_tokens": 20, "cached_tokens": 8}


def _sse(events: list[dict[str, Any]]) -> bytes:
    frames = [f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events]
    return ("".join(frames) + "data: [DONE]\n\n").encode()


def responses_answer() -> tuple[bytes, bytes]:
    """(SSE stream, JSON body) of a Responses API answer in OpenAI's shape."""
    usage = {
        "input_tokens": USAGE["input_tokens"],
        "input_tokens_details": {"cached_tokens": USAGE["cached_tokens"]},
        "output_tokens": USAGE["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": USAGE["reasoning_tokens"]},
        "total_tokens": USAGE["input_tokens"] + USAGE["output_tokens"],
    }
    reasoning = {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "".join(REASONING)}],
    }
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "".join(TEXT), "annotations": []}],
    }
    response = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "m",
        "output": [reasoning, message],
        "usage": usage,
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**response, "status": "in_progress", "output": []}},
        {"type": "response.in_progress", "response": {**response, "status": "in_progress", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": {**reasoning, "summary": []}},
    ]
    events += [
        {
            "type": "response.reasoning_summary_text.delta",
            "item_id": "rs_1",
            "output_index": 0,
            "summary_index": 0,
            "delta": delta,
        }
        for delta in REASONING
    ]
    events += [
        {"type": "response.output_item.done", "output_index": 0, "item": reasoning},
        {"type": "response.output_item.added", "output_index": 1, "item": {**message, "content": []}},
    ]
    events += [
        {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 1,
            "content_index": 0,
            "delta": delta,
        }
        for delta in TEXT
    ]
    events += [
        {"type": "response.output_item.done", "output_index": 1, "item": message},
        {"type": "response.completed", "response": response},
    ]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return _sse(events), json.dumps(response).encode()


def chat_answer() -> tuple[bytes, bytes]:
    """(SSE stream, JSON body) of a chat completion with reasoning_content, as vLLM sends it."""
    usage = {
        "prompt_tokens": USAGE["input_tokens"],
        "completion_tokens": USAGE["output_tokens"],
        "total_tokens": USAGE["input_tokens"] + USAGE["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": USAGE["cached_tokens"]},
        "completion_tokens_details": {"reasoning_tokens": USAGE["reasoning_tokens"]},
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"reasoning_content": delta}) for delta in REASONING]
    chunks += [chunk({"content": delta}) for delta in TEXT]
    chunks += [
        chunk({}, "stop"),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage},
    ]
    stream = ("".join(f"data: {json.dumps(item)}\n\n" for item in chunks) + "data: [DONE]\n\n").encode()
    whole = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(TEXT),
                    "reasoning_content": "".join(REASONING),
                },
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }
    return stream, json.dumps(whole).encode()


def app() -> Starlette:
    answers = {"responses": responses_answer(), "chat": chat_answer()}

    def endpoint(kind: str) -> Any:
        stream, whole = answers[kind]

        async def answer(request: Request) -> Response:
            body = await request.body()
            if b'"stream":true' in body.replace(b" ", b""):
                return Response(stream, media_type="text/event-stream")
            return Response(whole, media_type="application/json")

        return answer

    return Starlette(
        routes=[
            Route("/v1/responses", endpoint("responses"), methods=["POST"]),
            Route("/v1/chat/completions", endpoint("chat"), methods=["POST"]),
        ]
    )


async def serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    config = uvicorn.Config(
        app(), host=host, port=int(port), log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise OSError(f"cannot listen on {listen}")
        await asyncio.sleep(0.01)
    print(f"{host}:{server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    await task


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    options = parser.parse_args()
    asyncio.run(serve(options.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
