"""OpenAI's error replies: the JSON body, the HTTP status of a failed call (from its gRPC status
and ErrorInfo reason), and the errors the shim raises itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from starlette.responses import JSONResponse

from venna.gateway_http.client import CallError

# How much of a client's value an error message may quote.
QUOTE_CHARS = 100
NO_RETRY = {"x-should-retry": "false"}

# gRPC status -> (HTTP status, OpenAI error type): the statuses OpenAI's API answers with.
HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
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
REASONS: dict[str, tuple[int, str, str]] = {
    # OpenAI answers an unknown previous_response_id with 400, not 404.
    "PREVIOUS_RESPONSE_NOT_FOUND": (400, "invalid_request_error", "previous_response_not_found"),
    "INSUFFICIENT_QUOTA": (429, "insufficient_quota", "insufficient_quota"),
    "INVALID_API_KEY": (401, "invalid_request_error", "invalid_api_key"),
    "MISSING_API_KEY": (401, "invalid_request_error", "missing_api_key"),
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None,
    code: str | None,
    headers: Mapping[str, str] = {},
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=dict(headers))


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    body: dict[str, Any]  # OpenAI's error object: message, type, param, code
    headers: dict[str, str]


def call_error_response(error: CallError) -> JSONResponse:
    """The OpenAI error reply for a failed call."""
    mapped = http_error(error)
    return JSONResponse({"error": mapped.body}, status_code=mapped.status, headers=mapped.headers)


def http_error(error: CallError) -> HttpError:
    """A failed call as OpenAI reports it, from its status and google.rpc details."""
    status, type_ = HTTP_ERRORS.get(error.code, (500, "server_error"))
    info = error_details_pb2.ErrorInfo()
    if error.status is not None:
        for detail in error.status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
    param = info.metadata.get("param") or None
    code: str | None = info.reason.lower() or None
    if info.reason in REASONS:
        status, type_, code = REASONS[info.reason]
    headers: dict[str, str] = {}
    if "retry_after" in info.metadata:
        headers["retry-after"] = info.metadata["retry_after"]
    if status == 501:
        headers.update(NO_RETRY)
    if status >= 500 and error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        message = error.message or "The server had an error while processing your request."
    else:
        message = error.message
    return HttpError(status, error_body(message, type_, param, code)["error"], headers)


class BadRequest(Exception):
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


class ClientLeft(Exception):
    """The client closed its connection before the reply: there is nobody to answer."""


def quote(text: str) -> str:
    """A client's value as an error message may show it: never more than a short prefix."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…"
