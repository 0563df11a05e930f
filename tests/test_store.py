"""The store's worker thread: calls queued together share one transaction, and a failing call
undoes only its own writes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from backends.store import AsyncStore, Store


def _insert_then_fail(store: Store, name: str) -> None:
    with store.db.atomic():
        store.db.conn.execute("INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, 0)", [name, name])
        raise ValueError("refused after writing")


async def test_calls_queued_together_commit_together_and_fail_alone(tmp_path: Path) -> None:
    db = AsyncStore(Store(tmp_path / "venna.db"))
    try:
        # The worker is busy with the first call while the others queue up behind it.
        blocker = asyncio.ensure_future(db.call(time.sleep, 0.2))
        await asyncio.sleep(0.05)
        creates = [asyncio.ensure_future(db.call(db.store.create_key, f"ws-{n}")) for n in range(10)]
        failing = asyncio.ensure_future(db.call(_insert_then_fail, db.store, "doomed"))
        more = [asyncio.ensure_future(db.call(db.store.create_key, f"late-{n}")) for n in range(5)]
        await blocker
        keys = await asyncio.gather(*creates, *more)
        with pytest.raises(ValueError, match="refused after writing"):
            await failing
        assert len({key for key, _ in keys}) == 15
    finally:
        db.close()
    # Durable: another connection sees every committed call, and nothing of the failed one.
    with sqlite3.connect(tmp_path / "venna.db") as check:
        names = {row[0] for row in check.execute("SELECT name FROM workspaces")}
    assert names == {f"ws-{n}" for n in range(10)} | {f"late-{n}" for n in range(5)}


async def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    db = AsyncStore(Store(tmp_path / "venna.db"))
    db.close()
    with pytest.raises(RuntimeError, match="closed"):
        await db.call(db.store.list_keys)
