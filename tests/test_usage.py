"""Usage records: one per finished response, stored or not, and the workspace totals read from
them through the GetUsage RPC and `venna usage`."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlite_utils import Database

from tests.conftest import Client, Venna, error_info, make_request, serving
from tests.test_background import wait_for_status
from venna.backends.store import Lease
from venna.backends.store.records import new_response_rows
from venna.backends.store.sqlite.queries import Store
from venna.backends.store.sqlite.schema import migrations
from venna.cli import commands as cli
from venna.responses.v1 import events_pb2, response_pb2, usage_pb2, usage_pb2_grpc

TEN_WORDS = "one two three four five six seven eight nine ten"
SLOW = "echo:delay_ms=20"
MANY_WORDS = " ".join(["word"] * 200)


def usage_rows(db_path: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return {row["response_id"]: dict(row) for row in db.execute("SELECT * FROM usage")}


async def wait_for_usage(db_path: Path, response_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The usage record of a response, once it has been written (some are written detached)."""
    deadline = time.monotonic() + timeout
    while True:
        row = usage_rows(db_path).get(response_id)
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"no usage record for {response_id} after {timeout}s"
        await asyncio.sleep(0.02)


def usage_stub(venna: Venna) -> usage_pb2_grpc.UsageServiceAsyncStub:
    return usage_pb2_grpc.UsageServiceStub(venna.channel)


async def usage_of(venna: Venna, client: Client, **fields: Any) -> usage_pb2.GetUsageResponse:
    return await usage_stub(venna).GetUsage(usage_pb2.GetUsageRequest(**fields), metadata=client.metadata)


def tokens(row: dict[str, Any]) -> tuple[int, int]:
    return row["input_tokens"], row["output_tokens"]


def response_id_of(events: list[events_pb2.ResponseStreamEvent]) -> str:
    return events[0].created.response.id


async def workspace_of(venna: Venna, client: Client) -> str:
    workspace_id = await venna.server.store.authenticate(client.key)
    assert workspace_id is not None
    return workspace_id


# ------------------------------------------------------------------------------ records


async def test_every_finished_response_leaves_one_record(venna: Venna) -> None:
    stored = await venna.alpha.create(input="one two three")
    unstored = await venna.alpha.create(input="four five", store=False)
    streamed = response_id_of(await venna.alpha.stream(input="six seven eight nine"))
    streamed_unstored = response_id_of(await venna.alpha.stream(input="ten", store=False))
    background = await venna.alpha.create(input=TEN_WORDS, background=True)
    chained = await venna.alpha.create(input="and more", previous_response_id=stored.id, model="venna-1")

    expected = {
        stored.id: (3, 3),
        unstored.id: (2, 2),
        streamed: (4, 4),
        streamed_unstored: (1, 1),
        background.id: (10, 10),
        chained.id: (3 + 3 + 2, 2),
    }
    for response_id, counts in expected.items():
        row = await wait_for_usage(venna.db_path, response_id)
        assert tokens(row) == counts, response_id
        assert row["status"] == "completed"
        assert row["reasoning_tokens"] == row["cached_tokens"] == 0
        assert row["finished_at"] >= row["created_at"] > 0
    rows = usage_rows(venna.db_path)
    assert len(rows) == len(expected)
    assert rows[chained.id]["model"] == "venna-1"
    assert rows[stored.id]["model"] == "echo"
    assert rows[stored.id]["created_at"] == stored.created_at
    alpha = await workspace_of(venna, venna.alpha)
    assert {row["workspace_id"] for row in rows.values()} == {alpha}

    # The RPC totals what the records hold.
    usage = await usage_of(venna, venna.alpha)
    assert usage.object == "usage"
    assert usage.total.responses == 6
    assert usage.total.input_tokens == sum(counts[0] for counts in expected.values())
    assert usage.total.output_tokens == sum(counts[1] for counts in expected.values())
    assert usage.total.total_tokens == usage.total.input_tokens + usage.total.output_tokens
    assert not usage.total.HasField("model")
    [bucket] = usage.buckets
    assert bucket == usage.total


async def test_incomplete_failed_and_cancelled_responses_are_recorded(venna: Venna) -> None:
    incomplete = await venna.alpha.create(input=" ".join(["w"] * 20), max_output_tokens=16)
    assert incomplete.status == response_pb2.RESPONSE_STATUS_INCOMPLETE

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input=TEN_WORDS, model="echo:fail_after=3")
    failed = error_info(caught.value).metadata["response_id"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(input=TEN_WORDS, model="echo:fail_after=3", store=False)
    failed_unstored = error_info(caught.value).metadata["response_id"]
    failed_background = await venna.alpha.create(input=TEN_WORDS, model="echo:fail_after=3", background=True)

    # A foreground call cut by its deadline, stored and not.
    for store in (True, False):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await venna.alpha.stub.CreateResponse(
                make_request(input=MANY_WORDS, model=SLOW, store=store),
                metadata=venna.alpha.metadata,
                timeout=0.3,
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # A stream its client cancels.
    call = venna.alpha.stub.StreamResponse(
        make_request(input=MANY_WORDS, model=SLOW), metadata=venna.alpha.metadata
    )
    created = await call.read()
    assert isinstance(created, events_pb2.ResponseStreamEvent)
    for _ in range(5):
        await call.read()
    call.cancel()
    cancelled_stream = created.created.response.id

    # A background response cancelled while it runs.
    running = await venna.alpha.create(input=MANY_WORDS, model=SLOW, background=True)
    await wait_for_status(venna, running.id, response_pb2.RESPONSE_STATUS_IN_PROGRESS)
    assert (await venna.alpha.cancel(running.id)).status == response_pb2.RESPONSE_STATUS_CANCELLED

    statuses = {
        incomplete.id: "incomplete",
        failed: "failed",
        failed_unstored: "failed",
        failed_background.id: "failed",
        cancelled_stream: "cancelled",
        running.id: "cancelled",
    }
    for response_id, status in statuses.items():
        assert (await wait_for_usage(venna.db_path, response_id))["status"] == status, response_id
    assert tokens(usage_rows(venna.db_path)[incomplete.id]) == (20, 16)

    deadline = time.monotonic() + 10
    while len(usage_rows(venna.db_path)) < len(statuses) + 2:  # the two deadline-cut calls
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    rows = usage_rows(venna.db_path)
    assert len(rows) == len(statuses) + 2
    assert sorted(row["status"] for row in rows.values()).count("cancelled") == 4
    assert (await usage_of(venna, venna.alpha)).total.responses == len(rows)


async def test_deleted_responses_are_still_counted(venna: Venna) -> None:
    kept = await venna.alpha.create(input="one two")
    deleted = await venna.alpha.create(input="three four five")
    background = await venna.alpha.create(input="six", background=True)
    await wait_for_usage(venna.db_path, background.id)
    for response_id in (deleted.id, background.id):
        assert (await venna.alpha.delete(response_id)).deleted

    assert set(usage_rows(venna.db_path)) == {kept.id, deleted.id, background.id}
    usage = await usage_of(venna, venna.alpha)
    assert usage.total.responses == 3
    assert usage.total.input_tokens == 2 + 3 + 1


async def test_a_response_deleted_while_it_runs_is_recorded(venna: Venna) -> None:
    call = venna.alpha.stub.CreateResponse(
        make_request(input=" ".join(["word"] * 20), model=SLOW), metadata=venna.alpha.metadata
    )
    while True:
        with sqlite3.connect(venna.db_path) as db:
            row = db.execute("SELECT id FROM responses").fetchone()
        if row is not None:
            break
        await asyncio.sleep(0.01)
    await venna.alpha.delete(row[0])
    response = await call
    assert response.status == response_pb2.RESPONSE_STATUS_COMPLETED
    assert tokens(await wait_for_usage(venna.db_path, response.id)) == (20, 20)


async def test_a_restart_records_the_responses_it_fails(tmp_path: Path) -> None:
    db_path = tmp_path / "venna.db"
    store = Store(db_path)
    _, _ = store.create_key("alpha")
    [workspace] = store.list_workspaces()
    interrupted = response_pb2.Response(
        id="resp_interrupted",
        object="response",
        created_at=1_000,
        status=response_pb2.RESPONSE_STATUS_IN_PROGRESS,
        model="echo",
        store=True,
    )
    store.insert(new_response_rows(workspace.id, interrupted, []))
    store.close()

    async with serving(db_path) as venna:
        row = await wait_for_usage(venna.db_path, interrupted.id)
        assert row["status"] == "failed"
        assert row["workspace_id"] == workspace.id
        assert row["created_at"] == 1_000


async def test_unstored_records_are_written_before_shutdown_ends(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db") as venna:
        response = await venna.alpha.create(input="last words", store=False)
    assert tokens(usage_rows(tmp_path / "venna.db")[response.id]) == (2, 2)


# ------------------------------------------------------------------------------ GetUsage


async def seed(venna: Venna) -> None:
    """Records at known times: alpha has a@1000, b@2000, a@3000; beta has a@2000."""
    alpha, beta = await workspace_of(venna, venna.alpha), await workspace_of(venna, venna.beta)
    records = [
        (alpha, "a", 1_000, 10, 1, 0, 4),
        (alpha, "b", 2_000, 20, 2, 1, 0),
        (alpha, "a", 3_000, 30, 3, 0, 0),
        (beta, "a", 2_000, 500, 50, 0, 0),
    ]
    for number, (workspace, model, created_at, input_tokens, output_tokens, reasoning, cached) in enumerate(
        records
    ):
        response = response_pb2.Response(
            id=f"resp_{number}",
            created_at=created_at,
            model=model,
            status=response_pb2.RESPONSE_STATUS_COMPLETED,
        )
        response.usage.input_tokens = input_tokens
        response.usage.output_tokens = output_tokens
        response.usage.output_tokens_details.reasoning_tokens = reasoning
        response.usage.input_tokens_details.cached_tokens = cached
        await venna.server.store.record_usage(workspace, response)


async def test_totals_by_time_range_and_model(venna: Venna) -> None:
    await seed(venna)

    everything = await usage_of(venna, venna.alpha)
    assert (everything.total.responses, everything.total.input_tokens) == (3, 60)
    assert everything.total.output_tokens == 6
    assert everything.total.reasoning_tokens == 1
    assert everything.total.cached_tokens == 4
    assert everything.total.total_tokens == 66
    assert not everything.HasField("start_time") and not everything.HasField("end_time")

    by_model = await usage_of(venna, venna.alpha, group_by_model=True)
    assert [(b.model, b.responses, b.input_tokens, b.total_tokens) for b in by_model.buckets] == [
        ("a", 2, 40, 44),
        ("b", 1, 20, 22),
    ]
    assert by_model.total == everything.total

    # Half-open: the start is in, the end is out.
    middle = await usage_of(venna, venna.alpha, start_time=2_000, end_time=3_000)
    assert (middle.total.responses, middle.total.input_tokens) == (1, 20)
    assert (middle.start_time, middle.end_time) == (2_000, 3_000)
    since = await usage_of(venna, venna.alpha, start_time=1_001, group_by_model=True)
    assert [(b.model, b.input_tokens) for b in since.buckets] == [("a", 30), ("b", 20)]
    until = await usage_of(venna, venna.alpha, end_time=2_001)
    assert until.total.input_tokens == 30

    empty = await usage_of(venna, venna.alpha, start_time=5_000, group_by_model=True)
    assert list(empty.buckets) == []
    assert empty.HasField("total") and empty.total.responses == 0
    assert (await usage_of(venna, venna.alpha, start_time=2_000, end_time=2_000)).total.responses == 0


async def test_a_workspace_sees_only_its_own_usage(venna: Venna) -> None:
    await seed(venna)
    await venna.alpha.create(input="alpha only words here", model="venna-1")

    beta = await usage_of(venna, venna.beta, group_by_model=True)
    assert [(b.model, b.responses, b.input_tokens) for b in beta.buckets] == [("a", 1, 500)]
    assert beta.total.responses == 1
    alpha = await usage_of(venna, venna.alpha, group_by_model=True)
    assert [b.model for b in alpha.buckets] == ["a", "b", "venna-1"]
    assert alpha.total.input_tokens == 60 + 4

    # A fresh workspace has nothing.
    key, _ = await venna.server.store.create_key("gamma")
    gamma = await usage_of(venna, venna.client(key))
    assert list(gamma.buckets) == [] and gamma.total.responses == 0


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return [violation.field for violation in bad_request.field_violations]
    return []


@pytest.mark.parametrize(
    ("fields", "invalid"),
    [
        ({"start_time": 200, "end_time": 100}, ["end_time"]),
        ({"start_time": -1}, ["start_time"]),
        ({"start_time": -5, "end_time": -1}, ["start_time", "end_time"]),
    ],
)
async def test_an_invalid_range_is_invalid_argument(
    venna: Venna, fields: dict[str, int], invalid: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage_of(venna, venna.alpha, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.domain == "venna.dev"
    assert info.metadata["param"] == invalid[0]
    assert bad_request_fields(caught.value) == invalid


async def test_usage_needs_a_key(venna: Venna) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage_stub(venna).GetUsage(usage_pb2.GetUsageRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "MISSING_API_KEY"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage_of(venna, venna.client("vk_unknown"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_usage_through_the_in_process_handlers(venna: Venna) -> None:
    handler = await venna.server.handler("/venna.responses.v1.UsageService/GetUsage")
    assert handler is not None and handler.unary_unary is not None


async def test_usage_service_is_healthy_and_reflected(venna: Venna) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    service = "venna.responses.v1.UsageService"
    health = health_pb2_grpc.HealthStub(venna.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def reflect() -> list[str]:
        with grpc.insecure_channel(venna.server.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            [found] = [
                s for s in database.FindFileContainingSymbol(service).service if s.name == "UsageService"
            ]
            return [*database.get_services(), *(method.name for method in found.method)]

    assert {service, "GetUsage"} <= set(await asyncio.to_thread(reflect))


def test_the_contract_routes_get_usage() -> None:
    from google.api import annotations_pb2

    method = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].methods_by_name["GetUsage"]
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    assert (rule.WhichOneof("pattern"), rule.get) == ("get", "/v1/usage")


# ------------------------------------------------------------------------------ CLI


def test_the_cli_prints_totals_per_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_path = tmp_path / "venna.db"

    async def populate() -> None:
        async with serving(db_path) as venna:
            await seed(venna)
            await venna.beta.create(input="one two three", store=False)

    asyncio.run(populate())
    db = ["--db", str(db_path)]

    assert cli.main(["usage", *db]) == 0
    out = capsys.readouterr().out
    assert "workspace alpha (ws_" in out and "workspace beta (ws_" in out
    alpha_part, beta_part = out.split("workspace beta")
    assert _numbers(alpha_part, "all") == [3, 60, 6, 1, 4, 66]
    assert _numbers(beta_part, "all") == [2, 503, 53, 0, 0, 556]

    assert cli.main(["usage", "--workspace", "alpha", "--by-model", "--since", "1970-01-01T00:25", *db]) == 0
    out = capsys.readouterr().out
    assert "beta" not in out
    assert _numbers(out, "a") == [1, 30, 3, 0, 0, 33]
    assert _numbers(out, "b") == [1, 20, 2, 1, 0, 22]
    assert _numbers(out, "all") == [2, 50, 5, 1, 0, 55]

    assert cli.main(["usage", "--workspace", "beta", "--by-model", "--until", "2000", "--json", *db]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["until"] == 2_000 and document["since"] is None
    [beta] = document["workspaces"]
    assert beta["workspace"] == "beta"
    assert beta["buckets"] == []
    assert beta["total"]["responses"] == 0

    assert cli.main(["usage", "--workspace", "nobody", *db]) == 1
    assert "no workspace named 'nobody'" in capsys.readouterr().err
    assert cli.main(["usage", "--since", "2025-02-01", "--until", "2025-01-01", *db]) == 1


def _numbers(text: str, label: str) -> list[int]:
    """The counts on the table row whose first column is ``label``."""
    for line in text.splitlines():
        columns = line.split()
        if columns and columns[0] == label:
            return [int(column) for column in columns[1:]]
    raise AssertionError(f"no row {label!r} in:\n{text}")


# ------------------------------------------------------------------------------ migration


def test_the_migration_upgrades_an_existing_database(tmp_path: Path) -> None:
    """A database of the first schema keeps its data and gets usage records for the responses
    it already finished."""
    db_path = tmp_path / "old.db"
    old = Database(sqlite3.connect(db_path, isolation_level=None))
    migrations.apply(old, stop_before="m002_usage")
    assert "usage" not in old.table_names()
    old.execute("INSERT INTO workspaces (id, name, created_at) VALUES ('ws_old', 'old', 1)")
    finished = response_pb2.Response(
        id="resp_done",
        created_at=500,
        completed_at=510,
        model="echo",
        status=response_pb2.RESPONSE_STATUS_COMPLETED,
    )
    finished.usage.input_tokens, finished.usage.output_tokens = 7, 5
    running = response_pb2.Response(
        id="resp_running", created_at=600, model="echo", status=response_pb2.RESPONSE_STATUS_IN_PROGRESS
    )
    for response in (finished, running):
        old.execute(
            "INSERT INTO responses (id, workspace_id, status, background, created_at, body)"
            " VALUES (?, 'ws_old', ?, 0, ?, ?)",
            [response.id, response.status, response.created_at, response.SerializeToString()],
        )
    old.close()

    store = Store(db_path)
    try:
        assert "m002_usage" in [migration.name for migration in migrations.applied(store.db)]
        assert store.get_response("ws_old", "resp_done") == finished
        [total] = store.usage_totals("ws_old")
        assert (total.responses, total.input_tokens, total.output_tokens, total.total_tokens) == (1, 7, 5, 12)
        row = usage_rows(db_path)["resp_done"]
        assert (row["status"], row["created_at"], row["finished_at"]) == ("completed", 500, 510)
        # Recovery still finds the unfinished response, through the index that keeps only those.
        claimed = store.claim_responses(Lease("srv_test", 1000), queued=10, expired_only=False)
        assert [pending.response.id for pending in claimed] == ["resp_running"]
        queued, in_progress = response_pb2.RESPONSE_STATUS_QUEUED, response_pb2.RESPONSE_STATUS_IN_PROGRESS
        plan = store.db.execute(
            f"EXPLAIN QUERY PLAN SELECT id FROM responses WHERE status IN ({queued}, {in_progress})"
        ).fetchall()
        assert "idx_responses_unfinished" in str(plan)
    finally:
        store.close()
    # Opening it again applies nothing more.
    Store(db_path).close()
