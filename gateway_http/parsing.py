"""Reading a request: its content type, JSON body, query parameters and forwarded metadata,
and watching for a client that leaves."""

from __future__ import annotations

import json
from typing import Any

import orjson
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from starlette.requests import HTTPConnection, Request
from starlette.types import Receive

from venna.gateway_http.client import Metadata
from venna.gateway_http.errors import BadRequest, quote
from venna.gateway_http.middleware import REQUEST_ID_KEY
from venna.gateway_http.tracing import trace_context

# Bodies larger than this are parsed and decoded in a worker thread, off the event loop.
OFFLOAD_BYTES = 1024 * 1024
# Request parameters of OpenAI's API that Venna does not implement: null is taken as "not
# given" (clients echo them back that way), any other value is refused by name.
UNSUPPORTED_PARAMETERS = frozenset(
    {
        "prompt",
        "moderation",
        "prompt_cache_retention",
        "prompt_cache_options",
    }
)


def query_fields(request: Request, message: Descriptor) -> dict[str, Any]:
    """Query parameters as JSON values of the request's fields (``include[]=a`` is a list).

    Parameters the request does not have (``stream``, which picked the RPC, or ones unknown
    here) are ignored, as web APIs commonly do.
    """
    fields: dict[str, Any] = {}
    for raw_key, value in request.query_params.multi_items():
        key = raw_key.removesuffix("[]")
        field = message.fields_by_name.get(key)
        if field is None or key in request.path_params:
            continue
        if field.is_repeated:
            fields.setdefault(key, []).append(value)
        else:
            fields[key] = _query_value(field, key, value)
    return fields


def query_bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise BadRequest(400, f"Invalid value for '{key}': expected a boolean.", key, "invalid_type")


def _query_value(field: FieldDescriptor, key: str, value: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        return query_bool(key, value)
    if field.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
        try:
            return int(value)
        except ValueError:
            raise BadRequest(
                400, f"Invalid value for '{key}': expected an integer.", key, "invalid_type"
            ) from None
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; any body that is not one is a 400, however it fails.

    orjson refuses nesting deeper than 1024 levels with the same error as any invalid JSON,
    where the standard library would raise RecursionError.
    """
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        data = _parse_surrogate_escapes(body, error)
    if not isinstance(data, dict):
        raise BadRequest(400, "The JSON body of your request must be an object.")
    return data


def _parse_surrogate_escapes(body: bytes, error: orjson.JSONDecodeError) -> Any:
    """Valid JSON may escape a lone UTF-16 surrogate ("\\ud800"), which orjson refuses.

    Such a body is read by the standard library instead, so that the codec names the field
    that holds text no proto string can carry.
    """
    unparsable = BadRequest(
        400, "We could not parse the JSON body of your request. The body must be valid JSON."
    )
    if "surrogate" not in str(error):
        raise unparsable from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise unparsable from None


def check_content_type(request: Request) -> None:
    """A body must be JSON; one without a Content-Type is taken as JSON, as curl users expect."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise BadRequest(
        415,
        f"Unsupported Content-Type '{quote(content_type)}': the request body must be 'application/json'.",
        None,
        "unsupported_media_type",
    )


async def disconnected(receive: Receive) -> None:
    """Returns once the client has closed its connection (the rest of any body is ignored)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def forwarded_metadata(request: HTTPConnection) -> Metadata:
    authorizations = request.headers.getlist("authorization")
    if len(authorizations) > 1:
        raise BadRequest(
            400,
            "The request has more than one Authorization header; send exactly one.",
            None,
            "invalid_authorization_header",
        )
    authorization = authorizations[0] if authorizations else ""
    request_id: Metadata = ()
    if REQUEST_ID_KEY in request.scope:
        request_id = (("x-request-id", str(request.scope[REQUEST_ID_KEY])),)
    # The W3C trace context goes along too, so that a client's trace continues in the service.
    passed_on = (*request_id, *trace_context(request.scope["headers"]))
    if not authorization:
        return passed_on
    # gRPC metadata values are printable ASCII; no valid key is anything else.
    if not (authorization.isascii() and authorization.isprintable()):
        raise BadRequest(
            401, "Invalid API key: the Authorization header is malformed.", None, "invalid_api_key"
        )
    return (("authorization", authorization), *passed_on)


def drop_unsupported(fields: dict[str, Any]) -> None:
    """Removes the parameters Venna does not support from a JSON body, in place: a null one is
    as good as absent; any other value is refused (400 ``unsupported_parameter``)."""
    for name in UNSUPPORTED_PARAMETERS.intersection(fields):
        if fields.pop(name) is not None:
            raise BadRequest(
                400, f"The '{name}' parameter is not supported by Venna.", name, "unsupported_parameter"
            )
