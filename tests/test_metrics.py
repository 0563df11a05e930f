"""``GET /metrics``: the server's Prometheus metrics, read with prometheus-client's own parser,
moving with traffic: calls by method and status, latency, open streams, background work, and
tokens by workspace and model."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_venice import FakeVenice, error, text_stream
from tests.http_harness import HttpVenna, running
from tests.process_harness import serving
from tests.test_process import client_for, running_server, venna_command
from tests.test_venice_backend import free_port
from venna.responses.v1 import models_pb2, models_pb2_grpc


@pytest.fixture
def http_venna(tmp_path: Path) -> Iterator[HttpVenna]:
    yield from running(HttpVenna(tmp_path / "venna.db"))


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(exposition: str) -> Samples:
    """Every sample of a Prometheus exposition, by name and labels, as prometheus-client reads it."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def scrape(venna: HttpVenna) -> Samples:
    """Every sample of GET /metrics."""
    reply = httpx.get(venna.base_url.removesuffix("/v1") + "/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return samples_of(reply.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_traffic(http_venna: HttpVenna) -> None:
    headers = {"authorization": f"Bearer {http_venna.alpha}"}
    before = scrape(http_venna)
    created = httpx.post(
        f"{http_venna.base_url}/responses", json={"model": "echo", "input": "one two three"}, headers=headers
    )
    assert created.status_code == 200
    with httpx.stream(
        "POST",
        f"{http_venna.base_url}/responses",
        json={"model": "echo:delay_ms=300", "input": "four five", "stream": True},
        headers=headers,
    ) as streamed:
        assert streamed.status_code == 200
        during = scrape(http_venna)
        list(streamed.iter_lines())
    missing = httpx.get(f"{http_venna.base_url}/responses/resp_nope", headers=headers)
    assert missing.status_code == 404
    refused = httpx.get(f"{http_venna.base_url}/responses/resp_nope")
    assert refused.status_code == 401
    after = scrape(http_venna)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    service = "ResponsesService"
    assert grew("venna_rpc_calls_total", service=service, method="CreateResponse", code="OK") == 1
    assert grew("venna_rpc_calls_total", service=service, method="StreamResponse", code="OK") == 1
    assert grew("venna_rpc_calls_total", service=service, method="GetResponse", code="NOT_FOUND") == 1
    assert grew("venna_rpc_duration_seconds_count", service=service, method="CreateResponse") == 1
    assert grew("venna_rpc_duration_seconds_sum", service=service, method="StreamResponse") >= 0.3
    assert value(during, "venna_rpc_open_streams", method="StreamResponse") == 1
    assert value(after, "venna_rpc_open_streams", method="StreamResponse") == 0
    # Tokens are labelled by workspace id; alpha's is the only one with any.
    (workspace,) = {dict(labels)["workspace"] for (name, labels) in after if name == "venna_tokens_total"}
    assert grew("venna_tokens_total", workspace=workspace, model="echo", kind="input") == 3
    assert grew("venna_tokens_total", workspace=workspace, model="echo:delay_ms=300", kind="output") == 2


def test_background_work_is_a_gauge(http_venna: HttpVenna) -> None:
    headers = {"authorization": f"Bearer {http_venna.alpha}"}
    queued = httpx.post(
        f"{http_venna.base_url}/responses",
        json={"model": "echo:delay_ms=50", "input": " ".join(["w"] * 20), "background": True},
        headers=headers,
    ).json()
    assert (
        value(scrape(http_venna), "venna_background_responses", state="running")
        + value(scrape(http_venna), "venna_background_responses", state="queued")
        >= 1
    )
    deadline = time.monotonic() + 10
    while (
        httpx.get(f"{http_venna.base_url}/responses/{queued['id']}", headers=headers).json()["status"]
        != "completed"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)
    assert value(scrape(http_venna), "venna_background_responses", state="running") == 0


async def test_a_grpc_only_server_serves_metrics_on_its_own_address(tmp_path: Path) -> None:
    """`venna serve --no-http --metrics-listen HOST:PORT`: a real process, scraped while it
    serves gRPC calls."""
    db = tmp_path / "venna.db"
    key = venna_command("keys", "create", "--workspace", "alpha", db=db).stdout.strip()
    port = free_port()
    with running_server(db, "--metrics-listen", f"127.0.0.1:{port}") as (_, address):
        async with client_for(address, key) as client:
            await client.create(input="counted once")
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.get(f"http://127.0.0.1:{port}/metrics")
    samples = samples_of(reply.text)
    assert (
        value(
            samples, "venna_rpc_calls_total", service="ResponsesService", method="CreateResponse", code="OK"
        )
        == 1
    )


# ------------------------------------------------------------------ request ids and access log


def test_a_clients_request_id_is_kept_passed_on_and_logged(
    http_venna: HttpVenna, caplog: pytest.LogCaptureFixture
) -> None:
    """The id comes back, reaches the service in the call's metadata and is in the call's access
    line, with the workspace, the model and the status; the key never is."""
    caplog.set_level(logging.INFO, logger="venna.access")
    reply = httpx.post(
        f"{http_venna.base_url}/responses",
        json={"model": "echo", "input": "traced"},
        headers={"authorization": f"Bearer {http_venna.alpha}", "x-request-id": "trace-abc.123"},
    )
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "trace-abc.123"
    lines = [record.getMessage() for record in caplog.records if record.name == "venna.access"]
    (line,) = [line for line in lines if "request_id=trace-abc.123" in line]
    assert line.startswith("ResponsesService/CreateResponse OK ")
    assert "model=echo" in line and "workspace=ws_" in line
    assert http_venna.alpha not in caplog.text


def test_grpc_callers_get_their_request_id_back_or_a_new_one(
    http_venna: HttpVenna, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="venna.access")
    key = (("authorization", f"Bearer {http_venna.alpha}"),)
    with grpc.insecure_channel(http_venna.grpc_address) as channel:
        models = models_pb2_grpc.ModelsServiceStub(channel)
        _, sent = models.ListModels.with_call(
            models_pb2.ListModelsRequest(), metadata=(*key, ("x-request-id", "grpc-id-7"))
        )
        _, fresh = models.ListModels.with_call(models_pb2.ListModelsRequest(), metadata=key)
        with pytest.raises(grpc.RpcError) as refused:  # an error carries it too
            models.ListModels(models_pb2.ListModelsRequest(), metadata=(("x-request-id", "grpc-id-8"),))
    assert dict(sent.initial_metadata())["x-request-id"] == "grpc-id-7"
    generated = str(dict(fresh.initial_metadata())["x-request-id"])
    assert generated.startswith("req_") and len(generated) == 36
    assert dict(refused.value.initial_metadata())["x-request-id"] == "grpc-id-8"  # type: ignore[attr-defined]
    logged = [record.getMessage() for record in caplog.records if record.name == "venna.access"]
    assert any(f"request_id={generated}" in line for line in logged)


@pytest.mark.parametrize("sent", ["has spaces in it", "x" * 129, "line\\nbreak"])
def test_an_unusable_request_id_is_replaced(http_venna: HttpVenna, sent: str) -> None:
    reply = httpx.get(f"{http_venna.base_url}/models", headers={"x-request-id": sent})
    assert reply.headers["x-request-id"].startswith("req_")


def test_json_logs_are_one_object_per_line_with_the_access_fields(tmp_path: Path) -> None:
    """`venna serve --log-format json`: every line of its log parses, and a call's access line
    carries its fields as fields (and no key)."""
    db = tmp_path / "venna.db"
    key = venna_command("keys", "create", "--workspace", "alpha", db=db).stdout.strip()
    log = tmp_path / "serve.log"
    with serving(db, log, "--log-format", "json", "--log-level", "INFO") as server:
        reply = httpx.post(
            server.base_url + "/responses",
            json={"model": "echo", "input": "logged"},
            headers={"authorization": f"Bearer {key}", "x-request-id": "json-log-1"},
            timeout=10,
        )
        assert reply.status_code == 200
        server.terminate()
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    (access,) = [entry for entry in entries if entry.get("request_id") == "json-log-1"]
    assert access["logger"] == "venna.access"
    assert (access["method"], access["code"], access["model"]) == (
        "ResponsesService/CreateResponse",
        "OK",
        "echo",
    )
    assert access["workspace"].startswith("ws_") and access["duration_ms"] >= 0
    assert key not in log.read_text()


# ------------------------------------------------------------------ upstreams and the store


def test_upstream_attempts_retries_and_store_commits_are_measured(
    tmp_path: Path, fake: FakeVenice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VENICE_BASE_URL", fake.base_url)
    monkeypatch.setenv("VENICE_API_KEY", "metrics-upstream-key")
    fake.queue(error(503, headers={"retry-after": "0"}), text_stream(["fine", " now"]))
    venna = HttpVenna(tmp_path / "venna.db")
    venna.start()  # after the environment names the upstream: the server's routing reads it
    try:
        before = scrape(venna)
        reply = httpx.post(
            f"{venna.base_url}/responses",
            json={"model": "venice/some-model", "input": "hi"},
            headers={"authorization": f"Bearer {venna.alpha}"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        after = scrape(venna)
    finally:
        venna.stop()
    assert value(after, "venna_upstream_requests_total", upstream="venice", outcome="http_503") == 1
    assert value(after, "venna_upstream_requests_total", upstream="venice", outcome="ok") == 1
    assert value(after, "venna_upstream_retries_total", upstream="venice", reason="http_503") == 1
    assert value(after, "venna_upstream_response_seconds_count", upstream="venice") == 2
    # The response's writes were committed, in batches of at least one call.
    commits = value(after, "venna_store_commit_seconds_count") - value(
        before, "venna_store_commit_seconds_count"
    )
    assert commits >= 1
    assert value(after, "venna_store_commit_batch_size_sum") >= value(
        after, "venna_store_commit_batch_size_count"
    )
