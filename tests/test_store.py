"""The store's worker thread: calls queued together share one transaction, inserts queued
together are merged, and a failing call undoes only its own writes."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from venna.backends.store.records import NewRows, new_response_rows
from venna.backends.store.sqlite.queries import Store
from venna.backends.store.sqlite.writer import AsyncStore
from venna.responses.v1 import response_pb2
from venna.server.ids import new_id


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


def _response_rows(response_id: str) -> NewRows:
    response = response_pb2.Response(id=response_id, object="response", model="echo", created_at=1)
    response.status = response_pb2.RESPONSE_STATUS_COMPLETED
    response.output.add().message.id = new_id("msg")
    question = response_pb2.Item()
    question.message.id = new_id("msg")
    question.message.content.add().input_text.text = f"question of {response_id}"
    return new_response_rows("ws_test", response, [question], finished=True)


async def _queued_behind_a_busy_worker(
    db: AsyncStore, calls: list[Callable[[], Awaitable[Any]]]
) -> list[Any]:
    """Makes the calls while the worker is busy, so that they queue up and form one batch."""
    blocker = db.call(time.sleep, 0.2)
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(call()) for call in calls]
    await blocker
    return await asyncio.gather(*queued, return_exceptions=True)


@pytest.mark.parametrize("with_other_calls", [False, True], ids=["inserts-alone", "mixed"])
async def test_inserts_queued_together_are_merged_and_a_failing_one_fails_alone(
    tmp_path: Path, with_other_calls: bool
) -> None:
    db = AsyncStore(Store(tmp_path / "venna.db"))
    try:
        taken = new_id("resp")
        await db.insert(_response_rows(taken))
        fresh = [new_id("resp") for _ in range(6)]
        rows = [_response_rows(response_id) for response_id in [*fresh[:3], taken, *fresh[3:]]]
        calls: list[Callable[[], Awaitable[Any]]] = [functools.partial(db.insert, each) for each in rows]
        # rows[3] has an id that is taken already: refused.
        if with_other_calls:
            calls.insert(4, functools.partial(db.call, db.store.create_key, "between"))
        results = await _queued_behind_a_busy_worker(db, calls)
    finally:
        db.close()
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert all(not isinstance(result, BaseException) for index, result in enumerate(results) if index != 3)
    with sqlite3.connect(tmp_path / "venna.db") as check:
        stored = {row[0] for row in check.execute("SELECT id FROM responses")}
        items = check.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        usage = {row[0] for row in check.execute("SELECT response_id FROM usage")}
        workspaces = {row[0] for row in check.execute("SELECT name FROM workspaces")}
    assert stored == {taken, *fresh}
    assert items == 2 * len(stored)  # each with its input and output item, none twice
    assert usage == stored
    assert workspaces == ({"between"} if with_other_calls else set())


async def test_checkpoints_run_beside_the_writer(tmp_path: Path) -> None:
    """The write-ahead log is copied into the database file by the checkpoint thread, long
    before the writer's own (much later) automatic checkpoint would."""
    path = tmp_path / "venna.db"
    db = AsyncStore(Store(path))
    try:
        empty = path.stat().st_size
        for _ in range(20):
            await db.insert(_response_rows(new_id("resp")))
        for _ in range(200):  # up to 10 s
            if path.stat().st_size > empty:
                break
            await asyncio.sleep(0.05)
        assert path.stat().st_size > empty
    finally:
        db.close()
