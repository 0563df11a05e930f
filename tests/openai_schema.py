"""Validate JSON bodies and SSE events against OpenAI's published Responses API schemas.

The schemas come from ``tests/fixtures/openai_schemas.json``, an extract of OpenAI's OpenAPI spec (see
``tests/fixtures/README.md``); nothing outside the repository is read. OpenAPI 3.1 schemas are JSON
Schema 2020-12 plus annotation keywords (``discriminator``, ``x-*``, ``example``); ``jsonschema`` ignores
keywords it does not know, so those only document. ``format`` is an annotation too (no format checker),
because the spec uses non-standard formats such as ``unixtime``.

Failures raise ``AssertionError`` so that pytest reports them as test failures, with the path inside the
instance and the failing constraint. For ``anyOf``/``oneOf`` unions (output items, content parts, events)
the error shown comes from the branch whose ``type`` enum matches the instance's ``type``, rather than
from whichever branch failed "least", which is what makes union failures readable.
"""

from __future__ import annotations

import functools
import heapq
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, relevance
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openai_schemas.json"
# Base URI of the fixture inside the registry; the fixture's own refs are relative ("#/schemas/X").
FIXTURE_URI = "urn:venna:test-fixture:openai-schemas"
SCHEMA_REF_PREFIX = "#/schemas/"
EVENT_UNION = "ResponseStreamEvent"
# Long messages embed the whole failing instance (a full Response for union failures): keep them readable.
MAX_MESSAGE_CHARS = 400
MAX_OTHER_ERRORS = 5

Schema = Mapping[str, Any]


@functools.cache
def _fixture() -> dict[str, Any]:
    """The fixture document, read once per test session."""
    document: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return document


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = _fixture()["schemas"]
    return schemas


@functools.cache
def _registry() -> Registry[Any]:
    """One resource holding every schema, so ``#/schemas/X`` refs resolve without network or file access."""
    resource: Resource[Any] = DRAFT202012.create_resource(_fixture())
    registry: Registry[Any] = Registry().with_resource(FIXTURE_URI, resource)
    return registry


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    """A validator per schema name, built on first use and then reused."""
    if schema_name not in _schemas():
        raise KeyError(f"no schema {schema_name!r} in {FIXTURE.name}")
    return Draft202012Validator(
        {"$ref": f"{FIXTURE_URI}{SCHEMA_REF_PREFIX}{schema_name}"}, registry=_registry()
    )


def _resolve(schema: object) -> object:
    """Follow a local ``$ref`` to its target so that a union branch can be inspected."""
    seen: set[str] = set()
    while isinstance(schema, Mapping) and isinstance(schema.get("$ref"), str):
        ref: str = schema["$ref"]
        name = ref.removeprefix(FIXTURE_URI).removeprefix(SCHEMA_REF_PREFIX)
        if name in seen or name not in _schemas():
            break
        seen.add(name)
        schema = _schemas()[name]
    return schema


def type_values(schema: object) -> frozenset[str]:
    """The values a schema allows for its ``type`` property (via ``$ref``, ``allOf``): its discriminator."""
    schema = _resolve(schema)
    if not isinstance(schema, Mapping):
        return frozenset()
    values: set[str] = set()
    type_property = schema.get("properties", {}).get("type")
    if isinstance(type_property, Mapping):
        type_property = _resolve(type_property)
    if isinstance(type_property, Mapping):
        if isinstance(type_property.get("const"), str):
            values.add(type_property["const"])
        values.update(v for v in type_property.get("enum", ()) if isinstance(v, str))
    for part in schema.get("allOf", ()):
        values |= type_values(part)
    return frozenset(values)


def _discriminated_branch(error: ValidationError) -> list[ValidationError] | None:
    """For a failed union, the errors of the one branch whose ``type`` matches the instance's, if any."""
    if error.validator not in ("anyOf", "oneOf") or not isinstance(error.validator_value, list):
        return None
    instance = error.instance
    if not isinstance(instance, Mapping) or not isinstance(instance.get("type"), str):
        return None
    matching = [
        i for i, branch in enumerate(error.validator_value) if instance["type"] in type_values(branch)
    ]
    if len(matching) != 1:
        return None
    branch_errors = [e for e in error.context or () if e.relative_schema_path[0] == matching[0]]
    return branch_errors or None


def best_error(errors: Iterable[ValidationError]) -> ValidationError | None:
    """``jsonschema.exceptions.best_match``, except that a union descends into the discriminated branch.

    Inside the chosen branch every error is real, so the most relevant one (the shallowest) is taken, as
    ``best_match`` does at the top level; without a discriminator the deepest sub-error wins, as there.
    """
    best = max(errors, key=relevance, default=None)
    while best is not None and best.context:
        branch = _discriminated_branch(best)
        if branch is not None:
            best = max(branch, key=relevance)
            continue
        smallest = heapq.nsmallest(2, best.context, key=relevance)
        if len(smallest) == 2 and relevance(smallest[0]) == relevance(smallest[1]):
            break
        best = smallest[0]
    return best


def _short(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + " …"


def _describe(error: ValidationError) -> str:
    """One line: where in the instance, what failed, and which keyword of which schema said so."""
    error = best_error([error]) or error
    schema_path = "/".join(str(part) for part in error.absolute_schema_path)
    return (
        f"at {error.json_path}: {_short(error.message)} (keyword {error.validator!r}, schema {schema_path})"
    )


def validate(instance: object, schema_name: str) -> None:
    """Assert that ``instance`` is valid under the named schema (a ``components.schemas`` key)."""
    errors = list(_validator(schema_name).iter_errors(instance))
    if not errors:
        return
    best = max(errors, key=relevance)
    lines = [f"not a valid {schema_name}: {_describe(best)}"]
    others = sorted((e for e in errors if e is not best), key=relevance, reverse=True)
    lines.extend(f"  also {_describe(e)}" for e in others[:MAX_OTHER_ERRORS])
    if len(others) > MAX_OTHER_ERRORS:
        lines.append(f"  ... and {len(others) - MAX_OTHER_ERRORS} more")
    raise AssertionError("\n".join(lines))


@functools.cache
def event_schemas() -> dict[str, str]:
    """SSE event ``type`` value -> event schema name, from the schemas listed in ``ResponseStreamEvent``."""
    mapping: dict[str, str] = {}
    for branch in _schemas()[EVENT_UNION]["anyOf"]:
        name = str(branch["$ref"]).removeprefix(SCHEMA_REF_PREFIX)
        values = type_values(branch)
        if len(values) != 1:
            raise ValueError(f"event schema {name} allows {len(values)} type values, expected exactly one")
        (value,) = values
        if value in mapping:
            raise ValueError(f"event type {value!r} is claimed by both {mapping[value]} and {name}")
        mapping[value] = name
    return mapping


def validate_event(event: Mapping[str, object]) -> None:
    """Assert that an SSE event's payload is valid under the event schema its ``type`` names."""
    event_type = event.get("type")
    schema_name = event_schemas().get(event_type) if isinstance(event_type, str) else None
    if schema_name is None:
        raise AssertionError(
            f"event type {event_type!r} is not one of the {len(event_schemas())} types in {EVENT_UNION}"
        )
    validate(event, schema_name)


# ------------------------------------------------------------------------------ Open Responses
#
# The Open Responses document (``tests/fixtures/openresponses-openapi.json``, unmodified) is stricter
# than OpenAI's published schema in places. Shim bodies and events are checked against both; where the
# two disagree, Venna follows Open Responses and what OpenAI's service sends, and the OpenAI check is
# told so through OPENAI_DEVIATIONS, nowhere else.

OPEN_RESPONSES = Path(__file__).resolve().parent / "fixtures" / "openresponses-openapi.json"
OPEN_RESPONSES_URI = "urn:venna:test-fixture:open-responses"
OPEN_RESPONSES_PREFIX = "#/components/schemas/"


@functools.cache
def _open_responses() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(OPEN_RESPONSES.read_text(encoding="utf-8"))
    return document


@functools.cache
def _open_responses_validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in _open_responses()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {OPEN_RESPONSES.name}")
    resource: Resource[Any] = DRAFT202012.create_resource(_open_responses())
    registry: Registry[Any] = Registry().with_resource(OPEN_RESPONSES_URI, resource)
    return Draft202012Validator(
        {"$ref": f"{OPEN_RESPONSES_URI}{OPEN_RESPONSES_PREFIX}{schema_name}"}, registry=registry
    )


def validate_open_responses(instance: object, schema_name: str) -> None:
    """Assert that ``instance`` is valid under the named Open Responses schema."""
    errors = list(_open_responses_validator(schema_name).iter_errors(instance))
    if errors:
        best = max(errors, key=relevance)
        others = len(errors) - 1
        raise AssertionError(
            f"not a valid Open Responses {schema_name}: {_describe(best)}"
            + (f" (and {others} more)" if others else "")
        )


@functools.cache
def open_responses_event_schemas() -> dict[str, str]:
    """Event ``type`` -> Open Responses event schema, from the SSE body of ``POST /responses``."""
    body = _open_responses()["paths"]["/responses"]["post"]["responses"]["200"]["content"]
    mapping: dict[str, str] = {}
    for branch in body["text/event-stream"]["schema"]["oneOf"]:
        name = str(branch["$ref"]).removeprefix(OPEN_RESPONSES_PREFIX)
        properties = _open_responses()["components"]["schemas"][name]["properties"]
        for value in properties["type"]["enum"]:
            mapping[value] = name
    return mapping


def _without_null_usage(body: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if not (key == "usage" and value is None)}


def _openai_response(response: Mapping[str, Any]) -> dict[str, Any]:
    view = _without_null_usage(response)
    text = response.get("text")
    if isinstance(text, Mapping) and isinstance(text.get("format"), Mapping):
        format_ = text["format"]
        if "description" in format_ and format_["description"] is None:
            view["text"] = {**text, "format": {k: v for k, v in format_.items() if k != "description"}}
    return view


def openai_view(instance: Mapping[str, Any]) -> dict[str, Any]:
    """A body or event as OpenAI's published schema is asked to judge it: two documented
    deviations taken out, where Venna follows Open Responses (which requires both) and what
    OpenAI's service sends, while the published schema allows the field to be absent, not null:

    * ``usage: null`` on an unfinished response;
    * ``description: null`` in a ``json_schema`` text format that has none.
    """
    if instance.get("object") == "response":
        return _openai_response(instance)
    response = instance.get("response")
    if isinstance(response, Mapping) and response.get("object") == "response":
        return {**instance, "response": _openai_response(response)}
    return dict(instance)


@functools.cache
def open_responses_item_types() -> frozenset[str]:
    """The output item types Open Responses defines (its ``ItemField`` union)."""
    schemas = _open_responses()["components"]["schemas"]
    types: set[str] = set()
    for branch in schemas["ItemField"]["oneOf"]:
        name = str(branch["$ref"]).removeprefix(OPEN_RESPONSES_PREFIX)
        types.update(schemas[name]["properties"]["type"]["enum"])
    return frozenset(types)


def _open_responses_response(response: Mapping[str, Any]) -> dict[str, Any]:
    view = dict(response)
    view["tools"] = [tool for tool in response.get("tools", []) if tool.get("type") == "function"]
    choice = response.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") not in ("function", "allowed_tools"):
        view["tool_choice"] = "auto"  # a built-in tool forced: a choice of a tool it does not define
    view["output"] = [
        item for item in response.get("output", []) if item.get("type") in open_responses_item_types()
    ]
    text = response.get("text")
    if isinstance(text, Mapping) and isinstance(text.get("format"), Mapping) and "schema" in text["format"]:
        view["text"] = {**text, "format": {**text["format"], "schema": None}}
    return view


def open_responses_view(instance: Mapping[str, Any]) -> dict[str, Any] | None:
    """A body or event as the Open Responses document is asked to judge it; None where it defines
    nothing to judge. Two documented deviations are taken out:

    * items and tools Open Responses does not define (``web_search_call``, the ``web_search``
      tools, which OpenAI defines) are left out of ``output`` and ``tools``, a ``tool_choice``
      forcing one is judged as ``"auto"``, and the events of such items are not judged;
    * ``text.format.schema`` of a ``json_schema`` format: the document allows only null there
      (its generator lost the type), while OpenAI's service echoes the schema, as Venna does.
    """
    if instance.get("object") == "response":
        return _open_responses_response(instance)
    item = instance.get("item")
    if isinstance(item, Mapping) and item.get("type") not in open_responses_item_types():
        return None
    response = instance.get("response")
    if isinstance(response, Mapping) and response.get("object") == "response":
        return {**instance, "response": _open_responses_response(response)}
    return dict(instance)


def validate_response(body: Mapping[str, Any]) -> None:
    """A Response body, valid under OpenAI's schema and under Open Responses'."""
    validate(openai_view(body), "Response")
    view = open_responses_view(body)
    assert view is not None
    validate_open_responses(view, "ResponseResource")


def validate_stream_event(event: Mapping[str, Any]) -> None:
    """An SSE event, valid under OpenAI's event schema for its type and under Open Responses' where
    that document defines the type (it defines the core events; web search and the like are OpenAI's
    alone)."""
    validate_event(openai_view(event))
    schema_name = open_responses_event_schemas().get(str(event.get("type")))
    view = open_responses_view(event)
    if schema_name is not None and view is not None:
        validate_open_responses(view, schema_name)
