"""WebSocket mode of ``/v1/responses``, as OpenAI and Open Responses define it.

A client opens a WebSocket on ``/v1/responses`` (its key in the handshake's Authorization
header) and sends ``response.create`` messages: the create body plus ``"type"``, without
``stream``, ``stream_options`` or ``background``. Each response is streamed back as the same
events as SSE, one JSON text message each; responses on one connection run one after another.
Failures are ``error`` messages (``{"type": "error", "status", "error": {...}}``) and the
connection stays open.

Continuation works as over HTTP through ``previous_response_id``; in addition, the most recent
response of the connection is remembered when it was not stored (``"store": false``), so that
the next turn can continue it: its context and output become the start of the next input.
Only the most recent one is remembered, and a failed turn forgets it, as OpenAI's service does.

A connection lasts at most an hour, as OpenAI's do: after that, the turn in progress finishes,
then the client gets an ``error`` (``websocket_connection_limit_reached``) and the connection
closes; clients open a new one (a store:false continuation does not carry over).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf.descriptor import MethodDescriptor
from starlette.websockets import WebSocket, WebSocketDisconnect

from venna.gateway_http.client import CallError, Metadata, ServiceClient, message_class
from venna.gateway_http.codec import Codec, CodecError
from venna.gateway_http.errors import BadRequest, error_body, error_response, http_error
from venna.gateway_http.parsing import drop_unsupported, forwarded_metadata

log = logging.getLogger(__name__)

CREATE_EVENT = "response.create"
# Transport fields of the HTTP body that a WebSocket turn must not carry.
TRANSPORT_FIELDS = ("stream", "stream_options", "background")
# Statuses after which a remembered response may be continued.
_CONTINUABLE = frozenset({"completed", "incomplete"})
_TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Messages waiting while a turn runs; past this the client is not reading its events.
_MAX_WAITING_MESSAGES = 64
WEBSOCKET_MAX_SECONDS = 3600.0


@dataclass(slots=True)
class _Remembered:
    """An unstored response this connection may continue: its id and its whole context."""

    response_id: str
    items: list[Any]


class _TurnError(Exception):
    """A turn refused before it ran: its error message, as OpenAI sends it."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message"))
        self.status = status
        self.body = body


class ResponsesWebSocket:
    """Serves WebSocket connections on ``/v1/responses`` through the StreamResponse RPC."""

    def __init__(
        self,
        client: ServiceClient,
        codec: Codec,
        stream_method: MethodDescriptor,
        *,
        max_seconds: float = WEBSOCKET_MAX_SECONDS,
    ) -> None:
        self.client = client
        self.codec = codec
        self.stream_method = stream_method
        self.max_seconds = max_seconds

    async def serve(self, websocket: WebSocket) -> None:
        """One connection, from the handshake to its close."""
        try:
            metadata = forwarded_metadata(websocket)
            await self.client.check_key(metadata)
        except BadRequest as error:
            await _refuse(
                websocket, error.status, error_body(error.message, "invalid_request_error", None, error.code)
            )
            return
        except CallError as error:
            mapped = http_error(error)
            await _refuse(websocket, mapped.status, {"error": mapped.body})
            return
        await websocket.accept()
        await _Connection(self, websocket, metadata).run()


async def _refuse(websocket: WebSocket, status: int, body: dict[str, Any]) -> None:
    """Refuses the handshake with OpenAI's error JSON and its status where the server can send
    an HTTP reply to a WebSocket request; otherwise closes it (the server answers 403)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        error = body["error"]
        reply = error_response(status, error["message"], error["type"], error["param"], error["code"])
        await websocket.send_denial_response(reply)
    else:
        await websocket.close(code=1008, reason=str(body["error"]["message"])[:120])


class _Connection:
    """One accepted connection: reads messages on a task of its own, runs turns one by one."""

    def __init__(self, server: ResponsesWebSocket, websocket: WebSocket, metadata: Metadata) -> None:
        self.server = server
        self.websocket = websocket
        self.metadata = metadata
        self.remembered: _Remembered | None = None
        self.waiting: asyncio.Queue[str | None] = asyncio.Queue(_MAX_WAITING_MESSAGES)
        self.gone = asyncio.Event()
        self.closes_at = asyncio.get_running_loop().time() + server.max_seconds

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        turn: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self.closes_at):
                        text = await self.waiting.get()
                except TimeoutError:
                    await self._expire()
                    return
                if text is None:
                    return
                turn = asyncio.create_task(self._turn(text))
                gone = asyncio.create_task(self.gone.wait())
                try:
                    await asyncio.wait((turn, gone), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    gone.cancel()
                if not turn.done():
                    # The client left mid-turn: stop the work, as an HTTP client leaving does.
                    turn.cancel()
                    await asyncio.wait((turn,))
                    return
                turn.result()
        except WebSocketDisconnect:
            return
        finally:
            # Also when this connection's own task is cancelled (the server stopping): the turn
            # in progress is stopped with it, never left running for nobody.
            pending = [task for task in (reader, turn) if task is not None and not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _expire(self) -> None:
        """Ends a connection that reached its time limit (between turns), saying why."""
        minutes = self.server.max_seconds / 60
        await self._send(
            {
                "type": "error",
                "status": 400,
                "error": _error(
                    f"This WebSocket connection reached its limit of {minutes:g} minutes; open a new one.",
                    None,
                    "websocket_connection_limit_reached",
                ),
            }
        )
        await self.websocket.close(code=1000, reason="connection time limit reached")

    async def _read(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None and message.get("bytes") is not None:
                    text = message["bytes"].decode("utf-8", errors="replace")
                if text is not None:
                    await self.waiting.put(text)
        finally:
            self.gone.set()
            if not self.waiting.full():
                self.waiting.put_nowait(None)

    async def _turn(self, text: str) -> None:
        try:
            fields, continued = self._create_fields(text)
            request = self.server.codec.decode(
                fields, message_class(self.server.stream_method.input_type.full_name)
            )
        except _TurnError as error:
            self.remembered = None
            await self._send({"type": "error", "status": error.status, "error": error.body})
            return
        except CodecError as error:
            self.remembered = None
            body = error_body(error.message, "invalid_request_error", error.param, error.code)["error"]
            await self._send({"type": "error", "status": 400, "error": body})
            return
        final: dict[str, Any] | None = None
        try:
            events = self.server.client.stream(self.server.stream_method, request, self.metadata)
            async with aclosing(events) as stream:
                async for event in stream:
                    data = self.server.codec.encode(event)
                    response = data.get("response")
                    if continued is not None and isinstance(response, dict):
                        # The turn ran on the remembered context; it continues that response.
                        response["previous_response_id"] = continued
                    if data.get("type") in _TERMINAL_EVENTS:
                        final = response
                    await self._send(data)
        except CallError as error:
            self.remembered = None
            mapped = http_error(error)
            await self._send({"type": "error", "status": mapped.status, "error": mapped.body})
            return
        self._remember(fields, final)

    def _create_fields(self, text: str) -> tuple[dict[str, Any], str | None]:
        """The create body a message asks for, and the id of the remembered response it
        continues (its context then opens the input), if it does."""
        try:
            fields = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise _TurnError(400, _error("The message is not valid JSON.", None, "invalid_json")) from None
        if not isinstance(fields, dict):
            raise _TurnError(400, _error("The message must be a JSON object.", None, "invalid_json"))
        kind = fields.pop("type", None)
        if kind != CREATE_EVENT:
            raise _TurnError(
                400,
                _error(
                    f"Invalid 'type': expected '{CREATE_EVENT}'.",
                    "type",
                    "invalid_value" if kind is not None else "missing_required_parameter",
                ),
            )
        for name in TRANSPORT_FIELDS:
            if name in fields:
                raise _TurnError(
                    400,
                    _error(
                        f"'{name}' is not sent in WebSocket mode: every response streams on the socket.",
                        name,
                        "unsupported_parameter",
                    ),
                )
        try:
            drop_unsupported(fields)
        except BadRequest as error:
            raise _TurnError(error.status, _error(error.message, error.param, error.code)) from None
        remembered = self.remembered
        if remembered is None or fields.get("previous_response_id") != remembered.response_id:
            return fields, None
        del fields["previous_response_id"]
        fields["input"] = [*remembered.items, *_input_items(fields.get("input"))]
        return fields, remembered.response_id

    def _remember(self, fields: dict[str, Any], final: dict[str, Any] | None) -> None:
        """Remembers the turn's response if it was not stored and may be continued; forgets the
        previous one either way (only the most recent response is kept)."""
        self.remembered = None
        if final is None or final.get("store") is not False or final.get("status") not in _CONTINUABLE:
            return
        items = [*_input_items(fields.get("input")), *final.get("output", [])]
        self.remembered = _Remembered(str(final["id"]), items)

    async def _send(self, data: dict[str, Any]) -> None:
        await self.websocket.send_text(orjson.dumps(data).decode())


def _input_items(value: Any) -> list[Any]:
    """A create body's ``input`` as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return list(value)
    return [value]  # not a list: the codec refuses it with the right message


def _error(message: str, param: str | None, code: str | None) -> dict[str, Any]:
    body: dict[str, Any] = error_body(message, "invalid_request_error", param, code)["error"]
    return body
