"""Server reflection under both names clients ask for: ``grpc.reflection.v1`` (grpcurl, buf
curl and newer grpc tools try it first) and ``grpc.reflection.v1alpha`` (older ones).

grpcio-reflection serves only v1alpha. v1 is the same protocol, message for message and field
for field, under another package name; so v1 is served by the same servicer through v1alpha's
(wire-identical) message classes, and a descriptor of the v1 file, made from v1alpha's by
renaming its package, lets clients describe the v1 service too.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def register_v1_descriptor() -> None:
    """Adds the v1 reflection file to the default descriptor pool (once), so that reflection
    can answer for the v1 service as for any other."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    source = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(source)
    old_package = source.package
    source.name = _V1_FILE
    source.package = "grpc.reflection.v1"
    for message in source.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{old_package}."):
                field.type_name = ".grpc.reflection.v1." + field.type_name.removeprefix(f".{old_package}.")
    for service in source.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old_package, "grpc.reflection.v1")
            method.output_type = method.output_type.replace(old_package, "grpc.reflection.v1")
    source.ClearField("options")
    pool.Add(source)


def reflection_servicer(service_names: tuple[str, ...]) -> Any:
    """The v1alpha servicer, listing ``service_names`` and both reflection services."""
    register_v1_descriptor()
    return reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]  # untyped package
        (*service_names, V1_SERVICE_NAME, reflection.SERVICE_NAME)
    )


def v1_handlers(servicer: Any) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The v1 service's one method, answered by ``servicer`` with v1alpha's messages."""
    return {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
