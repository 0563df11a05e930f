"""The storage contract: what the server relies on from any ResponseStore, run against every
engine (the ``store`` fixture is parametrized by engine; a new engine adds its parameter and
must pass every test here unchanged)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.postgres_harness import PostgresServer
from venna.backends.store import (
    ChainTooDeep,
    Lease,
    ResponseStore,
    StoreUnavailable,
    UnreadableRecord,
    WindowUse,
    WorkspaceLimits,
    WorkspaceUnavailable,
    item_id,
    open_store,
)
from venna.backends.store.sqlite import SqliteStore
from venna.responses.v1 import conversations_pb2, events_pb2, response_pb2, service_pb2

# Each engine: where a fresh store is (a scratch directory, or a new PostgreSQL database).
ENGINES: dict[str, Callable[[pytest.FixtureRequest], str | Path]] = {
    "sqlite": lambda request: request.getfixturevalue("tmp_path") / "venna.db",
    "postgresql": lambda request: str(request.getfixturevalue("postgres_url")),
}


@pytest.fixture(params=sorted(ENGINES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ResponseStore]:
    opened = open_store(ENGINES[str(request.param)](request))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def workspaces(store: ResponseStore) -> tuple[str, str]:
    """Two workspaces' ids, made through their first keys."""
    ids = []
    for name in ("alpha", "beta"):
        key, _ = await store.create_key(name)
        workspace_id = await store.authenticate(key)
        assert workspace_id is not None
        ids.append(workspace_id)
    return ids[0], ids[1]


_counter = iter(range(10**9))

# Two processes' leases: one that holds for a minute, one that lapses at once.
LEASE = Lease("srv_first", 60_000)
OTHER = Lease("srv_second", 60_000)
BRIEF = Lease("srv_brief", 1)


def message(role: int, text: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.id = f"msg_{next(_counter):08d}"
    item.message.role = role  # type: ignore[assignment]
    if role == response_pb2.ROLE_USER:
        item.message.content.add().input_text.text = text
    else:
        item.message.content.add().output_text.text = text
    return item


def response(
    text: str,
    *,
    previous: str | None = None,
    status: int = response_pb2.RESPONSE_STATUS_COMPLETED,
    background: bool = False,
) -> response_pb2.Response:
    made = response_pb2.Response(
        id=f"resp_{next(_counter):08d}", object="response", created_at=1_700_000_000, model="echo"
    )
    made.status = status  # type: ignore[assignment]
    made.background = background
    if previous is not None:
        made.previous_response_id = previous
    made.output.append(message(response_pb2.ROLE_ASSISTANT, text))
    made.usage.input_tokens, made.usage.output_tokens = 3, 1
    return made


def event(sequence_number: int, kind: str = "in_progress") -> events_pb2.ResponseStreamEvent:
    made = events_pb2.ResponseStreamEvent(sequence_number=sequence_number)
    getattr(made, kind).response.id = "resp_x"
    return made


async def stored(
    store: ResponseStore, workspace: str, text: str, *, previous: str | None = None
) -> response_pb2.Response:
    made = response(text, previous=previous)
    await store.create_response(
        workspace, made, [message(response_pb2.ROLE_USER, f"say {text}")], finished=True
    )
    return made


# --------------------------------------------------------------------------- keys


async def test_keys_authenticate_until_revoked(store: ResponseStore) -> None:
    key, record = await store.create_key("alpha")
    assert key.startswith("vk_") and record.workspace == "alpha" and record.revoked_at is None
    assert key not in record.hint
    workspace = await store.authenticate(key)
    assert workspace is not None
    second, _ = await store.create_key("alpha")
    assert await store.authenticate(second) == workspace  # one workspace, two keys
    assert [item.id for item in await store.list_keys()] == [record.id, (await store.list_keys())[1].id]
    assert await store.revoke_key(record.id)
    assert not await store.revoke_key(record.id)  # only once
    assert await store.authenticate(key) is None
    assert await store.authenticate(second) == workspace
    assert await store.authenticate("vk_" + "x" * 43) is None
    assert await store.authenticate("not a key") is None
    assert [found.name for found in await store.list_workspaces()] == ["alpha"]


async def test_admin_keys_are_no_workspace_keys(store: ResponseStore) -> None:
    admin, record = await store.create_admin_key()
    assert admin.startswith("vka_") and record.admin and record.workspace == "" and admin not in record.hint
    workspace_key, _ = await store.create_key("alpha")
    assert await store.authenticate_admin(admin) == record.id
    assert await store.authenticate(admin) is None  # never a tenant
    assert await store.authenticate_admin(workspace_key) is None
    listed = await store.list_keys()
    assert [key.admin for key in listed] == [True, False]
    assert [key.workspace for key in await store.list_keys("alpha")] == ["alpha"]
    assert await store.list_keys("nobody") == []
    assert await store.revoke_key(record.id)
    assert await store.authenticate_admin(admin) is None
    assert (await store.list_keys())[0].revoked_at is not None


async def test_workspaces_are_made_and_revoked_with_their_keys(store: ResponseStore) -> None:
    heard: list[None] = []
    store.on_key_revoked(lambda: heard.append(None))
    made = await store.create_workspace("alpha")
    assert made is not None and made.name == "alpha" and made.revoked_at is None
    assert await store.create_workspace("alpha") is None  # names are unique
    assert await store.get_workspace("alpha") == made
    assert await store.get_workspace("beta") is None
    with pytest.raises(WorkspaceUnavailable):
        await store.create_key("beta", create_workspace=False)
    key, _ = await store.create_key("alpha", create_workspace=False)
    assert await store.authenticate(key) == made.id
    revoked = await store.revoke_workspace("alpha")
    assert revoked is not None and revoked.id == made.id and revoked.revoked_at is not None
    assert await store.authenticate(key) is None
    with pytest.raises(WorkspaceUnavailable):
        await store.create_key("alpha")
    assert await store.revoke_workspace("beta") is None
    assert [(found.name, found.revoked_at is not None) for found in await store.list_workspaces()] == [
        ("alpha", True)
    ]
    deadline = time.monotonic() + 5
    while not heard:  # the key cache must hear of the keys revoked with the workspace
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_limits_are_kept_per_workspace(store: ResponseStore) -> None:
    alpha, beta = await workspaces(store)
    assert await store.get_limits(alpha) == WorkspaceLimits()
    assert not WorkspaceLimits().any
    await store.set_limits(alpha, WorkspaceLimits(requests_per_minute=5, monthly_tokens=1000))
    assert await store.get_limits(alpha) == WorkspaceLimits(5, None, 1000)
    assert await store.get_limits(beta) == WorkspaceLimits()
    await store.set_limits(alpha, WorkspaceLimits(tokens_per_minute=70))
    assert await store.get_limits(alpha) == WorkspaceLimits(None, 70, None)


async def test_rate_windows_count_requests_up_to_a_bound(store: ResponseStore) -> None:
    alpha, beta = await workspaces(store)
    window = 1_800_000_000
    taken = [await store.take_requests(alpha, window, 1, max_requests=3, max_tokens=None) for _ in range(5)]
    assert [count for count, _ in taken] == [1, 1, 1, 0, 0]
    assert taken[-1][1] == WindowUse(3, 0)
    assert await store.window_use(alpha, window) == WindowUse(3, 0)
    assert await store.window_use(beta, window) == WindowUse(0, 0)  # per workspace
    assert await store.window_use(alpha, window + 60) == WindowUse(0, 0)  # per window
    # Several at once: as many as fit.
    assert await store.take_requests(beta, window, 4, max_requests=6, max_tokens=None) == (4, WindowUse(4, 0))
    assert await store.take_requests(beta, window, 4, max_requests=6, max_tokens=None) == (2, WindowUse(6, 0))
    assert await store.take_requests(beta, window, 4, max_requests=None, max_tokens=None) == (
        4,
        WindowUse(10, 0),
    )
    # A first request of a window, with nothing allowed, makes nothing.
    assert await store.take_requests(beta, window + 120, 2, max_requests=None, max_tokens=0) == (
        0,
        WindowUse(0, 0),
    )
    await store.add_window_tokens(alpha, window, 40)
    await store.add_window_tokens(alpha, window, 2)
    assert await store.take_requests(alpha, window, 1, max_requests=None, max_tokens=42) == (
        0,
        WindowUse(3, 42),
    )
    assert await store.take_requests(alpha, window, 2, max_requests=None, max_tokens=43) == (
        2,
        WindowUse(5, 42),
    )
    await store.add_window_tokens(beta, window + 60, 7)  # a window made by tokens alone
    assert await store.window_use(beta, window + 60) == WindowUse(0, 7)
    await store.prune_windows(window + 60)
    assert await store.window_use(alpha, window) == WindowUse(0, 0)
    assert await store.window_use(beta, window + 60) == WindowUse(0, 7)


async def test_concurrent_requests_never_pass_the_bound(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    results = await asyncio.gather(
        *(
            store.take_requests(alpha, 60, 1 + index % 3, max_requests=10, max_tokens=None)
            for index in range(40)
        )
    )
    assert sum(count for count, _ in results) == 10
    assert await store.window_use(alpha, 60) == WindowUse(10, 0)


async def test_a_revocation_is_announced(store: ResponseStore) -> None:
    heard: list[None] = []
    store.on_key_revoked(lambda: heard.append(None))
    _, record = await store.create_key("alpha")
    assert await store.revoke_key(record.id)
    deadline = time.monotonic() + 5
    while not heard:  # PostgreSQL delivers it as a notification, after the commit
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not await store.revoke_key(record.id)
    await asyncio.sleep(0.05)
    assert len(heard) == 1  # nothing revoked, nothing announced


async def test_a_revocation_by_another_process_reaches_postgresql_listeners(postgres_url: str) -> None:
    listening, revoking = open_store(postgres_url), open_store(postgres_url)
    await listening.open()
    await revoking.open()
    try:
        heard: list[None] = []
        listening.on_key_revoked(lambda: heard.append(None))
        _, record = await revoking.create_key("alpha")
        started = time.monotonic()
        assert await revoking.revoke_key(record.id)
        while not heard:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.005)
    finally:
        await listening.close()
        await revoking.close()


async def test_a_watch_wakes_for_stored_events_or_times_out(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await stored(store, alpha, "watched")
    watch = store.watch_events(made.id)
    try:
        started = time.monotonic()
        await watch.wait(0.2)  # nothing stored: only the time-out ends it
        assert time.monotonic() - started >= 0.15
        await store.append_events(made.id, [event(0)])
        started = time.monotonic()
        await watch.wait(2.0)  # a wake-up, or (on engines that cannot tell) the time-out
        assert time.monotonic() - started <= 2.5
    finally:
        watch.close()


async def test_postgresql_wakes_a_watch_for_another_process_within_milliseconds(postgres_url: str) -> None:
    following, writing = open_store(postgres_url), open_store(postgres_url)
    await following.open()
    await writing.open()
    try:
        alpha, _ = await workspaces(writing)
        made = await stored(writing, alpha, "elsewhere")
        watch = following.watch_events(made.id)
        other = following.watch_events("resp_someone_else")
        try:
            started = time.monotonic()
            await writing.append_events(made.id, [event(0)])
            await watch.wait(5.0)
            assert time.monotonic() - started < 0.5
            started = time.monotonic()
            await other.wait(0.3)  # not its response: no wake-up
            assert time.monotonic() - started >= 0.25
        finally:
            watch.close()
            other.close()
    finally:
        await following.close()
        await writing.close()


# --------------------------------------------------------------------------- responses


async def test_a_response_reads_back_as_stored(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await stored(store, alpha, "hello")
    assert await store.get_response(alpha, made.id) == made


async def test_another_workspace_sees_nothing(store: ResponseStore) -> None:
    alpha, beta = await workspaces(store)
    made = await stored(store, alpha, "private")
    await store.append_events(made.id, [event(0)])
    assert await store.get_response(beta, made.id) is None
    assert await store.load_context(beta, made.id) is None
    assert await store.list_input_items(beta, made.id, limit=10, ascending=True, after=None) is None
    assert await store.events_after(beta, made.id, -1) == []
    assert await store.find_items(beta, [item_id(made.output[0])]) == {}
    assert not await store.delete_response(beta, made.id)
    assert not await store.save_response(beta, made, finished=True)
    assert await store.get_response(alpha, made.id) == made  # untouched by all of that


async def test_save_replaces_status_and_output_and_appends_events(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = response("", status=response_pb2.RESPONSE_STATUS_QUEUED, background=True)
    made.ClearField("output")
    request = service_pb2.CreateResponseRequest(model="echo", background=True)
    await store.create_response(
        alpha, made, [message(response_pb2.ROLE_USER, "go")], request=request, events=[event(0)]
    )
    [claimed] = await store.claim_responses(LEASE, queued=10)
    assert (claimed.response.id, claimed.request, claimed.cancelling) == (made.id, request, False)

    made.status = response_pb2.RESPONSE_STATUS_COMPLETED
    made.output.append(message(response_pb2.ROLE_ASSISTANT, "done"))
    assert await store.save_response(alpha, made, events=[event(1), event(2, "completed")], finished=True)
    assert await store.get_response(alpha, made.id) == made
    assert [found.sequence_number for found in await store.events_after(alpha, made.id, -1)] == [0, 1, 2]
    assert [found.sequence_number for found in await store.events_after(alpha, made.id, 0)] == [1, 2]
    assert await store.last_sequence_number(made.id) == 2
    terminal = await store.last_terminal_event(made.id)
    assert terminal is not None and terminal.HasField("completed")
    assert (
        await store.claim_responses(LEASE, queued=10, expired_only=False) == []
    )  # finished: nothing to claim


async def test_events_stored_twice_are_kept_once(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await stored(store, alpha, "again")
    await store.append_events(made.id, [event(0), event(1)])
    await store.append_events(made.id, [event(1), event(2)])
    assert [found.sequence_number for found in await store.events_after(alpha, made.id, -1)] == [0, 1, 2]
    assert await store.last_terminal_event(made.id) is None
    assert await store.last_sequence_number("resp_unknown") == -1


async def test_context_is_the_chain_oldest_first(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    first = await stored(store, alpha, "one")
    second = await stored(store, alpha, "two", previous=first.id)
    third = await stored(store, alpha, "three", previous=second.id)
    context = await store.load_context(alpha, third.id)
    assert context is not None
    texts = [
        part.input_text.text or part.output_text.text for item in context for part in item.message.content
    ]
    assert texts == ["say one", "one", "say two", "two", "say three", "three"]
    assert await store.load_context(alpha, "resp_unknown") is None
    with pytest.raises(ChainTooDeep):
        await store.load_context(alpha, third.id, max_depth=2)
    assert await store.load_context(alpha, third.id, max_depth=3) == context


async def test_input_items_page_in_both_directions(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = response("listed")
    inputs = [message(response_pb2.ROLE_USER, f"item {n}") for n in range(5)]
    await store.create_response(alpha, made, inputs, finished=True)
    ids = [item_id(item) for item in inputs]

    async def page(ascending: bool, after: str | None, limit: int = 2) -> tuple[list[str], bool]:
        found = await store.list_input_items(alpha, made.id, limit=limit, ascending=ascending, after=after)
        assert found is not None
        return [item_id(item) for item in found.items], found.has_more

    assert await page(True, None) == (ids[:2], True)
    assert await page(True, ids[1]) == (ids[2:4], True)
    assert await page(True, ids[3]) == (ids[4:], False)
    assert await page(False, None) == (ids[::-1][:2], True)
    assert await page(False, ids[1]) == ([ids[0]], False)
    with pytest.raises(LookupError):
        await page(True, "msg_not_there")


async def test_items_are_found_by_id(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await stored(store, alpha, "find me")
    wanted = item_id(made.output[0])
    found = await store.find_items(alpha, [wanted, "msg_missing"])
    assert list(found) == [wanted] and found[wanted] == made.output[0]
    assert await store.find_items(alpha, []) == {}


async def test_delete_removes_the_response_and_keeps_its_usage(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await stored(store, alpha, "gone")
    assert await store.delete_response(alpha, made.id)
    assert await store.get_response(alpha, made.id) is None
    assert await store.events_after(alpha, made.id, -1) == []
    assert not await store.delete_response(alpha, made.id)
    (total,) = await store.usage_totals(alpha)
    assert (total.responses, total.input_tokens, total.output_tokens) == (1, 3, 1)


async def test_usage_totals_by_model_and_time(store: ResponseStore) -> None:
    alpha, beta = await workspaces(store)
    for model, created_at in (("a", 100), ("b", 200), ("b", 300)):
        made = response("x")
        made.model, made.created_at = model, created_at
        await store.record_usage(alpha, made)
    by_model = await store.usage_totals(alpha, group_by_model=True)
    assert [(total.model, total.responses) for total in by_model] == [("a", 1), ("b", 2)]
    (window,) = await store.usage_totals(alpha, since=150, until=300)
    assert window.responses == 1 and window.total_tokens == 4
    assert await store.usage_totals(alpha, since=1000) == []
    assert await store.usage_totals(beta) == []


async def test_concurrent_writes_each_succeed_or_fail_alone(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = [response(f"r{n}") for n in range(20)]
    duplicate = made[3]
    results = await asyncio.gather(
        *(store.create_response(alpha, one, [], finished=True) for one in made),
        store.create_response(alpha, duplicate, [], finished=True),  # the same id again: refused
        return_exceptions=True,
    )
    assert results[:-1] == [None] * 20
    assert isinstance(results[-1], Exception)
    for one in made:
        assert await store.get_response(alpha, one.id) == one


async def test_an_undecodable_record_fails_only_its_own_calls(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    good = await stored(store, alpha, "fine")
    bad = response("bad")
    # Nested past protobuf's parse limit: it serializes, but cannot be read back.
    schema = bad.text.format.json_schema.schema
    for _ in range(120):
        schema = schema.fields["inner"].struct_value
    await store.create_response(alpha, bad, [], finished=True)
    with pytest.raises(UnreadableRecord) as caught:
        await store.get_response(alpha, bad.id)
    assert caught.value.response_id == bad.id
    assert await store.get_response(alpha, good.id) == good
    assert await store.claim_responses(LEASE, queued=10, expired_only=False) == []


async def test_an_unreachable_server_is_refused_clearly(postgres_server: PostgresServer) -> None:
    store = open_store(f"postgresql://venna:secret@127.0.0.1:{postgres_server.port}/no_such_database")
    with pytest.raises(StoreUnavailable, match=r"venna:\*\*\*@") as caught:
        await store.open()
    assert "secret" not in str(caught.value)
    await store.close()


def test_a_file_that_is_not_a_database_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "not.db"
    path.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreUnavailable, match=r"not\.db"):
        SqliteStore(path)


# --------------------------------------------------------------------------- leases


async def unfinished(
    store: ResponseStore,
    workspace: str,
    lease: Lease | None,
    *,
    status: int = response_pb2.RESPONSE_STATUS_QUEUED,
    created_at: int = 1_700_000_000,
) -> response_pb2.Response:
    made = response("", status=status, background=True)
    made.ClearField("output")
    made.created_at = created_at
    request = service_pb2.CreateResponseRequest(model="echo", background=True)
    await store.create_response(workspace, made, [], request=request, events=[event(0)], lease=lease)
    return made


async def test_only_the_lease_holder_writes_a_response(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await unfinished(store, alpha, LEASE)
    assert await store.claim_responses(OTHER, queued=10) == []  # held
    made.status = response_pb2.RESPONSE_STATUS_IN_PROGRESS
    assert not await store.save_response(alpha, made, lease=OTHER)
    assert not await store.append_events(made.id, [event(1)], lease=OTHER)
    assert await store.last_sequence_number(made.id) == 0  # nothing written by the other
    assert await store.save_response(alpha, made, events=[event(1)], lease=LEASE)
    assert await store.append_events(made.id, [event(2)], lease=LEASE)
    renewal = await store.renew_leases(LEASE, [made.id])
    assert (renewal.lost, renewal.cancelling) == (frozenset(), frozenset())

    # Another process takes it over (a cancel its owner did not answer): the owner is fenced.
    assert await store.take_over(OTHER, alpha, made.id)
    assert not await store.append_events(made.id, [event(3)], lease=LEASE)
    made.status = response_pb2.RESPONSE_STATUS_COMPLETED
    assert not await store.save_response(
        alpha, made, events=[event(3, "completed")], finished=True, lease=LEASE
    )
    assert await store.last_sequence_number(made.id) == 2
    assert await store.usage_totals(alpha) == []  # no usage written over the holder's
    assert (await store.renew_leases(LEASE, [made.id])).lost == {made.id}

    made.status = response_pb2.RESPONSE_STATUS_CANCELLED
    assert await store.save_response(alpha, made, finished=True, lease=OTHER)
    assert (await store.get_response(alpha, made.id) or made).status == response_pb2.RESPONSE_STATUS_CANCELLED
    # Finished: nobody holds it any more, and nobody can take it over or claim it.
    assert (await store.renew_leases(OTHER, [made.id])).lost == {made.id}
    assert not await store.take_over(LEASE, alpha, made.id)
    assert await store.claim_responses(LEASE, queued=10, expired_only=False) == []


async def test_expired_leases_are_claimed_oldest_first_queued_ones_as_room_allows(
    store: ResponseStore,
) -> None:
    alpha, beta = await workspaces(store)
    running = await unfinished(store, alpha, BRIEF, status=response_pb2.RESPONSE_STATUS_IN_PROGRESS)
    newer = await unfinished(store, beta, BRIEF, created_at=1_700_000_002)
    older = await unfinished(store, alpha, None, created_at=1_700_000_001)  # held by nobody
    held = await unfinished(store, alpha, LEASE, created_at=1_600_000_000)
    await asyncio.sleep(0.01)
    first = await store.claim_responses(OTHER, queued=1)
    assert [(pending.workspace_id, pending.response.id) for pending in first] == [
        (alpha, running.id),
        (alpha, older.id),
    ]
    assert first[1].request == service_pb2.CreateResponseRequest(model="echo", background=True)
    assert await store.claim_responses(BRIEF, queued=0) == []  # claimed, and only queued ones are left
    assert [pending.response.id for pending in await store.claim_responses(OTHER, queued=5)] == [newer.id]
    assert (await store.renew_leases(OTHER, [running.id, older.id, newer.id])).lost == frozenset()
    # A store used by one process alone is claimed whole at its start, leases or not.
    everything = await store.claim_responses(BRIEF, queued=5, expired_only=False)
    assert [pending.response.id for pending in everything] == [held.id, running.id, older.id, newer.id]


async def test_released_responses_are_claimable_at_once(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await unfinished(store, alpha, LEASE)
    await store.release_leases(OTHER, [made.id])  # not the holder's: nothing happens
    assert await store.claim_responses(OTHER, queued=5) == []
    await store.release_leases(LEASE, [made.id])
    assert [pending.response.id for pending in await store.claim_responses(OTHER, queued=5)] == [made.id]


async def test_a_cancel_request_reaches_the_holder(store: ResponseStore) -> None:
    alpha, beta = await workspaces(store)
    made = await unfinished(store, alpha, LEASE)
    finished = await stored(store, alpha, "done")
    heard: list[str] = []
    arrived = asyncio.Event()

    def requested(response_id: str) -> None:
        heard.append(response_id)
        arrived.set()

    store.on_cancel_requested(requested)
    assert not await store.request_cancel(beta, made.id)  # another workspace's: unknown
    assert not await store.request_cancel(alpha, finished.id)  # over already
    assert await store.request_cancel(alpha, made.id)
    async with asyncio.timeout(2):
        await arrived.wait()
    assert heard == [made.id]
    renewal = await store.renew_leases(LEASE, [made.id])
    assert (renewal.lost, renewal.cancelling) == (frozenset(), frozenset({made.id}))
    await store.release_leases(LEASE, [made.id])
    [claimed] = await store.claim_responses(OTHER, queued=5)
    assert claimed.cancelling


async def test_a_deleted_response_still_gets_its_usage_from_its_holder(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = await unfinished(store, alpha, LEASE)
    assert await store.delete_response(alpha, made.id)
    made.status = response_pb2.RESPONSE_STATUS_CANCELLED
    made.usage.input_tokens = 3
    assert not await store.save_response(alpha, made, finished=True, lease=LEASE)
    (total,) = await store.usage_totals(alpha)
    assert (total.responses, total.input_tokens) == (1, 3)


# ------------------------------------------------------------------ conversations


def conversation(metadata: dict[str, str] | None = None) -> conversations_pb2.Conversation:
    return conversations_pb2.Conversation(
        id=f"conv_{next(_counter):08d}",
        object="conversation",
        created_at=1_700_000_000,
        metadata=metadata or {},
    )


async def test_a_conversation_keeps_its_items_in_order(store: ResponseStore) -> None:
    alpha, beta = await workspaces(store)
    made = conversation({"topic": "launch"})
    first = [message(response_pb2.ROLE_USER, "one"), message(response_pb2.ROLE_ASSISTANT, "two")]
    await store.create_conversation(alpha, made, first)
    assert await store.get_conversation(alpha, made.id) == made
    later = [message(response_pb2.ROLE_USER, "three")]
    assert await store.add_conversation_items(alpha, made.id, later)
    page = await store.conversation_items(alpha, made.id)
    assert page is not None and [item_id(item) for item in page.items] == [
        item_id(i) for i in [*first, *later]
    ]
    newest = await store.conversation_items(alpha, made.id, limit=2, ascending=False)
    assert newest is not None and newest.has_more
    assert [item_id(item) for item in newest.items] == [item_id(later[0]), item_id(first[1])]
    rest = await store.conversation_items(alpha, made.id, limit=2, ascending=False, after=item_id(first[1]))
    assert rest is not None and not rest.has_more
    assert [item_id(item) for item in rest.items] == [item_id(first[0])]
    with pytest.raises(LookupError):
        await store.conversation_items(alpha, made.id, after="msg_unknown")
    assert await store.get_conversation_item(alpha, made.id, item_id(first[1])) == first[1]
    # Another workspace learns nothing of it, and can change nothing.
    assert await store.get_conversation(beta, made.id) is None
    assert await store.conversation_items(beta, made.id) is None
    assert await store.get_conversation_item(beta, made.id, item_id(first[0])) is None
    assert not await store.add_conversation_items(beta, made.id, later)
    assert not await store.delete_conversation_item(beta, made.id, item_id(first[0]))
    assert await store.update_conversation(beta, made.id, {"x": "y"}) is None
    assert not await store.delete_conversation(beta, made.id)


async def test_a_conversation_is_updated_and_deleted(store: ResponseStore) -> None:
    alpha, _ = await workspaces(store)
    made = conversation({"a": "1"})
    items = [message(response_pb2.ROLE_USER, "one"), message(response_pb2.ROLE_USER, "two")]
    await store.create_conversation(alpha, made, items)
    updated = await store.update_conversation(alpha, made.id, {"b": "2"})
    assert updated is not None and dict(updated.metadata) == {"b": "2"}
    assert await store.get_conversation(alpha, made.id) == updated
    assert await store.delete_conversation_item(alpha, made.id, item_id(items[0]))
    assert not await store.delete_conversation_item(alpha, made.id, item_id(items[0]))
    page = await store.conversation_items(alpha, made.id)
    assert page is not None and [item_id(item) for item in page.items] == [item_id(items[1])]
    assert await store.delete_conversation(alpha, made.id)
    assert await store.get_conversation(alpha, made.id) is None
    assert await store.conversation_items(alpha, made.id) is None
    assert not await store.add_conversation_items(alpha, made.id, items)
