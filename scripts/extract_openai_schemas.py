#!/usr/bin/env python3
"""Extract the Responses API schemas from OpenAI's OpenAPI spec into a test fixture.

The HTTP shim's tests validate every JSON body and SSE event against OpenAI's published schemas, but the
project must not read the 3 MB spec outside the repository at test time. This script copies just the part
the tests need into ``tests/fixtures/openai_schemas.json``: the transitive ``$ref`` closure of
``components.schemas`` from ``ROOTS`` plus every event schema in ``ResponseStreamEvent.anyOf``.

Run it by hand (it needs PyYAML, which is not a runtime or test dependency)::

    .venv/bin/python scripts/extract_openai_schemas.py [SPEC] [--commit SHA] [--check]

``SPEC`` defaults to ``../shared/spec/openai-openapi.yaml`` relative to the repository root. The spec's
sha256 is checked against the one known for ``--commit`` (default ``SPEC_COMMIT``): when extracting from a
newer upstream ``openapi.yaml``, pass its commit so the recorded provenance stays true, and update
``tests/fixtures/README.md``. ``--check`` compares instead of writing and exits 1 if the fixture is stale.

The output is deterministic: schema names are sorted, each schema keeps the spec's key order, and no
timestamps are recorded, so regenerating from the same spec gives a byte-identical file.

Transformations (also recorded in the fixture's ``source.modifications``):

* ``$ref: "#/components/schemas/X"`` becomes ``"#/schemas/X"`` so the fixture is one self-contained
  JSON document that a ``referencing`` registry can resolve.
* ``$recursiveRef: "#"`` (a 2019-09 keyword that Draft 2020-12 ignores) inside a schema marked
  ``$recursiveAnchor: true`` becomes a plain ``$ref`` to that same schema, which is what it means there;
  the anchor is dropped. Without this, the recursive branch of ``CompoundFilter`` would accept anything.
* The YAML is read with the YAML 1.2 core schema, as OpenAPI 3.1 recommends, rather than PyYAML's
  YAML 1.1 rules: unquoted ``on``/``off``/``yes``/``no`` stay strings, ``0755`` is decimal, and dates
  and ``1:30``-style numbers stay strings. Where the two readings differ inside the extract, the script
  prints each difference so a reviewer can see it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = ROOT.parent / "shared" / "spec" / "openai-openapi.yaml"
OUTPUT = ROOT / "tests" / "fixtures" / "openai_schemas.json"

SPEC_REPOSITORY = "https://github.com/openai/openai-openapi"
SPEC_PATH = "openapi.yaml"
SPEC_COMMIT = "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"
# sha256 of openapi.yaml at each commit this script has been run against: guards the provenance record.
KNOWN_SHA256 = {SPEC_COMMIT: "db5d7478feae10b4d331834c60d9765a8aa042e38419f9b1694288c11aa8ebc8"}

ROOTS = (
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
    "ErrorResponse",
    "CreateResponse",
    "ConversationResource",
    "DeletedConversationResource",
    "ConversationItemList",
    "ConversationItem",
    "CompactResource",
    "TokenCountsResource",
)
EVENT_UNION = "ResponseStreamEvent"
SPEC_REF_PREFIX = "#/components/schemas/"
FIXTURE_REF_PREFIX = "#/schemas/"

JsonObject = dict[str, Any]

# JSON Schema keywords whose value is a schema, a list of schemas, or a name -> schema map. Every other
# keyword holds data (enum, default, example, x-*, discriminator ...), which is never searched for refs.
SCHEMA_KEYWORDS = frozenset(
    {
        "items",
        "additionalProperties",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "contains",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
    }
)
SCHEMA_LIST_KEYWORDS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
SCHEMA_MAP_KEYWORDS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


class _DuplicateKeyError(yaml.MarkedYAMLError):
    """PyYAML silently keeps the last of two equal keys; in a schema that would hide a spec bug."""


def _yaml_base_loader() -> type[yaml.SafeLoader]:
    """The libyaml-backed loader parses the 3 MB spec in about a second; pure Python takes far longer."""
    loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return loader


_BaseLoader = _yaml_base_loader()


class Yaml12Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """A safe loader with YAML 1.2 core-schema scalar rules, and an error on duplicate mapping keys."""

    # Start empty (not inherited) so that none of PyYAML's YAML 1.1 scalar rules survive.
    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() == "true"


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


# (tag, pattern, possible first characters; "" is how PyYAML looks up the empty scalar)
_CORE_RESOLVERS: tuple[tuple[str, str, list[str]], ...] = (
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
)
for _tag, _pattern, _first in _CORE_RESOLVERS:
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), _first)
Yaml12Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_spec(text: str, loader: type[yaml.SafeLoader]) -> JsonObject:
    """Parse the spec; a non-mapping document means this is not the file we expect."""
    document = yaml.load(text, Loader=loader)
    if not isinstance(document, dict):
        raise SystemExit("the spec is not a YAML mapping")
    return document


def _child_schemas(schema: object) -> Iterator[object]:
    """The subschemas of one schema, found by keyword so example and enum data is never taken for one."""
    if not isinstance(schema, dict):
        return
    for keyword, value in schema.items():
        if keyword in SCHEMA_KEYWORDS:
            yield value
        elif keyword in SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            yield from value
        elif keyword in SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            yield from value.values()


def _walk_schema(schema: object) -> Iterator[JsonObject]:
    """Every schema object inside ``schema`` (itself included), depth first."""
    if isinstance(schema, dict):
        yield schema
        for child in _child_schemas(schema):
            yield from _walk_schema(child)


def _component_refs(schema: object) -> Iterator[str]:
    """Names of the component schemas that ``schema`` refers to directly."""
    for node in _walk_schema(schema):
        ref = node.get("$ref")
        if ref is None:
            continue
        if not isinstance(ref, str) or not ref.startswith(SPEC_REF_PREFIX):
            raise SystemExit(f"unsupported $ref {ref!r}: only {SPEC_REF_PREFIX}* can be extracted")
        yield ref.removeprefix(SPEC_REF_PREFIX)


def event_schema_names(schemas: JsonObject) -> list[str]:
    """The event schemas of the stream union, in the spec's order."""
    names = list(_component_refs({"anyOf": schemas[EVENT_UNION]["anyOf"]}))
    if not names:
        raise SystemExit(f"{EVENT_UNION}.anyOf lists no event schemas")
    return names


def closure(schemas: JsonObject, roots: list[str]) -> list[str]:
    """Sorted names of every component schema reachable from ``roots``."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise SystemExit(f"components.schemas has no {name!r}")
        seen.add(name)
        pending.extend(_component_refs(schemas[name]))
    return sorted(seen)


def _rewrite(schema: object, name: str, recursive_anchor: bool) -> object:
    """Copy one schema with refs pointing into the fixture; see the module docstring for why."""
    if not isinstance(schema, dict):
        return schema
    rewritten: JsonObject = {}
    for keyword, value in schema.items():
        if keyword == "$ref":
            rewritten[keyword] = FIXTURE_REF_PREFIX + str(value).removeprefix(SPEC_REF_PREFIX)
        elif keyword == "$recursiveRef":
            if value != "#" or not recursive_anchor:
                raise SystemExit(
                    f"{name}: $recursiveRef {value!r} without a $recursiveAnchor cannot be rewritten"
                )
            rewritten["$ref"] = FIXTURE_REF_PREFIX + name
        elif keyword == "$recursiveAnchor":
            continue
        elif keyword in ("$dynamicRef", "$dynamicAnchor", "$id", "$anchor"):
            raise SystemExit(f"{name}: {keyword} is not supported by this extractor")
        elif keyword in SCHEMA_KEYWORDS:
            rewritten[keyword] = _rewrite(value, name, recursive_anchor)
        elif keyword in SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            rewritten[keyword] = [_rewrite(item, name, recursive_anchor) for item in value]
        elif keyword in SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            rewritten[keyword] = {key: _rewrite(item, name, recursive_anchor) for key, item in value.items()}
        else:
            rewritten[keyword] = value
    return rewritten


def _check_json_data(value: object, where: str) -> None:
    """YAML can yield dates, sets or non-string keys that JSON cannot carry: refuse them, never coerce."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SystemExit(f"{where}: non-string key {key!r}")
            _check_json_data(item, f"{where}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_data(item, f"{where}/{index}")
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise SystemExit(f"{where}: {type(value).__name__} value {value!r} has no JSON form")


def _differences(a: object, b: object, where: str) -> Iterator[str]:
    """Paths where the YAML 1.1 and YAML 1.2 readings of the spec disagree."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            if key not in a or key not in b:
                yield f"{where}/{key}: key present in only one reading"
            else:
                yield from _differences(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{where}/{index}")
    elif type(a) is not type(b) or a != b:
        yield f"{where}: YAML 1.1 gives {a!r}, YAML 1.2 gives {b!r}"


def build_fixture(spec_text: str, spec_sha256: str, commit: str) -> tuple[JsonObject, list[str]]:
    """The fixture document, and the YAML 1.1/1.2 differences found inside the extract."""
    spec = load_spec(spec_text, Yaml12Loader)
    schemas: JsonObject = spec["components"]["schemas"]
    events = event_schema_names(schemas)
    names = closure(schemas, [*ROOTS, *events])

    yaml11_schemas: JsonObject = load_spec(spec_text, _BaseLoader)["components"]["schemas"]
    differences = [d for n in names for d in _differences(yaml11_schemas.get(n), schemas[n], n)]

    extracted: JsonObject = {}
    for name in names:
        schema = schemas[name]
        _check_json_data(schema, name)
        anchored = isinstance(schema, dict) and schema.get("$recursiveAnchor") is True
        extracted[name] = _rewrite(schema, name, anchored)

    info = spec.get("info", {})
    source: JsonObject = {
        "repository": SPEC_REPOSITORY,
        "commit": commit,
        "path": SPEC_PATH,
        "sha256": spec_sha256,
        "openapi": spec.get("openapi"),
        "info_version": info.get("version"),
        "licence": info.get("license"),
        "copyright": "Copyright (c) OpenAI (https://openai.com)",
        "generator": "scripts/extract_openai_schemas.py",
        "roots": [*ROOTS, "each event schema in ResponseStreamEvent.anyOf"],
        "modifications": [
            "only the components.schemas entries reachable by $ref from the roots are kept",
            f"$ref '{SPEC_REF_PREFIX}X' rewritten to '{FIXTURE_REF_PREFIX}X'",
            "$recursiveRef '#' under $recursiveAnchor rewritten to a $ref to the enclosing schema",
        ],
    }
    return {"source": source, "schemas": extracted}, differences


def render(fixture: JsonObject) -> str:
    """Stable text: indented for readable diffs, non-ASCII kept as is, trailing newline."""
    if SPEC_REF_PREFIX in json.dumps(fixture["schemas"]):
        raise SystemExit(f"a {SPEC_REF_PREFIX} reference survived the rewrite outside a $ref keyword")
    return json.dumps(fixture, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("spec", nargs="?", type=Path, default=DEFAULT_SPEC, help=f"default: {DEFAULT_SPEC}")
    parser.add_argument(
        "--commit", default=SPEC_COMMIT, help="upstream commit of the spec (recorded in the fixture)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the fixture differs instead of writing it"
    )
    args = parser.parse_args(argv)

    raw = args.spec.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    expected = KNOWN_SHA256.get(args.commit)
    if expected is not None and expected != digest:
        print(
            f"{args.spec} has sha256 {digest}, but openapi.yaml at commit {args.commit} has {expected}: "
            "pass --commit with the spec's real upstream commit",
            file=sys.stderr,
        )
        return 2

    fixture, differences = build_fixture(raw.decode("utf-8"), digest, args.commit)
    for difference in differences:
        print(f"YAML 1.1/1.2 difference (1.2 reading kept): {difference}", file=sys.stderr)
    text = render(fixture)

    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
        if current != text:
            print(
                f"{OUTPUT.relative_to(ROOT)} is stale: run scripts/extract_openai_schemas.py", file=sys.stderr
            )
            return 1
        print(f"{OUTPUT.relative_to(ROOT)} is up to date")
        return 0

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(
        f"wrote {OUTPUT.relative_to(ROOT)}: {len(fixture['schemas'])} schemas, {len(text.encode())} bytes",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
