"""SQLite's inserts of new records: as few statements as possible, merged across a batch."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence

# The store's clock, in unix milliseconds (leases expire by it).
NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"


def _row(columns: int) -> str:
    return "(" + ", ".join("?" * columns) + ")"


# How each kind of new row is inserted: the statement up to VALUES, and one row's values.
# Events are idempotent (a write retried after an interruption may repeat some); a usage
# record written again replaces the earlier one. A response's lease is given as a length.
USAGE_INSERT = (
    "INSERT OR REPLACE INTO usage (response_id, workspace_id, model, status, input_tokens,"
    " output_tokens, reasoning_tokens, cached_tokens, created_at, finished_at) VALUES ",
    _row(10),
)
RESPONSE_INSERT = (
    "INSERT INTO responses (id, workspace_id, previous_response_id, status, background, created_at,"
    " body, request, owner, lease_until) VALUES ",
    f"(?, ?, ?, ?, ?, ?, ?, ?, ?, {NOW_MS} + ?)",
)
ITEM_INSERT = (
    "INSERT INTO items (workspace_id, response_id, item_id, kind, position, body) VALUES ",
    _row(6),
)
EVENT_INSERT = ("INSERT OR IGNORE INTO events (response_id, sequence_number, body) VALUES ", _row(3))
# Rows per statement at most; a statement per power of two below it, so that SQLite's
# statement cache holds every variant.
_MAX_ROWS_PER_STATEMENT = 64


@functools.lru_cache(maxsize=64)
def _values_statement(head: str, row: str, rows: int) -> str:
    return head + ", ".join([row] * rows)


def insert_rows(
    conn: sqlite3.Connection, insert: tuple[str, str], rows: Sequence[tuple[object, ...]]
) -> None:
    """Inserts ``rows`` with as few statements as possible (chunks of 64, 32, … 1 rows)."""
    head, row = insert
    start = 0
    while start < len(rows):
        size = min(_MAX_ROWS_PER_STATEMENT, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + size]
        conn.execute(_values_statement(head, row, size), [value for row in chunk for value in row])
        start += size
