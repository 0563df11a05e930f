"""The upstream HTTP client's handling of a connection cut mid-body, against a raw TCP server:
the bytes received before the cut are kept even when the cut is noticed before they are read."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from venna.backends.responses.client import _body_chunks

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
