"""How the shim reaches the Responses service: always through the gRPC contract.

Two transports behave the same way — same messages, same metadata, same status codes and
details — so the shim cannot tell them apart:

* ``InProcessClient`` invokes the service's own gRPC method handlers (authentication included)
  inside this process: no socket, no serialization. ``venna serve`` uses it.
* ``ChannelClient`` dials a gRPC target, for a shim in front of a remote fleet.

Methods are found from the service descriptor, so there is no second table of RPCs here.
Both check a key on its own (``check_key``), so that the shim refuses a request without a
valid key before it reads the request's body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from venna.gateway_http.tls import ChannelTls
from venna.responses.v1 import admin_pb2, conversations_pb2, models_pb2, service_pb2, usage_pb2

# The services the shim serves over HTTP, by their google.api.http annotations.
SERVICES: tuple[ServiceDescriptor, ...] = (
    service_pb2.DESCRIPTOR.services_by_name["ResponsesService"],
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"],
    models_pb2.DESCRIPTOR.services_by_name["ModelsService"],
    conversations_pb2.DESCRIPTOR.services_by_name["ConversationsService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
)
# Its calls take admin keys, not workspace keys: the key is checked by the call itself.
ADMIN_SERVICE = SERVICES[-1]
# Large enough for any request body the shim accepts (gRPC's default is 4 MiB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

Metadata = Sequence[tuple[str, str]]


@dataclass
class CallError(Exception):
    """A call that ended with a non-OK status, with its google.rpc details when present."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


class ServiceClient(Protocol):
    async def check_key(self, metadata: Metadata) -> None:
        """Returns if the call's key is valid; raises CallError (UNAUTHENTICATED) as a call would.

        The shim asks before it reads a request's body, so that nobody without a key makes it
        read, parse or decode anything.
        """
        ...

    async def unary(self, method: MethodDescriptor, request: Message, metadata: Metadata) -> Message: ...

    def stream(
        self, method: MethodDescriptor, request: Message, metadata: Metadata
    ) -> AsyncGenerator[Message, None]: ...


# A cheap call that needs a key: its answer tells a valid key (NOT_FOUND, INVALID_ARGUMENT)
# from an invalid one (UNAUTHENTICATED), without touching anything of the caller's.
_PROBE_METHOD = service_pb2.DESCRIPTOR.services_by_name["ResponsesService"].methods_by_name["GetResponse"]
_PROBE_ACCEPTED = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT})
KEY_PROBE_CACHE_SECONDS = 5.0
_KEY_PROBE_CACHE_ENTRIES = 10_000
_KEY_PROBE_TIMEOUT_SECONDS = 10.0

Unary = Callable[[MethodDescriptor, Message, Metadata], Awaitable[Message]]


class KeyProbe:
    """Checks a key with a probe call, remembering accepted keys for a few seconds.

    Only acceptances are cached (a new key works at once, a revoked one stops within the cache
    time); the cache is bounded, the oldest entry making room.
    """

    def __init__(self, unary: Unary, cache_seconds: float = KEY_PROBE_CACHE_SECONDS) -> None:
        self._unary = unary
        self._cache_seconds = cache_seconds
        self._accepted: dict[str, float] = {}

    async def check(self, metadata: Metadata) -> None:
        authorization = next((value for key, value in metadata if key == "authorization"), None)
        if authorization is not None and self._accepted.get(authorization, 0.0) > time.monotonic():
            return
        try:
            async with asyncio.timeout(_KEY_PROBE_TIMEOUT_SECONDS):
                await self._unary(_PROBE_METHOD, service_pb2.GetResponseRequest(response_id=""), metadata)
        except CallError as error:
            if error.code not in _PROBE_ACCEPTED:
                raise
        except TimeoutError:
            raise CallError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "The API key could not be checked in time."
            ) from None
        if authorization is None or self._cache_seconds <= 0:
            return
        self._accepted.pop(authorization, None)
        if len(self._accepted) >= _KEY_PROBE_CACHE_ENTRIES:
            del self._accepted[next(iter(self._accepted))]  # the oldest
        self._accepted[authorization] = time.monotonic() + self._cache_seconds


def _status_from_trailers(trailing_metadata: Any) -> status_pb2.Status | None:
    for key, value in trailing_metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


# ---------------------------------------------------------------------------------------------
# In process

# Resolves a method path to its handler the way the gRPC server does, authentication included.
HandlerLookup = Callable[[str], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]


class _Context:
    """The part of grpc.aio.ServicerContext the handlers use, for calls made in process."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)
        self._cancelled = False

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise CallError(code, details, _status_from_trailers(trailing_metadata))

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        """Nothing to send: the shim answers with its own headers (its x-request-id included)."""

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        pass

    def peer(self) -> str:
        return "in-process"

    def cancelled(self) -> bool:
        return self._cancelled

    def time_remaining(self) -> float | None:
        return None


# Authenticates a call's context (an object like ``_Context``: ``invocation_metadata()`` and
# ``abort()``) the way the server's handlers do, aborting it when the key is not valid, which
# in process raises CallError. Any: the server types it with grpc's ServicerContext.
KeyCheck = Callable[[Any], Awaitable[None]]


class InProcessClient:
    """Calls the service's handlers directly; cancelling the caller cancels the handler."""

    def __init__(self, lookup: HandlerLookup, check_key: KeyCheck | None = None) -> None:
        self._lookup = lookup
        self._check_key = check_key
        self._probe = KeyProbe(self.unary)

    async def check_key(self, metadata: Metadata) -> None:
        if self._check_key is None:
            await self._probe.check(metadata)
        else:
            await self._check_key(_Context(metadata))

    async def _handler(self, method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await self._lookup(method_path(method))
        if handler is None:
            raise CallError(grpc.StatusCode.UNIMPLEMENTED, f"Method {method.full_name} is not served.")
        return handler

    async def unary(self, method: MethodDescriptor, request: Message, metadata: Metadata) -> Message:
        handler = await self._handler(method)
        assert handler.unary_unary is not None
        response = await handler.unary_unary(request, _Context(metadata))  # type: ignore[arg-type]
        assert isinstance(response, Message)
        return response

    async def stream(
        self, method: MethodDescriptor, request: Message, metadata: Metadata
    ) -> AsyncGenerator[Message, None]:
        handler = await self._handler(method)
        assert handler.unary_stream is not None
        messages: AsyncGenerator[Message, None] = handler.unary_stream(request, _Context(metadata))  # type: ignore[arg-type,assignment]
        try:
            async for message in messages:
                yield message
        finally:
            await messages.aclose()


# ---------------------------------------------------------------------------------------------
# Over a channel


def open_channel(target: str, tls: ChannelTls | None = None) -> grpc.aio.Channel:
    """A channel to a Venna gRPC service, with message limits that fit the shim's; over TLS
    with ``tls`` (its files are read now: TlsFileError, a ValueError, names a bad one)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, tls.credentials(), options=(*CHANNEL_OPTIONS, *tls.options()))


class ChannelClient:
    """Calls a (possibly remote) gRPC server over one shared channel."""

    def __init__(self, channel: grpc.aio.Channel, key_cache_seconds: float = KEY_PROBE_CACHE_SECONDS) -> None:
        self._channel = channel
        self._probe = KeyProbe(self.unary, key_cache_seconds)
        self._unary: dict[str, Any] = {}
        self._streams: dict[str, Any] = {}
        for method in (method for service in SERVICES for method in service.methods):
            path = method_path(method)
            output = message_class(method.output_type.full_name)
            if method.server_streaming:
                self._streams[path] = channel.unary_stream(
                    path, request_serializer=_serialize, response_deserializer=output.FromString
                )
            else:
                self._unary[path] = channel.unary_unary(
                    path, request_serializer=_serialize, response_deserializer=output.FromString
                )

    async def check_key(self, metadata: Metadata) -> None:
        await self._probe.check(metadata)

    async def unary(self, method: MethodDescriptor, request: Message, metadata: Metadata) -> Message:
        try:
            response = await self._unary[method_path(method)](request, metadata=tuple(metadata))
        except grpc.aio.AioRpcError as error:
            raise _call_error(error) from None
        assert isinstance(response, Message)
        return response

    async def stream(
        self, method: MethodDescriptor, request: Message, metadata: Metadata
    ) -> AsyncGenerator[Message, None]:
        call = self._streams[method_path(method)](request, metadata=tuple(metadata))
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            raise _call_error(error) from None
        finally:
            call.cancel()  # no-op once the call has ended; stops the server's work otherwise


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def message_class(full_name: str) -> type[Message]:
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(full_name)


def _call_error(error: grpc.aio.AioRpcError) -> CallError:
    return CallError(error.code(), error.details() or "", rpc_status.from_call(error))  # type: ignore[arg-type]
