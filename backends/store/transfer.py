"""Moving a store to another engine: every record of a SQLite file copied into an empty
PostgreSQL database, in one transaction (all or nothing), keeping ids, keys and usage records.

The source is first brought up to the current schema (as ``venna serve`` would); the target is
created and migrated, and must hold nothing yet, so that a copy never merges two histories.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from venna.backends.store.postgres import PostgresStore
from venna.backends.store.protocol import StoreUnavailable
from venna.backends.store.sqlite import SqliteStore

BATCH_ROWS = 1000

# (table, columns, order): copied in this order, so that keys follow their workspaces and keys
# keep their creation order.
_TABLES: list[tuple[str, tuple[str, ...], str]] = [
    ("workspaces", ("id", "name", "created_at", "revoked_at"), "rowid"),
    ("api_keys", ("id", "workspace_id", "key_hash", "key_hint", "created_at", "revoked_at"), "rowid"),
    ("admin_keys", ("id", "key_hash", "key_hint", "created_at", "revoked_at"), "rowid"),
    (
        "workspace_limits",
        ("workspace_id", "requests_per_minute", "tokens_per_minute", "monthly_tokens"),
        "workspace_id",
    ),
    (
        "responses",
        (
            "id",
            "workspace_id",
            "previous_response_id",
            "status",
            "background",
            "created_at",
            "body",
            "request",
        ),
        "rowid",
    ),
    ("items", ("workspace_id", "response_id", "item_id", "kind", "position", "body"), "seq"),
    ("events", ("response_id", "sequence_number", "body"), "response_id, sequence_number"),
    (
        "usage",
        (
            "response_id",
            "workspace_id",
            "model",
            "status",
            "input_tokens",
            "output_tokens",
            "reasoning_tokens",
            "cached_tokens",
            "created_at",
            "finished_at",
        ),
        "workspace_id, created_at, response_id",
    ),
    ("conversations", ("id", "workspace_id", "created_at", "body"), "rowid"),
    # Copied in their order: the target numbers them anew, in the same order.
    ("conversation_items", ("conversation_id", "item_id", "body"), "seq"),
]
# Columns whose SQLite integers are PostgreSQL booleans.
_BOOLEANS = {("responses", "background")}


@dataclass(frozen=True)
class CopyReport:
    rows: dict[str, int]


class TargetNotEmpty(ValueError):
    """The target already holds records."""


async def copy_sqlite_to_postgres(source: Path, target_url: str) -> CopyReport:
    """Copies every record of the SQLite file ``source`` into the empty PostgreSQL database at
    ``target_url``. Raises FileNotFoundError, StoreUnavailable or TargetNotEmpty."""
    if not await asyncio.to_thread(source.is_file):
        raise FileNotFoundError(f"{source}: no such database file")
    migrated = SqliteStore(source)  # brings an older file up to the current schema
    await migrated.close()
    target = PostgresStore(target_url)
    await target.open()
    try:
        async with target.pool.acquire() as connection, connection.transaction():
            for table, _, _ in _TABLES:
                if await connection.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                    raise TargetNotEmpty(
                        f"the target database already has {table}; copy only into an empty one"
                    )
            counts: dict[str, int] = {}
            with _read_only(source) as reading:
                for table, columns, order in _TABLES:
                    marks = ", ".join(
                        f"${index}::integer::boolean" if (table, column) in _BOOLEANS else f"${index}"
                        for index, column in enumerate(columns, 1)
                    )
                    insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
                    cursor = reading.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
                    counts[table] = 0
                    while rows := cursor.fetchmany(BATCH_ROWS):
                        await connection.executemany(insert, rows)
                        counts[table] += len(rows)
    finally:
        await target.close()
    return CopyReport(counts)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise StoreUnavailable(f"{path}: {error}") from None
    try:
        yield connection
    finally:
        connection.close()
