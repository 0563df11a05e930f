"""The SQLite schema: numbered migrations applied at start, and a database file only its owner
can read."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from venna.backends.store.protocol import (
    unreadable_response,
)
from venna.backends.store.records import decode, usage_row
from venna.backends.store.sqlite.rows import USAGE_INSERT, insert_rows
from venna.responses.v1 import response_pb2

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
            response = decode(response_pb2.Response, body) or unreadable_response(
                response_id, created_at, background=False, status=status
            )
            finished_at = response.completed_at if response.HasField("completed_at") else response.created_at
            rows.append(usage_row(workspace_id, response, finished_at))
        insert_rows(db.conn, USAGE_INSERT, rows)
        after = finished[-1][0]


# Unfinished responses, by status: the only ones recovery looks for.
UNFINISHED_STATUSES = f"{response_pb2.RESPONSE_STATUS_QUEUED}, {response_pb2.RESPONSE_STATUS_IN_PROGRESS}"


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
        f"CREATE INDEX idx_responses_unfinished ON responses (status) WHERE status IN ({UNFINISHED_STATUSES})"
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


@migrations()
def m004_leases(db: Database) -> None:
    """Who runs each unfinished response (the owner's lease, in unix milliseconds), and
    whether somebody asked to cancel it. Responses already stored are nobody's: the next start
    claims the unfinished ones."""
    db.execute("ALTER TABLE responses ADD COLUMN owner TEXT")
    db.execute("ALTER TABLE responses ADD COLUMN lease_until INTEGER")
    db.execute("ALTER TABLE responses ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0")


@migrations()
def m005_conversations(db: Database) -> None:
    """Conversations and their items, in the order they were added."""
    db.execute(
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL,"
        " created_at INTEGER NOT NULL, body BLOB NOT NULL)"
    )
    db.execute(
        "CREATE TABLE conversation_items (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " conversation_id TEXT NOT NULL, item_id TEXT NOT NULL, body BLOB NOT NULL)"
    )
    db.execute("CREATE INDEX conversation_items_in_order ON conversation_items (conversation_id, seq)")
    db.execute("CREATE INDEX conversation_items_by_id ON conversation_items (conversation_id, item_id)")


@migrations()
def m006_administration(db: Database) -> None:
    """Revoked workspaces, admin keys, limits per workspace and the rate windows that enforce
    them."""
    db.execute("ALTER TABLE workspaces ADD COLUMN revoked_at INTEGER")
    db.execute(
        "CREATE TABLE admin_keys (id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE,"
        " key_hint TEXT NOT NULL, created_at INTEGER NOT NULL, revoked_at INTEGER)"
    )
    db.execute(
        "CREATE TABLE workspace_limits (workspace_id TEXT PRIMARY KEY, requests_per_minute INTEGER,"
        " tokens_per_minute INTEGER, monthly_tokens INTEGER)"
    )
    db.execute(
        "CREATE TABLE rate_windows (workspace_id TEXT NOT NULL, window_start INTEGER NOT NULL,"
        " requests INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (workspace_id, window_start))"
    )


# Conversations and key hashes are nobody else's business: the database is readable by its
# owner only. SQLite creates the -wal and -shm files with the database file's mode.
_FILE_MODE = 0o600
_DIRECTORY_MODE = 0o700
_SIDE_FILES = ("-wal", "-shm", "-journal")


def prepare_private_file(path: Path) -> None:
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
