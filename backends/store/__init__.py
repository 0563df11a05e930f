"""Durable state behind the service: the ``ResponseStore`` interface and its engines.

Nothing outside this package knows SQL, row shapes or the engines' libraries; the server and
the CLI hold a ``ResponseStore`` from ``open_store``.
"""

from __future__ import annotations

from pathlib import Path

from venna.backends.store.protocol import (
    UNREADABLE_MESSAGE,
    ChainTooDeep,
    InputItemsPage,
    KeyRecord,
    PendingResponse,
    ResponseStore,
    StoreUnavailable,
    UnreadableRecord,
    UsageTotal,
    Workspace,
    item_id,
    sum_usage,
    unreadable_response,
)

__all__ = [
    "UNREADABLE_MESSAGE",
    "ChainTooDeep",
    "InputItemsPage",
    "KeyRecord",
    "PendingResponse",
    "ResponseStore",
    "StoreUnavailable",
    "UnreadableRecord",
    "UsageTotal",
    "Workspace",
    "item_id",
    "open_store",
    "sum_usage",
    "unreadable_response",
]


def open_store(location: str | Path) -> ResponseStore:
    """The store at ``location``: a SQLite file path (created if missing, migrated to the
    current schema). Raises StoreUnavailable, or OSError for a path it cannot create."""
    from venna.backends.store.sqlite import SqliteStore

    return SqliteStore(location)
