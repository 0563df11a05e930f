"""The response store: responses, their items and stream events, and workspace keys, in SQLite.

Design points:

* Every row carries its workspace and every query filters on it, so an id from another
  workspace is indistinguishable from an unknown one.
* A response stores only its own new input items and its output items, never a copy of the
  history: storage grows linearly with a conversation. The context of a
  ``previous_response_id`` is rebuilt by one recursive query over the chain.
* Protos are stored as serialized bytes: compact, and decoding is cheaper than JSON.
* The class is synchronous and owns one connection; ``AsyncStore`` runs it on a single worker
  thread, so the event loop never blocks on SQLite and writes are naturally serialized.
* Billing reads the ``usage`` table: one row per finished response, stored or not, written in
  the same transaction as a stored response's final save. Rows have no foreign key and are
  never deleted with their response: usage outlives what it was used for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from venna.responses.v1 import events_pb2, response_pb2, service_pb2

log = logging.getLogger(__name__)

KEY_PREFIX = "vk_"
_INPUT, _OUTPUT = 0, 1

migrations = Migrations("venna")


@migrations()
def m001_initial(db: Database) -> None:
    """Workspaces, keys, responses, items and events."""
    db.table("workspaces").create(
        {"id": str, "name": str, "created_at": int}, pk="id", not_null={"name", "created_at"}
    )
    db.table("workspaces").create_index(["name"], unique=True)
    db.table("api_keys").create(
        {
            "id": str,
            "workspace_id": str,
            "key_hash": str,
            "key_hint": str,
            "created_at": int,
            "revoked_at": int,
        },
        pk="id",
        not_null={"workspace_id", "key_hash", "key_hint", "created_at"},
        foreign_keys=[("workspace_id", "workspaces", "id")],
    )
    db.table("api_keys").create_index(["key_hash"], unique=True)
    db.table("responses").create(
        {
            "id": str,
            "workspace_id": str,
            "previous_response_id": str,
            "status": int,
            "background": int,
            "created_at": int,
            "body": bytes,  # the Response without its output (that lives in items)
            "request": bytes,  # the CreateResponseRequest, kept until a background run ends
        },
        pk="id",
        not_null={"workspace_id", "status", "background", "created_at", "body"},
    )
    db.table("responses").create_index(["workspace_id", "id"])
    db.table("responses").create_index(["status"])
    db.table("items").create(
        {
            "seq": int,
            "workspace_id": str,
            "response_id": str,
            "item_id": str,
            "kind": int,  # 0 input, 1 output
            "position": int,
            "body": bytes,
        },
        pk="seq",
        not_null={"workspace_id", "response_id", "item_id", "kind", "position", "body"},
    )
    db.table("items").create_index(["response_id", "kind", "position"], unique=True)
    db.table("items").create_index(["workspace_id", "item_id"])
    db.execute(
        "CREATE TABLE events (response_id TEXT NOT NULL, sequence_number INTEGER NOT NULL,"
        " body BLOB NOT NULL, PRIMARY KEY (response_id, sequence_number)) WITHOUT ROWID"
    )


_TOKEN_COLUMNS = ("input_tokens", "output_tokens", "reasoning_tokens", "cached_tokens")


@migrations()
def m002_usage(db: Database) -> None:
    """Usage records, one per finished response, filled in from the responses already stored."""
    db.table("usage").create(
        {
            "response_id": str,
            "workspace_id": str,
            "model": str,
            "status": str,  # completed, incomplete, failed or cancelled
            **dict.fromkeys(_TOKEN_COLUMNS, int),
            "created_at": int,  # the response's creation, unix seconds
            "finished_at": int,
        },
        pk="response_id",
        not_null={"workspace_id", "model", "status", *_TOKEN_COLUMNS, "created_at", "finished_at"},
        defaults=dict.fromkeys(_TOKEN_COLUMNS, 0),
    )
    db.table("usage").create_index(["workspace_id", "created_at"])
    after = 0
    while True:  # in batches, so that a large database is not read into memory at once
        finished = db.execute(
            "SELECT rowid, id, workspace_id, status, created_at, body FROM responses"
            " WHERE rowid > ? AND status NOT IN (?, ?) ORDER BY rowid LIMIT 1000",
            [after, response_pb2.RESPONSE_STATUS_QUEUED, response_pb2.RESPONSE_STATUS_IN_PROGRESS],
        ).fetchall()
        if not finished:
            return
        rows = []
        for _, response_id, workspace_id, status, created_at, body in finished:
            # A body that cannot be decoded still has a usage record (with no tokens known).
            response = _decode(response_pb2.Response, body) or unreadable_response(
                response_id, created_at, background=False, status=status
            )
            finished_at = response.completed_at if response.HasField("completed_at") else response.created_at
            rows.append(_usage_row(workspace_id, response, finished_at))
        _insert_rows(db.conn, _USAGE_INSERT, rows)
        after = finished[-1][0]


# Unfinished responses, by status: the only ones recovery looks for.
_UNFINISHED_STATUSES = f"{response_pb2.RESPONSE_STATUS_QUEUED}, {response_pb2.RESPONSE_STATUS_IN_PROGRESS}"


@migrations()
def m003_fewer_index_writes(db: Database) -> None:
    """Fewer B-trees written per stored response; every commit writes each page it touched.

    * Lookups by response id use the primary key: the (workspace, id) index goes.
    * The status index keeps only unfinished responses (a partial index), the ones recovery
      looks for, so a response stored finished does not touch it.
    * Usage records live in one B-tree keyed by what reports read, (workspace, created_at,
      response), instead of a rowid table, a key index and a report index. A response's
      record keeps its key, so writing it again still replaces it.
    """
    db.execute("DROP INDEX IF EXISTS idx_responses_workspace_id_id")
    db.execute("DROP INDEX IF EXISTS idx_responses_status")
    db.execute(
        "CREATE INDEX idx_responses_unfinished ON responses (status)"
        f" WHERE status IN ({_UNFINISHED_STATUSES})"
    )
    names = ("response_id", "workspace_id", "model", "status", *_TOKEN_COLUMNS, "created_at", "finished_at")
    columns = ", ".join(names)
    tokens = ", ".join(f"{name} INTEGER NOT NULL DEFAULT 0" for name in _TOKEN_COLUMNS)
    db.execute(
        "CREATE TABLE usage_by_time (response_id TEXT NOT NULL, workspace_id TEXT NOT NULL,"
        f" model TEXT NOT NULL, status TEXT NOT NULL, {tokens}, created_at INTEGER NOT NULL,"
        " finished_at INTEGER NOT NULL, PRIMARY KEY (workspace_id, created_at, response_id))"
        " WITHOUT ROWID"
    )
    db.execute(f"INSERT INTO usage_by_time ({columns}) SELECT {columns} FROM usage")
    db.execute("DROP TABLE usage")
    db.execute("ALTER TABLE usage_by_time RENAME TO usage")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    workspace: str
    hint: str
    created_at: int
    revoked_at: int | None


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    name: str
    created_at: int


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Token totals of usage records: of one model, or of all of them (``model`` None)."""

    model: str | None
    responses: int
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    total_tokens: int


def sum_usage(totals: Sequence[UsageTotal]) -> UsageTotal:
    """One total (model None) over several, e.g. over the per-model totals."""
    return UsageTotal(
        model=None,
        responses=sum(total.responses for total in totals),
        input_tokens=sum(total.input_tokens for total in totals),
        output_tokens=sum(total.output_tokens for total in totals),
        reasoning_tokens=sum(total.reasoning_tokens for total in totals),
        cached_tokens=sum(total.cached_tokens for total in totals),
        total_tokens=sum(total.total_tokens for total in totals),
    )


@dataclass(frozen=True, slots=True)
class InputItemsPage:
    items: list[response_pb2.Item]
    has_more: bool


@dataclass(frozen=True, slots=True)
class PendingResponse:
    """A background response that had not finished when the server last stopped."""

    workspace_id: str
    response: response_pb2.Response
    request: service_pb2.CreateResponseRequest | None
    # The stored body or request could not be decoded: ``response`` is then a placeholder
    # (``unreadable_response``) with the row's status, and ``request`` is None.
    unreadable: bool = False


class UnreadableRecord(Exception):
    """A stored record that cannot be decoded (corrupt bytes, or a message nested deeper than
    protobuf's parser accepts although its serializer wrote it).

    Raised per row, so that one such record fails the calls that need it and nothing else.
    ``item_id`` names the unreadable item, if it was an item; ``readable`` holds the events
    read before an unreadable one (``events_after``).
    """

    def __init__(
        self,
        response_id: str,
        *,
        created_at: int = 0,
        background: bool = False,
        item_id: str | None = None,
        readable: Sequence[events_pb2.ResponseStreamEvent] = (),
    ) -> None:
        super().__init__(f"stored record of response {response_id} cannot be decoded")
        self.response_id = response_id
        self.created_at = created_at
        self.background = background
        self.item_id = item_id
        self.readable = list(readable)


class ChainTooDeep(Exception):
    """A ``previous_response_id`` chain longer than the limit a caller gave."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"chain longer than {limit} responses")
        self.limit = limit


UNREADABLE_MESSAGE = "The stored response could not be read."


def unreadable_response(
    response_id: str, created_at: int, *, background: bool, status: int = response_pb2.RESPONSE_STATUS_FAILED
) -> response_pb2.Response:
    """What is known of a response whose stored body cannot be decoded: its id, creation
    time and kind from the row's columns, failed with ``server_error``."""
    response = response_pb2.Response(
        id=response_id, object="response", created_at=created_at, background=background
    )
    response.status = status  # type: ignore[assignment]  # the row's status column
    response.error.code = "server_error"
    response.error.message = UNREADABLE_MESSAGE
    return response


_M = TypeVar("_M", bound=Message)


def _decode(message_type: type[_M], body: bytes) -> _M | None:
    """The decoded message, or None if ``body`` cannot be decoded."""
    try:
        return message_type.FromString(body)
    except DecodeError:
        return None


# The members of ResponseStreamEvent's union that end a response's stream.
_TERMINAL_EVENT_FIELDS = frozenset(
    events_pb2.ResponseStreamEvent.DESCRIPTOR.fields_by_name[name].number
    for name in ("completed", "incomplete", "failed")
)


def _is_terminal_event(body: bytes) -> bool:
    """Whether a stored event is terminal, read from its top-level fields only: this works
    even when the event's snapshot is nested too deeply to decode."""
    try:
        shallow = empty_pb2.Empty.FromString(body)  # every field is unknown, none is descended into
    except DecodeError:
        return False
    fields = UnknownFieldSet(shallow)
    return any(fields[index].field_number in _TERMINAL_EVENT_FIELDS for index in range(len(fields)))


def _hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a fast unsalted hash cannot be brute-forced.
    return hashlib.sha256(key.encode()).hexdigest()


# A usage record's status by the response's: "completed", "failed", ...
_STATUS_NAMES = {
    value: name.removeprefix("RESPONSE_STATUS_").lower()
    for name, value in response_pb2.ResponseStatus.items()
}


def _usage_row(
    workspace_id: str, response: response_pb2.Response, finished_at: int
) -> tuple[str, str, str, str, int, int, int, int, int, int]:
    usage = response.usage
    return (
        response.id,
        workspace_id,
        response.model,
        _STATUS_NAMES[response.status],
        usage.input_tokens,
        usage.output_tokens,
        usage.output_tokens_details.reasoning_tokens,
        usage.input_tokens_details.cached_tokens,
        response.created_at,
        finished_at,
    )


@dataclass(slots=True)
class NewRows:
    """Rows of new records, built by the caller and inserted by ``Store.insert``.

    Only inserts of records nobody can know of yet (a new response, its items and events, a
    usage record), so that inserts queued together can be merged into one statement per table
    (``AsyncStore.insert``) without changing what anyone reads.
    """

    usage: list[tuple[object, ...]] = field(default_factory=list)
    responses: list[tuple[object, ...]] = field(default_factory=list)
    items: list[tuple[object, ...]] = field(default_factory=list)
    events: list[tuple[object, ...]] = field(default_factory=list)

    def add(self, other: NewRows) -> None:
        self.usage += other.usage
        self.responses += other.responses
        self.items += other.items
        self.events += other.events


def new_response_rows(
    workspace_id: str,
    response: response_pb2.Response,
    input_items: Sequence[response_pb2.Item],
    *,
    request: service_pb2.CreateResponseRequest | None = None,
    events: Sequence[events_pb2.ResponseStreamEvent] = (),
    finished: bool = False,
) -> NewRows:
    """The rows of a new response with its input and output items (and, for background runs,
    its request and first events); ``finished`` adds its usage record."""
    return NewRows(
        usage=[_usage_row(workspace_id, response, int(time.time()))] if finished else [],
        responses=[
            (
                response.id,
                workspace_id,
                response.previous_response_id if response.HasField("previous_response_id") else None,
                response.status,
                int(response.background),
                response.created_at,
                _body_without_output(response),
                request.SerializeToString() if request is not None else None,
            )
        ],
        items=_item_rows(workspace_id, response.id, input_items, response.output),
        events=_event_rows(response.id, events),
    )


def usage_rows(workspace_id: str, response: response_pb2.Response) -> NewRows:
    """The usage record of a finished response that is not stored (``store: false``)."""
    return NewRows(usage=[_usage_row(workspace_id, response, int(time.time()))])


def _item_rows(
    workspace_id: str,
    response_id: str,
    input_items: Sequence[response_pb2.Item],
    output_items: Sequence[response_pb2.Item],
) -> list[tuple[object, ...]]:
    return [
        (workspace_id, response_id, item_id(item), kind, position, item.SerializeToString())
        for kind, items in ((_INPUT, input_items), (_OUTPUT, output_items))
        for position, item in enumerate(items)
    ]


def event_rows(response_id: str, events: Sequence[events_pb2.ResponseStreamEvent]) -> NewRows:
    """Stream events of a stored response, in addition to those it has."""
    return NewRows(events=_event_rows(response_id, events))


def _event_rows(
    response_id: str, events: Sequence[events_pb2.ResponseStreamEvent]
) -> list[tuple[object, ...]]:
    return [(response_id, event.sequence_number, event.SerializeToString()) for event in events]


# How each kind of new row is inserted: the statement up to VALUES, and the number of columns.
# Events are idempotent (a write retried after an interruption may repeat some); a usage
# record written again replaces the earlier one.
_USAGE_INSERT = (
    "INSERT OR REPLACE INTO usage (response_id, workspace_id, model, status, input_tokens,"
    " output_tokens, reasoning_tokens, cached_tokens, created_at, finished_at) VALUES ",
    10,
)
_RESPONSE_INSERT = (
    "INSERT INTO responses (id, workspace_id, previous_response_id, status, background, created_at,"
    " body, request) VALUES ",
    8,
)
_ITEM_INSERT = ("INSERT INTO items (workspace_id, response_id, item_id, kind, position, body) VALUES ", 6)
_EVENT_INSERT = ("INSERT OR IGNORE INTO events (response_id, sequence_number, body) VALUES ", 3)
# Rows per statement at most; a statement per power of two below it, so that SQLite's
# statement cache holds every variant.
_MAX_ROWS_PER_STATEMENT = 64


@functools.lru_cache(maxsize=64)
def _values_statement(head: str, columns: int, rows: int) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    return head + ", ".join([row] * rows)


def _insert_rows(
    conn: sqlite3.Connection, insert: tuple[str, int], rows: Sequence[tuple[object, ...]]
) -> None:
    """Inserts ``rows`` with as few statements as possible (chunks of 64, 32, … 1 rows)."""
    head, columns = insert
    start = 0
    while start < len(rows):
        size = min(_MAX_ROWS_PER_STATEMENT, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + size]
        conn.execute(_values_statement(head, columns, size), [value for row in chunk for value in row])
        start += size


def item_id(item: response_pb2.Item) -> str:
    """The id of whichever member of the item union is set."""
    kind = item.WhichOneof("item")
    return getattr(item, kind).id if kind else ""


# Conversations and key hashes are nobody else's business: the database is readable by its
# owner only. SQLite creates the -wal and -shm files with the database file's mode.
_FILE_MODE = 0o600
_DIRECTORY_MODE = 0o700
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _prepare_private_file(path: Path) -> None:
    """Creates the database file (and missing directories) for its owner only, whatever the
    umask; tightens an existing file (and its side files) that others could read. A directory
    that exists already keeps its mode: it may be shared on purpose."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by someone else: theirs
            os.mkdir(directory, _DIRECTORY_MODE)
            os.chmod(directory, _DIRECTORY_MODE)  # the umask may have taken bits away
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(descriptor, _FILE_MODE)  # exactly, whatever the umask
        finally:
            os.close(descriptor)
    for file in (path, *(path.with_name(path.name + suffix) for suffix in _SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o777 != _FILE_MODE:
                os.chmod(file, _FILE_MODE)


class Store:
    """Synchronous access to one SQLite database file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _prepare_private_file(self.path)
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

    def create_key(self, workspace_name: str) -> tuple[str, KeyRecord]:
        """Creates a key (and the workspace, if new); the plaintext is returned only here."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = int(time.time())
        with self._transaction():
            row = self._conn.execute("SELECT id FROM workspaces WHERE name = ?", [workspace_name]).fetchone()
            if row:
                workspace_id = row[0]
            else:
                workspace_id = "ws_" + secrets.token_hex(12)
                self._conn.execute(
                    "INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, ?)",
                    [workspace_id, workspace_name, now],
                )
            record = KeyRecord(
                id="key_" + secrets.token_hex(8),
                workspace=workspace_name,
                hint=key[:7] + "…" + key[-4:],
                created_at=now,
                revoked_at=None,
            )
            self._conn.execute(
                "INSERT INTO api_keys (id, workspace_id, key_hash, key_hint, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [record.id, workspace_id, _hash_key(key), record.hint, now],
            )
        return key, record

    def list_keys(self) -> list[KeyRecord]:
        rows = self._conn.execute(
            "SELECT k.id, w.name, k.key_hint, k.created_at, k.revoked_at FROM api_keys k"
            " JOIN workspaces w ON w.id = k.workspace_id ORDER BY k.created_at, k.rowid"
        ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._transaction():
            cursor = self._conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                [int(time.time()), key_id],
            )
        return cursor.rowcount == 1

    def list_workspaces(self) -> list[Workspace]:
        rows = self._conn.execute("SELECT id, name, created_at FROM workspaces ORDER BY name").fetchall()
        return [Workspace(*row) for row in rows]

    def authenticate(self, key: str) -> str | None:
        """The workspace id of a valid, unrevoked key."""
        if not key.startswith(KEY_PREFIX):
            return None
        row = self._conn.execute(
            "SELECT workspace_id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
            [_hash_key(key)],
        ).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------------------------- responses

    def insert(self, rows: NewRows) -> None:
        """Inserts new records, all or nothing."""
        with self._transaction():
            _insert_rows(self._conn, _USAGE_INSERT, rows.usage)
            _insert_rows(self._conn, _RESPONSE_INSERT, rows.responses)
            _insert_rows(self._conn, _ITEM_INSERT, rows.items)
            _insert_rows(self._conn, _EVENT_INSERT, rows.events)

    def save_response(
        self,
        workspace_id: str,
        response: response_pb2.Response,
        *,
        events: Sequence[events_pb2.ResponseStreamEvent] = (),
        finished: bool = False,
    ) -> bool:
        """Updates a stored response and replaces its output; False if it no longer exists.

        ``finished`` drops the kept request (a finished background run is never re-run) and
        writes the response's usage record, even when the response was deleted meanwhile: its
        tokens were spent all the same.
        """
        with self._transaction():
            cursor = self._conn.execute(
                "UPDATE responses SET status = ?, body = ?"
                + (", request = NULL" if finished else "")
                + " WHERE id = ? AND workspace_id = ?",
                [response.status, _body_without_output(response), response.id, workspace_id],
            )
            if finished:
                _insert_rows(
                    self._conn, _USAGE_INSERT, [_usage_row(workspace_id, response, int(time.time()))]
                )
            if cursor.rowcount != 1:
                return False
            self._conn.execute("DELETE FROM items WHERE response_id = ? AND kind = ?", [response.id, _OUTPUT])
            _insert_rows(self._conn, _ITEM_INSERT, _item_rows(workspace_id, response.id, (), response.output))
            _insert_rows(self._conn, _EVENT_INSERT, _event_rows(response.id, events))
        return True

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
        response = _decode(response_pb2.Response, body)
        if response is None:
            raise UnreadableRecord(response_id, created_at=created_at, background=bool(background))
        for (item_body,) in self._conn.execute(
            "SELECT body FROM items WHERE response_id = ? AND kind = ? ORDER BY position",
            [response_id, _OUTPUT],
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
        context: list[response_pb2.Item] = []
        for _, owner, found_id, body in rows:
            if body is None:
                continue
            item = _decode(response_pb2.Item, body)
            if item is None:
                raise UnreadableRecord(owner, item_id=found_id)
            context.append(item)
        return context

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
        found: dict[str, response_pb2.Item] = {}
        for found_id, owner, body in rows:
            item = _decode(response_pb2.Item, body)
            if item is None:
                raise UnreadableRecord(owner, item_id=found_id)
            found[found_id] = item
        return found

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
                [response_id, _INPUT, after],
            ).fetchone()
            if row is None:
                raise LookupError(after)
            bound = row[0]
        comparison, direction = (">", "ASC") if ascending else ("<", "DESC")
        rows = self._conn.execute(
            f"SELECT body FROM items WHERE response_id = ? AND kind = ? AND position {comparison} ?"
            f" ORDER BY position {direction} LIMIT ?",
            [response_id, _INPUT, bound, limit + 1],
        ).fetchall()
        items: list[response_pb2.Item] = []
        for (body,) in rows[:limit]:
            item = _decode(response_pb2.Item, body)
            if item is None:
                raise UnreadableRecord(response_id)
            items.append(item)
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
        events: list[events_pb2.ResponseStreamEvent] = []
        for (body,) in rows:
            event = _decode(events_pb2.ResponseStreamEvent, body)
            if event is None:
                raise UnreadableRecord(response_id, readable=events)
            events.append(event)
        return events

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
        if row is None or not _is_terminal_event(row[0]):
            return None
        event = _decode(events_pb2.ResponseStreamEvent, row[0])
        if event is None:
            raise UnreadableRecord(response_id)
        return event

    def pending_responses(self) -> list[PendingResponse]:
        """Responses left queued or in progress, oldest first (for recovery at start-up).

        A row whose body or request cannot be decoded comes as ``unreadable``, so that one
        such row never stops recovery of the others.
        """
        rows = self._conn.execute(
            # The statuses are literals, so that SQLite can use the partial index.
            "SELECT id, workspace_id, status, background, created_at, body, request FROM responses"
            f" WHERE status IN ({_UNFINISHED_STATUSES}) ORDER BY created_at, rowid"
        ).fetchall()
        pending: list[PendingResponse] = []
        for response_id, workspace_id, status, background, created_at, body, request in rows:
            response = _decode(response_pb2.Response, body)
            kept = _decode(service_pb2.CreateResponseRequest, request) if request else None
            unreadable = response is None or (request is not None and kept is None)
            if response is None:
                response = unreadable_response(
                    response_id, created_at, background=bool(background), status=status
                )
            pending.append(PendingResponse(workspace_id, response, kept, unreadable=unreadable))
        return pending


def _body_without_output(response: response_pb2.Response) -> bytes:
    body = response_pb2.Response()
    body.CopyFrom(response)
    body.ClearField("output")
    return body.SerializeToString()


_P = ParamSpec("_P")
_T = TypeVar("_T")


class AsyncStore:
    """Runs a Store's calls on one dedicated thread, off the event loop, committing together.

    Calls queue up while the thread works; it then takes all that are waiting (up to
    MAX_BATCH) and runs them in one transaction, each in a savepoint of its own, so that
    concurrent requests share one commit (group commit) and a failing call undoes only itself.
    Inserts of new records (``insert``) queued one after another are merged into one statement
    per table. The callers of a batch are woken together, with one wake-up of their event loop.
    """

    MAX_BATCH = 64
    # Once a batch shows that several callers write at the same time, the thread lets calls
    # gather for a moment before the next one: a commit and the thread and loop wake-ups
    # around it cost as much as the writes of several calls, so concurrent writers are served
    # with less work in all (about a fifth more creates per second at 16 callers). Fewer
    # concurrent callers never wait.
    LINGER_SECONDS = 0.001
    LINGER_AFTER_BATCH = 5
    # Checkpoints (copying the write-ahead log into the database file, with their fsyncs) run
    # on a thread and connection of their own, so that no commit waits for one: a commit that
    # ran SQLite's automatic checkpoint held up every caller of its batch for milliseconds.
    # The writer checkpoints by itself only once the log has grown this long regardless.
    CHECKPOINT_SECONDS = 0.1
    WAL_LIMIT_PAGES = 16384

    def __init__(self, store: Store) -> None:
        self.store = store
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closed = False
        store.db.conn.execute(f"PRAGMA wal_autocheckpoint={self.WAL_LIMIT_PAGES}")
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint, name="venna-checkpoint", daemon=True)
        self._checkpointer.start()
        self._thread = threading.Thread(target=self._work, name="venna-store", daemon=True)
        self._thread.start()

    # Both return the future of the call's result rather than being coroutines: a write is on
    # the path of every create, and each coroutine layer costs.
    def call(self, method: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> asyncio.Future[_T]:
        """Queues ``method(*args, **kwargs)`` for the store's thread; await the result."""
        return self._queue(functools.partial(method, *args, **kwargs))

    def insert(self, rows: NewRows) -> asyncio.Future[None]:
        """Queues an insert of new records (``Store.insert``); rows are built by the caller, so
        what is written is the records as they were at the call."""
        return self._queue(rows)

    def _queue(self, work: Callable[[], object] | NewRows) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((work, loop, future))
        return future

    def close(self) -> None:
        """Runs the calls already queued, then closes the database."""
        if self._closed:
            return
        self._closed = True
        self._calls.put(None)
        self._thread.join()
        self._stop_checkpoints.set()
        self._checkpointer.join()
        self.store.close()

    def _checkpoint(self) -> None:
        conn = sqlite3.connect(self.store.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            while not self._stop_checkpoints.wait(self.CHECKPOINT_SECONDS):
                try:
                    # PASSIVE: copies what it can without waiting for (or holding up) anyone.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    log.warning(
                        "checkpoint failed; the writer checkpoints once the log is long", exc_info=True
                    )
        finally:
            conn.close()

    def _work(self) -> None:
        linger = 0.0
        while True:
            first = self._calls.get()
            if first is None:
                return
            if linger:
                time.sleep(linger)
            batch = [first]
            stop = False
            while len(batch) < self.MAX_BATCH:
                try:
                    call = self._calls.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    stop = True
                    break
                batch.append(call)
            alone = len(batch) == 1
            outcomes = [_attempt(self._work_of(first))] if alone else self._run_together(batch)
            linger = self.LINGER_SECONDS if len(batch) >= self.LINGER_AFTER_BATCH else 0.0
            settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, object]]] = {}
            for (_, loop, future), (ok, value) in zip(batch, outcomes, strict=True):
                settled.setdefault(loop, []).append((future, ok, value))
            for loop, results in settled.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, results)
            if stop:
                return

    def _work_of(self, call: _Call) -> Callable[[], object]:
        work = call[0]
        if isinstance(work, NewRows):
            return functools.partial(self.store.insert, work)
        return work

    def _run_together(self, batch: list[_Call]) -> list[_Outcome]:
        """Runs the calls in one transaction. A batch of inserts alone is first tried as one
        insert; otherwise (or if that fails) each call gets a savepoint, and consecutive
        inserts are tried as one first unless they already failed together."""
        merge = True
        if all(isinstance(call[0], NewRows) for call in batch):
            outcome = _attempt(functools.partial(self.store.insert, _merged(batch)))
            if outcome[0]:
                return [outcome] * len(batch)
            merge = False  # one of them fails: find it
        conn = self.store.db.conn
        outcomes: list[_Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            start = 0
            while start < len(batch):
                end = start + 1
                while merge and end < len(batch) and isinstance(batch[start][0], NewRows):
                    if not isinstance(batch[end][0], NewRows):
                        break
                    end += 1
                if end - start > 1:
                    insert = functools.partial(self.store.insert, _merged(batch[start:end]))
                    if self._in_savepoint(insert, outcomes)[0]:
                        outcomes += [(True, None)] * (end - start)
                        start = end
                        continue
                # One by one: a failing insert of a merged group is found and fails alone.
                for call in batch[start:end]:
                    outcomes.append(self._in_savepoint(self._work_of(call), outcomes))
                start = end
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(False, error)] * len(batch)
        return outcomes

    def _in_savepoint(self, work: Callable[[], object], earlier: list[_Outcome]) -> _Outcome:
        """Runs ``work`` in a savepoint of the batch's transaction. Should its failure end the
        whole transaction, the ``earlier`` outcomes of the batch become that failure too (their
        writes are undone) and a new transaction begins."""
        conn = self.store.db.conn
        conn.execute("SAVEPOINT call")
        outcome = _attempt(work)
        if not conn.in_transaction:
            error = outcome[1] if not outcome[0] else sqlite3.OperationalError("transaction lost")
            earlier[:] = [(False, error)] * len(earlier)
            conn.execute("BEGIN IMMEDIATE")
            return (False, error)
        if not outcome[0]:
            conn.execute("ROLLBACK TO call")
        conn.execute("RELEASE call")
        return outcome


# A queued call: the work (a function, or new rows to insert), and its caller's loop and future.
_Call = tuple[Callable[[], object] | NewRows, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
# Whether the work succeeded, and its result or exception.
_Outcome = tuple[bool, object]


def _merged(calls: Sequence[_Call]) -> NewRows:
    """The rows of several insert calls together."""
    merged = NewRows()
    for work, _, _ in calls:
        assert isinstance(work, NewRows)
        merged.add(work)
    return merged


def _attempt(work: Callable[[], object]) -> _Outcome:
    try:
        return True, work()
    except Exception as error:
        return False, error


def _settle(results: list[tuple[asyncio.Future[Any], bool, object]]) -> None:
    for future, ok, value in results:
        if future.cancelled():
            continue  # the caller went away; the work is done (and committed) all the same
        if ok:
            future.set_result(value)
        else:
            assert isinstance(value, BaseException)
            future.set_exception(value)
