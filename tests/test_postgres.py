"""`venna serve`, `venna keys` and `venna usage` on PostgreSQL (``--db postgresql://…``), as
real processes on a throwaway PostgreSQL server: the same API, stored in PostgreSQL, surviving
a restart."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.postgres_harness import PostgresServer
from tests.process_harness import ROOT, create_key, serving
from venna.backends.base import TextDelta
from venna.backends.store import Lease, open_store
from venna.backends.store.postgres import PostgresStore
from venna.responses.v1 import response_pb2
from venna.server.builder import ResponseBuilder
from venna.server.ids import new_id


def venna_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "venna.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def with_password(url: str) -> str:
    """The URL with a password (the test server trusts loopback, so any password works)."""
    return url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@", 1)


async def test_serve_on_postgresql_end_to_end(postgres_url: str, tmp_path: Path) -> None:
    url = with_password(postgres_url)
    key = create_key(url, "alpha")
    other = create_key(url, "beta")
    log = tmp_path / "serve.log"
    with serving(url, log) as server:
        startup = log.read_text()
        assert "s3cret-pw" not in startup
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=10
        ) as http:
            first = (await http.post("/responses", json={"model": "echo", "input": "hello there"})).json()
            assert first["status"] == "completed"
            second = (
                await http.post(
                    "/responses",
                    json={"model": "echo", "input": "and again", "previous_response_id": first["id"]},
                )
            ).json()
            assert second["usage"]["input_tokens"] == 6  # the whole chain, rebuilt from PostgreSQL
            items = (await http.get(f"/responses/{second['id']}/input_items")).json()
            assert [item["content"][0]["text"] for item in items["data"]] == ["and again"]
            queued = (
                await http.post("/responses", json={"model": "echo", "input": "later", "background": True})
            ).json()
            deadline = time.monotonic() + 10
            while (await http.get(f"/responses/{queued['id']}")).json()["status"] != "completed":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            streamed = await http.get(f"/responses/{queued['id']}", params={"stream": "true"})
            assert streamed.text.count("event: response.completed") == 1
            stranger = await http.get(
                f"/responses/{first['id']}", headers={"authorization": f"Bearer {other}"}
            )
            assert stranger.status_code == 404
            assert (await http.delete(f"/responses/{second['id']}")).json()["deleted"] is True

    # Another process on the same database: everything is still there.
    with serving(url, log) as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=10
        ) as http:
            again = (await http.get(f"/responses/{first['id']}")).json()
            assert again["output"][0]["content"][0]["text"] == "hello there"
            assert (await http.get(f"/responses/{second['id']}")).status_code == 404

    report = venna_cli("usage", "--db", url, "--workspace", "alpha", "--json")
    assert report.returncode == 0, report.stderr
    (workspace,) = json.loads(report.stdout)["workspaces"]
    assert workspace["total"]["responses"] == 3  # usage outlives the deleted response
    listing = venna_cli("keys", "list", "--db", url)
    assert listing.returncode == 0 and "alpha" in listing.stdout and "beta" in listing.stdout


def test_an_unreachable_database_is_one_line_and_status_2(postgres_server: PostgresServer) -> None:
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{postgres_server.port}/no_such_database"
    for argv in (["keys", "list"], ["serve", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]):
        done = venna_cli(*argv, "--db", url)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("venna: --db postgresql://postgres:***@"), lines
        assert "no_such_database" in lines[0] and "s3cret-pw" not in done.stderr


async def test_a_key_revoked_elsewhere_is_refused_within_a_second(postgres_url: str, tmp_path: Path) -> None:
    """The server trusts accepted keys for a minute (--key-cache-seconds 60), yet a revocation by
    another process (`venna keys revoke`) reaches it as a notification and ends that trust."""
    key = create_key(postgres_url, "alpha")
    listing = venna_cli("keys", "list", "--db", postgres_url)
    key_id = next(word for word in listing.stdout.split() if word.startswith("key_"))
    with serving(postgres_url, tmp_path / "serve.log", "--key-cache-seconds", "60") as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=10
        ) as http:
            assert (await http.post("/responses", json={"model": "echo", "input": "hi"})).status_code == 200
            revoked = venna_cli("keys", "revoke", key_id, "--db", postgres_url)
            assert revoked.returncode == 0, revoked.stderr
            started = time.monotonic()
            while (await http.post("/responses", json={"model": "echo", "input": "hi"})).status_code != 401:
                assert time.monotonic() - started < 1.0, "the revoked key still works"
                await asyncio.sleep(0.02)


async def test_a_sqlite_store_moves_to_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """`venna db copy`: what a SQLite-backed server stored is served from PostgreSQL after the
    copy: responses, chains, input items, background streams, keys, usage and conversations."""
    sqlite_file = tmp_path / "venna.db"
    key = create_key(sqlite_file, "alpha")
    revoked_key = create_key(sqlite_file, "alpha")
    ids: dict[str, str] = {}
    with serving(sqlite_file, tmp_path / "sqlite.log") as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=10
        ) as http:
            first = (await http.post("/responses", json={"model": "echo", "input": "one two"})).json()
            second = (
                await http.post(
                    "/responses",
                    json={"model": "echo", "input": "three", "previous_response_id": first["id"]},
                )
            ).json()
            queued = (
                await http.post("/responses", json={"model": "echo", "input": "later on", "background": True})
            ).json()
            deadline = time.monotonic() + 10
            while (await http.get(f"/responses/{queued['id']}")).json()["status"] != "completed":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            conversation = (
                await http.post("/conversations", json={"items": [{"role": "user", "content": "kept"}]})
            ).json()
            ids = {
                "first": first["id"],
                "second": second["id"],
                "queued": queued["id"],
                "conversation": conversation["id"],
            }
    listing = venna_cli("keys", "list", "--db", str(sqlite_file))
    revoked_id = [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("key_")][1]
    assert venna_cli("keys", "revoke", revoked_id, "--db", str(sqlite_file)).returncode == 0
    before = json.loads(venna_cli("usage", "--db", str(sqlite_file), "--json").stdout)
    admin_key = venna_cli("keys", "create", "--admin", "--db", str(sqlite_file)).stdout.strip()
    limited = venna_cli(
        "limits", "set", "--workspace", "alpha", "--monthly-tokens", "123456", "--db", str(sqlite_file)
    )
    assert limited.returncode == 0, limited.stderr

    copied = venna_cli("db", "copy", "--from", str(sqlite_file), "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    shown = venna_cli("limits", "show", "--workspace", "alpha", "--db", postgres_url)
    assert "monthly tokens 123456" in shown.stdout  # limits and admin keys come along
    assert "3 responses" in copied.stderr and "2 api_keys" in copied.stderr
    again = venna_cli("db", "copy", "--from", str(sqlite_file), "--to", postgres_url)
    assert (again.returncode == 2 and "not empty" in again.stderr) or "already has" in again.stderr

    assert json.loads(venna_cli("usage", "--db", postgres_url, "--json").stdout) == before
    with serving(postgres_url, tmp_path / "postgres.log") as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=10
        ) as http:
            got = (await http.get(f"/responses/{ids['second']}")).json()
            assert got["output"][0]["content"][0]["text"] == "three"
            items = (await http.get(f"/responses/{ids['first']}/input_items")).json()
            assert items["data"][0]["content"][0]["text"] == "one two"
            followed = (
                await http.post(
                    "/responses",
                    json={"model": "echo", "input": "four", "previous_response_id": ids["second"]},
                )
            ).json()
            # The context rebuilt from PostgreSQL: "one two", its echo, "three", its echo, "four".
            assert followed["usage"]["input_tokens"] == 7
            replay = await http.get(f"/responses/{ids['queued']}", params={"stream": "true"})
            assert replay.text.count("event: response.completed") == 1
            refused = await http.get(
                f"/responses/{ids['first']}", headers={"authorization": f"Bearer {revoked_key}"}
            )
            assert refused.status_code == 401
            in_conversation = (
                await http.post(
                    "/responses", json={"model": "echo", "input": "more", "conversation": ids["conversation"]}
                )
            ).json()
            assert in_conversation["usage"]["input_tokens"] == 2  # "kept", copied, then "more"
            workspaces = await http.get("/admin/workspaces", headers={"authorization": f"Bearer {admin_key}"})
            assert workspaces.status_code == 200, workspaces.text
            assert workspaces.json()["data"][0]["limits"]["monthly_tokens"] == 123456


def test_copy_refuses_what_it_cannot_do(postgres_url: str, tmp_path: Path) -> None:
    missing = venna_cli("db", "copy", "--from", str(tmp_path / "missing.db"), "--to", postgres_url)
    assert missing.returncode == 2 and "no such database file" in missing.stderr
    backwards = venna_cli("db", "copy", "--from", postgres_url, "--to", str(tmp_path / "x.db"))
    assert backwards.returncode == 2 and "from a SQLite file" in backwards.stderr
    assert "Traceback" not in missing.stderr + backwards.stderr


async def test_a_response_run_elsewhere_is_followed_live_to_its_end(
    postgres_url: str, tmp_path: Path
) -> None:
    """A stream resumed on this server follows a background response another process (here the
    test itself, writing through the store as a replica would) runs: each event arrives as it
    is stored, and the stream ends with the terminal event."""
    key = create_key(postgres_url, "alpha")
    replica = open_store(postgres_url)
    await replica.open()
    try:
        workspace = await replica.authenticate(key)
        assert workspace is not None
        response = response_pb2.Response(
            id=new_id("resp"), object="response", created_at=int(time.time()), model="echo", background=True
        )
        response.status = response_pb2.RESPONSE_STATUS_IN_PROGRESS
        builder = ResponseBuilder(response)
        # Held by the test's lease, as a replica holds what it runs: the server leaves it alone.
        lease = Lease("srv_test_replica", 60_000)
        await replica.create_response(workspace, response, [], events=builder.created(), lease=lease)
        with serving(postgres_url, tmp_path / "serve.log") as server:
            async with httpx.AsyncClient(
                base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=20
            ) as http:
                received: list[tuple[str, float]] = []
                arrived = asyncio.Event()

                async def follow() -> None:
                    async with http.stream(
                        "GET", f"/responses/{response.id}", params={"stream": "true"}
                    ) as reply:
                        assert reply.status_code == 200
                        async for line in reply.aiter_lines():
                            if line.startswith("event: "):
                                received.append((line.removeprefix("event: "), time.monotonic()))
                                arrived.set()

                follower = asyncio.create_task(follow())
                await asyncio.sleep(0.5)  # the follower has read what exists and waits
                assert [name for name, _ in received] == ["response.created"]
                delays = []
                for word in ("one", "two", "three", "four", "five"):
                    events = builder.apply(TextDelta(f" {word}"))
                    before = len(received)
                    stored_at = time.monotonic()
                    assert await replica.append_events(response.id, events, lease=lease)
                    async with asyncio.timeout(5):
                        while len(received) < before + len(events):
                            arrived.clear()
                            await arrived.wait()
                    delays.append(received[-1][1] - stored_at)
                    await asyncio.sleep(0.05)
                final = builder.completed()
                assert await replica.save_response(
                    workspace, builder.response, events=final, finished=True, lease=lease
                )
                await asyncio.wait_for(follower, 5)
    finally:
        await replica.close()
    names = [name for name, _ in received]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert names.count("response.completed") == 1
    assert "response.output_text.delta" in names
    assert max(delays) < 0.5, delays  # woken by the notification, not the one-second poll


async def test_the_listening_connection_comes_back_after_it_is_lost(postgres_url: str) -> None:
    """The connection that hears other processes' notifications is killed server-side: it is
    reconnected, what may have been missed meanwhile is acted on (cached keys forgotten), and
    notifications arrive again."""
    store, other = PostgresStore(postgres_url), PostgresStore(postgres_url)
    await store.open()
    await other.open()
    try:
        heard = asyncio.Event()
        store.on_key_revoked(heard.set)
        listener = store._listener
        assert listener is not None
        await other.pool.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
        async with asyncio.timeout(5):
            await heard.wait()  # back, and every cached key forgotten
        heard.clear()
        _, record = await other.create_key("alpha")
        assert await other.revoke_key(record.id)
        async with asyncio.timeout(2):
            await heard.wait()
    finally:
        await store.close()
        await other.close()
