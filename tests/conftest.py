"""Shared fixtures: a real Venna gRPC server on loopback over a real SQLite file."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from venna.responses.v1 import events_pb2, response_pb2, service_pb2, service_pb2_grpc
from venna.server.app import ServerConfig, VennaServer
from venna.server.routing import Router

pytest_plugins = ["tests.http_harness", "tests.fake_venice", "tests.postgres_harness"]


@dataclass
class Client:
    """The generated stub bound to one workspace key."""

    stub: service_pb2_grpc.ResponsesServiceAsyncStub
    key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)

    async def create(self, **fields: Any) -> response_pb2.Response:
        return await self.stub.CreateResponse(make_request(**fields), metadata=self.metadata)

    async def stream(self, **fields: Any) -> list[events_pb2.ResponseStreamEvent]:
        call = self.stub.StreamResponse(make_request(**fields), metadata=self.metadata)
        return [event async for event in call]

    async def get(self, response_id: str) -> response_pb2.Response:
        return await self.stub.GetResponse(
            service_pb2.GetResponseRequest(response_id=response_id), metadata=self.metadata
        )

    async def resume(
        self, response_id: str, starting_after: int | None = None
    ) -> list[events_pb2.ResponseStreamEvent]:
        request = service_pb2.ResumeResponseStreamRequest(response_id=response_id)
        if starting_after is not None:
            request.starting_after = starting_after
        return [event async for event in self.stub.ResumeResponseStream(request, metadata=self.metadata)]

    async def cancel(self, response_id: str) -> response_pb2.Response:
        return await self.stub.CancelResponse(
            service_pb2.CancelResponseRequest(response_id=response_id), metadata=self.metadata
        )

    async def delete(self, response_id: str) -> service_pb2.DeleteResponseResponse:
        return await self.stub.DeleteResponse(
            service_pb2.DeleteResponseRequest(response_id=response_id), metadata=self.metadata
        )

    async def input_items(self, response_id: str, **fields: Any) -> service_pb2.ListInputItemsResponse:
        return await self.stub.ListInputItems(
            service_pb2.ListInputItemsRequest(response_id=response_id, **fields), metadata=self.metadata
        )


def user_message(text: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.role = response_pb2.ROLE_USER
    item.message.content.add().input_text.text = text
    return item


def make_request(
    *, input: str | Sequence[response_pb2.Item] = (), model: str = "echo", **fields: Any
) -> service_pb2.CreateResponseRequest:
    """A CreateResponseRequest; a string ``input`` is one user message, as in the JSON API."""
    items = [user_message(input)] if isinstance(input, str) else list(input)
    return service_pb2.CreateResponseRequest(model=model, input=items, **fields)


def output_text(response: response_pb2.Response) -> str:
    """The concatenated output_text of a response's messages (the SDK's ``output_text``)."""
    return "".join(
        part.output_text.text
        for item in response.output
        if item.HasField("message")
        for part in item.message.content
        if part.HasField("output_text")
    )


def event_type(event: events_pb2.ResponseStreamEvent) -> str:
    """The Responses API type string of an event, from the contract's json_type option."""
    from venna.responses.v1 import options_pb2

    member = event.WhichOneof("event")
    assert member is not None
    message = getattr(event, member)
    return str(message.DESCRIPTOR.GetOptions().Extensions[options_pb2.json_type])


@dataclass
class Venna:
    server: VennaServer
    channel: grpc.aio.Channel
    alpha: Client
    beta: Client
    db_path: Path

    def client(self, key: str) -> Client:
        return Client(async_stub(self.channel), key)


def async_stub(channel: grpc.aio.Channel) -> service_pb2_grpc.ResponsesServiceAsyncStub:
    return service_pb2_grpc.ResponsesServiceStub(channel)  # the generated stub is typed by channel kind


def start_config(db_path: Path, **overrides: Any) -> ServerConfig:
    return ServerConfig(grpc_listen="127.0.0.1:0", db_path=db_path, shutdown_grace=2.0, **overrides)


@contextlib.asynccontextmanager
async def serving(db_path: Path, router: Router | None = None, **config: Any) -> AsyncIterator[Venna]:
    """A started server over ``db_path`` with two workspaces, alpha and beta, each with a key."""
    server = VennaServer(start_config(db_path, **config), router=router)
    await server.start()
    alpha_key, _ = await server.store.create_key("alpha")
    beta_key, _ = await server.store.create_key("beta")
    channel = grpc.aio.insecure_channel(server.address)
    stub = async_stub(channel)
    try:
        yield Venna(server, channel, Client(stub, alpha_key), Client(stub, beta_key), db_path)
    finally:
        await channel.close(grace=None)
        await server.stop(grace=0.5)


@pytest.fixture
async def venna(tmp_path: Path) -> AsyncIterator[Venna]:
    async with serving(tmp_path / "venna.db") as started:
        yield started


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo a failed call carries."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error without google.rpc.Status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")
