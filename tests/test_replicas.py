"""Two real `venna serve` replicas on one PostgreSQL database behave as one service: whatever
one stores the other serves, a stream is followed from either, a cancel or delete on one stops
the other's run, and the work of a replica killed with SIGKILL is settled or run by the other
within its lease."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.process_harness import ROOT, ServeProcess, create_key, serving

# Short leases, so that a lost replica's work is recovered within seconds.
LEASE_SECONDS = 2.0
# Echo words one every 20 ms: 300 words run for about six seconds.
SLOW = "echo:delay_ms=20"
LONG_INPUT = " ".join(f"w{index}" for index in range(300))


@contextlib.contextmanager
def two_replicas(url: str, tmp_path: Path, *extra: str) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    with (
        serving(url, tmp_path / "a.log", "--lease-seconds", str(LEASE_SECONDS), *extra) as first,
        serving(url, tmp_path / "b.log", "--lease-seconds", str(LEASE_SECONDS), *extra) as second,
    ):
        yield first, second


@contextlib.asynccontextmanager
async def client(server: ServeProcess, key: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=30
    ) as http:
        yield http


async def stream_events(http: httpx.AsyncClient, response_id: str) -> list[dict[str, Any]]:
    """The response's events as ``GET /responses/{id}?stream=true`` sends them, to the end."""
    events = []
    async with http.stream("GET", f"/responses/{response_id}", params={"stream": "true"}) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


async def wait_for(
    http: httpx.AsyncClient, response_id: str, statuses: set[str], within: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        found: dict[str, Any] = (await http.get(f"/responses/{response_id}")).json()
        if found["status"] in statuses:
            return found
        assert time.monotonic() < deadline, f"{response_id} still {found['status']} after {within} s"
        await asyncio.sleep(0.05)


async def wait_for_output(http: httpx.AsyncClient, response_id: str) -> None:
    """Until the response runs and some of its output is stored."""
    deadline = time.monotonic() + 10
    while len(await stream_prefix(http, response_id)) < 6:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def stream_prefix(http: httpx.AsyncClient, response_id: str) -> list[str]:
    """The event types stored so far (the stream read until it waits for more)."""
    names: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.3):
            async with http.stream("GET", f"/responses/{response_id}", params={"stream": "true"}) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("event: "):
                        names.append(line.removeprefix("event: "))
    return names


def check_one_stream(events: list[dict[str, Any]], terminal: str | None) -> None:
    """Numbered from 0 without a gap; ``terminal`` once, last (no terminal event at all for None)."""
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    ends = [event["type"] for event in events if event["type"] in TERMINAL_TYPES]
    assert ends == ([terminal] if terminal else []), ends
    if terminal:
        assert events[-1]["type"] == terminal


async def venna_cli(*argv: str) -> str:
    """What a `venna` command prints, run as an operator runs it (the loop stays free meanwhile)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "venna.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


TERMINAL_TYPES = {"response.completed", "response.incomplete", "response.failed"}


async def test_what_one_replica_stores_the_other_serves(postgres_url: str, tmp_path: Path) -> None:
    key = create_key(postgres_url, "alpha")
    stranger = create_key(postgres_url, "beta")
    with two_replicas(postgres_url, tmp_path) as (a, b):
        async with client(a, key) as on_a, client(b, key) as on_b:
            first = (await on_a.post("/responses", json={"model": "echo", "input": "hello from a"})).json()
            assert (await on_b.get(f"/responses/{first['id']}")).json() == first
            second = (
                await on_b.post(
                    "/responses",
                    json={"model": "echo", "input": "and b", "previous_response_id": first["id"]},
                )
            ).json()
            assert second["usage"]["input_tokens"] == 3 + 3 + 2  # the chain, whose head A stored
            items = (await on_a.get(f"/responses/{second['id']}/input_items")).json()
            assert [item["content"][0]["text"] for item in items["data"]] == ["and b"]
            items = (await on_b.get(f"/responses/{first['id']}/input_items")).json()
            assert [item["content"][0]["text"] for item in items["data"]] == ["hello from a"]
            hidden = await on_b.get(
                f"/responses/{first['id']}", headers={"authorization": f"Bearer {stranger}"}
            )
            assert hidden.status_code == 404
            assert (await on_b.delete(f"/responses/{first['id']}")).json()["deleted"] is True
            assert (await on_a.get(f"/responses/{first['id']}")).status_code == 404
            assert (await on_a.delete(f"/responses/{first['id']}")).status_code == 404


async def test_a_background_response_on_one_replica_is_followed_on_the_other(
    postgres_url: str, tmp_path: Path
) -> None:
    key = create_key(postgres_url, "alpha")
    with two_replicas(postgres_url, tmp_path) as (a, b):
        async with client(a, key) as on_a, client(b, key) as on_b:
            made = (
                await on_a.post(
                    "/responses",
                    json={"model": "echo:delay_ms=5", "input": LONG_INPUT, "background": True},
                )
            ).json()
            followed = await stream_events(on_b, made["id"])  # from the start, while A runs it
            check_one_stream(followed, "response.completed")
            assert followed[-1]["response"]["output"][0]["content"][0]["text"] == LONG_INPUT
            # Exactly what A stored, event for event.
            assert await stream_events(on_a, made["id"]) == followed
            assert (await on_b.get(f"/responses/{made['id']}")).json()["status"] == "completed"


async def test_a_cancel_on_one_replica_stops_the_run_on_the_other(postgres_url: str, tmp_path: Path) -> None:
    key = create_key(postgres_url, "alpha")
    with two_replicas(postgres_url, tmp_path) as (a, b):
        async with client(a, key) as on_a, client(b, key) as on_b:
            made = (
                await on_a.post("/responses", json={"model": SLOW, "input": LONG_INPUT, "background": True})
            ).json()
            await wait_for_output(on_b, made["id"])
            follower = asyncio.create_task(stream_events(on_b, made["id"]))
            started = time.monotonic()
            cancelled = (await on_b.post(f"/responses/{made['id']}/cancel")).json()
            took = time.monotonic() - started
            assert cancelled["status"] == "cancelled"
            assert took < 2.0, f"the owner answered the cancel in {took:.2f} s"
            # Stored by its owner, with what it had generated: not a bare take-over.
            text = cancelled["output"][0]["content"][0]["text"]
            assert text and LONG_INPUT.startswith(text) and text != LONG_INPUT
            events = await asyncio.wait_for(follower, 10)
            check_one_stream(events, None)  # a cancelled stream simply ends
            stored = len(await stream_events(on_a, made["id"]))
            await asyncio.sleep(0.5)
            assert len(await stream_events(on_a, made["id"])) == stored  # A stopped generating
            assert (await on_a.get(f"/responses/{made['id']}")).json()["status"] == "cancelled"

            # A delete on B stops A's run too; its usage is kept.
            doomed = (
                await on_a.post("/responses", json={"model": SLOW, "input": LONG_INPUT, "background": True})
            ).json()
            await wait_for_output(on_b, doomed["id"])
            assert (await on_b.delete(f"/responses/{doomed['id']}")).json()["deleted"] is True
            assert (await on_a.get(f"/responses/{doomed['id']}")).status_code == 404
            deadline = time.monotonic() + 5
            while True:  # A's run of it still has its usage record
                report = json.loads(await venna_cli("usage", "--json", "--db", postgres_url))
                [alpha] = report["workspaces"]
                if alpha["total"]["responses"] == 2:
                    break
                assert time.monotonic() < deadline, alpha
                await asyncio.sleep(0.1)
    log = (tmp_path / "a.log").read_text()
    assert "Traceback" not in log, log


async def test_a_killed_replica_s_work_is_settled_by_the_other_within_its_lease(
    postgres_url: str, tmp_path: Path
) -> None:
    """A runs one background response and holds a second queued behind it (one slot); SIGKILL
    A. B fails the running one (one ``response.failed``, last) and runs the queued one to its
    end, both within the lease and a renewal period; a follower on B of the running one is
    ended by that failure; a cancel of a third, queued one asked of nobody is taken over."""
    key = create_key(postgres_url, "alpha")
    with two_replicas(postgres_url, tmp_path, "--background-concurrency", "1") as (a, b):
        async with client(a, key) as on_a, client(b, key) as on_b:
            body = {"model": SLOW, "input": LONG_INPUT, "background": True}
            running = (await on_a.post("/responses", json=body)).json()
            queued = (await on_a.post("/responses", json={**body, "model": "echo:delay_ms=1"})).json()
            await wait_for_output(on_b, running["id"])
            assert (await on_b.get(f"/responses/{queued['id']}")).json()["status"] == "queued"
            follower = asyncio.create_task(stream_events(on_b, running["id"]))
            await asyncio.sleep(0.2)
            a.kill()
            killed = time.monotonic()

            failed = await wait_for(on_b, running["id"], {"failed"}, within=LEASE_SECONDS + 5)
            settled_in = time.monotonic() - killed
            assert failed["error"]["code"] == "server_error"
            followed = await asyncio.wait_for(follower, 10)
            check_one_stream(followed, "response.failed")
            check_one_stream(await stream_events(on_b, running["id"]), "response.failed")

            finished = await wait_for(on_b, queued["id"], {"completed"}, within=LEASE_SECONDS + 10)
            assert finished["output"][0]["content"][0]["text"] == LONG_INPUT
            check_one_stream(await stream_events(on_b, queued["id"]), "response.completed")
            assert settled_in < LEASE_SECONDS + 3, settled_in
    log = (tmp_path / "b.log").read_text()
    assert "Traceback" not in log, log


@contextlib.asynccontextmanager
async def queued_on_a_killed_replica(
    url: str, tmp_path: Path, lease_seconds: str
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """Replica A (one slot, ``lease_seconds``) holds a running and a queued response and is
    killed; yields a client of replica B (a long lease: it looks for lost work rarely) and the
    queued response's id."""
    key = create_key(url, "alpha")
    with (
        serving(
            url, tmp_path / "a.log", "--lease-seconds", lease_seconds, "--background-concurrency", "1"
        ) as a,
        serving(url, tmp_path / "b.log", "--lease-seconds", "60") as b,
    ):
        async with client(a, key) as on_a, client(b, key) as on_b:
            body = {"model": SLOW, "input": LONG_INPUT, "background": True}
            await on_a.post("/responses", json=body)
            queued = (await on_a.post("/responses", json=body)).json()
            a.kill()
            yield on_b, queued["id"]


async def test_a_cancel_nobody_answers_is_taken_over(postgres_url: str, tmp_path: Path) -> None:
    """The owner of a queued response is gone (SIGKILL) but its lease has not expired yet: a
    cancel waits for it a while, then takes the response over and cancels it itself."""
    async with queued_on_a_killed_replica(postgres_url, tmp_path, "60") as (on_b, queued):
        cancelled = (await on_b.post(f"/responses/{queued}/cancel")).json()
        assert cancelled["status"] == "cancelled"
        assert (await on_b.get(f"/responses/{queued}")).json()["status"] == "cancelled"
        check_one_stream(await stream_events(on_b, queued), None)


async def test_a_cancel_of_a_lost_replica_s_response_is_answered_at_once(
    postgres_url: str, tmp_path: Path
) -> None:
    """A's lease has expired (A was killed) but B would not look for lost work for a while (its
    own lease is long): a cancel on B claims the response and cancels it at once, without
    waiting for an owner that cannot answer."""
    async with queued_on_a_killed_replica(postgres_url, tmp_path, "1") as (on_b, queued):
        await asyncio.sleep(1.5)  # A's lease is over
        started = time.monotonic()
        cancelled = (await on_b.post(f"/responses/{queued}/cancel")).json()
        took = time.monotonic() - started
        assert cancelled["status"] == "cancelled"
        assert took < 2.0, f"the cancel took {took:.1f} s"
        check_one_stream(await stream_events(on_b, queued), None)


async def test_a_key_revoked_is_refused_by_every_replica_within_a_second(
    postgres_url: str, tmp_path: Path
) -> None:
    key = create_key(postgres_url, "alpha")
    with two_replicas(postgres_url, tmp_path, "--key-cache-seconds", "60") as (a, b):
        async with client(a, key) as on_a, client(b, key) as on_b:
            for http in (on_a, on_b):  # both trust the key now, for a minute
                assert (
                    await http.post("/responses", json={"model": "echo", "input": "hi"})
                ).status_code == 200
            listing = await venna_cli("keys", "list", "--db", postgres_url)
            key_id = next(word for word in listing.split() if word.startswith("key_"))
            await venna_cli("keys", "revoke", key_id, "--db", postgres_url)
            revoked = time.monotonic()
            for http in (on_b, on_a):
                while (
                    await http.post("/responses", json={"model": "echo", "input": "hi"})
                ).status_code != 401:
                    assert time.monotonic() - revoked < 1.0, "a revoked key still works on a replica"
                    await asyncio.sleep(0.02)
