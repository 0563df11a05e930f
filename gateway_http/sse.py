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
        next one never cancels the stream itself.
        """
        if first is None:
            return
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        last_sequence_number = -1

        async def pull() -> None:
            nonlocal last_sequence_number
            try:
                last_sequence_number = first.sequence_number  # type: ignore[attr-defined]
                await queue.put(self._frame(first))
                # Let the first frame go out before framing the rest of a burst: putting into a
                # queue with room never suspends, so a backend that produces everything at
                # once would otherwise delay the client's first event until the last.
                await asyncio.sleep(0)
                async for event in events:
                    last_sequence_number = event.sequence_number  # type: ignore[attr-defined]
                    await queue.put(self._frame(event))
            except CallError as error:
                await queue.put(self._error_frame(error, last_sequence_number + 1))
            except Exception:
                log.exception("event stream failed")
            finally:
                await events.aclose()
            # Not reached when cancelled: then the consumer is gone and nobody reads the queue.
            await queue.put(None)

        puller = asyncio.create_task(pull())
        try:
            while True:
                if queue.empty():
                    try:
                        async with asyncio.timeout(self.keepalive_seconds):
                            frame = await queue.get()
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                else:
                    frame = queue.get_nowait()
                if frame is None:
                    return
                # Frames that piled up while the last write went out leave in one write.
                ready: list[bytes] = [frame]
                finished = False
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        finished = True
                        break
                    ready.append(more)
                yield frame if len(ready) == 1 else b"".join(ready)
                if finished:
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
        data = {
            "type": "error",
            "code": body["code"] or body["type"],
            "message": body["message"],
            "param": body["param"],
            "sequence_number": sequence_number,
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"
