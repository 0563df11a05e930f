"""Server-sent events: OpenAI's streaming framing of the contract's events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import orjson
from google.protobuf.message import Message
from starlette.responses import Response, StreamingResponse

from venna.gateway_http.client import CallError
from venna.gateway_http.codec import Codec
from venna.gateway_http.errors import http_error

log = logging.getLogger(__name__)

# Frames framed but not yet written after which a stream stops pulling events: a slow client
# holds back its own stream, not the memory of the process.
MAX_PENDING_FRAMES = 256


class EventStreams:
    """SSE replies of the shim: frames each event as it exists, keeps quiet connections alive,
    and stops the work behind a stream when its client leaves."""

    def __init__(self, codec: Codec, keepalive_seconds: float) -> None:
        self.codec = codec
        self.keepalive_seconds = keepalive_seconds
        # Stream pullers finishing their clean-up after their client left.
        self._stopping: set[asyncio.Task[None]] = set()

    async def response(self, events: AsyncGenerator[Message, None]) -> Response:
        """An SSE response, or the stream's error raised if it fails before its first event."""
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()
            raise
        return StreamingResponse(
            self._sse_frames(first, events),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _sse_frames(
        self, first: Message | None, events: AsyncGenerator[Message, None]
    ) -> AsyncIterator[bytes]:
        """Frames each event as soon as it exists; comments keep a quiet connection alive.

        The events are pulled by a task of their own, so that waiting with a time-out for the
        next one never cancels the stream itself. Frames wait in a list, not a queue: frames
        that piled up while the last write went out leave in one write, and a burst of events
        costs no queue operation each.
        """
        if first is None:
            return
        frames: list[bytes] = []
        # Set when frames (or the end) await the writer; set when the writer took them.
        ready = asyncio.Event()
        room = asyncio.Event()
        room.set()
        ended = False
        last_sequence_number = -1

        def push(frame: bytes) -> None:
            frames.append(frame)
            ready.set()
            if len(frames) >= MAX_PENDING_FRAMES:
                room.clear()

        async def pull() -> None:
            nonlocal ended, last_sequence_number
            try:
                last_sequence_number = first.sequence_number  # type: ignore[attr-defined]
                push(self._frame(first))
                # Let the first frame go out before framing the rest of a burst: a backend that
                # produces everything at once would otherwise delay the client's first event
                # until the last.
                await asyncio.sleep(0)
                async for event in events:
                    last_sequence_number = event.sequence_number  # type: ignore[attr-defined]
                    push(self._frame(event))
                    if not room.is_set():
                        await room.wait()  # a slow client: stop pulling until it catches up
            except CallError as error:
                push(self._error_frame(error, last_sequence_number + 1))
            except Exception:
                log.exception("event stream failed")
            finally:
                await events.aclose()
            # Not reached when cancelled: then the consumer is gone and nobody reads the frames.
            ended = True
            ready.set()

        puller = asyncio.create_task(pull())
        try:
            while True:
                if not ready.is_set():
                    try:
                        async with asyncio.timeout(self.keepalive_seconds):
                            await ready.wait()
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                ready.clear()
                if frames:
                    batch = frames[0] if len(frames) == 1 else b"".join(frames)
                    frames.clear()
                    room.set()
                    yield batch
                if ended and not frames:
                    return
        finally:
            # The client went away, or the stream ended: stop the work behind it either way.
            # Cancelled once, then awaited through a shield: when this generator is itself
            # being cancelled, a plain await would pass a second cancellation on to the puller
            # and interrupt its clean-up (closing the backend and its upstream request).
            puller.cancel()
            self._stopping.add(puller)
            puller.add_done_callback(self._stopping.discard)
            try:
                await asyncio.shield(puller)
            except BaseException as error:
                if not isinstance(error, asyncio.CancelledError):
                    log.debug("event stream ended with %r", error)

    def _frame(self, event: Message) -> bytes:
        data = self.codec.encode(event)
        kind: str = data["type"]
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _error_frame(self, error: CallError, sequence_number: int) -> bytes:
        body = http_error(error).body
        code = body["code"] or body["type"]
        data = {
            "type": "error",
            # OpenAI's shape: the error's fields at the top.
            "code": code,
            "message": body["message"],
            "param": body["param"],
            "sequence_number": sequence_number,
            # Open Responses' shape: the same error as an object.
            "error": {"type": body["type"], "code": code, "message": body["message"], "param": body["param"]},
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"
