"""Workspace keys on gRPC: ``authorization: Bearer vk_…`` resolves to the caller's workspace.

``Authenticator.wrap`` wraps each handler of the ``venna.responses.v1`` services (Responses,
Usage) once, when the server is assembled, so that, inside the handler's own task, the
workspace is set in a context variable (read with ``workspace_id()``) and ServiceErrors become
gRPC statuses with their details. Health and reflection stay open. (A grpc server interceptor
would do the same, but it runs a coroutine and builds a new handler for every call.)

The key is checked before anything else is done for a call: a request message that cannot be
decoded is reported (INVALID_ARGUMENT) only to a caller with a valid key, and each key has a
bound on the calls it runs at once in this process.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, Final

import grpc
import grpc.aio

from venna.backends.store import ADMIN_KEY_PREFIX, KEY_PREFIX, ResponseStore
from venna.server.errors import ABORTED_WITH, ServiceError
from venna.server.quotas import Quotas

log = logging.getLogger(__name__)

# The servicer context of a call of any of our RPCs.
Context = grpc.aio.ServicerContext[Any, Any]
_Unary = Callable[[Any, Context], Awaitable[Any]]
_Stream = Callable[[Any, Context], AsyncGenerator[Any, None]]
# Runs on a call's request once its key is accepted; raises ServiceError to refuse it.
RequestCheck = Callable[[Any], None]

DEFAULT_MAX_CONCURRENT_PER_KEY = 256
# What a wrapped handler takes: a workspace key; a workspace key within its workspace's limits;
# an admin key.
_PLAIN, _METERED, _ADMIN = 0, 1, 2

_workspace: contextvars.ContextVar[str] = contextvars.ContextVar("venna_workspace")


def current_workspace() -> str | None:
    """The calling workspace, or None before (or without) authentication."""
    return _workspace.get(None)


def workspace_id() -> str:
    """The workspace of the current call; set by the wrapped handler before the service code runs."""
    return _workspace.get()


def _bearer_key(context: Context) -> str | None:
    """The key of ``authorization: Bearer <key>``; raises when there is more than one
    ``authorization`` (which one counts would be a guess)."""
    values = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
    if len(values) > 1:
        raise ServiceError(
            grpc.StatusCode.UNAUTHENTICATED,
            "Send one 'authorization' header, not several.",
            reason="INVALID_API_KEY",
        )
    if values and isinstance(values[0], str):
        scheme, _, token = values[0].partition(" ")
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
        # Bumped by clear(): a lookup that began before a revocation must not be cached.
        self.generation = 0

    def clear(self) -> None:
        """Forgets every key: some key was revoked (the store says which only by its hash)."""
        self._entries.clear()
        self.generation += 1

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: str, workspace: str, generation: int | None = None) -> None:
        """Remembers an acceptance, unless a revocation came since its lookup began."""
        if self.ttl <= 0 or (generation is not None and generation != self.generation):
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[key] = (workspace, time.monotonic() + self.ttl)


@dataclass(frozen=True, slots=True)
class _KeyKind:
    """One kind of key (workspace or admin): how it looks, where it is looked up and cached, and
    what a valid key of the other kind is told."""

    name: str
    prefix: str
    cache: KeyCache
    lookup: Callable[[str], Awaitable[str | None]]
    other_prefix: str
    other_lookup: Callable[[str], Awaitable[str | None]]
    other_refused: str
    other_reason: str


class _Undecodable:
    """Stands for a request message that could not be decoded, so that the call can be
    authenticated before it is refused."""

    __slots__ = ()


UNDECODABLE: Final = _Undecodable()


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize``, answering UNDECODABLE instead of raising: grpc would end the call with
    UNKNOWN and log a traceback, before the key was looked at."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or whatever a malformed message makes the parser raise
            return UNDECODABLE

    return parse


def _undecodable() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "The request message could not be decoded: it is not a valid protobuf message of this"
        " method's request type, or it is nested more than 100 levels deep.",
        reason="UNDECODABLE_REQUEST",
    )


class Authenticator:
    """Resolves keys to workspaces and wraps handlers so that every call is authenticated."""

    def __init__(
        self,
        store: ResponseStore,
        key_cache_seconds: float = 5.0,
        max_concurrent_per_key: int = DEFAULT_MAX_CONCURRENT_PER_KEY,
        quotas: Quotas | None = None,
    ) -> None:
        if max_concurrent_per_key < 1:
            raise ValueError("max_concurrent_per_key must be at least 1")
        self._store = store
        self._keys = KeyCache(key_cache_seconds)
        # Admin keys apart: an admin key must never be read as a workspace's.
        self._admin_keys = KeyCache(key_cache_seconds)
        # A revocation anywhere (another process, another replica) ends the key's cache entry
        # here at once where the store can tell; elsewhere the cache window bounds it.
        store.on_key_revoked(self._keys.clear)
        store.on_key_revoked(self._admin_keys.clear)
        self._workspace_kind = _KeyKind(
            "API key",
            KEY_PREFIX,
            self._keys,
            store.authenticate,
            ADMIN_KEY_PREFIX,
            store.authenticate_admin,
            "This is an admin key: it manages workspaces through the admin API and cannot call this"
            " API as a workspace. Use a workspace key.",
            "ADMIN_KEY_NOT_ALLOWED",
        )
        self._admin_kind = _KeyKind(
            "admin key",
            ADMIN_KEY_PREFIX,
            self._admin_keys,
            store.authenticate_admin,
            KEY_PREFIX,
            store.authenticate,
            "This is a workspace key: the admin API takes admin keys only ('venna keys create --admin').",
            "ADMIN_KEY_REQUIRED",
        )
        self._max_concurrent = max_concurrent_per_key
        # Calls (and streams) running now, by key.
        self._running: dict[str, int] = {}
        self._quotas = quotas

    async def _identify(self, context: Context, kind: _KeyKind) -> tuple[str, str]:
        """The call's key and what it stands for (a workspace id, or an admin key's id); raises
        ServiceError when there is no valid key of ``kind``."""
        key = _bearer_key(context)
        if key is None:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"Missing {kind.name}: send 'authorization: Bearer {kind.prefix}…'.",
                reason="MISSING_API_KEY",
            )
        found = kind.cache.get(key)
        if found is None:
            generation = kind.cache.generation
            found = await kind.lookup(key)
            if found is None:
                # Said plainly when it is a valid key of the other kind: a likely mix-up.
                if key.startswith(kind.other_prefix) and await kind.other_lookup(key):
                    raise ServiceError(
                        grpc.StatusCode.PERMISSION_DENIED, kind.other_refused, reason=kind.other_reason
                    )
                raise ServiceError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"Invalid {kind.name}: the key is unknown or has been revoked.",
                    reason="INVALID_API_KEY",
                )
            kind.cache.put(key, found, generation)
        return key, found

    async def _key_and_workspace(self, context: Context) -> tuple[str, str]:
        """The call's key and its workspace; raises ServiceError when there is no valid key."""
        return await self._identify(context, self._workspace_kind)

    async def verify(self, context: Context) -> None:
        """Aborts ``context`` (with the status a call would get) unless its metadata carries a
        valid key; for front ends that must know before they read a request's body."""
        try:
            await self._key_and_workspace(context)
        except ServiceError as error:
            await _abort(context, error)

    @contextmanager
    def _admitted(self, key: str) -> Iterator[None]:
        """Counts a call of ``key`` while it runs; refuses it when the key is at its limit."""
        running = self._running.get(key, 0)
        if running >= self._max_concurrent:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Too many concurrent requests for this API key: at most {self._max_concurrent}"
                " calls and streams may run at once.",
                reason="TOO_MANY_CONCURRENT_REQUESTS",
                metadata={"limit": str(self._max_concurrent)},
            )
        self._running[key] = running + 1
        try:
            yield
        finally:
            left = self._running[key] - 1
            if left:
                self._running[key] = left
            else:
                del self._running[key]

    def running(self, key: str) -> int:
        """How many calls of ``key`` run now."""
        return self._running.get(key, 0)

    def wrap(
        self,
        handler: grpc.RpcMethodHandler[Any, Any],
        check: RequestCheck | None = None,
        *,
        metered: bool = False,
        admin: bool = False,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` (unary or server-streaming) behind the key check and error mapping;
        ``check`` runs on each request once its key is accepted; a ``metered`` call (one that
        reaches a model) is admitted only within its workspace's limits; an ``admin`` call takes
        an admin key instead of a workspace key."""
        mode = _ADMIN if admin else _METERED if metered else _PLAIN
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, check, mode),  # type: ignore[arg-type]  # aio handlers are async
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, check, mode),  # type: ignore[arg-type]
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError("only unary and server-streaming methods are served")

    async def _admit(self, request: Any, context: Context, check: RequestCheck | None, mode: int) -> str:
        """Authenticates the call, checks its request and its workspace's limits; the call's key."""
        if mode == _ADMIN:
            key, _ = await self._identify(context, self._admin_kind)
        else:
            key, workspace = await self._key_and_workspace(context)
            _workspace.set(workspace)
        if request is UNDECODABLE:
            raise _undecodable()
        if check is not None:
            check(request)
        if mode == _METERED and self._quotas is not None:
            await self._quotas.admit(workspace)
        return key

    def _wrap_unary(self, behavior: _Unary, check: RequestCheck | None, mode: int) -> _Unary:
        async def unary(request: Any, context: Context) -> Any:
            try:
                key = await self._admit(request, context, check, mode)
                with self._admitted(key):
                    return await behavior(request, context)
            except ServiceError as error:
                await _abort(context, error)
            except Exception:
                log.exception("unexpected failure")
                await _abort(context, _internal())

        return unary

    def _wrap_stream(self, behavior: _Stream, check: RequestCheck | None, mode: int) -> _Stream:
        async def stream(request: Any, context: Context) -> AsyncGenerator[Any, None]:
            try:
                key = await self._admit(request, context, check, mode)
                with self._admitted(key):
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


def open_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` of a service that needs no key (health, reflection), answering an undecodable
    request with INVALID_ARGUMENT instead of grpc's UNKNOWN and a logged traceback."""
    deserializer = _tolerant(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _decoded_unary(handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _decoded_unary(handler.unary_stream),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _decoded_stream(handler.stream_stream),  # type: ignore[arg-type]
            request_deserializer=deserializer,
            response_serializer=serializer,
        )
    raise TypeError("client-streaming methods are not served")


def _decoded_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """``behavior`` (a coroutine or async generator function of a request and a context),
    aborting first when the request could not be decoded."""
    if inspect.isasyncgenfunction(behavior):

        async def messages(request: Any, context: Context) -> AsyncGenerator[Any, None]:
            if request is UNDECODABLE:
                await _abort(context, _undecodable())
                return
            async with aclosing(behavior(request, context)) as answers:
                async for answer in answers:
                    yield answer

        return messages

    async def call(request: Any, context: Context) -> Any:
        if request is UNDECODABLE:
            await _abort(context, _undecodable())
            return None
        return await behavior(request, context)

    return call


def _decoded_stream(behavior: Callable[..., AsyncGenerator[Any, None]]) -> Callable[..., Any]:
    """A bidirectional ``behavior`` whose request stream aborts the call at an undecodable message."""

    async def messages(requests: AsyncIterator[Any], context: Context) -> AsyncGenerator[Any, None]:
        async def decoded() -> AsyncGenerator[Any, None]:
            async for request in requests:
                if request is UNDECODABLE:
                    await _abort(context, _undecodable())
                yield request

        async with aclosing(behavior(decoded(), context)) as answers:
            async for answer in answers:
                yield answer

    return messages


def _internal() -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, "The server had an internal error.", reason="INTERNAL")


async def _abort(context: Context, error: ServiceError) -> None:
    status = error.to_status()
    ABORTED_WITH.set(status.code)
    await context.abort(status.code, status.details, status.trailing_metadata)
