"""``GET /v1/models`` and gRPC ``ListModels``: the routing table's models, aliases included,
with each upstream's own list fetched from its ``GET /models`` and cached; as the official SDK's
``models.list()`` reads it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import serving
from tests.fake_venice import MODELS_PATH, FakeVenice
from tests.http_harness import HttpVenna, running
from venna.backends.base import Backend
from venna.backends.echo import EchoBackend
from venna.backends.responses import ResponsesUpstream
from venna.responses.v1 import models_pb2, models_pb2_grpc
from venna.server.routing import Router

UPSTREAM_MODELS = {
    "object": "list",
    "data": [
        {"id": "llama3.2", "object": "model", "created": 1_700_000_000, "owned_by": "library"},
        {"id": "qwen3:8b", "object": "model", "created": 1_700_000_001, "owned_by": "library"},
    ],
}


def router(fake: FakeVenice, *, down: str | None = None) -> Router:
    upstreams: dict[str, Backend] = {
        "echo": EchoBackend(),
        "local": ResponsesUpstream(fake.base_url, None, prefix="local/", dialect="chat"),
        # Configured but without its key: not offered.
        "venice": ResponsesUpstream(fake.base_url, "", prefix="venice/"),
    }
    if down is not None:
        upstreams["gone"] = ResponsesUpstream(down, None, prefix="gone/", connect_timeout=1.0)
    return Router(upstreams, {"small": "local/qwen3:8b"})


async def test_list_models_over_grpc_lists_local_aliases_and_upstream_models(
    tmp_path: Path, fake: FakeVenice
) -> None:
    fake.models = UPSTREAM_MODELS
    async with serving(tmp_path / "venna.db", router(fake)) as venna:
        stub = models_pb2_grpc.ModelsServiceStub(venna.channel)
        listed = await stub.ListModels(models_pb2.ListModelsRequest(), metadata=venna.alpha.metadata)
        again = await stub.ListModels(models_pb2.ListModelsRequest(), metadata=venna.alpha.metadata)
    assert listed.object == "list"
    assert [(model.id, model.owned_by) for model in listed.data] == [
        ("echo", "venna"),
        ("local/llama3.2", "library"),
        ("local/qwen3:8b", "library"),
        ("small", "venna"),
    ]
    assert listed.data[1].created == 1_700_000_000 and listed.data[1].object == "model"
    assert again == listed
    fetched = [record for record in fake.requests if record.path == MODELS_PATH]
    assert len(fetched) == 1, "the upstream's list is cached"
    assert "authorization" not in fetched[0].headers


async def test_an_upstream_that_cannot_list_does_not_hold_up_the_others(
    tmp_path: Path, fake: FakeVenice
) -> None:
    fake.models = UPSTREAM_MODELS
    async with serving(tmp_path / "venna.db", router(fake, down="http://127.0.0.1:9/v1")) as venna:
        stub = models_pb2_grpc.ModelsServiceStub(venna.channel)
        began = time.monotonic()
        listed = await stub.ListModels(models_pb2.ListModelsRequest(), metadata=venna.alpha.metadata)
        took = time.monotonic() - began
    assert "local/llama3.2" in [model.id for model in listed.data]
    assert not [model.id for model in listed.data if model.id.startswith("gone/")]
    assert took < 3.0


@pytest.fixture
def http_venna(tmp_path: Path, fake: FakeVenice) -> Iterator[HttpVenna]:
    fake.models = UPSTREAM_MODELS
    yield from running(HttpVenna(tmp_path / "venna.db", router=router(fake)))


def test_the_official_sdk_lists_the_models(http_venna: HttpVenna) -> None:
    client = openai.OpenAI(base_url=http_venna.base_url, api_key=http_venna.alpha)
    models = list(client.models.list())
    assert [model.id for model in models] == ["echo", "local/llama3.2", "local/qwen3:8b", "small"]
    assert all(model.object == "model" and model.owned_by and model.created > 0 for model in models)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=http_venna.base_url, api_key="vk_wrong").models.list()
