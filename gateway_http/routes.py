"""The shim's routes, from the contract's ``google.api.http`` annotations: where a unary and a
server-streaming RPC share a route, ``stream`` picks the streaming one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2
from google.protobuf.descriptor import MethodDescriptor

from venna.gateway_http.client import SERVICES


@dataclass(frozen=True, slots=True)
class Binding:
    """The RPCs behind one HTTP route."""

    verb: str
    template: str
    has_body: bool
    unary: MethodDescriptor | None
    streaming: MethodDescriptor | None


def bindings() -> list[Binding]:
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for method in (method for service in SERVICES for method in service.methods):
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        if verb is None:
            continue
        entry = grouped.setdefault((verb.upper(), getattr(rule, verb)), {"body": bool(rule.body)})
        entry["streaming" if method.server_streaming else "unary"] = method
    return [
        Binding(verb, template, entry["body"], entry.get("unary"), entry.get("streaming"))
        for (verb, template), entry in grouped.items()
    ]


def pick(binding: Binding, stream: bool) -> MethodDescriptor:
    """The RPC of a route: the streaming one when asked for and there is one."""
    method = binding.streaming if stream and binding.streaming else binding.unary or binding.streaming
    assert method is not None
    return method
