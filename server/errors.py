"""One error vocabulary for the service, encoded as gRPC status codes with google.rpc details.

Every error carries an ``ErrorInfo`` (domain ``venna.dev``, an UPPER_SNAKE reason, and the
offending ``param`` in its metadata) and, for invalid fields, a ``BadRequest`` naming them, so
any client (and the HTTP shim) can render OpenAI's ``{"error": {message, type, param, code}}``
without parsing messages.
"""

from __future__ import annotations

import contextvars

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from venna.backends.base import BackendError, ErrorKind

DOMAIN = "venna.dev"
# How much of a client's value an error message quotes.
QUOTED_CHARS = 64

# The status a handler aborted its call with: set where calls are aborted, in the call's own
# context, so that a wrapper around the handler (metrics, access log) reads it afterwards.
ABORTED_WITH: contextvars.ContextVar[grpc.StatusCode | None] = contextvars.ContextVar(
    "venna_aborted_with", default=None
)


def quoted(value: str, limit: int = QUOTED_CHARS) -> str:
    """``value`` as an error message may quote it: never more than ``limit`` characters, so
    that a megabyte sent is not a megabyte echoed (and logged) back."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


class ServiceError(Exception):
    """A client-visible failure of a call."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        param: str | None = None,
        violations: list[tuple[str, str]] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.param = param
        self.violations = violations or (
            [(param, message)] if param and code is grpc.StatusCode.INVALID_ARGUMENT else []
        )
        self.metadata = metadata or {}

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata))
        if self.param:
            info.metadata["param"] = self.param
        details: list[Message] = [info]
        if "retry_after" in self.metadata:
            # The standard detail for gRPC clients that honour retry hints.
            seconds = float(self.metadata["retry_after"])
            delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                        for field, description in self.violations
                    ]
                )
            )
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        status = status_pb2.Status(
            code=self.code.value[0],  # value is (number, name)
            message=self.message,
            details=packed,
        )
        return rpc_status.to_status(status)


def invalid_argument(param: str, message: str, reason: str = "INVALID_VALUE") -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason, param=param)


def response_not_found(response_id: str, param: str = "response_id") -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"No response found with id '{quoted(response_id)}'.",
        reason="RESPONSE_NOT_FOUND",
        param=param,
    )


def conversation_not_found(conversation_id: str, param: str = "conversation_id") -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"Conversation with id '{quoted(conversation_id)}' not found.",
        reason="CONVERSATION_NOT_FOUND",
        param=param,
    )


_BACKEND_CODES = {
    ErrorKind.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.QUOTA_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def from_backend(error: BackendError, response_id: str | None = None) -> ServiceError:
    """The call's status when a backend fails before a stream could report it in-band."""
    metadata = dict(error.details)
    if error.retry_after is not None:
        metadata["retry_after"] = f"{error.retry_after:g}"
    if response_id:
        metadata["response_id"] = response_id
    return ServiceError(
        _BACKEND_CODES[error.kind],
        error.message,
        reason=error.code.upper(),  # OpenAI's code, e.g. invalid_value, insufficient_quota
        param=error.param,
        metadata=metadata,
    )
