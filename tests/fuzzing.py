"""Generated hostile and careless requests for both transports, and the properties every answer
must have.

Used by tests/test_fuzz.py (a bounded run in CI) and scripts/fuzz.py (a long run against a
``venna serve`` process). The HTTP cases are JSON bodies for ``POST /v1/responses`` shaped like
OpenAI's create request (with wrong types, out-of-range numbers, unknown keys and very deep
schemas mixed in), arbitrary JSON, raw bytes and the other routes. The gRPC cases are request
messages generated from the protobuf descriptors, deliberately deep Structs spliced in on the
wire, and raw bytes sent as they are.

The properties: no 5xx (except 501 for paths Venna does not serve); every HTTP error is OpenAI's
error JSON; every gRPC error has a code other than INTERNAL or UNKNOWN and an ErrorInfo detail;
a stream ends with exactly one terminal event; a stored response can be read back; a call
without a valid key gets 401 / UNAUTHENTICATED; the server still answers a normal request.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import grpc
import httpx
from google.protobuf import message_factory, struct_pb2, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, EncodeError, Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st

from venna.responses.v1 import events_pb2, options_pb2, response_pb2, service_pb2, usage_pb2

# --------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Known:
    """Objects that exist on the server under test, so that some generated ids hit something."""

    alpha: str  # a key of workspace alpha; most cases use it
    beta: str  # a key of another workspace
    response_id: str  # a stored, completed response of alpha
    background_id: str  # a finished background response of alpha
    item_id: str  # an input item of response_id
    beta_response_id: str  # a response of beta, which alpha must not see


def make_known(base_url: str, alpha: str, beta: str) -> Known:
    """Creates the objects of ``Known`` over HTTP with keys of two workspaces."""
    with httpx.Client(base_url=base_url, timeout=30, verify=False) as client:
        alpha_headers = {"authorization": f"Bearer {alpha}"}
        beta_headers = {"authorization": f"Bearer {beta}"}
        first = client.post("/responses", json={"model": "echo", "input": "known"}, headers=alpha_headers)
        first.raise_for_status()
        background = client.post(
            "/responses",
            json={"model": "echo", "input": "known later", "background": True},
            headers=alpha_headers,
        ).json()
        items = client.get(f"/responses/{first.json()['id']}/input_items", headers=alpha_headers).json()
        other = client.post("/responses", json={"model": "echo", "input": "beta's"}, headers=beta_headers)
        # The background response finishes first, so that every replay of it ends.
        for _ in range(500):
            reply = client.get(f"/responses/{background['id']}", headers=alpha_headers)
            if reply.json()["status"] == "completed":
                break
            time.sleep(0.01)
    return Known(
        alpha, beta, first.json()["id"], background["id"], items["data"][0]["id"], other.json()["id"]
    )


AUTH_MODES = ("valid", "valid", "valid", "valid", "valid", "valid", "other", "none", "wrong", "malformed")
# An error names what was wrong; it does not echo a client's input back whole (a 1 MiB model
# name, a 5,000-character id).
MAX_ERROR_BYTES = 4096
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


def authorization(mode: str, known: Known) -> str | None:
    """The Authorization value of an auth mode; None sends no header."""
    return {
        "valid": f"Bearer {known.alpha}",
        "other": f"Bearer {known.beta}",
        "none": None,
        "wrong": "Bearer vk_" + "x" * 43,
        "malformed": "Basic dmVubmE6dmVubmE=",
    }[mode]


def has_valid_key(mode: str) -> bool:
    return mode in ("valid", "other")


# ---------------------------------------------------------------------------------------- splices


@dataclass(frozen=True)
class Splice:
    """A piece of JSON text too big or too deep to hold as a Python value (json.dumps would
    recurse past Python's limit); it keeps generated cases short to print."""

    def render(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class DeepArrays(Splice):
    depth: int

    def render(self) -> str:
        return "[" * self.depth + "1" + "]" * self.depth


@dataclass(frozen=True)
class DeepObjects(Splice):
    """``{"a": {"a": ... 1}}``: ``depth`` objects."""

    depth: int

    def render(self) -> str:
        return '{"a":' * self.depth + "1" + "}" * self.depth


@dataclass(frozen=True)
class DeepSchema(Splice):
    """A JSON Schema of ``depth`` nested objects, each one level of ``properties`` deeper
    (two JSON levels per schema level), as a structured-output schema would nest."""

    depth: int

    def render(self) -> str:
        head = '{"type":"object","properties":{"p":'
        return head * self.depth + '{"type":"string"}' + "}}" * self.depth


@dataclass(frozen=True)
class Huge(Splice):
    """A JSON string of ``length`` copies of ``char``."""

    length: int
    char: str = "x"

    def render(self) -> str:
        return json.dumps(self.char * self.length)


@dataclass(frozen=True)
class Token(Splice):
    """JSON text taken as it is: NaN, Infinity, huge exponents, escaped lone surrogates."""

    text: str

    def render(self) -> str:
        return self.text


def render(value: Any) -> str:
    """JSON text of a generated value (NaN and Infinity as Python's json writes them)."""
    if isinstance(value, Splice):
        return value.render()
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(key)) + ":" + render(item) for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(render(item) for item in value) + "]"
    return json.dumps(value)


# ------------------------------------------------------------------------------- HTTP strategies

# Depths on both sides of the limits that matter: protobuf's recursion limit (100 message
# levels; a Struct takes three per JSON level), Python's JSON parser, and deeper.
STRUCT_DEPTHS = (16, 30, 31, 32, 33, 34, 35, 40, 50, 64, 100, 200)
JSON_DEPTHS = (100, 500, 989, 990, 1000, 2000, 10_000, 100_000)

lone_surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udc00\ud800"])
short_text = st.text(max_size=12)
texts = st.one_of(
    short_text,
    st.text(min_size=1, max_size=200),
    lone_surrogates,
    st.sampled_from(["", " ", "\x00", "hello world", "null", "'; DROP TABLE responses; --", "\u202e\ufeff"]),
    st.builds(Huge, st.sampled_from([10_000, 100_000, 1_000_000])),
    # Escaped as JSON writes them: "\u00e9", and a surrogate pair per emoji.
    st.builds(Huge, st.sampled_from([10_000, 100_000]), st.sampled_from(["é", "\U0001f600"])),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 16, 15, 2**31, 2**63, 2**64, -(2**63) - 1, 0.5, 1e-308, 1e308]),
    st.sampled_from([Token("NaN"), Token("-Infinity"), Token("1e999"), Token("-0"), Token("1" + "0" * 5000)]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, short_text, lone_surrogates)
arbitrary_json: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(short_text, children, max_size=4)
    ),
    max_leaves=20,
)
junk = st.one_of(
    arbitrary_json,
    st.builds(DeepArrays, st.sampled_from(JSON_DEPTHS)),
    st.builds(DeepObjects, st.sampled_from(JSON_DEPTHS)),
    st.builds(Huge, st.sampled_from([100_000, 1_000_000])),
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = junk) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``bad``: most fields stay plausible, so that the
    request reaches the code behind validation."""
    return st.integers(0, 9).flatmap(lambda roll: bad if roll == 0 else good)


models = st.one_of(
    st.sampled_from(["echo", "echo", "echo", "venna-1", "echo:fail_after=2", "echo:delay_ms=1"]),
    st.sampled_from(["gpt-4o", "", "ECHO", "echo:", "echo:delay_ms=-1", "echo:nope=1", "echo/x", "a" * 300]),
    st.builds(Huge, st.sampled_from([10_000, 1_000_000])),
    short_text.filter(lambda name: not name.startswith("venice")),
)


def ids(known: Known) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(
            [known.response_id, known.background_id, known.beta_response_id, known.item_id, "resp_0"]
        ),
        st.sampled_from(["", "resp_", "resp_" + "f" * 64, "../etc/passwd", "resp_%00"]),
        st.integers(5000, 5001).map(lambda length: "r" * length),
        short_text,
    )


def struct_value(depth: int) -> Any:
    """``{"p": {"p": ... {}}}`` as a Python value: ``depth`` objects."""
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"p": value}
    return value


def schema_value(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"p": value}, "required": ["p"]}
    return value


# JSON Schemas from flat to far past every limit: Python values up to 40 levels, splices beyond.
schemas = st.one_of(
    st.integers(0, 6).map(schema_value),
    st.sampled_from(STRUCT_DEPTHS).filter(lambda depth: depth <= 40).map(schema_value),
    st.sampled_from(STRUCT_DEPTHS).filter(lambda depth: depth <= 40).map(struct_value),
    st.builds(DeepSchema, st.sampled_from((50, 64, 100, 200, 500))),
    st.builds(DeepObjects, st.sampled_from(JSON_DEPTHS)),
    st.dictionaries(short_text, arbitrary_json, max_size=5),
)


def content_parts() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("input_text"), "text": mostly(texts)}),
        st.fixed_dictionaries({"type": st.just("output_text"), "text": mostly(texts)}),
        st.fixed_dictionaries(
            {"type": st.just("input_image")},
            optional={"image_url": mostly(st.just("https://example.invalid/a.png")), "detail": short_text},
        ),
        st.fixed_dictionaries({"type": st.just("refusal"), "refusal": mostly(texts)}),
        st.fixed_dictionaries({"type": short_text, "text": texts}),
        arbitrary_json,
    )


def input_items(known: Known) -> st.SearchStrategy[Any]:
    roles = mostly(st.sampled_from(["user", "assistant", "system", "developer"]), short_text)
    return st.one_of(
        st.fixed_dictionaries(
            {"role": roles, "content": st.one_of(texts, st.lists(content_parts(), max_size=3))},
            optional={"type": st.just("message"), "id": ids(known), "status": short_text},
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("function_call"),
                "call_id": mostly(st.sampled_from(["call_1", "call_2"])),
                "name": mostly(st.sampled_from(["get_weather", "f"])),
                "arguments": mostly(st.sampled_from(["{}", '{"a": 1}', "not json"])),
            }
        ),
        st.fixed_dictionaries(
            {"type": st.just("function_call_output"), "call_id": mostly(st.just("call_1")), "output": texts}
        ),
        st.fixed_dictionaries({"type": st.just("item_reference"), "id": ids(known)}),
        st.fixed_dictionaries(
            {"type": st.just("reasoning"), "summary": st.lists(arbitrary_json, max_size=2)},
            optional={"encrypted_content": texts, "id": ids(known)},
        ),
        arbitrary_json,
    )


def tools() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("function"), "name": mostly(st.sampled_from(["get_weather", "f", ""]))},
            optional={"parameters": schemas, "strict": mostly(st.booleans()), "description": texts},
        ),
        st.fixed_dictionaries({"type": st.sampled_from(["web_search", "web_search_preview"])}),
        arbitrary_json,
    )


def text_configs() -> st.SearchStrategy[Any]:
    json_schema = st.fixed_dictionaries(
        {"type": st.just("json_schema"), "name": mostly(st.sampled_from(["answer", ""]))},
        optional={"schema": schemas, "strict": mostly(st.booleans()), "description": texts},
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "format": st.one_of(
                json_schema,
                st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
                arbitrary_json,
            ),
            "verbosity": mostly(st.sampled_from(["low", "medium", "high"])),
        },
    )


plain_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)


def clean_create_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Create requests a careful client sends, except that schemas may be deep and strings
    long: most are accepted, so they reach the store, the stream and the read-back."""
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "user", "assistant", "developer", "system"]), "content": plain_text}
    )
    function_tool = st.fixed_dictionaries(
        {"type": st.just("function"), "name": st.sampled_from(["get_weather", "lookup"])},
        optional={"parameters": schemas, "strict": st.booleans(), "description": plain_text},
    )
    json_schema = st.fixed_dictionaries(
        {"type": st.just("json_schema"), "name": st.just("answer"), "schema": schemas},
        optional={"strict": st.booleans()},
    )
    optional: dict[str, st.SearchStrategy[Any]] = {
        "instructions": plain_text,
        "store": st.booleans(),
        "background": st.booleans(),
        "stream": st.booleans(),
        "metadata": st.dictionaries(st.text(min_size=1, max_size=8), plain_text, max_size=4),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_output_tokens": st.integers(16, 4096),
        "tools": st.lists(function_tool, max_size=2),
        "parallel_tool_calls": st.booleans(),
        "text": st.fixed_dictionaries({"format": json_schema}),
        "truncation": st.sampled_from(["auto", "disabled"]),
        "user": plain_text,
        "seed": st.integers(0, 2**31),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4),
    }
    return st.fixed_dictionaries(
        {
            "model": st.sampled_from(["echo", "echo", "echo", "venna-1", "echo:fail_after=2"]),
            "input": st.one_of(
                plain_text,
                st.lists(message, min_size=1, max_size=3),
                st.builds(Huge, st.sampled_from([100_000, 1_000_000])),
            ),
        },
        optional=optional,
    )


def create_bodies(known: Known) -> st.SearchStrategy[dict[str, Any]]:
    """Create requests as OpenAI defines them, each field plausible nine times in ten."""
    optional: dict[str, st.SearchStrategy[Any]] = {
        "instructions": mostly(texts),
        "previous_response_id": mostly(ids(known)),
        "store": mostly(st.booleans()),
        "background": mostly(st.booleans()),
        "stream": mostly(st.booleans()),
        "metadata": mostly(st.dictionaries(short_text, short_text, max_size=20)),
        "temperature": mostly(numbers),
        "top_p": mostly(numbers),
        "max_output_tokens": mostly(numbers),
        "tools": mostly(st.lists(tools(), max_size=3)),
        "tool_choice": mostly(
            st.one_of(
                st.sampled_from(["auto", "none", "required"]),
                st.fixed_dictionaries({"type": st.just("function"), "name": st.just("get_weather")}),
            )
        ),
        "parallel_tool_calls": mostly(st.booleans()),
        "text": mostly(text_configs()),
        "reasoning": mostly(
            st.fixed_dictionaries({}, optional={"effort": short_text, "summary": short_text})
        ),
        "truncation": mostly(st.sampled_from(["auto", "disabled"])),
        "service_tier": mostly(st.sampled_from(["auto", "default", "flex"])),
        "user": mostly(texts),
        "safety_identifier": mostly(texts),
        "prompt_cache_key": mostly(texts),
        "max_tool_calls": mostly(numbers),
        "top_logprobs": mostly(numbers),
        "include": mostly(st.lists(short_text, max_size=3)),
        "stop": mostly(st.one_of(short_text, st.lists(short_text, max_size=6))),
        "seed": mostly(numbers),
        "stream_options": arbitrary_json,
        "conversation": arbitrary_json,
    }
    inputs = st.one_of(texts, st.lists(input_items(known), max_size=4), junk)
    body = st.fixed_dictionaries({"model": mostly(models), "input": inputs}, optional=optional)
    unknown = st.dictionaries(short_text, arbitrary_json, max_size=2)
    return st.tuples(body, st.integers(0, 4), unknown).map(
        lambda parts: {**parts[0], **parts[2]} if parts[1] == 0 else parts[0]
    )


@dataclass(frozen=True)
class HttpCase:
    """One HTTP request: ``document`` (JSON, with splices) or ``raw`` is the body."""

    kind: str
    method: str
    path: str  # under /v1, already percent-encoded
    query: str = ""
    document: Any = None
    raw: bytes | None = None
    content_type: str | None = "application/json"
    auth: str = "valid"

    def body(self) -> bytes | None:
        if self.raw is not None:
            return self.raw
        if self.document is None:
            return None
        return render(self.document).encode("utf-8", "surrogatepass")

    def reproducer(self, base_url: str = "$BASE") -> str:
        """A curl command for the case (bodies over 2 KB are described, not quoted)."""
        parts = ["curl", "-s", "-X", self.method]
        if self.auth != "none":
            parts += ["-H", f"'Authorization: <{self.auth} key>'"]
        if self.content_type is not None:
            parts += ["-H", f"'Content-Type: {self.content_type}'"]
        body = self.body()
        if body is not None:
            if len(body) <= 2000:
                parts += ["--data-binary", repr(body)[1:]]
            elif self.raw is None:
                parts += ["--data-binary", f"<{len(body)} bytes of JSON: {self.document!r:.300}>"]
            else:
                parts += ["--data-binary", f"<{len(body)} bytes, starting {body[:200]!r}>"]
        url = f"{base_url}{self.path}" + (f"?{self.query}" if self.query else "")
        return " ".join([*parts, f"'{url}'"])


CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=utf-16",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
    "garbage/\x7f",
)


def _path_id(value: str, encode: bool) -> str:
    return urllib.parse.quote(value, safe="") if encode else urllib.parse.quote(value, safe="/%?#")


def http_cases(known: Known) -> st.SearchStrategy[HttpCase | WireCase]:
    """Every kind of HTTP request the fuzz sends, mostly creates."""
    return _http_cases(known)


@lru_cache(maxsize=8)
def _http_cases(known: Known) -> st.SearchStrategy[HttpCase | WireCase]:
    auth = st.sampled_from(AUTH_MODES)
    create = st.builds(
        HttpCase,
        kind=st.just("http.create"),
        method=st.just("POST"),
        path=st.just("/responses"),
        document=create_bodies(known),
        auth=auth,
    )
    clean = st.builds(
        HttpCase,
        kind=st.just("http.clean_create"),
        method=st.just("POST"),
        path=st.just("/responses"),
        document=clean_create_bodies(),
        auth=auth,
    )
    arbitrary = st.builds(
        HttpCase,
        kind=st.just("http.json"),
        method=st.just("POST"),
        path=st.just("/responses"),
        document=st.one_of(
            arbitrary_json,
            junk,
            st.dictionaries(
                st.sampled_from(["model", "input", "stream", "tools", "text", "metadata", "x"]),
                junk,
                max_size=4,
            ),
        ),
        auth=auth,
    )
    create_json = st.builds(lambda body: render(body).encode("utf-8", "surrogatepass"), create_bodies(known))
    raw = st.builds(
        HttpCase,
        kind=st.just("http.raw"),
        method=st.just("POST"),
        path=st.just("/responses"),
        raw=st.one_of(
            st.binary(max_size=300),
            st.builds(lambda data, cut: data[:cut], create_json, st.integers(0, 200)),
            create_json.map(lambda data: data.decode("utf-8", "surrogatepass").encode("utf-16")),
            create_json.map(lambda data: b"\xef\xbb\xbf" + data),
            st.sampled_from(
                [
                    b'{"model": "echo", "input": "\xff\xfe"}',
                    b'{"model": "echo", "model": "echo", "input": "x"}',
                ]
            ),
        ),
        content_type=st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)),
        auth=auth,
    )
    odd_type = st.builds(
        HttpCase,
        kind=st.just("http.content_type"),
        method=st.just("POST"),
        path=st.just("/responses"),
        raw=create_json,
        content_type=st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)),
        auth=auth,
    )
    query_keys = st.sampled_from(
        ["stream", "starting_after", "include", "include[]", "limit", "order", "after", "start_time",
         "end_time", "group_by_model", "x", ""]
    )  # fmt: skip
    query_values = st.one_of(
        st.sampled_from(["true", "false", "1", "0", "-1", "100", "101", "asc", "desc", "9" * 30, ""]),
        short_text,
    )
    queries = st.lists(st.tuples(query_keys, query_values), max_size=4).map(
        lambda pairs: urllib.parse.urlencode(pairs)
    )
    route = st.one_of(
        st.tuples(
            st.sampled_from(["GET", "DELETE", "POST", "PUT", "PATCH"]),
            st.sampled_from(["/responses/{}", "/responses/{}/cancel", "/responses/{}/input_items"]),
            ids(known),
            st.booleans(),
        ).map(lambda parts: (parts[0], parts[1].format(_path_id(parts[2], parts[3])))),
        st.tuples(
            st.sampled_from(["GET", "DELETE", "POST", "PUT", "HEAD", "OPTIONS"]),
            st.sampled_from(["/responses", "/usage", "/models", "/responses/", "/chat/completions", "/"]),
        ),
    )
    other = st.builds(
        lambda method_path, query, auth_mode: HttpCase(
            kind="http.route", method=method_path[0], path=method_path[1], query=query, document=None,
            content_type=None, auth=auth_mode,
        ),
        route,
        queries,
        auth,
    )  # fmt: skip
    return st.one_of(clean, create, clean, create, arbitrary, raw, odd_type, other, wire_cases())


# -------------------------------------------------------------------------------- HTTP properties

_KNOWN_ROUTES = (
    ("POST", re.compile(r"/v1/responses")),
    ("GET", re.compile(r"/v1/responses/[^/]+")),
    ("DELETE", re.compile(r"/v1/responses/[^/]+")),
    ("POST", re.compile(r"/v1/responses/[^/]+/cancel")),
    ("GET", re.compile(r"/v1/responses/[^/]+/input_items")),
    ("GET", re.compile(r"/v1/usage")),
)


def served_path(path: str) -> bool:
    """Whether Venna serves the (decoded) path with some method."""
    return any(pattern.fullmatch(path) for _, pattern in _KNOWN_ROUTES)


def served_route(method: str, path: str) -> bool:
    return any(method == verb and pattern.fullmatch(path) for verb, pattern in _KNOWN_ROUTES)


@dataclass
class Outcome:
    """What one case got, and the properties it broke (empty when it behaved)."""

    kind: str
    status: str
    failures: list[tuple[str, str]] = field(default_factory=list)  # (property, detail)

    def fail(self, prop: str, detail: str) -> None:
        self.failures.append((prop, detail[:500]))


def sse_events(text: str) -> list[dict[str, Any]]:
    """The data objects of an SSE body, in order (comments skipped)."""
    events = []
    for frame in text.split("\n\n"):
        data = [line[5:].strip() for line in frame.split("\n") if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def check_error_body(response: httpx.Response, outcome: Outcome) -> None:
    if not response.headers.get("content-type", "").startswith("application/json"):
        outcome.fail("error_shape", f"{response.status_code} with content-type "
                     f"{response.headers.get('content-type')!r}: {response.text[:200]!r}")  # fmt: skip
        return
    try:
        data = response.json()
    except ValueError:
        outcome.fail("error_shape", f"{response.status_code} body is not JSON: {response.text[:200]!r}")
        return
    error = data.get("error") if isinstance(data, dict) else None
    if (
        not isinstance(error, dict)
        or set(data) != {"error"}
        or set(error) != {"message", "type", "param", "code"}
    ):
        outcome.fail("error_shape", f"{response.status_code} body is not OpenAI's error JSON: {data!r:.300}")
        return
    if not (isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        outcome.fail("error_shape", f"{response.status_code} error without message or type: {error!r:.300}")
    if not all(error[key] is None or isinstance(error[key], str) for key in ("param", "code")):
        outcome.fail("error_shape", f"{response.status_code} param/code not strings: {error!r:.300}")
    if len(response.content) > MAX_ERROR_BYTES:
        outcome.fail(
            "error_echo", f"{response.status_code} error of {len(response.content)} bytes: {error!r:.200}"
        )


def check_terminal(events: Sequence[str], outcome: Outcome, stored_status: Callable[[], str | None]) -> None:
    """Exactly one terminal event, the last; a cancelled response's stream may have none."""
    terminal = [index for index, kind in enumerate(events) if kind in TERMINAL_EVENTS]
    if not terminal:
        if stored_status() != "cancelled":
            outcome.fail("terminal_event", f"stream ended without a terminal event: {list(events)[-3:]}")
    elif len(terminal) > 1 or terminal[0] != len(events) - 1:
        tail = [events[index] for index in terminal]
        outcome.fail("terminal_event", f"terminal events {tail} at {terminal} of {len(events)}")


class HttpProbe:
    """Sends HTTP cases to a Venna and checks the properties."""

    def __init__(self, base_url: str, known: Known, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.known = known
        self.client = httpx.Client(timeout=timeout, verify=False)

    def close(self) -> None:
        self.client.close()

    def headers(self, auth: str, content_type: str | None = None) -> dict[str, str]:
        headers = {}
        value = authorization(auth, self.known)
        if value is not None:
            headers["authorization"] = value
        if content_type is not None:
            headers["content-type"] = content_type
        return headers

    def run(self, case: HttpCase | WireCase) -> Outcome:
        if isinstance(case, WireCase):
            return run_wire(case, self.base_url, self.known, self)
        url = self.base_url + case.path + (f"?{case.query}" if case.query else "")
        try:
            response = self.client.request(
                case.method, url, content=case.body(), headers=self.headers(case.auth, case.content_type)
            )
        except httpx.HTTPError as error:
            outcome = Outcome(case.kind, "no answer")
            outcome.fail("transport", f"{type(error).__name__}: {error}")
            return outcome
        outcome = Outcome(case.kind, str(response.status_code))
        path = urllib.parse.unquote(response.request.url.path)
        status = response.status_code
        unserved = status == 501 and not served_path(path)
        # ``echo:fail_after=N`` makes the model fail on purpose: a server_error is its answer.
        injected = status == 500 and b"fail_after" in (case.body() or b"")
        if status >= 500 and not (unserved or injected):
            outcome.fail("server_error", f"{status}: {response.text[:300]!r}")
        if status >= 400 and case.method != "HEAD":
            check_error_body(response, outcome)
        # Without a valid key nothing of the body is looked at: 401, or 415 for a Content-Type
        # that is refused on the headers alone.
        if not has_valid_key(case.auth) and served_route(case.method, path) and status not in (401, 415):
            outcome.fail("unauthenticated", f"{case.auth} key answered {status}, not 401")
        if 200 <= status < 300 and case.method in ("POST", "GET"):
            self._check_success(case, response, outcome)
        self.check_still_serving(outcome)
        return outcome

    def _check_success(self, case: HttpCase, response: httpx.Response, outcome: Outcome) -> None:
        key = "valid" if case.auth == "valid" else "other"
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                events = sse_events(response.text)
            except ValueError as error:
                outcome.fail("sse", f"undecodable event: {error}")
                return
            first = events[0].get("response", {}) if events else {}
            response_id = first.get("id")

            def stored_status() -> str | None:
                return self._stored(response_id, key).get("status") if response_id else None

            check_terminal([str(event.get("type")) for event in events], outcome, stored_status)
            if response_id and first.get("store"):
                self._check_readback(response_id, key, outcome)
            return
        if case.path == "/responses" and case.method == "POST":
            data = response.json()
            if data.get("store") and isinstance(data.get("id"), str):
                self._check_readback(data["id"], key, outcome)

    def _stored(self, response_id: str, auth: str) -> dict[str, Any]:
        reply = self.client.get(f"{self.base_url}/responses/{response_id}", headers=self.headers(auth))
        return dict(reply.json()) if reply.status_code == 200 else {}

    def _check_readback(self, response_id: str, auth: str, outcome: Outcome) -> None:
        """What the store accepted it can read back, as JSON, as items, and as a replay."""
        for path in (f"/responses/{response_id}", f"/responses/{response_id}/input_items"):
            reply = self.client.get(self.base_url + path, headers=self.headers(auth))
            if reply.status_code != 200:
                outcome.fail("readback", f"GET {path} answered {reply.status_code}: {reply.text[:200]!r}")
                return
        if self._stored(response_id, auth).get("background"):
            replay = self.client.get(
                f"{self.base_url}/responses/{response_id}?stream=true", headers=self.headers(auth)
            )
            if replay.status_code != 200:
                outcome.fail("readback", f"replay answered {replay.status_code}: {replay.text[:200]!r}")
                return
            kinds = [str(event.get("type")) for event in sse_events(replay.text)]
            check_terminal(kinds, outcome, lambda: self._stored(response_id, auth).get("status"))

    def check_still_serving(self, outcome: Outcome) -> None:
        """A normal create still works. A connection the server closed after an error is
        retried once on a new one, as every HTTP client does: what counts is the server."""
        detail = ""
        for _ in range(2):
            try:
                reply = self.client.post(
                    self.base_url + "/responses",
                    json={"model": "echo", "input": "still serving"},
                    headers=self.headers("valid"),
                )
            except httpx.TransportError as error:
                detail = f"{type(error).__name__}: {error}"
                continue
            try:
                if (
                    reply.status_code == 200
                    and reply.json()["output"][0]["content"][0]["text"] == "still serving"
                ):
                    return
            except (ValueError, LookupError):
                pass
            detail = f"{reply.status_code}: {reply.text[:200]!r}"
            break
        if detail:
            outcome.fail("still_serving", f"a normal request then got {detail}")


# --------------------------------------------------------------------------- HTTP on the wire


@dataclass(frozen=True)
class WireCase:
    """An HTTP/1.1 request written byte by byte: odd framing, duplicated and malformed headers
    that an HTTP client library would refuse to send. It always asks to close the connection,
    so that the reply ends with the stream."""

    request_line: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    framing: str  # "length", "chunked", "both" (Content-Length and chunked), "two_lengths", "none"
    auth: str = "valid"
    second_auth: str | None = None  # a second Authorization header, after the first
    kind: str = "http.wire"

    def payload(self, known: Known) -> bytes:
        lines = [self.request_line]
        value = authorization(self.auth, known)
        if value is not None:
            lines.append(f"Authorization: {value}")
        if self.second_auth is not None:
            second = authorization(self.second_auth, known)
            lines.append(f"Authorization: {second if second is not None else ''}")
        lines += [f"{name}: {field_value}" for name, field_value in self.headers]
        body = self.body
        if self.framing in ("length", "both"):
            lines.append(f"Content-Length: {len(body)}")
        if self.framing == "two_lengths":
            lines += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 5}"]
        if self.framing in ("chunked", "both"):
            lines.append("Transfer-Encoding: chunked")
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        lines.append("Connection: close")
        return "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n" + body

    def path(self) -> str:
        parts = self.request_line.split(" ")
        return urllib.parse.unquote(urllib.parse.urlsplit(parts[1]).path) if len(parts) == 3 else ""

    def method(self) -> str:
        return self.request_line.split(" ")[0]

    def reproducer(self) -> str:
        return f"{self!r}\n    bytes: {self.payload(_PLACEHOLDER_KNOWN)[:600]!r}"


_PLACEHOLDER_KNOWN = Known("<alpha key>", "<beta key>", "resp_1", "resp_2", "msg_1", "resp_3")


def wire_cases() -> st.SearchStrategy[WireCase]:
    create = b'{"model": "echo", "input": "on the wire"}'
    request_lines = st.one_of(
        st.sampled_from(["POST /v1/responses HTTP/1.1"] * 4 + ["GET /v1/usage HTTP/1.1"]),
        st.sampled_from(
            [
                "POST /v1/responses HTTP/1.0",
                "POST http://127.0.0.1/v1/responses HTTP/1.1",
                "POST /v1/responses?stream=true HTTP/1.1",
                "POST /v1//responses HTTP/1.1",
                "POST /v1/responses/../responses HTTP/1.1",
                "POST * HTTP/1.1",
                "POST /v1/responses HTTP/2.0",
                "POST /v1/responses HTTX/1.1",
                "P\x00ST /v1/responses HTTP/1.1",
                "POST  /v1/responses HTTP/1.1",
                "BREW /v1/responses HTTP/1.1",
                "POST /v1/responses%00 HTTP/1.1",
                "POST /v1/" + "a" * 20_000 + " HTTP/1.1",
            ]
        ),
    )
    extra_headers = st.lists(
        st.sampled_from(
            [
                ("Content-Type", "application/json"),
                ("Content-Type", "application/json"),
                ("Content-Type", "text/plain"),
                ("Content-Type", "application/json; charset=latin-1"),
                ("Expect", "100-continue"),
                ("X-Junk", "x" * 20_000),
                ("X-Folded", "a\r\n b"),
                ("X-Space ", "before the colon"),
                ("X-Nul", "a\x00b"),
                ("Host", "second.example"),
                ("Content-Encoding", "gzip"),
                ("Transfer-Encoding", "gzip, chunked"),
                ("", "no name"),
            ]
        ),
        max_size=3,
    )
    return st.builds(
        WireCase,
        request_line=request_lines,
        headers=st.tuples(st.sampled_from([("Host", "127.0.0.1")] * 5 + [("X-No-Host", "1")])).flatmap(
            lambda host: extra_headers.map(lambda more: (*host, *more))
        ),
        body=st.one_of(st.just(create), st.binary(max_size=64), st.just(b"")),
        framing=st.sampled_from(["length", "length", "length", "chunked", "both", "two_lengths", "none"]),
        auth=st.sampled_from(AUTH_MODES),
        second_auth=st.one_of(st.none(), st.none(), st.sampled_from(["valid", "other", "wrong", "none"])),
    )


def _read_reply(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (or the deadline)."""
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def run_wire(case: WireCase, base_url: str, known: Known, probe: HttpProbe, timeout: float = 20.0) -> Outcome:
    """Sends a wire case on its own connection and checks what comes back."""
    address = urllib.parse.urlsplit(base_url)
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(
            (address.hostname or "127.0.0.1", address.port or 80), timeout=timeout
        ) as sock:
            with contextlib.suppress(OSError):  # the server may answer and close before reading it all
                sock.sendall(case.payload(known))
            reply = _read_reply(sock, deadline)
    except TimeoutError:
        outcome = Outcome(case.kind, "no answer")
        outcome.fail("wire_hang", f"no reply and no close within {timeout:g} s")
        probe.check_still_serving(outcome)
        return outcome
    except OSError as error:
        outcome = Outcome(case.kind, "no answer")
        outcome.fail("transport", f"{type(error).__name__}: {error}")
        probe.check_still_serving(outcome)
        return outcome
    head, _, body = reply.partition(b"\r\n\r\n")
    while re.match(rb"HTTP/1\.[01] 1\d\d", head):  # 100 Continue, then the reply
        head, _, body = body.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if match is None:
        outcome = Outcome(case.kind, "closed")
        if reply:
            outcome.fail("wire_reply", f"not an HTTP reply: {reply[:200]!r}")
        probe.check_still_serving(outcome)
        return outcome
    status = int(match.group(1))
    outcome = Outcome(case.kind, str(status))
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    path = case.path()
    if status >= 500 and not (status == 501 and not served_path(path)):
        outcome.fail("server_error", f"{status}: {body[:300]!r}")
    if status >= 400:
        response = httpx.Response(
            status,
            headers={"content-type": headers.get(b"content-type", b"").decode("latin-1")},
            content=body,
        )
        check_error_body(response, outcome)
    if case.framing in ("both", "two_lengths") and status < 400:
        outcome.fail("wire_framing", f"a request with {case.framing} framing was answered {status}")
    # Two headers only when the first is sent at all; an empty second one counts as one.
    two_keys = case.second_auth is not None and case.auth != "none" and case.second_auth != case.auth
    if two_keys and status < 400:
        outcome.fail("duplicate_authorization", f"two different Authorization headers answered {status}")
    probe.check_still_serving(outcome)
    return outcome


# ------------------------------------------------------------------------------- gRPC strategies

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
proto_text = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["", "hello world", "\x00", "\U0001f600"]),
    st.integers(100_000, 100_001).map(lambda length: "x" * length),
)
json_for_struct: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), proto_text),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(proto_text, children, max_size=3)
    ),
    max_leaves=12,
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, -1 if low else 1, 16, 100]))
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    return proto_text


def _struct_fill(target: struct_pb2.Struct, draw: st.DrawFn) -> None:
    value = draw(json_for_struct)
    target.update(value if isinstance(value, dict) else {"value": value})


class MessageStrategies:
    """Messages of any type, generated by walking its descriptor: every field set or not, enums
    with unknown numbers, a oneof's members at most one at a time, recursion bounded by
    ``depth``. ``overrides`` gives some fields (by full name) values that reach deeper code."""

    def __init__(self, overrides: Mapping[str, st.SearchStrategy[Any]], depth: int = 4) -> None:
        self.overrides = overrides
        self.depth = depth

    def of(self, descriptor: Descriptor, depth: int | None = None) -> st.SearchStrategy[Message]:
        remaining = self.depth if depth is None else depth
        message_class = _message_class(descriptor)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = message_class()
            self._fill(draw, message, descriptor, remaining)
            return message

        return build()

    def _fill(self, draw: st.DrawFn, message: Message, descriptor: Descriptor, depth: int) -> None:
        if descriptor.full_name == "google.protobuf.Struct":
            _struct_fill(message, draw)  # type: ignore[arg-type]
            return
        # One member, or none, of each real oneof (not the synthetic one of an optional field).
        chosen: dict[str, str | None] = {}
        for oneof in descriptor.oneofs:
            if not (len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name):
                chosen[oneof.name] = draw(st.sampled_from([None, *(member.name for member in oneof.fields)]))
        for field_ in descriptor.fields:
            union = field_.containing_oneof
            if union is not None and union.name in chosen:
                if chosen[union.name] != field_.name:
                    continue
            elif not draw(st.booleans()):
                continue
            self._set(draw, message, field_, depth)

    def _set(self, draw: st.DrawFn, message: Message, field_: FieldDescriptor, depth: int) -> None:
        override = self.overrides.get(field_.full_name)
        target = getattr(message, field_.name)
        if field_.message_type is not None and field_.message_type.GetOptions().map_entry:
            key_field = field_.message_type.fields_by_name["key"]
            value_field = field_.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                return  # no map of messages in these protos
            entries = draw(st.dictionaries(_scalar(key_field), _scalar(value_field), max_size=20))
            target.update(entries)
            return
        if field_.is_repeated:
            if field_.message_type is not None:
                if depth <= 0:
                    return
                for item in draw(
                    st.lists(
                        override if override is not None else self.of(field_.message_type, depth - 1),
                        max_size=3,
                    )
                ):
                    target.add().CopyFrom(item)
            else:
                target.extend(
                    draw(st.lists(override if override is not None else _scalar(field_), max_size=4))
                )
            return
        if field_.message_type is not None:
            if override is not None:
                target.CopyFrom(draw(override))
            elif field_.message_type.full_name == "google.protobuf.Struct":
                _struct_fill(target, draw)
            elif depth > 0:
                target.SetInParent()
                self._fill(draw, target, field_.message_type, depth - 1)
            else:
                target.SetInParent()
            return
        setattr(message, field_.name, draw(override if override is not None else _scalar(field_)))


def _message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


# The methods, their request types and whether they stream.
_RESPONSES = service_pb2.DESCRIPTOR.services_by_name["ResponsesService"]
_USAGE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"]
METHODS: dict[str, tuple[Descriptor, bool]] = {
    f"/{service.full_name}/{method.name}": (method.input_type, method.server_streaming)
    for service in (_RESPONSES, _USAGE)
    for method in service.methods
}
CREATE_METHODS = (
    "/venna.responses.v1.ResponsesService/CreateResponse",
    "/venna.responses.v1.ResponsesService/StreamResponse",
)


@dataclass(frozen=True)
class GrpcCase:
    """One call: ``message`` serialized, then ``splice`` bytes appended (protobuf merges them);
    or ``raw`` bytes as they are."""

    kind: str
    method: str
    message: Message | None = None
    splice: tuple[str, int] | None = None  # (where, depth) of a deep Struct spliced in
    raw: bytes | None = None
    auth: str = "valid"
    hint: str = ""  # how raw bytes were made

    def payload(self) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.message is not None
        data = self.message.SerializePartialToString()
        if self.splice is not None:
            data += _deep_splice(*self.splice)
        return data

    def __repr__(self) -> str:
        if self.raw is not None:
            more = "..." if len(self.raw) > 300 else ""
            body = f"raw={self.raw[:300]!r}{more} ({len(self.raw)} bytes{self.hint})"
        else:
            assert self.message is not None
            shown = text_format.MessageToString(self.message, as_one_line=True)
            body = f"message=<{shown[:600]}{'...' if len(shown) > 600 else ''}>"
            if self.splice is not None:
                body += f" + deep Struct at {self.splice[0]} of depth {self.splice[1]}"
        return f"GrpcCase({self.kind}, {self.method.rsplit('/', 1)[-1]}, {body}, auth={self.auth})"

    def reproducer(self) -> str:
        payload = self.payload()
        more = "..." if len(payload) > 400 else ""
        return f"{self!r}\n    payload bytes: {payload[:400].hex()}{more}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field on the wire."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_struct(depth: int) -> bytes:
    """A Struct of ``depth`` levels, ``{"p": {"p": ...}}``, written on the wire directly (a client
    library may refuse to serialize what a hostile client sends anyway)."""
    struct = b""
    for _ in range(depth):
        value = _field(5, struct)  # Value.struct_value
        entry = _field(1, b"p") + _field(2, value)  # FieldsEntry key, value
        struct = _field(1, entry)  # Struct.fields
    return struct


_SPLICES = ("tools.parameters", "text.format.json_schema.schema")


def _deep_splice(where: str, depth: int) -> bytes:
    struct = deep_struct(depth)
    if where == "tools.parameters":
        return _field(11, _field(1, _field(1, b"f") + _field(3, struct)))  # tools[].function
    return _field(14, _field(1, _field(3, _field(1, b"s") + _field(3, struct))))  # text.format.json_schema


def grpc_cases(known: Known) -> st.SearchStrategy[GrpcCase]:
    return _grpc_cases(known)


@lru_cache(maxsize=8)
def _grpc_cases(known: Known) -> st.SearchStrategy[GrpcCase]:
    package = "venna.responses.v1"
    id_strategy = ids(known).filter(lambda value: isinstance(value, str) and "\ud800" not in value)
    plain_ids = id_strategy.filter(lambda value: not any(0xD800 <= ord(c) <= 0xDFFF for c in value))
    model_names = st.one_of(
        st.sampled_from(["echo", "echo", "venna-1", "echo:fail_after=2", "gpt-4o", ""]),
        proto_text,
    ).filter(lambda name: not name.startswith("venice"))
    overrides: dict[str, st.SearchStrategy[Any]] = {
        f"{package}.CreateResponseRequest.model": mostly(st.just("echo"), model_names),
        f"{package}.CreateResponseRequest.previous_response_id": plain_ids,
        f"{package}.ItemReference.id": plain_ids,
        f"{package}.GetResponseRequest.response_id": plain_ids,
        f"{package}.ResumeResponseStreamRequest.response_id": plain_ids,
        f"{package}.DeleteResponseRequest.response_id": plain_ids,
        f"{package}.CancelResponseRequest.response_id": plain_ids,
        f"{package}.ListInputItemsRequest.response_id": plain_ids,
    }
    walker = MessageStrategies(overrides)
    # Two authorization entries: which one counts would be a guess, so neither does.
    auth = st.sampled_from((*AUTH_MODES, "valid+wrong", "wrong+valid"))

    def generated(method: str) -> st.SearchStrategy[GrpcCase]:
        descriptor, _ = METHODS[method]
        return st.builds(
            GrpcCase,
            kind=st.just("grpc.message"),
            method=st.just(method),
            message=walker.of(descriptor),
            auth=auth,
        )

    creates = st.builds(
        GrpcCase,
        kind=st.just("grpc.create"),
        method=st.sampled_from(CREATE_METHODS),
        message=_plausible_creates(walker),
        auth=auth,
    )
    deep = st.builds(
        GrpcCase,
        kind=st.just("grpc.deep_struct"),
        method=st.sampled_from(CREATE_METHODS),
        message=st.just(service_pb2.CreateResponseRequest(model="echo", input=[_user("deep")])),
        splice=st.tuples(st.sampled_from(_SPLICES), st.sampled_from((*STRUCT_DEPTHS, 1000))),
        auth=auth,
    )
    valid = service_pb2.CreateResponseRequest(model="echo", input=[_user("hi")]).SerializeToString()
    raw = st.builds(
        lambda method, data, auth_mode: GrpcCase(
            "grpc.raw", method, raw=data[0], auth=auth_mode, hint=data[1]
        ),
        st.sampled_from(sorted(METHODS)),
        st.one_of(
            st.binary(max_size=200).map(lambda data: (data, "")),
            st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
                lambda flip: (
                    valid[: flip[0]] + bytes([flip[1]]) + valid[flip[0] + 1 :],
                    ", one byte changed",
                )
            ),
            st.integers(0, len(valid) - 1).map(lambda cut: (valid[:cut], ", truncated")),
            st.sampled_from(
                [
                    (_field(1, b"\xff\xfe"), ", invalid UTF-8 in a string"),
                    (_varint(1 << 3 | 0) + b"\x01", ", wrong wire type"),
                    (_field(2, b"\x0a\x05\x0a\x03\xff\xff\xff") + _field(1, b"echo"), ", invalid UTF-8 deep"),
                    (_varint(536870911 << 3 | 2) + _varint(2) + b"ab", ", largest field number"),
                    (b"\x0a\xff\xff\xff\xff\x0f", ", length past the end"),
                    (valid + _varint(99 << 3 | 0) + b"\x07", ", unknown field"),
                ]
            ),
        ),
        auth,
    )
    return st.one_of(creates, creates, creates, deep, raw, *(generated(method) for method in sorted(METHODS)))


def _user(text: str) -> response_pb2.Item:
    item = response_pb2.Item()
    item.message.role = response_pb2.ROLE_USER
    item.message.content.add().input_text.text = text
    return item


def _plausible_creates(walker: MessageStrategies) -> st.SearchStrategy[Message]:
    """Create requests that start valid (echo, a user message) with generated fields merged in."""

    names = sorted(service_pb2.CreateResponseRequest.DESCRIPTOR.fields_by_name)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        request: Message = service_pb2.CreateResponseRequest(
            model="echo", input=[_user(draw(proto_text) or "hi")]
        )
        extra = draw(walker.of(service_pb2.CreateResponseRequest.DESCRIPTOR, depth=3))
        chosen = set(draw(st.lists(st.sampled_from(names), max_size=4)))
        for name in names:
            if name in chosen:
                request.ClearField(name)
            else:
                extra.ClearField(name)
        request.MergeFrom(extra)
        return request

    return build()


# -------------------------------------------------------------------------------- gRPC properties


def event_type(event: events_pb2.ResponseStreamEvent) -> str:
    member = event.WhichOneof("event")
    if member is None:
        return ""
    return str(getattr(event, member).DESCRIPTOR.GetOptions().Extensions[options_pb2.json_type])


def _has_error_info(error: grpc.RpcError) -> bool:
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        return False
    return status is not None and any(
        detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for detail in status.details
    )


def _identity(data: bytes) -> bytes:
    return data


class GrpcProbe:
    """Sends gRPC cases over a blocking channel and checks the properties."""

    def __init__(self, address: str, known: Known, timeout: float = 30.0) -> None:
        self.known = known
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )

    def close(self) -> None:
        self.channel.close()

    def metadata(self, auth: str) -> tuple[tuple[str, str], ...]:
        """``authorization`` metadata of an auth mode; "valid+wrong" sends two of them."""
        values = [authorization(mode, self.known) for mode in auth.split("+")]
        return tuple(("authorization", value) for value in values if value is not None)

    def _unary(self, method: str, payload: bytes, auth: str) -> bytes:
        call = self.channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
        return bytes(call(payload, metadata=self.metadata(auth), timeout=self.timeout))

    def _stream(self, method: str, payload: bytes, auth: str, received: list[bytes]) -> None:
        call = self.channel.unary_stream(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        for reply in call(payload, metadata=self.metadata(auth), timeout=self.timeout):
            received.append(bytes(reply))

    def run(self, case: GrpcCase) -> Outcome:
        try:
            payload = case.payload()
        except EncodeError as error:
            outcome = Outcome(case.kind, "unsendable")
            outcome.fail("client", f"the case cannot be serialized: {error}")
            return outcome
        _, streaming = METHODS[case.method]
        received: list[bytes] = []
        try:
            if streaming:
                self._stream(case.method, payload, case.auth, received)
                reply = b""
            else:
                reply = self._unary(case.method, payload, case.auth)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            outcome = Outcome(case.kind, code.name)
            injected = code == grpc.StatusCode.INTERNAL and b"fail_after" in payload
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and not injected:
                outcome.fail("grpc_internal", f"{code.name}: {details!r:.300}")
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                outcome.fail("grpc_hang", f"no answer within {self.timeout:g} s")
            if len(details) > MAX_ERROR_BYTES:
                outcome.fail("error_echo", f"{code.name} message of {len(details)} characters")
            if not _has_error_info(error):
                outcome.fail("grpc_error_info", f"{code.name} without ErrorInfo: {details!r:.300}")
            if not has_valid_key(case.auth) and code != grpc.StatusCode.UNAUTHENTICATED:
                outcome.fail("unauthenticated", f"{case.auth} key answered {code.name}, not UNAUTHENTICATED")
            if received:
                self._check_events(received, outcome, case.auth, failed_call=True)
            self.check_still_serving(outcome)
            return outcome
        outcome = Outcome(case.kind, "OK")
        if not has_valid_key(case.auth):
            outcome.fail("unauthenticated", f"{case.auth} key answered OK")
        if streaming:
            # Resumed after a sequence number, which may be the last one.
            resumed = (
                case.method.endswith("/ResumeResponseStream")
                and isinstance(case.message, service_pb2.ResumeResponseStreamRequest)
                and case.message.HasField("starting_after")
            )
            self._check_events(received, outcome, case.auth, failed_call=False, resumed=resumed)
        elif case.method in CREATE_METHODS:
            response = response_pb2.Response.FromString(reply)
            if response.store:
                self._check_readback(response.id, case.auth, outcome)
        self.check_still_serving(outcome)
        return outcome

    def _check_events(
        self, received: list[bytes], outcome: Outcome, auth: str, *, failed_call: bool, resumed: bool = False
    ) -> None:
        try:
            events = [events_pb2.ResponseStreamEvent.FromString(data) for data in received]
        except DecodeError as error:
            outcome.fail("stream", f"undecodable event: {error}")
            return
        if resumed and not events and not failed_call:
            return  # resumed after its last event: nothing follows, and nothing is owed
        if failed_call:
            # A stream may end with a status instead of an event, but never after a terminal one.
            if any(event_type(event) in TERMINAL_EVENTS for event in events):
                outcome.fail("terminal_event", "a terminal event, then an error status")
            return
        first = events[0].created.response if events and events[0].HasField("created") else None

        def stored_status() -> str | None:
            if first is None:
                return None
            response = self._get(first.id, auth)
            if response is None:
                return None
            return "cancelled" if response.status == response_pb2.RESPONSE_STATUS_CANCELLED else "other"

        check_terminal([event_type(event) for event in events], outcome, stored_status)
        if first is not None and first.store:
            self._check_readback(first.id, auth, outcome)

    def _get(self, response_id: str, auth: str) -> response_pb2.Response | None:
        request = service_pb2.GetResponseRequest(response_id=response_id).SerializeToString()
        try:
            reply = self._unary("/venna.responses.v1.ResponsesService/GetResponse", request, auth)
        except grpc.RpcError:
            return None
        return response_pb2.Response.FromString(reply)

    def _check_readback(self, response_id: str, auth: str, outcome: Outcome) -> None:
        request = service_pb2.GetResponseRequest(response_id=response_id).SerializeToString()
        try:
            reply = self._unary("/venna.responses.v1.ResponsesService/GetResponse", request, auth)
            listing = service_pb2.ListInputItemsRequest(response_id=response_id).SerializeToString()
            self._unary("/venna.responses.v1.ResponsesService/ListInputItems", listing, auth)
        except grpc.RpcError as error:
            outcome.fail("readback", f"reading {response_id} back: {error.code().name}")
            return
        if response_pb2.Response.FromString(reply).background:
            resume = service_pb2.ResumeResponseStreamRequest(response_id=response_id).SerializeToString()
            received: list[bytes] = []
            try:
                self._stream(
                    "/venna.responses.v1.ResponsesService/ResumeResponseStream", resume, auth, received
                )
            except grpc.RpcError as error:
                outcome.fail("readback", f"replaying {response_id}: {error.code().name}")
                return
            kinds = [event_type(events_pb2.ResponseStreamEvent.FromString(data)) for data in received]
            check_terminal(kinds, outcome, lambda: None)

    def check_still_serving(self, outcome: Outcome) -> None:
        request = service_pb2.CreateResponseRequest(model="echo", input=[_user("still serving")])
        try:
            reply = self._unary(CREATE_METHODS[0], request.SerializeToString(), "valid")
            text = response_pb2.Response.FromString(reply).output[0].message.content[0].output_text.text
            ok, detail = text == "still serving", repr(text)
        except (grpc.RpcError, IndexError) as error:
            ok, detail = False, f"{type(error).__name__}: {error}"
        if not ok:
            outcome.fail("still_serving", f"a normal call then got {detail}")


def iter_failures(outcome: Outcome) -> Iterator[str]:
    for prop, detail in outcome.failures:
        yield f"{prop}: {detail}"
