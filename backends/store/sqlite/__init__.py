"""The store on one SQLite file: the default engine, embedded, for one process.

``SqliteStore`` implements ResponseStore over ``Store`` (the queries, synchronous, one
connection) run by ``AsyncStore`` (one thread that takes the calls queued meanwhile and commits
them together). New records are built into rows at the call and merged with other inserts of
the same batch.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from venna.backends.store.protocol import (
    InputItemsPage,
    KeyRecord,
    Lease,
    PendingResponse,
    Renewal,
    StoreUnavailable,
    UsageTotal,
    WindowUse,
    Workspace,
    WorkspaceLimits,
)
from venna.backends.store.records import event_rows, new_response_rows, usage_rows
from venna.backends.store.sqlite.queries import Store
from venna.backends.store.sqlite.writer import AsyncStore
from venna.responses.v1 import conversations_pb2, events_pb2, response_pb2, service_pb2

__all__ = ["SqliteStore"]


class SqliteStore:
    """ResponseStore on one SQLite file. Each method returns the future of its result (no
    coroutine layer: a write is on the path of every create)."""

    def __init__(self, path: str | Path) -> None:
        try:
            queries = Store(path)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"{path}: {error}") from None
        self.path = queries.path
        # The synchronous queries, run on the store's thread only.
        self.queries = queries
        self._thread = AsyncStore(queries)
        self._revoked: list[Callable[[], None]] = []
        self._cancelling: list[Callable[[str], None]] = []
        # The open descriptor holding the serve lock, while this process serves from the file.
        self._serve_lock: int | None = None

    # One process per file: a process starting takes over what the previous one left.
    shared = False

    async def open(self, *, serving: bool = False) -> None:
        """The file was opened and migrated when this store was made. A serving process takes
        the file's serve lock: a second server on the same file would claim the first one's
        unfinished work as its own (the command-line tools take no lock)."""
        if serving:
            self._serve_lock = _take_serve_lock(self.path)

    async def close(self) -> None:
        # Joining the store's thread waits for the writes queued before: off the event loop.
        await asyncio.to_thread(self._thread.close)
        if self._serve_lock is not None:
            os.close(self._serve_lock)  # releases the lock
            self._serve_lock = None

    # ------------------------------------------------------------------ keys and workspaces

    def create_key(
        self, workspace_name: str, *, create_workspace: bool = True
    ) -> asyncio.Future[tuple[str, KeyRecord]]:
        return self._thread.call(self.queries.create_key, workspace_name, create_workspace=create_workspace)

    def create_admin_key(self) -> asyncio.Future[tuple[str, KeyRecord]]:
        return self._thread.call(self.queries.create_admin_key)

    def list_keys(self, workspace_name: str | None = None) -> asyncio.Future[list[KeyRecord]]:
        return self._thread.call(self.queries.list_keys, workspace_name)

    async def revoke_key(self, key_id: str) -> bool:
        revoked = await self._thread.call(self.queries.revoke_key, key_id)
        if revoked:
            self._announce_revocation()
        return revoked

    def _announce_revocation(self) -> None:
        for callback in self._revoked:
            callback()

    def create_workspace(self, name: str) -> asyncio.Future[Workspace | None]:
        return self._thread.call(self.queries.create_workspace, name)

    def get_workspace(self, name: str) -> asyncio.Future[Workspace | None]:
        return self._thread.call(self.queries.get_workspace, name)

    async def revoke_workspace(self, name: str) -> Workspace | None:
        workspace, keys_revoked = await self._thread.call(self.queries.revoke_workspace, name)
        if keys_revoked:
            self._announce_revocation()
        return workspace

    def list_workspaces(self) -> asyncio.Future[list[Workspace]]:
        return self._thread.call(self.queries.list_workspaces)

    def authenticate(self, key: str) -> asyncio.Future[str | None]:
        return self._thread.call(self.queries.authenticate, key)

    def authenticate_admin(self, key: str) -> asyncio.Future[str | None]:
        return self._thread.call(self.queries.authenticate_admin, key)

    def on_key_revoked(self, callback: Callable[[], None]) -> None:
        # SQLite tells no other process: a revocation by `venna keys revoke` reaches a running
        # server when its key cache entry expires.
        self._revoked.append(callback)

    # ------------------------------------------------------------------ responses

    def create_response(
        self,
        workspace_id: str,
        response: response_pb2.Response,
        input_items: Sequence[response_pb2.Item],
        *,
        request: service_pb2.CreateResponseRequest | None = None,
        events: Sequence[events_pb2.ResponseStreamEvent] = (),
        finished: bool = False,
        lease: Lease | None = None,
    ) -> asyncio.Future[None]:
        rows = new_response_rows(
            workspace_id,
            response,
            input_items,
            request=request,
            events=events,
            finished=finished,
            lease=lease,
        )
        return self._thread.insert(rows)

    def save_response(
        self,
        workspace_id: str,
        response: response_pb2.Response,
        *,
        events: Sequence[events_pb2.ResponseStreamEvent] = (),
        finished: bool = False,
        lease: Lease | None = None,
    ) -> asyncio.Future[bool]:
        return self._thread.call(
            self.queries.save_response, workspace_id, response, events=events, finished=finished, lease=lease
        )

    def append_events(
        self,
        response_id: str,
        events: Sequence[events_pb2.ResponseStreamEvent],
        *,
        lease: Lease | None = None,
    ) -> asyncio.Future[bool]:
        if lease is not None:
            return self._thread.call(self.queries.append_held_events, response_id, events, lease)
        return _stored(self._thread.insert(event_rows(response_id, events)))

    def record_usage(self, workspace_id: str, response: response_pb2.Response) -> asyncio.Future[None]:
        return self._thread.insert(usage_rows(workspace_id, response))

    def get_response(
        self, workspace_id: str, response_id: str
    ) -> asyncio.Future[response_pb2.Response | None]:
        return self._thread.call(self.queries.get_response, workspace_id, response_id)

    def delete_response(self, workspace_id: str, response_id: str) -> asyncio.Future[bool]:
        return self._thread.call(self.queries.delete_response, workspace_id, response_id)

    def load_context(
        self, workspace_id: str, response_id: str, *, max_depth: int | None = None
    ) -> asyncio.Future[list[response_pb2.Item] | None]:
        return self._thread.call(self.queries.load_context, workspace_id, response_id, max_depth=max_depth)

    def find_items(
        self, workspace_id: str, item_ids: Sequence[str]
    ) -> asyncio.Future[dict[str, response_pb2.Item]]:
        return self._thread.call(self.queries.find_items, workspace_id, item_ids)

    def list_input_items(
        self, workspace_id: str, response_id: str, *, limit: int, ascending: bool, after: str | None
    ) -> asyncio.Future[InputItemsPage | None]:
        return self._thread.call(
            self.queries.list_input_items,
            workspace_id,
            response_id,
            limit=limit,
            ascending=ascending,
            after=after,
        )

    def events_after(
        self, workspace_id: str, response_id: str, after: int
    ) -> asyncio.Future[list[events_pb2.ResponseStreamEvent]]:
        return self._thread.call(self.queries.events_after, workspace_id, response_id, after)

    def watch_events(self, response_id: str) -> _Poll:
        # One process per file, whose own followers follow live responses in memory: a
        # follower of the store only polls.
        return _Poll()

    def last_sequence_number(self, response_id: str) -> asyncio.Future[int]:
        return self._thread.call(self.queries.last_sequence_number, response_id)

    def last_terminal_event(self, response_id: str) -> asyncio.Future[events_pb2.ResponseStreamEvent | None]:
        return self._thread.call(self.queries.last_terminal_event, response_id)

    # ------------------------------------------------------------------ leases

    def claim_responses(
        self, lease: Lease, *, queued: int, expired_only: bool = True
    ) -> asyncio.Future[list[PendingResponse]]:
        return self._thread.call(
            self.queries.claim_responses, lease, queued=queued, expired_only=expired_only
        )

    def renew_leases(self, lease: Lease, response_ids: Sequence[str]) -> asyncio.Future[Renewal]:
        return self._thread.call(self.queries.renew_leases, lease, list(response_ids))

    def release_leases(self, lease: Lease, response_ids: Sequence[str]) -> asyncio.Future[None]:
        return self._thread.call(self.queries.release_leases, lease, list(response_ids))

    def take_over(self, lease: Lease, workspace_id: str, response_id: str) -> asyncio.Future[bool]:
        return self._thread.call(self.queries.take_over, lease, workspace_id, response_id)

    async def request_cancel(self, workspace_id: str, response_id: str) -> bool:
        requested = await self._thread.call(self.queries.request_cancel, workspace_id, response_id)
        if requested:
            for callback in self._cancelling:
                callback(response_id)
        return requested

    def on_cancel_requested(self, callback: Callable[[str], None]) -> None:
        # Only this process uses the file: its own requests are the only ones.
        self._cancelling.append(callback)

    # ------------------------------------------------------------------ limits

    def set_limits(self, workspace_id: str, limits: WorkspaceLimits) -> asyncio.Future[None]:
        return self._thread.call(self.queries.set_limits, workspace_id, limits)

    def get_limits(self, workspace_id: str) -> asyncio.Future[WorkspaceLimits]:
        return self._thread.call(self.queries.get_limits, workspace_id)

    def take_requests(
        self, workspace_id: str, window: int, count: int, *, max_requests: int | None, max_tokens: int | None
    ) -> asyncio.Future[tuple[int, WindowUse]]:
        return self._thread.call(
            self.queries.take_requests, workspace_id, window, count, max_requests, max_tokens
        )

    def add_window_tokens(self, workspace_id: str, window: int, tokens: int) -> asyncio.Future[None]:
        return self._thread.call(self.queries.add_window_tokens, workspace_id, window, tokens)

    def window_use(self, workspace_id: str, window: int) -> asyncio.Future[WindowUse]:
        return self._thread.call(self.queries.window_use, workspace_id, window)

    def prune_windows(self, before: int) -> asyncio.Future[None]:
        return self._thread.call(self.queries.prune_windows, before)

    def observe_commits(self, observer: Callable[[int, float], None]) -> None:
        # Every call runs in a batch of the store's thread, reads included: a batch is a commit.
        self._thread.observer = observer

    def ping(self) -> asyncio.Future[None]:
        return self._thread.call(self.queries.ping)

    # ------------------------------------------------------------------ conversations

    def create_conversation(
        self,
        workspace_id: str,
        conversation: conversations_pb2.Conversation,
        items: Sequence[response_pb2.Item],
    ) -> asyncio.Future[None]:
        return self._thread.call(self.queries.create_conversation, workspace_id, conversation, items)

    def get_conversation(
        self, workspace_id: str, conversation_id: str
    ) -> asyncio.Future[conversations_pb2.Conversation | None]:
        return self._thread.call(self.queries.get_conversation, workspace_id, conversation_id)

    def update_conversation(
        self, workspace_id: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> asyncio.Future[conversations_pb2.Conversation | None]:
        return self._thread.call(
            self.queries.update_conversation, workspace_id, conversation_id, dict(metadata)
        )

    def delete_conversation(self, workspace_id: str, conversation_id: str) -> asyncio.Future[bool]:
        return self._thread.call(self.queries.delete_conversation, workspace_id, conversation_id)

    def add_conversation_items(
        self, workspace_id: str, conversation_id: str, items: Sequence[response_pb2.Item]
    ) -> asyncio.Future[bool]:
        return self._thread.call(
            self.queries.add_conversation_items, workspace_id, conversation_id, list(items)
        )

    def conversation_items(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        limit: int | None = None,
        ascending: bool = True,
        after: str | None = None,
    ) -> asyncio.Future[InputItemsPage | None]:
        return self._thread.call(
            self.queries.conversation_items,
            workspace_id,
            conversation_id,
            limit=limit,
            ascending=ascending,
            after=after,
        )

    def get_conversation_item(
        self, workspace_id: str, conversation_id: str, item_id: str
    ) -> asyncio.Future[response_pb2.Item | None]:
        return self._thread.call(self.queries.get_conversation_item, workspace_id, conversation_id, item_id)

    def delete_conversation_item(
        self, workspace_id: str, conversation_id: str, item_id: str
    ) -> asyncio.Future[bool]:
        return self._thread.call(
            self.queries.delete_conversation_item, workspace_id, conversation_id, item_id
        )

    def usage_totals(
        self,
        workspace_id: str,
        *,
        since: int | None = None,
        until: int | None = None,
        group_by_model: bool = False,
    ) -> asyncio.Future[list[UsageTotal]]:
        return self._thread.call(
            self.queries.usage_totals, workspace_id, since=since, until=until, group_by_model=group_by_model
        )


class _Poll:
    """An EventWatch that only waits out its timeout."""

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def close(self) -> None:
        pass


def _stored(insert: asyncio.Future[None]) -> asyncio.Future[bool]:
    """True once ``insert`` committed (its error, if it failed)."""
    result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def settle(done: asyncio.Future[None]) -> None:
        if result.cancelled():
            return
        error = None if done.cancelled() else done.exception()
        if done.cancelled():
            result.cancel()
        elif error is not None:
            result.set_exception(error)
        else:
            result.set_result(True)

    insert.add_done_callback(settle)
    return result


def _take_serve_lock(path: Path) -> int:
    """An exclusive lock on ``<database>.serve-lock`` (a file of its own, so that SQLite's own
    locks on the database are never touched), held by the returned descriptor until it is
    closed or the process ends, however it ends."""
    lock_path = path.with_name(path.name + ".serve-lock")
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise StoreUnavailable(
            f"{path}: another venna serve is running on this database file (one server per SQLite"
            " file; several replicas share a PostgreSQL database)"
        ) from None
    return descriptor
