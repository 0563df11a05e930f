"""The HTTP shim against hostile and careless clients: keys checked before any body work,
bodies that would break a parser, clients that leave, stall or hold connections open, and
requests whose framing or headers are ambiguous. Raw sockets where a well-behaved HTTP client
could not send what is being tested."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.http_harness import TRANSPORTS, HttpVenna, running
from tests.test_http_wire import client_for, error, words
from venna.gateway_http.server import ConnectionLimits

# Short enough for a fast test, long enough that a loaded machine answers a live client in time.
SHORT = 0.5
# How long a test waits for something that must happen within SHORT.
SOON = 3.0
# How long a test waits for a reply.
PATIENCE = 5.0


@pytest.fixture(scope="module", params=TRANSPORTS)
def http_venna(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpVenna]:
    """Venna over HTTP on both transports, shared by the tests of the module."""
    yield from running(HttpVenna(tmp_path_factory.mktemp("venna") / "venna.db", transport=str(request.param)))


@pytest.fixture(scope="module")
def strict_venna(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpVenna]:
    """A Venna whose connections have short read deadlines and keep-alive."""
    limits = ConnectionLimits(header_timeout=SHORT, body_timeout=SHORT, keep_alive_timeout=SHORT)
    yield from running(HttpVenna(tmp_path_factory.mktemp("strict") / "venna.db", limits=limits))


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


def connect(venna: HttpVenna) -> socket.socket:
    return socket.create_connection(("127.0.0.1", venna.http_port), timeout=PATIENCE)


def request_head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_reply(sock: socket.socket) -> Reply:
    """One HTTP/1.1 reply with a Content-Length body, read off the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full reply: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines)
    }
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a reply body"
        rest += chunk
    return Reply(int(status_line.split()[1]), headers, rest[:length])


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within ``seconds`` (anything it sends is skipped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def openai_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json")
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return dict(err)


# --------------------------------------------------------------------------- authentication first


@pytest.mark.parametrize("key", [None, "vk_not_a_real_key"])
def test_a_body_is_not_read_without_a_valid_key(http_venna: HttpVenna, key: str | None) -> None:
    """A client without a valid key gets its 401 before it sends a byte of its (large) body."""
    auth = [f"authorization: Bearer {key}"] if key else []
    with connect(http_venna) as sock:
        sock.sendall(
            request_head(
                "POST", "/v1/responses", "content-type: application/json", "content-length: 6000000", *auth
            )
        )
        err = openai_error(read_reply(sock), 401)
    assert err["code"] == ("missing_api_key" if key is None else "invalid_api_key")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'{"model": "echo", "input": 5}', id="bad-field"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="deep"),
    ],
)
def test_no_key_and_a_bad_body_is_401(http_venna: HttpVenna, content: bytes) -> None:
    with client_for(http_venna, None) as http:
        response = http.post("/responses", content=content, headers={"content-type": "application/json"})
    assert error(response, 401)["code"] == "missing_api_key"


def test_no_key_and_a_bad_query_is_401(http_venna: HttpVenna) -> None:
    with client_for(http_venna, None) as http:
        response = http.get("/responses/resp_x/input_items", params={"limit": "many"})
    assert error(response, 401)["code"] == "missing_api_key"


def test_duplicate_authorization_headers_are_refused(http_venna: HttpVenna) -> None:
    """Two keys are ambiguous: neither of them is taken (the first one used to win)."""
    headers = [("authorization", f"Bearer {http_venna.alpha}"), ("authorization", "Bearer vk_other")]
    with client_for(http_venna, None) as http:
        response = http.post("/responses", json={"model": "echo", "input": "x"}, headers=headers)
    assert error(response, 400)["code"] == "invalid_authorization_header"


# --------------------------------------------------------------------------- bodies that break parsers


@pytest.mark.parametrize("text", [b"x", b"\\ud800"], ids=["text", "lone-surrogate"])
@pytest.mark.parametrize("depth", [990, 1100, 100_000])
def test_deeply_nested_json_is_400(http_venna: HttpVenna, depth: int, text: bytes) -> None:
    """Whichever parser reads it (a lone surrogate escape takes another path), never a 500."""
    content = b'{"model": "echo", "input": "' + text + b'", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    with client_for(http_venna, http_venna.alpha) as http:
        response = http.post("/responses", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    assert error(response, 400)["type"] == "invalid_request_error"


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"p": value}}
    return value


def _lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        pytest.param(
            {"tools": [{"type": "function", "name": "f", "parameters": _nested(200)}]},
            "tools[0].parameters",
            id="tool-parameters",
        ),
        pytest.param(
            {"text": {"format": {"type": "json_schema", "name": "s", "schema": _nested(200)}}},
            "text.format.schema",
            id="schema",
        ),
        pytest.param(
            {"tools": [{"type": "function", "name": "f", "parameters": {"enum": _lists(300)}}]},
            "tools[0].parameters.enum",
            id="list",
        ),
    ],
)
def test_deep_json_values_are_400_naming_the_field(
    http_venna: HttpVenna, request_body: dict[str, Any], param: str
) -> None:
    """Deep values that a recursive converter would choke on: a 400 that says where."""
    with client_for(http_venna, http_venna.alpha) as http:
        response = http.post("/responses", json={"model": "echo", "input": "x", **request_body})
    err = error(response, 400)
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_value")
    assert str(err["param"]).startswith(param), err


def test_errors_quote_no_more_than_a_prefix_of_a_value(http_venna: HttpVenna) -> None:
    huge = "z" * 100_000
    with client_for(http_venna, http_venna.alpha) as http:
        for request_body in ({huge: 1}, {"truncation": huge}, {"input": [{"type": huge}]}):
            response = http.post("/responses", json={"model": "echo", "input": "x", **request_body})
            err = error(response, 400)
            assert len(err["message"]) < 500, err["message"][:200]
            assert len(err["param"] or "") < 500


# --------------------------------------------------------------------------- headers and framing


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"]
)
def test_a_body_that_is_not_json_is_415(http_venna: HttpVenna, content_type: str) -> None:
    with client_for(http_venna, http_venna.alpha) as http:
        response = http.post(
            "/responses", content=b'{"model": "echo", "input": "x"}', headers={"content-type": content_type}
        )
    assert error(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "application/merge+json"])
def test_json_bodies_are_taken_with_or_without_a_content_type(
    http_venna: HttpVenna, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    with client_for(http_venna, http_venna.alpha) as http:
        request = http.build_request("POST", "/responses", content=b'{"model": "echo", "input": "x"}')
        request.headers.pop("content-type", None)
        request.headers.update(headers)
        response = http.send(request)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"


def test_content_length_with_transfer_encoding_is_400_and_closed(strict_venna: HttpVenna) -> None:
    """Framing a proxy and this server could read differently (request smuggling)."""
    with connect(strict_venna) as sock:
        sock.sendall(
            request_head(
                "POST",
                "/v1/responses",
                f"authorization: Bearer {strict_venna.alpha}",
                "content-type: application/json",
                "content-length: 5",
                "transfer-encoding: chunked",
            )
            + b"0\r\n\r\n"
            + request_head("GET", "/healthz")
        )
        err = openai_error(read_reply(sock), 400)
        assert err["code"] == "invalid_request_framing"
        # What follows is never taken as a request: the connection is closed.
        assert closed_within(sock, PATIENCE)


def test_oversized_headers_are_431(strict_venna: HttpVenna) -> None:
    with connect(strict_venna) as sock:
        sock.sendall(request_head("GET", "/healthz", "x-padding: " + "p" * 40_000))
        err = openai_error(read_reply(sock), 431)
        assert err["code"] == "request_headers_too_large"


# --------------------------------------------------------------------------- clients that leave


def _stored_response_ids(db_path: Path) -> set[str]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT id FROM responses")}


def test_a_client_that_leaves_a_unary_create_cancels_it(http_venna: HttpVenna) -> None:
    """The generation stops when the client leaves, and the response is stored cancelled.

    The echo model writes a word every 50 ms: 200 words would take 10 s to complete.
    """
    before = _stored_response_ids(http_venna.db_path)
    body = json.dumps({"model": "echo:delay_ms=50", "input": words(200)}).encode()
    with connect(http_venna) as sock:
        sock.sendall(
            request_head(
                "POST",
                "/v1/responses",
                f"authorization: Bearer {http_venna.alpha}",
                "content-type: application/json",
                f"content-length: {len(body)}",
            )
            + body
        )
        time.sleep(0.5)  # the call is under way: its first words are written
    left = time.monotonic()
    new: set[str] = set()
    while not new and time.monotonic() - left < PATIENCE:
        time.sleep(0.05)
        new = _stored_response_ids(http_venna.db_path) - before
    assert len(new) == 1, "the abandoned response was not settled in time"
    with client_for(http_venna, http_venna.alpha) as http:
        stored = http.get(f"/responses/{new.pop()}").json()
    assert stored["status"] == "cancelled"
    assert time.monotonic() - left < PATIENCE


# --------------------------------------------------------------------------- slow and idle clients


def test_half_sent_headers_are_closed(strict_venna: HttpVenna) -> None:
    with connect(strict_venna) as sock:
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        assert closed_within(sock, PATIENCE)


def test_headers_trickled_byte_by_byte_are_closed(strict_venna: HttpVenna) -> None:
    """Each byte arriving in time does not extend the deadline of the whole header block."""
    start = time.monotonic()
    with connect(strict_venna) as sock:
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"s" * 100:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if closed_within(sock, 0.1):
                closed = True
                break
        assert closed
    assert time.monotonic() - start < PATIENCE


def test_a_connection_that_sends_nothing_is_closed(strict_venna: HttpVenna) -> None:
    with connect(strict_venna) as sock:
        assert closed_within(sock, PATIENCE)


def test_half_sent_body_is_408_and_closed(strict_venna: HttpVenna) -> None:
    with connect(strict_venna) as sock:
        sock.sendall(
            request_head(
                "POST",
                "/v1/responses",
                f"authorization: Bearer {strict_venna.alpha}",
                "content-type: application/json",
                "content-length: 1000",
            )
            + b'{"model": "echo", '
        )
        started = time.monotonic()
        err = openai_error(read_reply(sock), 408)
        assert err["code"] == "request_timeout"
        assert time.monotonic() - started < PATIENCE
        assert closed_within(sock, PATIENCE)
    # The server is fine for the next client.
    with client_for(strict_venna, strict_venna.alpha) as http:
        assert http.post("/responses", json={"model": "echo", "input": "x"}).status_code == 200


def test_idle_keep_alive_connections_are_closed(strict_venna: HttpVenna) -> None:
    with connect(strict_venna) as sock:
        sock.sendall(request_head("GET", "/healthz"))
        assert read_reply(sock).status == 200
        # A second request on the same connection in time is served...
        sock.sendall(request_head("GET", "/healthz"))
        assert read_reply(sock).status == 200
        # ...and the connection, left idle, is closed (uvicorn's own default is 5 s).
        assert closed_within(sock, SOON)


def test_a_streaming_reply_is_not_cut_by_the_read_deadlines(strict_venna: HttpVenna) -> None:
    """The deadlines bound what the client sends, not how long the answer takes."""
    with (
        client_for(strict_venna, strict_venna.alpha) as http,
        http.stream(
            "POST", "/responses", json={"model": "echo:delay_ms=50", "input": words(20), "stream": True}
        ) as response,
    ):
        text = "".join(response.iter_text())
    assert "response.completed" in text


def test_connections_over_the_limit_are_refused(tmp_path: Path) -> None:
    venna = HttpVenna(tmp_path / "venna.db", limits=ConnectionLimits(max_connections=3))
    venna.start()
    try:
        held = [connect(venna) for _ in range(3)]
        for sock in held:  # each one is surely open on the server's side once it has answered
            sock.sendall(request_head("GET", "/healthz"))
            assert read_reply(sock).status == 200
        started = time.monotonic()
        with connect(venna) as extra:
            err = openai_error(read_reply(extra), 503)
            assert err["code"] == "too_many_connections"
            assert closed_within(extra, PATIENCE)
        assert time.monotonic() - started < PATIENCE
        held.pop().close()
        time.sleep(0.2)  # the server notices the close
        with httpx.Client(timeout=PATIENCE) as http:
            assert http.get(f"http://127.0.0.1:{venna.http_port}/healthz").status_code == 200
        for sock in held:
            sock.close()
    finally:
        venna.stop()
