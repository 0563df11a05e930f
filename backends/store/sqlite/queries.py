"""Synchronous access to one SQLite database file: every query and write of the store."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from google.protobuf.message import DecodeError
from sqlite_utils import Database

from venna.backends.store.protocol import (
    ChainTooDeep,
    InputItemsPage,
    KeyRecord,
    Lease,
    PendingResponse,
    Renewal,
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
    event_tuples,
    hash_key,
    item_rows,
    key_hint,
    limit_columns,
    limits_of,
    new_admin_key_id,
    new_key_id,
    new_secret,
    new_workspace_id,
    pending_response,
    terminal_event_of,
    usage_row,
)
from venna.backends.store.sqlite.rows import (
    EVENT_INSERT,
    ITEM_INSERT,
    NOW_MS,
    RESPONSE_INSERT,
    USAGE_INSERT,
    insert_rows,
)
from venna.backends.store.sqlite.schema import UNFINISHED_STATUSES, migrations, prepare_private_file
from venna.responses.v1 import conversations_pb2, events_pb2, response_pb2


class Store:
    """Synchronous access to one SQLite database file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        prepare_private_file(self.path)
        # Autocommit at the driver level: transactions are explicit (Store._transaction).
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db = Database(conn, execute_plugins=False)
        self.db.enable_wal()
        conn.execute("PRAGMA synchronous=NORMAL")  # durable against crashes of the process
        conn.execute("PRAGMA busy_timeout=5000")  # the CLI may write while the server runs
        migrations.apply(self.db)
        self._conn = conn

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """The writes of one method, all or nothing.

        Inside a transaction that is already open (AsyncStore's batch, which gives each call a
        savepoint of its own) the writes join it; otherwise they get their own.
        """
        conn = self._conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ---------------------------------------------------------------------------- keys

    def create_key(self, workspace_name: str, *, create_workspace: bool = True) -> tuple[str, KeyRecord]:
        """Creates a key (and the workspace, if new and allowed); the plaintext is returned only here."""
        key = new_secret(KEY_PREFIX)
        now = int(time.time())
        with self._transaction():
            row = self._conn.execute(
                "SELECT id, revoked_at FROM workspaces WHERE name = ?", [workspace_name]
            ).fetchone()
            if row is None and not create_workspace:
                raise WorkspaceUnavailable(f"No workspace named {workspace_name!r}.")
            if row is not None and row[1] is not None:
                raise WorkspaceUnavailable(f"Workspace {workspace_name!r} is revoked.")
            if row:
                workspace_id = row[0]
            else:
                workspace_id = new_workspace_id()
                self._conn.execute(
                    "INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, ?)",
                    [workspace_id, workspace_name, now],
                )
            record = KeyRecord(
                id=new_key_id(), workspace=workspace_name, hint=key_hint(key), created_at=now, revoked_at=None
            )
            self._conn.execute(
                "INSERT INTO api_keys (id, workspace_id, key_hash, key_hint, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [record.id, workspace_id, hash_key(key), record.hint, now],
            )
        return key, record

    def create_admin_key(self) -> tuple[str, KeyRecord]:
        key = new_secret(ADMIN_KEY_PREFIX)
        record = KeyRecord(
            id=new_admin_key_id(),
            workspace="",
            hint=key_hint(key),
            created_at=int(time.time()),
            revoked_at=None,
            admin=True,
        )
        with self._transaction():
            self._conn.execute(
                "INSERT INTO admin_keys (id, key_hash, key_hint, created_at) VALUES (?, ?, ?, ?)",
                [record.id, hash_key(key), record.hint, record.created_at],
            )
        return key, record

    def list_keys(self, workspace_name: str | None = None) -> list[KeyRecord]:
        where, parameters = ("WHERE w.name = ?", [workspace_name]) if workspace_name is not None else ("", [])
        rows = self._conn.execute(
            "SELECT k.id, w.name, k.key_hint, k.created_at, k.revoked_at, k.rowid FROM api_keys k"
            f" JOIN workspaces w ON w.id = k.workspace_id {where}",
            parameters,
        ).fetchall()
        keys = [(row[3], 1, row[5], KeyRecord(*row[:5])) for row in rows]
        if workspace_name is None:
            admin = self._conn.execute(
                "SELECT id, key_hint, created_at, revoked_at, rowid FROM admin_keys"
            ).fetchall()
            keys += [
                (row[2], 0, row[4], KeyRecord(row[0], "", row[1], row[2], row[3], True)) for row in admin
            ]
        return [record for *_, record in sorted(keys, key=lambda entry: entry[:3])]

    def revoke_key(self, key_id: str) -> bool:
        table = "admin_keys" if key_id.startswith("akey_") else "api_keys"
        with self._transaction():
            cursor = self._conn.execute(
                f"UPDATE {table} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                [int(time.time()), key_id],
            )
        return cursor.rowcount == 1

    def create_workspace(self, name: str) -> Workspace | None:
        workspace = Workspace(id=new_workspace_id(), name=name, created_at=int(time.time()))
        with self._transaction():
            cursor = self._conn.execute(
                "INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                [workspace.id, workspace.name, workspace.created_at],
            )
        return workspace if cursor.rowcount == 1 else None

    def get_workspace(self, name: str) -> Workspace | None:
        row = self._conn.execute(
            "SELECT id, name, created_at, revoked_at FROM workspaces WHERE name = ?", [name]
        ).fetchone()
        return Workspace(*row) if row else None

    def revoke_workspace(self, name: str) -> tuple[Workspace | None, bool]:
        """The workspace (None if unknown) and whether a key was revoked with it."""
        now = int(time.time())
        with self._transaction():
            self._conn.execute(
                "UPDATE workspaces SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", [now, name]
            )
            workspace = self.get_workspace(name)
            if workspace is None:
                return None, False
            cursor = self._conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE workspace_id = ? AND revoked_at IS NULL",
                [now, workspace.id],
            )
        return workspace, cursor.rowcount > 0

    def list_workspaces(self) -> list[Workspace]:
        rows = self._conn.execute(
            "SELECT id, name, created_at, revoked_at FROM workspaces ORDER BY name"
        ).fetchall()
        return [Workspace(*row) for row in rows]

    def authenticate(self, key: str) -> str | None:
        """The workspace id of a valid, unrevoked key."""
        if not key.startswith(KEY_PREFIX):
            return None
        row = self._conn.execute(
            "SELECT workspace_id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
            [hash_key(key)],
        ).fetchone()
        return row[0] if row else None

    def authenticate_admin(self, key: str) -> str | None:
        if not key.startswith(ADMIN_KEY_PREFIX):
            return None
        row = self._conn.execute(
            "SELECT id FROM admin_keys WHERE key_hash = ? AND revoked_at IS NULL", [hash_key(key)]
        ).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------------------------- limits

    def set_limits(self, workspace_id: str, limits: WorkspaceLimits) -> None:
        with self._transaction():
            self._conn.execute(
                "INSERT INTO workspace_limits (workspace_id, requests_per_minute, tokens_per_minute,"
                " monthly_tokens) VALUES (?, ?, ?, ?) ON CONFLICT (workspace_id) DO UPDATE SET"
                " requests_per_minute = excluded.requests_per_minute,"
                " tokens_per_minute = excluded.tokens_per_minute, monthly_tokens = excluded.monthly_tokens",
                [workspace_id, *limit_columns(limits)],
            )

    def get_limits(self, workspace_id: str) -> WorkspaceLimits:
        row = self._conn.execute(
            "SELECT requests_per_minute, tokens_per_minute, monthly_tokens FROM workspace_limits"
            " WHERE workspace_id = ?",
            [workspace_id],
        ).fetchone()
        return limits_of(row)

    def take_requests(
        self, workspace_id: str, window: int, count: int, max_requests: int | None, max_tokens: int | None
    ) -> tuple[int, WindowUse]:
        with self._transaction():
            use = self.window_use(workspace_id, window)
            room = count if max_requests is None else max(0, min(count, max_requests - use.requests))
            if max_tokens is not None and use.tokens >= max_tokens:
                room = 0
            if room == 0:
                return 0, use
            self._conn.execute(
                "INSERT INTO rate_windows (workspace_id, window_start, requests) VALUES (?, ?, ?)"
                " ON CONFLICT (workspace_id, window_start)"
                " DO UPDATE SET requests = requests + excluded.requests",
                [workspace_id, window, room],
            )
        return room, WindowUse(use.requests + room, use.tokens)

    def add_window_tokens(self, workspace_id: str, window: int, tokens: int) -> None:
        with self._transaction():
            self._conn.execute(
                "INSERT INTO rate_windows (workspace_id, window_start, tokens) VALUES (?, ?, ?)"
                " ON CONFLICT (workspace_id, window_start) DO UPDATE SET tokens = tokens + excluded.tokens",
                [workspace_id, window, tokens],
            )

    def window_use(self, workspace_id: str, window: int) -> WindowUse:
        row = self._conn.execute(
            "SELECT requests, tokens FROM rate_windows WHERE workspace_id = ? AND window_start = ?",
            [workspace_id, window],
        ).fetchone()
        return WindowUse(*row) if row else WindowUse(0, 0)

    def prune_windows(self, before: int) -> None:
        with self._transaction():
            self._conn.execute("DELETE FROM rate_windows WHERE window_start < ?", [before])

    # ---------------------------------------------------------------------------- responses

    def insert(self, rows: NewRows) -> None:
        """Inserts new records, all or nothing."""
        with self._transaction():
            insert_rows(self._conn, USAGE_INSERT, rows.usage)
            insert_rows(self._conn, RESPONSE_INSERT, rows.responses)
            insert_rows(self._conn, ITEM_INSERT, rows.items)
            insert_rows(self._conn, EVENT_INSERT, rows.events)

    def save_response(
        self,
        workspace_id: str,
        response: response_pb2.Response,
        *,
        events: Sequence[events_pb2.ResponseStreamEvent] = (),
        finished: bool = False,
        lease: Lease | None = None,
    ) -> bool:
        """Updates a stored response and replaces its output; False if it no longer exists, or
        if ``lease`` no longer holds it (then nothing is written).

        ``finished`` drops the kept request and the lease (a finished background run is never
        re-run) and writes the response's usage record, even when the response was deleted
        meanwhile: its tokens were spent all the same.
        """
        if finished:
            holding = ", request = NULL, owner = NULL, lease_until = NULL"
        elif lease is not None:
            holding = f", lease_until = {NOW_MS} + {int(lease.milliseconds)}"
        else:
            holding = ""
        condition = " AND owner = ?" if lease is not None else ""
        with self._transaction():
            cursor = self._conn.execute(
                f"UPDATE responses SET status = ?, body = ?{holding} WHERE id = ? AND workspace_id = ?"
                + condition,
                [
                    response.status,
                    body_without_output(response),
                    response.id,
                    workspace_id,
                    *([lease.owner] if lease is not None else []),
                ],
            )
            saved = cursor.rowcount == 1
            if finished and (saved or not self._exists(response.id)):
                insert_rows(self._conn, USAGE_INSERT, [usage_row(workspace_id, response, int(time.time()))])
            if not saved:
                return False
            self._conn.execute("DELETE FROM items WHERE response_id = ? AND kind = ?", [response.id, OUTPUT])
            insert_rows(self._conn, ITEM_INSERT, item_rows(workspace_id, response.id, (), response.output))
            insert_rows(self._conn, EVENT_INSERT, event_tuples(response.id, events))
        return True

    def _exists(self, response_id: str) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM responses WHERE id = ?", [response_id]).fetchone() is not None
        )

    def append_held_events(
        self, response_id: str, events: Sequence[events_pb2.ResponseStreamEvent], lease: Lease
    ) -> bool:
        """Stores events of a response while ``lease`` holds it, renewing the lease."""
        with self._transaction():
            if not self._renew(lease, response_id):
                return False
            insert_rows(self._conn, EVENT_INSERT, event_tuples(response_id, events))
        return True

    def _renew(self, lease: Lease, response_id: str) -> bool:
        cursor = self._conn.execute(
            f"UPDATE responses SET lease_until = {NOW_MS} + ? WHERE id = ? AND owner = ?",
            [lease.milliseconds, response_id, lease.owner],
        )
        return cursor.rowcount == 1

    # ---------------------------------------------------------------------------- leases

    def claim_responses(
        self, lease: Lease, *, queued: int, expired_only: bool = True
    ) -> list[PendingResponse]:
        """Holds the unfinished responses nobody holds: every one in progress, up to ``queued``
        queued ones, oldest first (a bad row comes as ``unreadable``)."""
        free = (
            f" AND (owner IS NULL OR lease_until IS NULL OR lease_until < {NOW_MS})" if expired_only else ""
        )
        claimed: list[PendingResponse] = []
        with self._transaction():
            for status, limit in (
                (response_pb2.RESPONSE_STATUS_IN_PROGRESS, -1),
                (response_pb2.RESPONSE_STATUS_QUEUED, queued),
            ):
                if limit == 0:
                    continue
                rows = self._conn.execute(
                    "SELECT id, workspace_id, status, background, created_at, body, request,"
                    f" cancel_requested FROM responses WHERE status IN ({UNFINISHED_STATUSES})"
                    f" AND status = {int(status)}{free}"
                    " ORDER BY created_at, rowid LIMIT ?",
                    [limit],
                ).fetchall()
                for row in rows:
                    self._conn.execute(
                        f"UPDATE responses SET owner = ?, lease_until = {NOW_MS} + ? WHERE id = ?",
                        [lease.owner, lease.milliseconds, row[0]],
                    )
                claimed += [
                    pending_response(
                        row[1], row[0], row[2], bool(row[3]), row[4], row[5], row[6], bool(row[7])
                    )
                    for row in rows
                ]
        claimed.sort(key=lambda pending: pending.response.created_at)
        return claimed

    def renew_leases(self, lease: Lease, response_ids: Sequence[str]) -> Renewal:
        held: set[str] = set()
        cancelling: set[str] = set()
        with self._transaction():
            for response_id in response_ids:
                if self._renew(lease, response_id):
                    held.add(response_id)
                    row = self._conn.execute(
                        "SELECT cancel_requested FROM responses WHERE id = ?", [response_id]
                    ).fetchone()
                    if row is not None and row[0]:
                        cancelling.add(response_id)
        return Renewal(lost=frozenset(set(response_ids) - held), cancelling=frozenset(cancelling))

    def release_leases(self, lease: Lease, response_ids: Sequence[str]) -> None:
        with self._transaction():
            self._conn.executemany(
                "UPDATE responses SET owner = NULL, lease_until = NULL WHERE id = ? AND owner = ?",
                [(response_id, lease.owner) for response_id in response_ids],
            )

    def take_over(self, lease: Lease, workspace_id: str, response_id: str) -> bool:
        with self._transaction():
            cursor = self._conn.execute(
                f"UPDATE responses SET owner = ?, lease_until = {NOW_MS} + ?"
                f" WHERE id = ? AND workspace_id = ? AND status IN ({UNFINISHED_STATUSES})",
                [lease.owner, lease.milliseconds, response_id, workspace_id],
            )
        return cursor.rowcount == 1

    def request_cancel(self, workspace_id: str, response_id: str) -> bool:
        with self._transaction():
            cursor = self._conn.execute(
                "UPDATE responses SET cancel_requested = 1"
                f" WHERE id = ? AND workspace_id = ? AND status IN ({UNFINISHED_STATUSES})",
                [response_id, workspace_id],
            )
        return cursor.rowcount == 1

    def usage_totals(
        self,
        workspace_id: str,
        *,
        since: int | None = None,
        until: int | None = None,
        group_by_model: bool = False,
    ) -> list[UsageTotal]:
        """Totals of the workspace's responses created in [since, until), per model (by name) or
        as one total; no entry for an empty range."""
        conditions = ["workspace_id = ?"]
        parameters: list[object] = [workspace_id]
        if since is not None:
            conditions.append("created_at >= ?")
            parameters.append(since)
        if until is not None:
            conditions.append("created_at < ?")
            parameters.append(until)
        rows = self._conn.execute(
            f"SELECT {'model' if group_by_model else 'NULL'}, COUNT(*), SUM(input_tokens),"
            " SUM(output_tokens), SUM(reasoning_tokens), SUM(cached_tokens),"
            " SUM(input_tokens + output_tokens)"
            f" FROM usage WHERE {' AND '.join(conditions)}"
            + (" GROUP BY model ORDER BY model" if group_by_model else ""),
            parameters,
        ).fetchall()
        return [UsageTotal(*row) for row in rows if row[1]]

    def get_response(self, workspace_id: str, response_id: str) -> response_pb2.Response | None:
        """The stored response with its output; None if unknown in this workspace.

        Raises UnreadableRecord if its body or an output item cannot be decoded.
        """
        row = self._conn.execute(
            "SELECT body, created_at, background FROM responses WHERE id = ? AND workspace_id = ?",
            [response_id, workspace_id],
        ).fetchone()
        if row is None:
            return None
        body, created_at, background = row
        response = decode(response_pb2.Response, body)
        if response is None:
            raise UnreadableRecord(response_id, created_at=created_at, background=bool(background))
        for (item_body,) in self._conn.execute(
            "SELECT body FROM items WHERE response_id = ? AND kind = ? ORDER BY position",
            [response_id, OUTPUT],
        ):
            try:
                response.output.add().ParseFromString(item_body)  # in place: no copy
            except DecodeError:
                raise UnreadableRecord(
                    response_id, created_at=created_at, background=bool(background)
                ) from None
        return response

    def delete_response(self, workspace_id: str, response_id: str) -> bool:
        with self._transaction():
            cursor = self._conn.execute(
                "DELETE FROM responses WHERE id = ? AND workspace_id = ?", [response_id, workspace_id]
            )
            if cursor.rowcount != 1:
                return False
            self._conn.execute("DELETE FROM items WHERE response_id = ?", [response_id])
            self._conn.execute("DELETE FROM events WHERE response_id = ?", [response_id])
        return True

    def ping(self) -> None:
        self._conn.execute("SELECT 1").fetchone()

    # ------------------------------------------------------------------ conversations

    def create_conversation(
        self,
        workspace_id: str,
        conversation: conversations_pb2.Conversation,
        items: Sequence[response_pb2.Item],
    ) -> None:
        with self._transaction():
            self._conn.execute(
                "INSERT INTO conversations (id, workspace_id, created_at, body) VALUES (?, ?, ?, ?)",
                [conversation.id, workspace_id, conversation.created_at, conversation.SerializeToString()],
            )
            self._add_conversation_items(conversation.id, items)

    def _add_conversation_items(self, conversation_id: str, items: Sequence[response_pb2.Item]) -> None:
        self._conn.executemany(
            "INSERT INTO conversation_items (conversation_id, item_id, body) VALUES (?, ?, ?)",
            [(conversation_id, item_id(item), item.SerializeToString()) for item in items],
        )

    def _conversation_row(self, workspace_id: str, conversation_id: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT body FROM conversations WHERE id = ? AND workspace_id = ?",
            [conversation_id, workspace_id],
        ).fetchone()
        return None if row is None else bytes(row[0])

    def get_conversation(
        self, workspace_id: str, conversation_id: str
    ) -> conversations_pb2.Conversation | None:
        body = self._conversation_row(workspace_id, conversation_id)
        return None if body is None else conversations_pb2.Conversation.FromString(body)

    def update_conversation(
        self, workspace_id: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> conversations_pb2.Conversation | None:
        with self._transaction():
            conversation = self.get_conversation(workspace_id, conversation_id)
            if conversation is None:
                return None
            conversation.metadata.clear()
            conversation.metadata.update(metadata)
            self._conn.execute(
                "UPDATE conversations SET body = ? WHERE id = ?",
                [conversation.SerializeToString(), conversation_id],
            )
        return conversation

    def delete_conversation(self, workspace_id: str, conversation_id: str) -> bool:
        with self._transaction():
            cursor = self._conn.execute(
                "DELETE FROM conversations WHERE id = ? AND workspace_id = ?", [conversation_id, workspace_id]
            )
            if cursor.rowcount != 1:
                return False
            self._conn.execute("DELETE FROM conversation_items WHERE conversation_id = ?", [conversation_id])
        return True

    def add_conversation_items(
        self, workspace_id: str, conversation_id: str, items: Sequence[response_pb2.Item]
    ) -> bool:
        with self._transaction():
            if self._conversation_row(workspace_id, conversation_id) is None:
                return False
            self._add_conversation_items(conversation_id, items)
        return True

    def conversation_items(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        limit: int | None = None,
        ascending: bool = True,
        after: str | None = None,
    ) -> InputItemsPage | None:
        if self._conversation_row(workspace_id, conversation_id) is None:
            return None
        if after is None:
            bound = -1 if ascending else 2**62
        else:
            row = self._conn.execute(
                "SELECT seq FROM conversation_items WHERE conversation_id = ? AND item_id = ?"
                " ORDER BY seq LIMIT 1",
                [conversation_id, after],
            ).fetchone()
            if row is None:
                raise LookupError(after)
            bound = row[0]
        comparison, direction = (">", "ASC") if ascending else ("<", "DESC")
        rows = self._conn.execute(
            f"SELECT body FROM conversation_items WHERE conversation_id = ? AND seq {comparison} ?"
            f" ORDER BY seq {direction} LIMIT ?",
            [conversation_id, bound, -1 if limit is None else limit + 1],
        ).fetchall()
        shown = rows if limit is None else rows[:limit]
        items = [decode_item(body, conversation_id) for (body,) in shown]
        return InputItemsPage(items=items, has_more=limit is not None and len(rows) > limit)

    def get_conversation_item(
        self, workspace_id: str, conversation_id: str, item_id_: str
    ) -> response_pb2.Item | None:
        if self._conversation_row(workspace_id, conversation_id) is None:
            return None
        row = self._conn.execute(
            "SELECT body FROM conversation_items WHERE conversation_id = ? AND item_id = ?"
            " ORDER BY seq LIMIT 1",
            [conversation_id, item_id_],
        ).fetchone()
        return None if row is None else decode_item(row[0], conversation_id, item_id_)

    def delete_conversation_item(self, workspace_id: str, conversation_id: str, item_id_: str) -> bool:
        with self._transaction():
            if self._conversation_row(workspace_id, conversation_id) is None:
                return False
            cursor = self._conn.execute(
                "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ?",
                [conversation_id, item_id_],
            )
        return cursor.rowcount > 0

    def load_context(
        self, workspace_id: str, response_id: str, *, max_depth: int | None = None
    ) -> list[response_pb2.Item] | None:
        """The conversation up to and including ``response_id``, oldest first.

        Per response: its input items, then its output items; ``None`` if the response is
        unknown in this workspace. One query, however deep the chain; with ``max_depth``, the
        query stops one response past that many and raises ChainTooDeep, so that the work a
        refused chain costs is bounded too. Raises UnreadableRecord if an item of the chain
        cannot be decoded.
        """
        bound = 2**62 if max_depth is None else max_depth
        rows = self._conn.execute(
            """
            WITH RECURSIVE chain(id, previous_id, depth) AS (
                SELECT id, previous_response_id, 0 FROM responses
                WHERE id = :id AND workspace_id = :ws
                UNION ALL
                SELECT r.id, r.previous_response_id, chain.depth + 1
                FROM responses r JOIN chain ON r.id = chain.previous_id
                WHERE r.workspace_id = :ws AND chain.depth < :bound
            )
            SELECT chain.depth, chain.id, items.item_id, items.body FROM chain
            LEFT JOIN items ON items.response_id = chain.id
            ORDER BY chain.depth DESC, items.kind, items.position
            """,
            {"id": response_id, "ws": workspace_id, "bound": bound},
        ).fetchall()
        if not rows:
            return None
        if max_depth is not None and rows[0][0] >= max_depth:
            raise ChainTooDeep(max_depth)
        return [decode_item(body, owner, found_id) for _, owner, found_id, body in rows if body is not None]

    def find_items(self, workspace_id: str, item_ids: Sequence[str]) -> dict[str, response_pb2.Item]:
        """Stored items of this workspace by id (for item_reference inputs).

        Raises UnreadableRecord (with its ``item_id``) if one of them cannot be decoded.
        """
        if not item_ids:
            return {}
        marks = ",".join("?" * len(item_ids))
        rows = self._conn.execute(
            "SELECT item_id, response_id, body FROM items"
            f" WHERE workspace_id = ? AND item_id IN ({marks}) ORDER BY seq",
            [workspace_id, *item_ids],
        ).fetchall()
        return {found_id: decode_item(body, owner, found_id) for found_id, owner, body in rows}

    def list_input_items(
        self,
        workspace_id: str,
        response_id: str,
        *,
        limit: int,
        ascending: bool,
        after: str | None,
    ) -> InputItemsPage | None:
        """A page of a response's own input items; None if the response is unknown.

        Raises LookupError if ``after`` is not an input item of the response.
        """
        exists = self._conn.execute(
            "SELECT 1 FROM responses WHERE id = ? AND workspace_id = ?", [response_id, workspace_id]
        ).fetchone()
        if exists is None:
            return None
        if after is None:
            bound = -1 if ascending else 2**62
        else:
            row = self._conn.execute(
                "SELECT position FROM items WHERE response_id = ? AND kind = ? AND item_id = ?"
                " ORDER BY position LIMIT 1",
                [response_id, INPUT, after],
            ).fetchone()
            if row is None:
                raise LookupError(after)
            bound = row[0]
        comparison, direction = (">", "ASC") if ascending else ("<", "DESC")
        rows = self._conn.execute(
            f"SELECT body FROM items WHERE response_id = ? AND kind = ? AND position {comparison} ?"
            f" ORDER BY position {direction} LIMIT ?",
            [response_id, INPUT, bound, limit + 1],
        ).fetchall()
        items = [decode_item(body, response_id) for (body,) in rows[:limit]]
        return InputItemsPage(items=items, has_more=len(rows) > limit)

    def events_after(
        self, workspace_id: str, response_id: str, after: int
    ) -> list[events_pb2.ResponseStreamEvent]:
        """The stored events numbered above ``after``, in order.

        Raises UnreadableRecord at the first event that cannot be decoded, with the events
        before it in ``readable``.
        """
        rows = self._conn.execute(
            "SELECT e.body FROM events e JOIN responses r ON r.id = e.response_id"
            " WHERE e.response_id = ? AND r.workspace_id = ? AND e.sequence_number > ?"
            " ORDER BY e.sequence_number",
            [response_id, workspace_id, after],
        ).fetchall()
        return decode_events(response_id, (body for (body,) in rows))

    def last_sequence_number(self, response_id: str) -> int:
        row = self._conn.execute(
            "SELECT MAX(sequence_number) FROM events WHERE response_id = ?", [response_id]
        ).fetchone()
        return -1 if row is None or row[0] is None else int(row[0])

    def last_terminal_event(self, response_id: str) -> events_pb2.ResponseStreamEvent | None:
        """The response's last stored event if it ends the stream (completed, incomplete or
        failed), else None. Raises UnreadableRecord if it is terminal but cannot be decoded."""
        row = self._conn.execute(
            "SELECT body FROM events WHERE response_id = ? ORDER BY sequence_number DESC LIMIT 1",
            [response_id],
        ).fetchone()
        return terminal_event_of(response_id, row[0] if row is not None else None)
