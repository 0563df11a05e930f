"""The upstream HTTP client's handling of a connection cut mid-body, against a raw TCP server:
the bytes received before the cut are kept even when the cut is noticed before they are read."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from venna.backends.responses.client import _body_chunks
from venna.backends.responses.streams import SseParser

FRAMES = b"event: a\ndata: {}\n\n" * 3


async def test_bytes_received_before_a_cut_are_handed_over_before_the_error() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        chunk = f"{len(FRAMES):x}\r\n".encode() + FRAMES + b"\r\n"
        writer.write(head + chunk)  # no terminating chunk: the body is cut
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.get(f"http://127.0.0.1:{port}/")
            # Let the rest of the body and the close arrive before anything is read: the reader
            # then holds both the bytes and the error.
            await asyncio.sleep(0.2)
            received: list[bytes] = []

            async def read_all() -> None:
                async for chunk in _body_chunks(response):
                    received.append(chunk)

            with pytest.raises(aiohttp.ClientPayloadError):
                await read_all()
            response.close()
    finally:
        server.close()
        await server.wait_closed()
    assert b"".join(received) == FRAMES


def _parsed_in_pieces(body: bytes, size: int) -> list[tuple[str, dict[str, object] | None]]:
    parser = SseParser()
    events = []
    for start in range(0, len(body), size):
        events += parser.feed(body[start : start + size])
    return events


SSE_BODY = (
    b": a comment\r\n"
    b"event: response.output_text.delta\r\n"
    b'data: {"type": "response.output_text.delta", "delta": "caf\xc3\xa9"}\r\n\r\n'
    b"event: typed.by.the.event.line\n"
    b'data: {"delta":\n'
    b'data: "two data lines"}\n\n'
    b"data: {not json\n\n"
    b"data: [1, 2]\n\n"
    b"data:" + b'{"type": "long", "text": "' + b"x" * 100_000 + b'"}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("size", [1, 7, 4096, len(SSE_BODY)])
def test_sse_events_are_the_same_whatever_the_chunk_boundaries(size: int) -> None:
    """An upstream's bytes arrive in pieces of any size: split inside a line, inside a CRLF or a
    multi-byte character, the events are the same; malformed frames and non-objects are
    skipped, a data line may be long, and the event line names a payload without a type."""
    events = _parsed_in_pieces(SSE_BODY, size)
    assert [kind for kind, _ in events] == [
        "response.output_text.delta",
        "typed.by.the.event.line",
        "long",
        "[DONE]",
    ]
    assert events[0][1] == {"type": "response.output_text.delta", "delta": "café"}
    assert events[1][1] == {"delta": "two data lines"}
    assert events[2][1] is not None and len(str(events[2][1]["text"])) == 100_000
    assert events[3][1] is None


def test_an_event_without_its_blank_line_is_not_dispatched() -> None:
    """A stream cut inside an event yields nothing for it: a half-received event is never
    taken for a whole one."""
    parser = SseParser()
    assert parser.feed(b'data: {"type": "a"}\n\ndata: {"type": "b"}\n') == [("a", {"type": "a"})]
    assert parser.feed(b'data: {"type": "c"}') == []
