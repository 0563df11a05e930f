"""Workspace keys on gRPC: ``authorization: Bearer vk_…`` resolves to the caller's workspace.

``Authenticator.wrap`` wraps each handler of the ``venna.responses.v1`` services (Responses,
Usage) once, when the server is assembled, so that, inside the handler's own task, the
workspace is set in a context variable (read with ``workspace_id()``) and ServiceErrors become
gRPC statuses with their details. Health and reflection stay open. (A grpc server interceptor
would do the same, but it runs a coroutine and builds a new handler for every call.)
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio

from backends.store import AsyncStore
from server.errors import ServiceError

log = logging.getLogger(__name__)

# The servicer context of a call of any of our RPCs.
Context = grpc.aio.ServicerContext[Any, Any]
_Unary = Callable[[Any, Context], Awaitable[Any]]
_Stream = Callable[[Any, Context], AsyncGenerator[Any, None]]

_workspace: contextvars.ContextVar[str] = contextvars.ContextVar("venna_workspace")


def workspace_id() -> str:
    """The workspace of the current call; set by the wrapped handler before the service code runs."""
    return _workspace.get()


def _bearer_key(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class KeyCache:
    """Recently accepted keys, so that a call does not wait on the store to know its workspace.

    Only acceptances are kept (a new key works at once) and only for ``ttl`` seconds, which
    bounds how long a revoked key keeps working in a running server.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[str, float]] = {}

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: str, workspace: str) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[key] = (workspace, time.monotonic() + self.ttl)


class Authenticator:
    """Resolves keys to workspaces and wraps handlers so that every call is authenticated."""

    def __init__(self, db: AsyncStore, key_cache_seconds: float = 5.0) -> None:
        self._db = db
        self._keys = KeyCache(key_cache_seconds)

    async def _authenticate(self, context: Context) -> None:
        key = _bearer_key(context)
        if key is None:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                "Missing API key: send 'authorization: Bearer vk_…'.",
                reason="MISSING_API_KEY",
            )
        found = self._keys.get(key)
        if found is None:
            found = await self._db.call(self._db.store.authenticate, key)
            if found is None:
                raise ServiceError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "Invalid API key: the key is unknown or has been revoked.",
                    reason="INVALID_API_KEY",
                )
            self._keys.put(key, found)
        _workspace.set(found)

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` (unary or server-streaming) behind the key check and error mapping."""
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary),  # type: ignore[arg-type]  # aio handlers are async
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream),  # type: ignore[arg-type]
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError("only unary and server-streaming methods are served")

    def _wrap_unary(self, behavior: _Unary) -> _Unary:
        async def unary(request: Any, context: Context) -> Any:
            try:
                await self._authenticate(context)
                return await behavior(request, context)
            except ServiceError as error:
                await _abort(context, error)
            except Exception:
                log.exception("unexpected failure")
                await _abort(context, _internal())

        return unary

    def _wrap_stream(self, behavior: _Stream) -> _Stream:
        async def stream(request: Any, context: Context) -> AsyncGenerator[Any, None]:
            try:
                await self._authenticate(context)
                # aclosing: when the call ends early, the handler (and the backend under it)
                # stops now rather than whenever the abandoned generator is collected.
                async with aclosing(behavior(request, context)) as messages:
                    async for message in messages:
                        yield message
            except ServiceError as error:
                await _abort(context, error)
            except Exception:
                log.exception("unexpected failure")
                await _abort(context, _internal())

        return stream


def _internal() -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, "The server had an internal error.", reason="INTERNAL")


async def _abort(context: Context, error: ServiceError) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
