"""The store on PostgreSQL (asyncpg), for several replicas sharing one state.

Reads go straight to a connection pool. Writes go through one writer task per process, which
takes every write queued meanwhile and commits them together (group commit, each commit
durable). A batch of new records only (creates and usage records: the common case) is one
statement, each table's rows sent as arrays, with its notification: one round trip. A batch
with updates runs in one transaction, consecutive inserts merged into one statement per table.
Should a batch fail, its writes are run again one by one, each in its own transaction, so that
a failing write fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from venna.backends.store import describe
from venna.backends.store.postgres.schema import NOW_MS, UNFINISHED_STATUSES, Connection, migrate
from venna.backends.store.protocol import (
    ChainTooDeep,
    InputItemsPage,
    KeyRecord,
    Lease,
    PendingResponse,
    Renewal,
    StoreUnavailable,
    UnreadableRecord,
    UsageTotal,
    WindowUse,
    Workspace,
    WorkspaceLimits,
    WorkspaceUnavailable,
    item_id,
)
from venna.backends.store.records import (
    ADMIN_KEY_PREFIX,
    INPUT,
    KEY_PREFIX,
    OUTPUT,
    NewRows,
    body_without_output,
    decode,
    decode_events,
    decode_item,
    event_rows,
    hash_key,
    item_rows,
    key_hint,
    limit_columns,
    limits_of,
    new_admin_key_id,
    new_key_id,
    new_response_rows,
    new_secret,
    new_workspace_id,
    pending_response,
    terminal_event_of,
    usage_row,
    usage_rows,
)
from venna.responses.v1 import conversations_pb2, events_pb2, response_pb2, service_pb2

__all__ = ["PostgresStore"]

log = logging.getLogger(__name__)

# The notification channel of key revocations (no payload: listeners forget every cached key).
_KEYS_CHANNEL = "venna_keys"
# Notifications of stored events: the response ids of a commit, comma-separated, or "*" when
# they would not fit PostgreSQL's payload limit (8,000 bytes). One per commit, not per event.
_EVENTS_CHANNEL = "venna_events"
# Cancel requests: the payload is the response id, for its owner.
_CANCEL_CHANNEL = "venna_cancel"
_MAX_PAYLOAD = 7000
_T = TypeVar("_T")
# A write: new rows to insert, or a function of the connection (run inside the batch's
# transaction).
_Write = NewRows | Callable[[Connection], Awaitable[Any]]
# A queued write, its caller's future, and the responses it touches.
_Queued = tuple[_Write, "asyncio.Future[Any]", tuple[str, ...]]

_USAGE_UPSERT = (
    "INSERT INTO usage (response_id, workspace_id, model, status, input_tokens, output_tokens,"
    " reasoning_tokens, cached_tokens, created_at, finished_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (response_id) DO UPDATE SET workspace_id = EXCLUDED.workspace_id,"
    " model = EXCLUDED.model, status = EXCLUDED.status, input_tokens = EXCLUDED.input_tokens,"
    " output_tokens = EXCLUDED.output_tokens, reasoning_tokens = EXCLUDED.reasoning_tokens,"
    " cached_tokens = EXCLUDED.cached_tokens, created_at = EXCLUDED.created_at,"
    " finished_at = EXCLUDED.finished_at"
)
_RESPONSE_INSERT = (
    "INSERT INTO responses (id, workspace_id, previous_response_id, status, background, created_at,"
    f" body, request, owner, lease_until) VALUES ($1, $2, $3, $4, $5::integer::boolean, $6, $7, $8,"
    f" $9, {NOW_MS} + $10::bigint)"
)
_CLAIM = (
    f"UPDATE responses SET owner = $1, lease_until = {NOW_MS} + $2"
    " WHERE id IN (SELECT id FROM responses"
    f" WHERE status IN ({UNFINISHED_STATUSES}) AND status = $3 AND {{free}}"
    " ORDER BY created_at, id LIMIT $4 FOR UPDATE SKIP LOCKED)"
    " RETURNING id, workspace_id, status, background, created_at, body, request, cancel_requested"
)
_UNHELD = f"(owner IS NULL OR lease_until IS NULL OR lease_until < {NOW_MS})"
_ITEM_INSERT = (
    "INSERT INTO items (workspace_id, response_id, item_id, kind, position, body)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)
_EVENT_INSERT = (
    "INSERT INTO events (response_id, sequence_number, body) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
)


class PostgresStore:
    """ResponseStore on a PostgreSQL database named by a ``postgresql://`` URL."""

    MAX_BATCH = 64
    RELISTEN_MAX_SECONDS = 5.0

    def __init__(self, url: str, *, min_connections: int = 2, max_connections: int = 10) -> None:
        self.url = url
        self._sizes = (min_connections, max_connections)
        self._pool: asyncpg.Pool | None = None
        self._writes: asyncio.Queue[_Queued | None] = asyncio.Queue()
        # Followers of stored events in this process, by response id.
        self._watches: dict[str, set[_Watch]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._revoked: list[Callable[[], None]] = []
        self._cancelling: list[Callable[[str], None]] = []
        self._commit_observer: Callable[[int, float], None] = _unobserved
        # One connection of its own, listening for notifications of other processes; and the
        # task bringing it back after it is lost.
        self._listener: Connection | None = None
        self._relisten: asyncio.Task[None] | None = None

    # Replicas share the database: a process starting waits for others' leases to expire.
    shared = True

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    async def open(self, *, serving: bool = False) -> None:
        # Any number of processes may serve from one database.
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self._sizes[0], max_size=self._sizes[1], command_timeout=60
            )
            async with self._pool.acquire() as connection:
                await migrate(connection)
            self._listener = await self._listen()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as error:
            if self._listener is not None:
                listener, self._listener = self._listener, None
                await listener.close()
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            raise StoreUnavailable(f"{describe(self.url)}: {error}") from None
        self._writer = asyncio.create_task(self._write_batches(), name="venna-postgres-writer")

    async def close(self) -> None:
        """Commits the writes already queued, then closes the pool."""
        if self._writer is not None:
            await self._writes.put(None)
            await self._writer
            self._writer = None
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten
            self._relisten = None
        if self._listener is not None:
            listener, self._listener = self._listener, None  # a close of ours, not a loss
            await listener.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _listen(self) -> Connection:
        """A connection of its own listening on every channel."""
        listener: Connection = await asyncpg.connect(self.url)
        try:
            await listener.add_listener(_KEYS_CHANNEL, self._key_revoked)
            await listener.add_listener(_EVENTS_CHANNEL, self._events_stored)
            await listener.add_listener(_CANCEL_CHANNEL, self._cancel_requested)
        except BaseException:
            await listener.close()
            raise
        listener.add_termination_listener(self._listener_lost)
        return listener

    async def _listen_again(self) -> None:
        """Reconnects the listening connection (backing off up to RELISTEN_MAX_SECONDS); then
        acts on whatever may have been missed meanwhile: cached keys are forgotten and every
        follower reads the store again (owners learn of missed cancels at their next renewal)."""
        delay = 0.1
        while True:
            try:
                self._listener = await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.debug("listening connection not back yet: %s", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RELISTEN_MAX_SECONDS)
                continue
            log.warning("listening for notifications again")
            self._key_revoked()
            for watches in list(self._watches.values()):
                for watch in watches:
                    watch.wake()
            return

    # ------------------------------------------------------------------ the writer

    def _queue(self, write: _Write, touched: tuple[str, ...] = ()) -> asyncio.Future[Any]:
        """Queues a write; ``touched``: the responses whose events or state it stores, announced
        to followers everywhere when it commits."""
        if self._writer is None:
            raise RuntimeError("the store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writes.put_nowait((write, future, touched))
        return future

    async def _write_batches(self) -> None:
        while True:
            first = await self._writes.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.MAX_BATCH and not self._writes.empty():
                queued = self._writes.get_nowait()
                if queued is None:
                    stop = True
                    break
                batch.append(queued)
            started = time.perf_counter()
            await self._commit(batch)
            self._commit_observer(len(batch), time.perf_counter() - started)
            if stop:
                return

    async def _commit(self, batch: list[_Queued]) -> None:
        if all(isinstance(write, NewRows) for write, _, _ in batch):
            # Only new records (the common case: creates): one statement, one round trip.
            merged = NewRows()
            for write, _, _ in batch:
                assert isinstance(write, NewRows)
                merged.add(write)
            statement, arguments = _one_statement(merged, {id_ for _, _, touched in batch for id_ in touched})
            try:
                await self.pool.execute(statement, *arguments)
            except Exception:
                pass  # each on its own, below, so that only the failing one fails
            else:
                for _, future, _ in batch:
                    _settle(future, None)
                return
            await self._commit_each(batch)
            return
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                results = await self._run_merged(connection, [write for write, _, _ in batch])
                await _announce(connection, {id_ for _, _, touched in batch for id_ in touched})
        except Exception:
            # Which one failed is not known: each on its own, so that only it fails.
            await self._commit_each(batch)
            return
        for (_, future, _), result in zip(batch, results, strict=True):
            _settle(future, result)

    async def _commit_each(self, batch: list[_Queued]) -> None:
        """Each write of the batch in a transaction of its own."""
        for write, future, touched in batch:
            try:
                async with self.pool.acquire() as connection, connection.transaction():
                    (result,) = await self._run_merged(connection, [write])
                    await _announce(connection, set(touched))
            except Exception as error:
                _settle(future, error=error)
            else:
                _settle(future, result)

    async def _run_merged(self, connection: Connection, writes: Sequence[_Write]) -> list[Any]:
        """Runs the writes in order; consecutive inserts go as one statement per table."""
        results: list[Any] = []
        pending = NewRows()
        inserts = 0
        for write in writes:
            if isinstance(write, NewRows):
                pending.add(write)
                inserts += 1
                continue
            if inserts:
                await _insert(connection, pending)
                results += [None] * inserts
                pending, inserts = NewRows(), 0
            results.append(await write(connection))
        if inserts:
            await _insert(connection, pending)
            results += [None] * inserts
        return results

    # ------------------------------------------------------------------ keys and workspaces

    async def create_key(
        self, workspace_name: str, *, create_workspace: bool = True
    ) -> tuple[str, KeyRecord]:
        key = new_secret(KEY_PREFIX)
        now = int(time.time())
        async with self.pool.acquire() as connection, connection.transaction():
            if create_workspace:
                await connection.execute(
                    "INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3)"
                    " ON CONFLICT (name) DO NOTHING",
                    new_workspace_id(),
                    workspace_name,
                    now,
                )
            # FOR SHARE: a revocation of the workspace cannot commit between this check and the key.
            row = await connection.fetchrow(
                "SELECT id, revoked_at FROM workspaces WHERE name = $1 FOR SHARE", workspace_name
            )
            if row is None:
                raise WorkspaceUnavailable(f"No workspace named {workspace_name!r}.")
            if row["revoked_at"] is not None:
                raise WorkspaceUnavailable(f"Workspace {workspace_name!r} is revoked.")
            record = KeyRecord(
                id=new_key_id(), workspace=workspace_name, hint=key_hint(key), created_at=now, revoked_at=None
            )
            await connection.execute(
                "INSERT INTO api_keys (id, workspace_id, key_hash, key_hint, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                record.id,
                row["id"],
                hash_key(key),
                record.hint,
                now,
            )
        return key, record

    async def create_admin_key(self) -> tuple[str, KeyRecord]:
        key = new_secret(ADMIN_KEY_PREFIX)
        record = KeyRecord(
            id=new_admin_key_id(),
            workspace="",
            hint=key_hint(key),
            created_at=int(time.time()),
            revoked_at=None,
            admin=True,
        )
        await self.pool.execute(
            "INSERT INTO admin_keys (id, key_hash, key_hint, created_at) VALUES ($1, $2, $3, $4)",
            record.id,
            hash_key(key),
            record.hint,
            record.created_at,
        )
        return key, record

    async def list_keys(self, workspace_name: str | None = None) -> list[KeyRecord]:
        if workspace_name is not None:
            rows = await self.pool.fetch(
                "SELECT k.id, w.name, k.key_hint, k.created_at, k.revoked_at FROM api_keys k"
                " JOIN workspaces w ON w.id = k.workspace_id WHERE w.name = $1 ORDER BY k.seq",
                workspace_name,
            )
            return [KeyRecord(*row) for row in rows]
        rows = await self.pool.fetch(
            "SELECT * FROM (SELECT k.id, w.name, k.key_hint, k.created_at, k.revoked_at, false AS admin,"
            " 1 AS kind, k.seq FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id"
            " UNION ALL SELECT id, '', key_hint, created_at, revoked_at, true, 0, seq FROM admin_keys)"
            " AS keys ORDER BY created_at, kind, seq"
        )
        return [KeyRecord(*row[:6]) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        table = "admin_keys" if key_id.startswith("akey_") else "api_keys"
        async with self.pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                f"UPDATE {table} SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                int(time.time()),
                key_id,
            )
            if status != "UPDATE 1":
                return False
            # Delivered at commit to every process listening, this one included.
            await connection.execute(f"NOTIFY {_KEYS_CHANNEL}")
        return True

    async def create_workspace(self, name: str) -> Workspace | None:
        workspace = Workspace(id=new_workspace_id(), name=name, created_at=int(time.time()))
        status = await self.pool.execute(
            "INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            workspace.id,
            workspace.name,
            workspace.created_at,
        )
        return workspace if status == "INSERT 0 1" else None

    async def get_workspace(self, name: str) -> Workspace | None:
        row = await self.pool.fetchrow(
            "SELECT id, name, created_at, revoked_at FROM workspaces WHERE name = $1", name
        )
        return Workspace(*row) if row else None

    async def revoke_workspace(self, name: str) -> Workspace | None:
        now = int(time.time())
        async with self.pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                "UPDATE workspaces SET revoked_at = COALESCE(revoked_at, $1) WHERE name = $2"
                " RETURNING id, name, created_at, revoked_at",
                now,
                name,
            )
            if row is None:
                return None
            status = await connection.execute(
                "UPDATE api_keys SET revoked_at = $1 WHERE workspace_id = $2 AND revoked_at IS NULL",
                now,
                row["id"],
            )
            if status != "UPDATE 0":
                await connection.execute(f"NOTIFY {_KEYS_CHANNEL}")
        return Workspace(*row)

    def on_key_revoked(self, callback: Callable[[], None]) -> None:
        self._revoked.append(callback)

    def _listener_lost(self, connection: object) -> None:
        if connection is not self._listener:
            return  # closed by us
        self._listener = None
        log.warning(
            "lost the connection that listens for notifications (key revocations, cancels, stored"
            " events); reconnecting, meanwhile followers poll and revoked keys expire from the cache"
        )
        self._relisten = asyncio.get_running_loop().create_task(self._listen_again(), name="venna-relisten")

    def watch_events(self, response_id: str) -> _Watch:
        watch = _Watch(self, response_id)
        self._watches.setdefault(response_id, set()).add(watch)
        return watch

    def _unwatch(self, watch: _Watch) -> None:
        watches = self._watches.get(watch.response_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.response_id]

    def _events_stored(self, _connection: object, _pid: object, _channel: object, payload: object) -> None:
        """A commit (of any process) stored events or state of the responses in ``payload``."""
        ids = self._watches if payload == "*" else str(payload).split(",")
        for response_id in list(ids):
            for watch in self._watches.get(response_id, ()):
                watch.wake()

    def _key_revoked(self, *_: object) -> None:
        for callback in self._revoked:
            callback()

    def _cancel_requested(self, _connection: object, _pid: object, _channel: object, payload: object) -> None:
        for callback in self._cancelling:
            callback(str(payload))

    async def list_workspaces(self) -> list[Workspace]:
        rows = await self.pool.fetch("SELECT id, name, created_at, revoked_at FROM workspaces ORDER BY name")
        return [Workspace(*row) for row in rows]

    async def authenticate(self, key: str) -> str | None:
        if not key.startswith(KEY_PREFIX):
            return None
        found: str | None = await self.pool.fetchval(
            "SELECT workspace_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", hash_key(key)
        )
        return found

    async def authenticate_admin(self, key: str) -> str | None:
        if not key.startswith(ADMIN_KEY_PREFIX):
            return None
        found: str | None = await self.pool.fetchval(
            "SELECT id FROM admin_keys WHERE key_hash = $1 AND revoked_at IS NULL", hash_key(key)
        )
        return found

    # ------------------------------------------------------------------ limits

    async def set_limits(self, workspace_id: str, limits: WorkspaceLimits) -> None:
        await self.pool.execute(
            "INSERT INTO workspace_limits (workspace_id, requests_per_minute, tokens_per_minute,"
            " monthly_tokens) VALUES ($1, $2, $3, $4) ON CONFLICT (workspace_id) DO UPDATE SET"
            " requests_per_minute = EXCLUDED.requests_per_minute,"
            " tokens_per_minute = EXCLUDED.tokens_per_minute, monthly_tokens = EXCLUDED.monthly_tokens",
            workspace_id,
            *limit_columns(limits),
        )

    async def get_limits(self, workspace_id: str) -> WorkspaceLimits:
        row = await self.pool.fetchrow(
            "SELECT requests_per_minute, tokens_per_minute, monthly_tokens FROM workspace_limits"
            " WHERE workspace_id = $1",
            workspace_id,
        )
        return limits_of(tuple(row) if row else None)

    async def take_requests(
        self, workspace_id: str, window: int, count: int, *, max_requests: int | None, max_tokens: int | None
    ) -> tuple[int, WindowUse]:
        # One statement: the upsert's row lock orders the requests of every replica, and the row
        # keeps how many this very update counted (RETURNING shows only the new values).
        row = await self.pool.fetchrow(_TAKE_REQUESTS, workspace_id, window, count, max_requests, max_tokens)
        assert row is not None
        return row["taken"], WindowUse(row["requests"], row["tokens"])

    async def add_window_tokens(self, workspace_id: str, window: int, tokens: int) -> None:
        await self.pool.execute(
            "INSERT INTO rate_windows AS w (workspace_id, window_start, tokens) VALUES ($1, $2, $3)"
            " ON CONFLICT (workspace_id, window_start) DO UPDATE SET tokens = w.tokens + EXCLUDED.tokens",
            workspace_id,
            window,
            tokens,
        )

    async def window_use(self, workspace_id: str, window: int) -> WindowUse:
        row = await self.pool.fetchrow(
            "SELECT requests, tokens FROM rate_windows WHERE workspace_id = $1 AND window_start = $2",
            workspace_id,
            window,
        )
        return WindowUse(row["requests"], row["tokens"]) if row else WindowUse(0, 0)

    async def prune_windows(self, before: int) -> None:
        await self.pool.execute("DELETE FROM rate_windows WHERE window_start < $1", before)

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
        return self._queue(
            new_response_rows(
                workspace_id,
                response,
                input_items,
                request=request,
                events=events,
                finished=finished,
                lease=lease,
            ),
            (response.id,) if events else (),
        )

    def save_response(
        self,
        workspace_id: str,
        response: response_pb2.Response,
        *,
        events: Sequence[events_pb2.ResponseStreamEvent] = (),
        finished: bool = False,
        lease: Lease | None = None,
    ) -> asyncio.Future[bool]:
        # Serialized now: what is written is the response as it is at the call.
        body = body_without_output(response)
        outputs = item_rows(workspace_id, response.id, (), response.output)
        usage = usage_row(workspace_id, response, int(time.time())) if finished else None
        appended = event_rows(response.id, events).events
        parameters: list[object] = [response.status, body, response.id, workspace_id]
        if finished:
            holding = ", request = NULL, owner = NULL, lease_until = NULL"
        elif lease is not None:
            holding = f", lease_until = {NOW_MS} + $6"
        else:
            holding = ""
        if lease is not None:
            parameters.append(lease.owner)
            if not finished:
                parameters.append(lease.milliseconds)
        statement = (
            f"UPDATE responses SET status = $1, body = $2{holding} WHERE id = $3 AND workspace_id = $4"
            + (" AND owner = $5" if lease is not None else "")
        )

        async def save(connection: Connection) -> bool:
            saved = await connection.execute(statement, *parameters) == "UPDATE 1"
            if usage is not None and (
                saved or not await connection.fetchval("SELECT 1 FROM responses WHERE id = $1", response.id)
            ):
                await connection.execute(_USAGE_UPSERT, *usage)
            if not saved:
                return False
            await connection.execute(
                "DELETE FROM items WHERE response_id = $1 AND kind = $2", response.id, OUTPUT
            )
            if outputs:
                await connection.executemany(_ITEM_INSERT, outputs)
            if appended:
                await connection.executemany(_EVENT_INSERT, appended)
            return True

        return self._queue(save, (response.id,))

    def append_events(
        self,
        response_id: str,
        events: Sequence[events_pb2.ResponseStreamEvent],
        *,
        lease: Lease | None = None,
    ) -> asyncio.Future[bool]:
        rows = event_rows(response_id, events)
        if lease is None:
            return self._queue(rows, (response_id,))

        async def append(connection: Connection) -> bool:
            # The row lock taken here orders this write after a claim or a cancel, or before.
            held = await connection.execute(
                f"UPDATE responses SET lease_until = {NOW_MS} + $3 WHERE id = $1 AND owner = $2",
                response_id,
                lease.owner,
                lease.milliseconds,
            )
            if held != "UPDATE 1":
                return False
            await connection.executemany(_EVENT_INSERT, rows.events)
            return True

        return self._queue(append, (response_id,))

    def record_usage(self, workspace_id: str, response: response_pb2.Response) -> asyncio.Future[None]:
        return self._queue(usage_rows(workspace_id, response))

    async def get_response(self, workspace_id: str, response_id: str) -> response_pb2.Response | None:
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT body, created_at, background FROM responses WHERE id = $1 AND workspace_id = $2",
                response_id,
                workspace_id,
            )
            if row is None:
                return None
            outputs = await connection.fetch(
                "SELECT body FROM items WHERE response_id = $1 AND kind = $2 ORDER BY position",
                response_id,
                OUTPUT,
            )
        response = decode(response_pb2.Response, row["body"])
        items = [decode(response_pb2.Item, output["body"]) for output in outputs]
        if response is None or None in items:
            raise UnreadableRecord(response_id, created_at=row["created_at"], background=row["background"])
        response.output.extend(item for item in items if item is not None)
        return response

    async def delete_response(self, workspace_id: str, response_id: str) -> bool:
        async with self.pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                "DELETE FROM responses WHERE id = $1 AND workspace_id = $2", response_id, workspace_id
            )
            if status != "DELETE 1":
                return False
            await connection.execute("DELETE FROM items WHERE response_id = $1", response_id)
            await connection.execute("DELETE FROM events WHERE response_id = $1", response_id)
        return True

    async def load_context(
        self, workspace_id: str, response_id: str, *, max_depth: int | None = None
    ) -> list[response_pb2.Item] | None:
        bound = 2**62 if max_depth is None else max_depth
        rows = await self.pool.fetch(
            """
            WITH RECURSIVE chain(id, previous_id, depth) AS (
                SELECT id, previous_response_id, 0::bigint FROM responses
                WHERE id = $1 AND workspace_id = $2
                UNION ALL
                SELECT r.id, r.previous_response_id, chain.depth + 1
                FROM responses r JOIN chain ON r.id = chain.previous_id
                WHERE r.workspace_id = $2 AND chain.depth < $3
            )
            SELECT chain.depth, chain.id, items.item_id, items.body FROM chain
            LEFT JOIN items ON items.response_id = chain.id
            ORDER BY chain.depth DESC, items.kind, items.position
            """,
            response_id,
            workspace_id,
            bound,
        )
        if not rows:
            return None
        if max_depth is not None and rows[0]["depth"] >= max_depth:
            raise ChainTooDeep(max_depth)
        return [decode_item(body, owner, found_id) for _, owner, found_id, body in rows if body is not None]

    async def find_items(self, workspace_id: str, item_ids: Sequence[str]) -> dict[str, response_pb2.Item]:
        if not item_ids:
            return {}
        rows = await self.pool.fetch(
            "SELECT item_id, response_id, body FROM items WHERE workspace_id = $1 AND item_id = ANY($2)"
            " ORDER BY seq",
            workspace_id,
            list(item_ids),
        )
        return {found_id: decode_item(body, owner, found_id) for found_id, owner, body in rows}

    async def list_input_items(
        self, workspace_id: str, response_id: str, *, limit: int, ascending: bool, after: str | None
    ) -> InputItemsPage | None:
        async with self.pool.acquire() as connection:
            exists = await connection.fetchval(
                "SELECT 1 FROM responses WHERE id = $1 AND workspace_id = $2", response_id, workspace_id
            )
            if exists is None:
                return None
            if after is None:
                bound = -1 if ascending else 2**31 - 1
            else:
                position = await connection.fetchval(
                    "SELECT position FROM items WHERE response_id = $1 AND kind = $2 AND item_id = $3"
                    " ORDER BY position LIMIT 1",
                    response_id,
                    INPUT,
                    after,
                )
                if position is None:
                    raise LookupError(after)
                bound = position
            comparison, direction = (">", "ASC") if ascending else ("<", "DESC")
            rows = await connection.fetch(
                f"SELECT body FROM items WHERE response_id = $1 AND kind = $2 AND position {comparison} $3"
                f" ORDER BY position {direction} LIMIT $4",
                response_id,
                INPUT,
                bound,
                limit + 1,
            )
        items = [decode_item(row["body"], response_id) for row in rows[:limit]]
        return InputItemsPage(items=items, has_more=len(rows) > limit)

    async def events_after(
        self, workspace_id: str, response_id: str, after: int
    ) -> list[events_pb2.ResponseStreamEvent]:
        rows = await self.pool.fetch(
            "SELECT e.body FROM events e JOIN responses r ON r.id = e.response_id"
            " WHERE e.response_id = $1 AND r.workspace_id = $2 AND e.sequence_number > $3"
            " ORDER BY e.sequence_number",
            response_id,
            workspace_id,
            after,
        )
        return decode_events(response_id, (row["body"] for row in rows))

    async def last_sequence_number(self, response_id: str) -> int:
        last = await self.pool.fetchval(
            "SELECT MAX(sequence_number) FROM events WHERE response_id = $1", response_id
        )
        return -1 if last is None else int(last)

    async def last_terminal_event(self, response_id: str) -> events_pb2.ResponseStreamEvent | None:
        body = await self.pool.fetchval(
            "SELECT body FROM events WHERE response_id = $1 ORDER BY sequence_number DESC LIMIT 1",
            response_id,
        )
        return terminal_event_of(response_id, body)

    # ------------------------------------------------------------------ leases

    async def claim_responses(
        self, lease: Lease, *, queued: int, expired_only: bool = True
    ) -> list[PendingResponse]:
        free = _UNHELD if expired_only else "true"
        claimed: list[PendingResponse] = []
        async with self.pool.acquire() as connection, connection.transaction():
            for status, limit in (
                (response_pb2.RESPONSE_STATUS_IN_PROGRESS, None),
                (response_pb2.RESPONSE_STATUS_QUEUED, queued),
            ):
                if limit == 0:
                    continue
                rows = await connection.fetch(
                    _CLAIM.format(free=free), lease.owner, lease.milliseconds, status, limit
                )
                claimed += [pending_response(*_pending_columns(row)) for row in rows]
        claimed.sort(key=lambda pending: (pending.response.created_at, pending.response.id))
        return claimed

    async def renew_leases(self, lease: Lease, response_ids: Sequence[str]) -> Renewal:
        rows = await self.pool.fetch(
            f"UPDATE responses SET lease_until = {NOW_MS} + $2 WHERE owner = $1 AND id = ANY($3::text[])"
            " RETURNING id, cancel_requested",
            lease.owner,
            lease.milliseconds,
            list(response_ids),
        )
        held = {row["id"] for row in rows}
        return Renewal(
            lost=frozenset(set(response_ids) - held),
            cancelling=frozenset(row["id"] for row in rows if row["cancel_requested"]),
        )

    async def release_leases(self, lease: Lease, response_ids: Sequence[str]) -> None:
        await self.pool.execute(
            "UPDATE responses SET owner = NULL, lease_until = NULL WHERE owner = $1 AND id = ANY($2::text[])",
            lease.owner,
            list(response_ids),
        )

    async def take_over(self, lease: Lease, workspace_id: str, response_id: str) -> bool:
        status = await self.pool.execute(
            f"UPDATE responses SET owner = $1, lease_until = {NOW_MS} + $2"
            f" WHERE id = $3 AND workspace_id = $4 AND status IN ({UNFINISHED_STATUSES})",
            lease.owner,
            lease.milliseconds,
            response_id,
            workspace_id,
        )
        return bool(status == "UPDATE 1")

    async def request_cancel(self, workspace_id: str, response_id: str) -> bool:
        async with self.pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                "UPDATE responses SET cancel_requested = true"
                f" WHERE id = $1 AND workspace_id = $2 AND status IN ({UNFINISHED_STATUSES})",
                response_id,
                workspace_id,
            )
            if status != "UPDATE 1":
                return False
            # Delivered at commit to every process listening (the owner among them).
            await connection.execute("SELECT pg_notify($1, $2)", _CANCEL_CHANNEL, response_id)
        return True

    def on_cancel_requested(self, callback: Callable[[str], None]) -> None:
        self._cancelling.append(callback)

    # ------------------------------------------------------------------ usage

    def observe_commits(self, observer: Callable[[int, float], None]) -> None:
        self._commit_observer = observer

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # ------------------------------------------------------------------ conversations

    async def create_conversation(
        self,
        workspace_id: str,
        conversation: conversations_pb2.Conversation,
        items: Sequence[response_pb2.Item],
    ) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(
                "INSERT INTO conversations (id, workspace_id, created_at, body) VALUES ($1, $2, $3, $4)",
                conversation.id,
                workspace_id,
                conversation.created_at,
                conversation.SerializeToString(),
            )
            await _add_conversation_items(connection, conversation.id, items)

    async def get_conversation(
        self, workspace_id: str, conversation_id: str
    ) -> conversations_pb2.Conversation | None:
        body = await self.pool.fetchval(
            "SELECT body FROM conversations WHERE id = $1 AND workspace_id = $2",
            conversation_id,
            workspace_id,
        )
        return None if body is None else conversations_pb2.Conversation.FromString(body)

    async def update_conversation(
        self, workspace_id: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> conversations_pb2.Conversation | None:
        async with self.pool.acquire() as connection, connection.transaction():
            body = await connection.fetchval(
                "SELECT body FROM conversations WHERE id = $1 AND workspace_id = $2 FOR UPDATE",
                conversation_id,
                workspace_id,
            )
            if body is None:
                return None
            conversation = conversations_pb2.Conversation.FromString(body)
            conversation.metadata.clear()
            conversation.metadata.update(metadata)
            await connection.execute(
                "UPDATE conversations SET body = $1 WHERE id = $2",
                conversation.SerializeToString(),
                conversation_id,
            )
        return conversation

    async def delete_conversation(self, workspace_id: str, conversation_id: str) -> bool:
        async with self.pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                "DELETE FROM conversations WHERE id = $1 AND workspace_id = $2", conversation_id, workspace_id
            )
            if status != "DELETE 1":
                return False
            await connection.execute(
                "DELETE FROM conversation_items WHERE conversation_id = $1", conversation_id
            )
        return True

    async def add_conversation_items(
        self, workspace_id: str, conversation_id: str, items: Sequence[response_pb2.Item]
    ) -> bool:
        async with self.pool.acquire() as connection, connection.transaction():
            # Locked, so that items added by concurrent calls keep the order of their commits.
            found = await connection.fetchval(
                "SELECT 1 FROM conversations WHERE id = $1 AND workspace_id = $2 FOR UPDATE",
                conversation_id,
                workspace_id,
            )
            if found is None:
                return False
            await _add_conversation_items(connection, conversation_id, items)
        return True

    async def conversation_items(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        limit: int | None = None,
        ascending: bool = True,
        after: str | None = None,
    ) -> InputItemsPage | None:
        async with self.pool.acquire() as connection:
            found = await connection.fetchval(
                "SELECT 1 FROM conversations WHERE id = $1 AND workspace_id = $2",
                conversation_id,
                workspace_id,
            )
            if found is None:
                return None
            if after is None:
                bound = -1 if ascending else 2**62
            else:
                seq = await connection.fetchval(
                    "SELECT seq FROM conversation_items WHERE conversation_id = $1 AND item_id = $2"
                    " ORDER BY seq LIMIT 1",
                    conversation_id,
                    after,
                )
                if seq is None:
                    raise LookupError(after)
                bound = seq
            comparison, direction = (">", "ASC") if ascending else ("<", "DESC")
            rows = await connection.fetch(
                f"SELECT body FROM conversation_items WHERE conversation_id = $1 AND seq {comparison} $2"
                f" ORDER BY seq {direction} LIMIT $3",
                conversation_id,
                bound,
                None if limit is None else limit + 1,
            )
        shown = rows if limit is None else rows[:limit]
        items = [decode_item(row["body"], conversation_id) for row in shown]
        return InputItemsPage(items=items, has_more=limit is not None and len(rows) > limit)

    async def get_conversation_item(
        self, workspace_id: str, conversation_id: str, item_id: str
    ) -> response_pb2.Item | None:
        body = await self.pool.fetchval(
            "SELECT i.body FROM conversation_items i JOIN conversations c ON c.id = i.conversation_id"
            " WHERE c.id = $1 AND c.workspace_id = $2 AND i.item_id = $3 ORDER BY i.seq LIMIT 1",
            conversation_id,
            workspace_id,
            item_id,
        )
        return None if body is None else decode_item(body, conversation_id, item_id)

    async def delete_conversation_item(self, workspace_id: str, conversation_id: str, item_id: str) -> bool:
        status = await self.pool.execute(
            "DELETE FROM conversation_items i USING conversations c WHERE c.id = i.conversation_id"
            " AND c.id = $1 AND c.workspace_id = $2 AND i.item_id = $3",
            conversation_id,
            workspace_id,
            item_id,
        )
        return status != "DELETE 0"

    async def usage_totals(
        self,
        workspace_id: str,
        *,
        since: int | None = None,
        until: int | None = None,
        group_by_model: bool = False,
    ) -> list[UsageTotal]:
        conditions = ["workspace_id = $1"]
        parameters: list[object] = [workspace_id]
        if since is not None:
            parameters.append(since)
            conditions.append(f"created_at >= ${len(parameters)}")
        if until is not None:
            parameters.append(until)
            conditions.append(f"created_at < ${len(parameters)}")
        rows = await self.pool.fetch(
            f"SELECT {'model' if group_by_model else 'NULL'}, COUNT(*), SUM(input_tokens),"
            " SUM(output_tokens), SUM(reasoning_tokens), SUM(cached_tokens),"
            " SUM(input_tokens + output_tokens)"
            f" FROM usage WHERE {' AND '.join(conditions)}"
            + (" GROUP BY model ORDER BY model" if group_by_model else ""),
            *parameters,
        )
        return [UsageTotal(row[0], *(int(value or 0) for value in tuple(row)[1:])) for row in rows if row[1]]


def _pending_columns(row: asyncpg.Record) -> tuple[str, str, int, bool, int, bytes, bytes | None, bool]:
    """A claimed row as ``pending_response`` takes it."""
    return (
        row["workspace_id"],
        row["id"],
        row["status"],
        row["background"],
        row["created_at"],
        row["body"],
        row["request"],
        row["cancel_requested"],
    )


async def _insert(connection: Connection, rows: NewRows) -> None:
    """New records, one statement per table (usage first: a record written again replaces the
    earlier one)."""
    if rows.usage:
        await connection.executemany(_USAGE_UPSERT, rows.usage)
    if rows.responses:
        await connection.executemany(_RESPONSE_INSERT, rows.responses)
    if rows.items:
        await connection.executemany(_ITEM_INSERT, rows.items)
    if rows.events:
        await connection.executemany(_EVENT_INSERT, rows.events)


# Each table's columns as ``_one_statement`` inserts them from arrays: (name, array type);
# a response's lease comes as a length, turned into an expiry by the database's clock.
_ARRAY_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "usage": [
        ("response_id", "text"),
        ("workspace_id", "text"),
        ("model", "text"),
        ("status", "text"),
        ("input_tokens", "bigint"),
        ("output_tokens", "bigint"),
        ("reasoning_tokens", "bigint"),
        ("cached_tokens", "bigint"),
        ("created_at", "bigint"),
        ("finished_at", "bigint"),
    ],
    "responses": [
        ("id", "text"),
        ("workspace_id", "text"),
        ("previous_response_id", "text"),
        ("status", "integer"),
        ("background", "integer"),
        ("created_at", "bigint"),
        ("body", "bytea"),
        ("request", "bytea"),
        ("owner", "text"),
        ("lease_until", "bigint"),
    ],
    "items": [
        ("workspace_id", "text"),
        ("response_id", "text"),
        ("item_id", "text"),
        ("kind", "smallint"),
        ("position", "integer"),
        ("body", "bytea"),
    ],
    "events": [("response_id", "text"), ("sequence_number", "integer"), ("body", "bytea")],
}
# What each selected column becomes (the others are taken as they are).
_CONVERTED = {
    ("responses", "background"): "background::boolean",
    ("responses", "lease_until"): f"{NOW_MS} + lease_until",
}
_CONFLICTS = {
    "usage": _USAGE_UPSERT[_USAGE_UPSERT.index(" ON CONFLICT") :],
    "events": " ON CONFLICT DO NOTHING",
}


def _one_statement(rows: NewRows, touched: set[str]) -> tuple[str, list[object]]:
    """One statement inserting every row (each table's rows as arrays, unnested) and, if
    ``touched``, notifying followers: a single round trip, atomic on its own."""
    # A usage record written twice in one statement would be an error: the last one wins.
    usage = list({row[0]: row for row in rows.usage}.values())
    tables = {"usage": usage, "responses": rows.responses, "items": rows.items, "events": rows.events}
    parts: list[str] = []
    arguments: list[object] = []
    for table, table_rows in tables.items():
        if not table_rows:
            continue
        columns = _ARRAY_COLUMNS[table]
        arrays = []
        for index, (_, kind) in enumerate(columns):
            arguments.append([row[index] for row in table_rows])
            arrays.append(f"${len(arguments)}::{kind}[]")
        names = ", ".join(name for name, _ in columns)
        selected = ", ".join(_CONVERTED.get((table, name), name) for name, _ in columns)
        parts.append(
            f"{table}_rows AS (INSERT INTO {table} ({names}) SELECT {selected}"
            f" FROM unnest({', '.join(arrays)}) AS t({names}){_CONFLICTS.get(table, '')})"
        )
    if touched:
        payload = ",".join(sorted(touched))
        arguments += [_EVENTS_CHANNEL, payload if len(payload) <= _MAX_PAYLOAD else "*"]
        ending = f"SELECT pg_notify(${len(arguments) - 1}, ${len(arguments)})"
    else:
        ending = "SELECT 1"
    return (f"WITH {', '.join(parts)} {ending}" if parts else ending), arguments


def _settle(
    future: asyncio.Future[Any], result: object = None, *, error: BaseException | None = None
) -> None:
    if future.cancelled():
        return  # the caller went away; the write is done (and committed) all the same
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _announce(connection: Connection, response_ids: set[str]) -> None:
    """One notification for the commit, delivered to every listener when it commits."""
    if not response_ids:
        return
    payload = ",".join(sorted(response_ids))
    if len(payload) > _MAX_PAYLOAD:
        payload = "*"
    await connection.execute("SELECT pg_notify($1, $2)", _EVENTS_CHANNEL, payload)


class _Watch:
    """An EventWatch woken by the store's notifications."""

    def __init__(self, store: PostgresStore, response_id: str) -> None:
        self.response_id = response_id
        self._store = store
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._woken.wait()
        self._woken.clear()

    def close(self) -> None:
        self._store._unwatch(self)


async def _add_conversation_items(
    connection: Connection, conversation_id: str, items: Sequence[response_pb2.Item]
) -> None:
    if items:
        await connection.executemany(
            "INSERT INTO conversation_items (conversation_id, item_id, body) VALUES ($1, $2, $3)",
            [(conversation_id, item_id(item), item.SerializeToString()) for item in items],
        )


# $3 requests asked for, $4 the most the window may hold (NULL: no bound), $5 the tokens at which
# it takes none (NULL: no bound). A new window has no tokens yet.
_TAKE_REQUESTS = """
INSERT INTO rate_windows AS w (workspace_id, window_start, requests, last_taken)
SELECT $1, $2, first, first FROM (
    SELECT CASE WHEN $5::bigint IS NOT NULL AND $5 <= 0 THEN 0
                ELSE GREATEST(0, LEAST($3::bigint, COALESCE($4::bigint, $3))) END AS first
) AS asked
ON CONFLICT (workspace_id, window_start) DO UPDATE SET
    last_taken = CASE WHEN $5::bigint IS NOT NULL AND w.tokens >= $5 THEN 0
                      ELSE LEAST($3, GREATEST(0, COALESCE($4, w.requests + $3) - w.requests)) END,
    requests = w.requests + CASE WHEN $5::bigint IS NOT NULL AND w.tokens >= $5 THEN 0
                                 ELSE LEAST($3, GREATEST(0, COALESCE($4, w.requests + $3) - w.requests)) END
RETURNING requests, tokens, last_taken AS taken
"""


def _unobserved(writes: int, seconds: float) -> None:
    pass
