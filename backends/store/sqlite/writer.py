"""One thread that runs the store's calls off the event loop, committing together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from venna.backends.store.records import NewRows
from venna.backends.store.sqlite.queries import Store

log = logging.getLogger(__name__)

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
        # Told of each batch (its calls, its seconds), on this thread.
        self.observer: Callable[[int, float], None] = _unobserved
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
            started = time.perf_counter()
            outcomes = [_attempt(self._work_of(first))] if alone else self._run_together(batch)
            self.observer(len(batch), time.perf_counter() - started)
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


def _unobserved(calls: int, seconds: float) -> None:
    pass


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
