"""Durable state behind the service: the ``ResponseStore`` interface and its engines.

Nothing outside this package knows SQL, row shapes or the engines' libraries; the server and
the CLI hold a ``ResponseStore`` from ``open_store``.
"""

from __future__ import annotations

from pathlib import Path

from venna.backends.store.protocol import (
    UNREADABLE_MESSAGE,
    ChainTooDeep,
    EventWatch,
    InputItemsPage,
    KeyRecord,
    Lease,
    PendingResponse,
    Renewal,
    ResponseStore,
    StoreUnavailable,
    UnreadableRecord,
    UsageTotal,
    WindowUse,
    Workspace,
    WorkspaceLimits,
    WorkspaceUnavailable,
    item_id,
    sum_usage,
    unreadable_response,
)
from venna.backends.store.records import ADMIN_KEY_PREFIX, KEY_PREFIX

__all__ = [
    "ADMIN_KEY_PREFIX",
    "KEY_PREFIX",
    "UNREADABLE_MESSAGE",
    "ChainTooDeep",
    "EventWatch",
    "InputItemsPage",
    "KeyRecord",
    "Lease",
    "PendingResponse",
    "Renewal",
    "ResponseStore",
    "StoreUnavailable",
    "UnreadableRecord",
    "UsageTotal",
    "WindowUse",
    "Workspace",
    "WorkspaceLimits",
    "WorkspaceUnavailable",
    "copy_store",
    "describe",
    "item_id",
    "open_store",
    "sum_usage",
    "unreadable_response",
]


def open_store(location: str | Path) -> ResponseStore:
    """The store at ``location``: a ``postgresql://`` URL, or a SQLite file path (created if
    missing). Await its ``open()`` before use. Raises StoreUnavailable, or OSError for a file
    it cannot create."""
    if isinstance(location, str) and location.startswith(("postgresql://", "postgres://")):
        from venna.backends.store.postgres import PostgresStore

        return PostgresStore(location)
    from venna.backends.store.sqlite import SqliteStore

    return SqliteStore(location)


async def copy_store(source: str | Path, target: str) -> dict[str, int]:
    """Copies every record of the SQLite file ``source`` into the empty PostgreSQL database
    ``target``, all or nothing; the rows copied, by table. Raises ValueError for any other pair
    of engines, FileNotFoundError, StoreUnavailable, or TargetNotEmpty (a ValueError)."""
    from venna.backends.store.transfer import copy_sqlite_to_postgres

    if "://" in str(source) or not target.startswith(("postgresql://", "postgres://")):
        raise ValueError("copies go from a SQLite file (--from PATH) to PostgreSQL (--to postgresql://…)")
    return (await copy_sqlite_to_postgres(Path(source), target)).rows


def describe(location: str | Path) -> str:
    """``location`` as messages and logs may show it: a URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    text = str(location)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))
