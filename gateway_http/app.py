"""The HTTP shim: OpenAI's Responses endpoints as JSON and SSE, over the gRPC contract.

Routes come from the contract's ``google.api.http`` annotations. Where a unary and a
server-streaming RPC share a route (POST /v1/responses, GET /v1/responses/{id}), ``stream``
— in the body or the query — picks the streaming one. Path parameters, the JSON body (for
``body: "*"``) and query parameters fill the request message; the reply is the JSON of the
response message, or an SSE stream of its events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from google.api import annotations_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as Message_

from gateway_http.client import SERVICES, CallError, Metadata, ServiceClient, message_class
from gateway_http.codec import Codec, CodecError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_KEEPALIVE_SECONDS = 15.0
_NO_RETRY = {"x-should-retry": "false"}
# Request parameters of OpenAI's API that Venna does not implement: null is taken as "not
# given" (clients echo them back that way), any other value is refused by name.
_UNSUPPORTED_PARAMETERS = frozenset(
    {
        "conversation",
        "prompt",
        "context_management",
        "moderation",
        "prompt_cache_retention",
        "prompt_cache_options",
    }
)

# gRPC status -> (HTTP status, OpenAI error type); as in DESIGN.md's table.
_HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
# ErrorInfo reasons that OpenAI reports differently from their status code's default.
_REASONS: dict[str, tuple[int, str, str]] = {
    # OpenAI answers an unknown previous_response_id with 400, not 404.
    "PREVIOUS_RESPONSE_NOT_FOUND": (400, "invalid_request_error", "previous_response_not_found"),
    "INSUFFICIENT_QUOTA": (429, "insufficient_quota", "insufficient_quota"),
    "INVALID_API_KEY": (401, "invalid_request_error", "invalid_api_key"),
    "MISSING_API_KEY": (401, "invalid_request_error", "missing_api_key"),
}


@dataclass(frozen=True, slots=True)
class _Binding:
    """The RPCs behind one HTTP route."""

    verb: str
    template: str
    has_body: bool
    unary: MethodDescriptor | None
    streaming: MethodDescriptor | None


def _bindings() -> list[_Binding]:
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for method in (method for service in SERVICES for method in service.methods):
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        if verb is None:
            continue
        entry = grouped.setdefault((verb.upper(), getattr(rule, verb)), {"body": bool(rule.body)})
        entry["streaming" if method.server_streaming else "unary"] = method
    return [
        _Binding(verb, template, entry["body"], entry.get("unary"), entry.get("streaming"))
        for (verb, template), entry in grouped.items()
    ]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None,
    code: str | None,
    headers: Mapping[str, str] = {},
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=dict(headers))


@dataclass(frozen=True, slots=True)
class _HttpError:
    status: int
    body: dict[str, Any]  # OpenAI's error object: message, type, param, code
    headers: dict[str, str]


def call_error_response(error: CallError) -> JSONResponse:
    """The OpenAI error reply for a failed call."""
    mapped = _http_error(error)
    return JSONResponse({"error": mapped.body}, status_code=mapped.status, headers=mapped.headers)


def _http_error(error: CallError) -> _HttpError:
    """A failed call as OpenAI reports it, from its status and google.rpc details."""
    status, type_ = _HTTP_ERRORS.get(error.code, (500, "server_error"))
    info = error_details_pb2.ErrorInfo()
    if error.status is not None:
        for detail in error.status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
    param = info.metadata.get("param") or None
    code: str | None = info.reason.lower() or None
    if info.reason in _REASONS:
        status, type_, code = _REASONS[info.reason]
    headers: dict[str, str] = {}
    if "retry_after" in info.metadata:
        headers["retry-after"] = info.metadata["retry_after"]
    if status == 501:
        headers.update(_NO_RETRY)
    if status >= 500 and error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        message = error.message or "The server had an error while processing your request."
    else:
        message = error.message
    return _HttpError(status, error_body(message, type_, param, code)["error"], headers)


class RequestIdMiddleware:
    """Gives every reply an ``x-request-id``, as OpenAI's API does (SDKs surface it on errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ("req_" + secrets.token_hex(16)).encode()

        async def send_with_id(message: Message_) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ResponsesHttpApp:
    """Builds the Starlette app around a ServiceClient."""

    def __init__(
        self,
        client: ServiceClient,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS,
    ) -> None:
        self.client = client
        self.codec = Codec()
        # Stream pullers finishing their clean-up after their client left.
        self._stopping: set[asyncio.Task[None]] = set()
        self.max_body_bytes = max_body_bytes
        self.keepalive_seconds = keepalive_seconds

    def build(self) -> Starlette:
        routes = [
            Route(binding.template, self._endpoint(binding), methods=[binding.verb])
            for binding in _bindings()
        ]
        routes += [
            Route("/healthz", self._health, methods=["GET"]),
            Route(
                "/v1/{rest:path}", self._not_implemented, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]
            ),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
            middleware=[Middleware(RequestIdMiddleware)],
        )

    # ------------------------------------------------------------------ endpoints

    def _endpoint(self, binding: _Binding) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                response = await self._handle(binding, request)
            except _BadRequest as error:
                response = _error_response(
                    error.status, error.message, "invalid_request_error", error.param, error.code
                )
            except CodecError as error:
                response = _error_response(
                    400, error.message, "invalid_request_error", error.param, error.code
                )
            except CallError as error:
                response = call_error_response(error)
            return response

        return endpoint

    async def _handle(self, binding: _Binding, request: Request) -> Response:
        if binding.has_body:
            fields = await self._json_body(request)
            stream = fields.pop("stream", None) or False
            fields.pop("stream_options", None)  # obfuscation padding is not sent, so nothing to switch off
            for name in _UNSUPPORTED_PARAMETERS.intersection(fields):
                if fields.pop(name) is not None:
                    raise _BadRequest(
                        400,
                        f"The '{name}' parameter is not supported by Venna.",
                        name,
                        "unsupported_parameter",
                    )
            if not isinstance(stream, bool):
                raise _BadRequest(
                    400, "Invalid type for 'stream': expected a boolean.", "stream", "invalid_type"
                )
        else:
            stream = bool(binding.streaming) and _query_bool("stream", request.query_params.get("stream", ""))
        method = binding.streaming if stream and binding.streaming else binding.unary or binding.streaming
        assert method is not None
        if not binding.has_body:
            fields = _query_fields(request, method.input_type)
        fields.update(request.path_params)
        message = self.codec.decode(fields, message_class(method.input_type.full_name))
        metadata = _forwarded_metadata(request)
        if method.server_streaming:
            return await self._sse(method, message, metadata)
        result = await self.client.unary(method, message, metadata)
        return Response(orjson.dumps(self.codec.encode(result)), media_type="application/json")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BadRequest(413, f"The request body exceeds {self.max_body_bytes} bytes.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise _BadRequest(413, f"The request body exceeds {self.max_body_bytes} bytes.")
        if not body.strip():
            return {}
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest(
                400,
                "We could not parse the JSON body of your request. The body must be valid JSON.",
            ) from None
        if not isinstance(data, dict):
            raise _BadRequest(400, "The JSON body of your request must be an object.")
        return data

    async def _sse(self, method: MethodDescriptor, message: Message, metadata: Metadata) -> Response:
        """An SSE response, or a JSON error if the stream fails before its first event."""
        events = self.client.stream(method, message, metadata)
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
        body = _http_error(error).body
        data = {
            "type": "error",
            "code": body["code"] or body["type"],
            "message": body["message"],
            "param": body["param"],
            "sequence_number": sequence_number,
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _not_implemented(self, request: Request) -> Response:
        return _error_response(
            501,
            f"Endpoint '{request.method} {request.url.path}' is not implemented yet on Venna gateway",
            "not_implemented",
            None,
            "not_implemented",
            _NO_RETRY,
        )

    async def _http_exception(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        message = {
            404: "Not found.",
            405: f"Method {request.method} is not allowed on {request.url.path}.",
        }.get(error.status_code, str(error.detail))
        return _error_response(error.status_code, message, "invalid_request_error", None, None, _NO_RETRY)


def _query_fields(request: Request, message: Descriptor) -> dict[str, Any]:
    """Query parameters as JSON values of the request's fields (``include[]=a`` is a list).

    Parameters the request does not have (``stream``, which picked the RPC, or ones unknown
    here) are ignored, as web APIs commonly do.
    """
    fields: dict[str, Any] = {}
    for raw_key, value in request.query_params.multi_items():
        key = raw_key.removesuffix("[]")
        field = message.fields_by_name.get(key)
        if field is None or key in request.path_params:
            continue
        if field.is_repeated:
            fields.setdefault(key, []).append(value)
        else:
            fields[key] = _query_value(field, key, value)
    return fields


def _query_bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise _BadRequest(400, f"Invalid value for '{key}': expected a boolean.", key, "invalid_type")


def _query_value(field: FieldDescriptor, key: str, value: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        return _query_bool(key, value)
    if field.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
        try:
            return int(value)
        except ValueError:
            raise _BadRequest(
                400, f"Invalid value for '{key}': expected an integer.", key, "invalid_type"
            ) from None
    return value


def _forwarded_metadata(request: Request) -> Metadata:
    authorization = request.headers.get("authorization")
    if not authorization:
        return ()
    # gRPC metadata values are printable ASCII; no valid key is anything else.
    if not (authorization.isascii() and authorization.isprintable()):
        raise _BadRequest(
            401, "Invalid API key: the Authorization header is malformed.", None, "invalid_api_key"
        )
    return (("authorization", authorization),)


def create_app(client: ServiceClient, **options: Any) -> Starlette:
    """The ASGI app of the shim."""
    return ResponsesHttpApp(client, **options).build()
