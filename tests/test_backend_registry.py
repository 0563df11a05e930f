"""The backend registry: kinds by name, typed sections in venna.toml, and a third party's kind
(tests/fixtures/third_party_kind: one module plus one entry point) served by a real
``venna serve`` without a line of Venna naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.process_harness import create_key, serving
from venna.backends import registry
from venna.backends.base import BackendEvent, GenerationRequest, TextDelta
from venna.backends.echo import EchoBackend
from venna.backends.responses import ResponsesUpstream
from venna.server.routing import ConfigError, default_router

THIRD_PARTY = Path(__file__).resolve().parent / "fixtures" / "third_party_kind"


@pytest.fixture
def third_party_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fixture distribution importable (and its entry point visible), here and in children."""
    monkeypatch.syspath_prepend(str(THIRD_PARTY))
    monkeypatch.setenv("PYTHONPATH", str(THIRD_PARTY))
    yield
    registry.unregister("reverse")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "venna.toml"
    path.write_text(text)
    return path


def test_built_in_kinds_load_through_the_registry() -> None:
    assert {"echo", "responses"} <= set(registry.names())
    responses = registry.get("responses")
    config = registry.parse_config(responses, {"base_url": "http://up/v1", "dialect": "openai"})
    backend = responses.build(config, registry.BuildContext("up", {}))
    assert isinstance(backend, ResponsesUpstream)
    assert (backend.prefix, backend.dialect) == ("up/", "openai")
    echo = registry.get("echo")
    context = registry.BuildContext("e", {})
    assert isinstance(echo.build(registry.parse_config(echo, {}), context), EchoBackend)


def test_sections_are_typed_by_their_kind() -> None:
    responses = registry.get("responses")
    parsed = registry.parse_config(
        responses, {"base_url": "http://x", "read_timeout": 5, "accepts": ["temperature"], "max_attempts": 2}
    )
    assert parsed.read_timeout == 5.0 and isinstance(parsed.read_timeout, float)
    assert parsed.accepts == ["temperature"]
    for section, message in (
        ({}, "'base_url' is required"),
        ({"base_url": "http://x", "accepts": "temperature"}, "'accepts' must be a list of strings"),
        ({"base_url": "http://x", "accepts": [1]}, "'accepts' must be a string"),
        ({"base_url": "http://x", "max_attempts": True}, "'max_attempts' must be a whole number"),
        ({"base_url": "http://x", "colour": "red"}, "unknown keys colour for kind 'responses'"),
    ):
        with pytest.raises(ValueError, match=message):
            registry.parse_config(responses, section)


def test_unknown_kinds_name_the_known_ones() -> None:
    with pytest.raises(registry.UnknownKind, match=r"unknown backend kind 'nope'; known: .*echo.*responses"):
        registry.get("nope")


@dataclasses.dataclass(frozen=True)
class ShoutConfig:
    times: int = 1


class ShoutBackend:
    def __init__(self, times: int) -> None:
        self.times = times

    def validate(self, request: GenerationRequest) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[BackendEvent, None]:
        yield TextDelta("HEY" * self.times)


def test_a_kind_registered_by_a_program_serves_its_upstreams(tmp_path: Path) -> None:
    kind = registry.BackendKind("shout", ShoutConfig, lambda config, _: ShoutBackend(config.times))
    registry.register(kind)
    try:
        assert registry.register(kind) is kind  # again: harmless
        with pytest.raises(ValueError, match="registered already"):
            registry.register(registry.BackendKind("shout", ShoutConfig, lambda config, _: ShoutBackend(1)))
        router = default_router(write_config(tmp_path, '[upstreams.loud]\nkind = "shout"\ntimes = 3\n'), {})
        route = router.resolve("loud/anything")
        assert isinstance(route.backend, ShoutBackend) and route.backend.times == 3
        with pytest.raises(ConfigError, match=r"\[upstreams.loud\]: 'times' must be a whole number"):
            default_router(write_config(tmp_path, '[upstreams.loud]\nkind = "shout"\ntimes = "x"\n'), {})
    finally:
        registry.unregister("shout")


def test_an_installed_kind_is_found_by_its_entry_point(third_party_installed: None) -> None:
    assert "reverse" in registry.names()
    kind = registry.get("reverse")
    assert kind.config.__name__ == "ReverseConfig"


async def test_venna_serve_routes_to_a_third_party_kind(third_party_installed: None, tmp_path: Path) -> None:
    """One module and one entry point, no change to Venna: served end to end by a real process."""
    db, log = tmp_path / "venna.db", tmp_path / "serve.log"
    config = write_config(
        tmp_path,
        '[upstreams.mirror]\nkind = "reverse"\nsuffix = "!"\n\n[aliases]\nbackwards = "mirror/any"\n',
    )
    key = create_key(db, "alpha")
    with serving(db, log, "--config", str(config)) as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"authorization": f"Bearer {key}"}, timeout=10
        ) as http:
            for model in ("mirror/whatever", "backwards"):
                reply = await http.post("/responses", json={"model": model, "input": "stressed"})
                assert reply.status_code == 200, reply.text
                body = reply.json()
                assert body["output"][0]["content"][0]["text"] == "desserts!"
                assert body["status"] == "completed"
            refused = await http.post(
                "/responses", json={"model": "mirror/x", "input": "hi", "temperature": 0.5}
            )
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "temperature"


def test_a_section_of_an_unknown_kind_stops_serve_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[upstreams.mirror]\nkind = "reverse"\n')
    with pytest.raises(ConfigError, match=r"\[upstreams.mirror\]: unknown backend kind 'reverse'"):
        default_router(config, {})
