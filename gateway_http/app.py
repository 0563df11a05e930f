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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as Message_

from venna.gateway_http.client import SERVICES, CallError, Metadata, ServiceClient, message_class
from venna.gateway_http.codec import Codec, CodecError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_KEEPALIVE_SECONDS = 15.0
# Bodies larger than this are parsed and decoded in a worker thread, off the event loop.
OFFLOAD_BYTES = 1024 * 1024
# How much of a client's value an error message may quote.
_QUOTE_CHARS = 100
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
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] = {},
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers)


class _ClientLeft(Exception):
    """The client closed its connection before the reply: there is nobody to answer."""


def _quote(text: str) -> str:
    """A client's value as an error message may show it: never more than a short prefix."""
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "…"


class FramingGuardMiddleware:
    """Refuses requests whose body framing is ambiguous, before anything else looks at them.

    A request with both Content-Length and Transfer-Encoding can be read differently by a
    proxy in front and by this server (request smuggling); it gets a 400 and the connection
    is closed, since where its body ends is not known.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                response = _error_response(
                    400,
                    "A request may not have both Content-Length and Transfer-Encoding headers.",
                    "invalid_request_error",
                    None,
                    "invalid_request_framing",
                    {"connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
        self._routes: list[Route] = []
        for binding in _bindings():
            for method in (binding.unary, binding.streaming):
                if method is not None:
                    # Built now: bodies may be decoded in worker threads, which must find the
                    # codec's converters ready rather than build them concurrently.
                    self.codec.prepare(method.input_type)

    def build(self) -> Starlette:
        self._routes = [
            Route(binding.template, self._endpoint(binding), methods=[binding.verb])
            for binding in _bindings()
        ]
        routes = [
            *self._routes,
            Route("/healthz", self._health, methods=["GET"]),
            Route("/v1/{rest:path}", self._unrouted, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
            middleware=[Middleware(RequestIdMiddleware), Middleware(FramingGuardMiddleware)],
        )

    # ------------------------------------------------------------------ endpoints

    def _endpoint(self, binding: _Binding) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                response = await self._handle(binding, request)
            except _BadRequest as error:
                response = _error_response(
                    error.status,
                    error.message,
                    "invalid_request_error",
                    error.param,
                    error.code,
                    error.headers,
                )
            except (_ClientLeft, ClientDisconnect):
                # Not sent: the connection is gone. A status of our own marks it in any log.
                response = Response(status_code=499)
            except CodecError as error:
                response = _error_response(
                    400, error.message, "invalid_request_error", error.param, error.code
                )
            except CallError as error:
                response = call_error_response(error)
            return response

        return endpoint

    async def _handle(self, binding: _Binding, request: Request) -> Response:
        # Nothing of the body is read before the headers are checked and the key is known good:
        # a client without a valid key costs one key check, whatever it sends.
        if binding.has_body:
            _check_content_type(request)
        metadata = _forwarded_metadata(request)
        await self.client.check_key(metadata)
        if binding.has_body:
            body = await self._read_body(request)
            if len(body) > OFFLOAD_BYTES:
                # Parsing and decoding megabytes takes a while: other clients are served meanwhile.
                method, message = await asyncio.to_thread(
                    self._decode_body, binding, body, request.path_params
                )
            else:
                method, message = self._decode_body(binding, body, request.path_params)
        else:
            stream = bool(binding.streaming) and _query_bool("stream", request.query_params.get("stream", ""))
            method = _pick(binding, stream)
            fields = _query_fields(request, method.input_type)
            fields.update(request.path_params)
            message = self.codec.decode(fields, message_class(method.input_type.full_name))
        if method.server_streaming:
            return await self._sse(method, message, metadata)
        result = await self._unary_while_connected(method, message, metadata, request.receive)
        return Response(orjson.dumps(self.codec.encode(result)), media_type="application/json")

    def _decode_body(
        self, binding: _Binding, body: bytes, path_params: Mapping[str, Any]
    ) -> tuple[MethodDescriptor, Message]:
        """The RPC a JSON body asks for, and its request message."""
        fields = _parse_json_object(body)
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
            raise _BadRequest(400, "Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
        method = _pick(binding, stream)
        fields.update(path_params)
        return method, self.codec.decode(fields, message_class(method.input_type.full_name))

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to exceed the limit.

        How long it may take to arrive is bounded by the connection (see gateway_http.server).
        """
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BadRequest(413, f"The request body exceeds {self.max_body_bytes} bytes.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise _BadRequest(413, f"The request body exceeds {self.max_body_bytes} bytes.")
        return bytes(body)

    async def _unary_while_connected(
        self, method: MethodDescriptor, message: Message, metadata: Metadata, receive: Receive
    ) -> Message:
        """The unary call's reply; the call is cancelled if the client leaves before it.

        Cancelling it is what stops the generation (and its upstream request) and stores the
        response as cancelled, as a gRPC deadline or an SSE disconnect does.
        """
        call = asyncio.ensure_future(self.client.unary(method, message, metadata))
        watcher = asyncio.ensure_future(_disconnected(receive))
        left = False
        try:
            await asyncio.wait((call, watcher), return_when=asyncio.FIRST_COMPLETED)
            left = watcher.done() and watcher.exception() is None
            if not left:
                await asyncio.wait((call,))  # the connection cannot be watched: the call goes on
        finally:
            watcher.cancel()
            if not call.done():
                call.cancel()
                # The call settles the response as it unwinds: let it, even when this task is
                # itself being cancelled.
                await asyncio.wait((call,))
        if left and call.cancelled():
            raise _ClientLeft
        return call.result()

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

    async def _unrouted(self, request: Request) -> Response:
        """405 for a known path asked with another method; 501 for any other path under /v1."""
        allowed = sorted(
            {
                verb
                for route in self._routes
                if route.matches(request.scope)[0] is Match.PARTIAL
                for verb in route.methods or ()
            }
        )
        if allowed:
            return _error_response(
                405,
                f"Method {request.method} is not allowed on {_quote(request.url.path)}; "
                f"allowed: {', '.join(allowed)}.",
                "invalid_request_error",
                None,
                "method_not_allowed",
                {"allow": ", ".join(allowed), **_NO_RETRY},
            )
        return _error_response(
            501,
            f"Endpoint '{request.method} {_quote(request.url.path)}' is not implemented yet on Venna gateway",
            "not_implemented",
            None,
            "not_implemented",
            _NO_RETRY,
        )

    async def _http_exception(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        message = {
            404: "Not found.",
            405: f"Method {request.method} is not allowed on {_quote(request.url.path)}.",
        }.get(error.status_code, str(error.detail))
        code = "method_not_allowed" if error.status_code == 405 else None
        headers = {**(error.headers or {}), **_NO_RETRY}
        return _error_response(error.status_code, message, "invalid_request_error", None, code, headers)


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


def _pick(binding: _Binding, stream: bool) -> MethodDescriptor:
    """The RPC of a route: the streaming one when asked for and there is one."""
    method = binding.streaming if stream and binding.streaming else binding.unary or binding.streaming
    assert method is not None
    return method


def _parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; any body that is not one is a 400, however it fails.

    orjson refuses nesting deeper than 1024 levels with the same error as any invalid JSON,
    where the standard library would raise RecursionError.
    """
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        data = _parse_surrogate_escapes(body, error)
    if not isinstance(data, dict):
        raise _BadRequest(400, "The JSON body of your request must be an object.")
    return data


def _parse_surrogate_escapes(body: bytes, error: orjson.JSONDecodeError) -> Any:
    """Valid JSON may escape a lone UTF-16 surrogate ("\\ud800"), which orjson refuses.

    Such a body is read by the standard library instead, so that the codec names the field
    that holds text no proto string can carry.
    """
    unparsable = _BadRequest(
        400, "We could not parse the JSON body of your request. The body must be valid JSON."
    )
    if "surrogate" not in str(error):
        raise unparsable from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise unparsable from None


def _check_content_type(request: Request) -> None:
    """A body must be JSON; one without a Content-Type is taken as JSON, as curl users expect."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise _BadRequest(
        415,
        f"Unsupported Content-Type '{_quote(content_type)}': the request body must be 'application/json'.",
        None,
        "unsupported_media_type",
    )


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has closed its connection (the rest of any body is ignored)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _forwarded_metadata(request: Request) -> Metadata:
    authorizations = request.headers.getlist("authorization")
    if len(authorizations) > 1:
        raise _BadRequest(
            400,
            "The request has more than one Authorization header; send exactly one.",
            None,
            "invalid_authorization_header",
        )
    authorization = authorizations[0] if authorizations else ""
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
