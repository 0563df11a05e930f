"""Keys, workspace isolation, validation, pagination and deletion over gRPC."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import Client, Venna, serving, user_message
from venna.responses.v1 import response_pb2, service_pb2
from venna.server.app import ServerConfig, VennaServer


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo and the BadRequest field names of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info, fields = error_details_pb2.ErrorInfo(), []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields = [violation.field for violation in bad_request.field_violations]
    return info, fields


# ---------------------------------------------------------------------------------------- keys


async def test_missing_bad_and_revoked_keys_are_unauthenticated(venna: Venna) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await venna.alpha.stub.CreateResponse(service_pb2.CreateResponseRequest(model="echo"))
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(missing.value)[0].reason == "MISSING_API_KEY"

    for bad in ("vk_not-a-key", "sk-openai-style", ""):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await venna.client(bad).create(input="hi")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_key_stops_working_once_its_cache_entry_expires(tmp_path: Path) -> None:
    async with serving(tmp_path / "venna.db", key_cache_seconds=0.3) as venna:
        store = venna.server.store
        key, record = await store.create_key("gamma")
        # A new key works at once: refusals are never cached.
        assert (await venna.client(key).create(input="hi")).status == response_pb2.RESPONSE_STATUS_COMPLETED
        assert await store.revoke_key(record.id)
        # Trusted from the cache for at most key_cache_seconds, then refused.
        await asyncio.sleep(0.35)
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await venna.client(key).create(input="hi")
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(revoked.value)[0].reason == "INVALID_API_KEY"


async def test_keys_are_stored_only_as_hashes(venna: Venna) -> None:
    with sqlite3.connect(venna.db_path) as db:
        stored = " ".join(str(value) for row in db.execute("SELECT * FROM api_keys") for value in row)
    assert venna.alpha.key not in stored and venna.beta.key not in stored


# ---------------------------------------------------------------------------------------- isolation


async def test_another_workspace_cannot_see_or_touch_a_response(venna: Venna) -> None:
    mine = await venna.alpha.create(input="private words", background=False)
    background = await venna.alpha.create(input="private too", background=True)

    async def refused(call: object) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call  # type: ignore[misc]
        return caught.value

    unknown_error = await refused(venna.beta.get("resp_0000"))
    for response_id in (mine.id, background.id):
        for call in (
            venna.beta.get(response_id),
            venna.beta.delete(response_id),
            venna.beta.cancel(response_id),
            venna.beta.input_items(response_id),
            venna.beta.resume(response_id),
        ):
            error = await refused(call)
            # Exactly what an unknown id gets, so existence does not leak.
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert details(error)[0].reason == details(unknown_error)[0].reason
            assert error.details() == (unknown_error.details() or "").replace("resp_0000", response_id)
        chained = await refused(venna.beta.create(input="x", previous_response_id=response_id))
        assert chained.code() == grpc.StatusCode.NOT_FOUND

    # Still intact for its owner.
    assert (await venna.alpha.get(mine.id)).id == mine.id
    assert (await venna.alpha.input_items(mine.id)).data


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"key": "v" * 513}}, "metadata"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_output_tokens": 15}, "max_output_tokens"),
        ({"model": ""}, "model"),
        ({"model": "no-such-model"}, "model"),
        ({"model": "echo:delay_ms=banana"}, "model"),
        ({"include": ["not.a.thing"]}, "include"),
        ({"input": [response_pb2.Item()]}, "input[0]"),
        ({"input": [response_pb2.Item(message=response_pb2.Message())]}, "input[0].role"),
    ],
)
async def test_invalid_requests_name_the_field(venna: Venna, fields: dict[str, object], param: str) -> None:
    request: dict[str, object] = {"input": "hello"}
    request.update(fields)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await venna.alpha.create(**request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = details(caught.value)
    assert info.metadata["param"] == param
    assert param in violations
    assert caught.value.details()
    # Nothing was stored for a rejected request.
    with sqlite3.connect(venna.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0


async def test_limits_at_the_boundary_are_accepted(venna: Venna) -> None:
    response = await venna.alpha.create(
        input="ok",
        metadata={("k" * 63 + str(n % 10))[:64]: "v" * 512 for n in range(16)},
        temperature=2.0,
        top_p=0.0,
        max_output_tokens=16,
    )
    assert response.status == response_pb2.RESPONSE_STATUS_COMPLETED
    assert response.temperature == 2.0 and response.top_p == 0.0 and response.max_output_tokens == 16


# ---------------------------------------------------------------------------------------- pagination


async def paged_ids(client: Client, response_id: str, **fields: object) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    after: str | None = None
    while True:
        request = dict(fields)
        if after is not None:
            request["after"] = after
        page = await client.input_items(response_id, **request)
        pages += 1
        ids += [item.message.id for item in page.data]
        if page.data:
            assert page.first_id == page.data[0].message.id
            assert page.last_id == page.data[-1].message.id
        if not page.has_more:
            return ids, pages
        after = page.last_id


async def test_input_items_page_both_ways(venna: Venna) -> None:
    texts = [f"message {n}" for n in range(7)]
    response = await venna.alpha.create(input=[user_message(text) for text in texts])

    everything = await venna.alpha.input_items(response.id, order=service_pb2.ORDER_ASC)
    assert everything.object == "list"
    assert [item.message.content[0].input_text.text for item in everything.data] == texts
    in_order = [item.message.id for item in everything.data]

    ascending, pages = await paged_ids(venna.alpha, response.id, limit=3, order=service_pb2.ORDER_ASC)
    assert ascending == in_order and pages == 3
    descending, pages = await paged_ids(venna.alpha, response.id, limit=2)
    assert descending == in_order[::-1] and pages == 4

    # The ids are stable across listings.
    again = await venna.alpha.input_items(response.id, order=service_pb2.ORDER_ASC)
    assert [item.message.id for item in again.data] == in_order


async def test_input_items_defaults_and_limits(venna: Venna) -> None:
    response = await venna.alpha.create(input=[user_message(f"m{n}") for n in range(25)])
    page = await venna.alpha.input_items(response.id)
    assert len(page.data) == 20 and page.has_more
    assert page.data[0].message.content[0].input_text.text == "m24"

    for limit in (0, 101):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await venna.alpha.input_items(response.id, limit=limit)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(caught.value)[0].metadata["param"] == "limit"

    with pytest.raises(grpc.aio.AioRpcError) as unknown_after:
        await venna.alpha.input_items(response.id, after="msg_unknown")
    assert unknown_after.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(unknown_after.value)[0].metadata["param"] == "after"


# ---------------------------------------------------------------------------------------- deletion


async def test_delete_removes_the_response_its_items_and_events(venna: Venna) -> None:
    kept = await venna.alpha.create(input="keep me")
    doomed = await venna.alpha.create(input="delete me", background=True)
    await venna.alpha.resume(doomed.id)  # wait until it has finished

    deleted = await venna.alpha.delete(doomed.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (doomed.id, "response", True)

    for call in (
        venna.alpha.get(doomed.id),
        venna.alpha.delete(doomed.id),
        venna.alpha.input_items(doomed.id),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with sqlite3.connect(venna.db_path) as db:
        for table in ("responses", "items", "events"):
            column = "id" if table == "responses" else "response_id"
            assert (
                db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", [doomed.id]).fetchone()[0] == 0
            )
    assert (await venna.alpha.get(kept.id)).id == kept.id


async def test_a_second_server_cannot_take_a_busy_port(tmp_path: Path) -> None:
    """gRPC shares ports by default; Venna does not, so a second server fails instead of
    silently answering half the calls from another database."""
    async with serving(tmp_path / "one.db") as venna:
        second = VennaServer(ServerConfig(grpc_listen=venna.server.address, db_path=tmp_path / "two.db"))
        with pytest.raises(OSError, match="cannot listen"):
            await second.start()
        await second.close()
        assert (await venna.alpha.create(input="still here")).status == response_pb2.RESPONSE_STATUS_COMPLETED
