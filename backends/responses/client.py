"""An OpenAI-compatible upstream as a backend: a stateful API on a stateless upstream.

One client serves any upstream that speaks ``POST /responses`` (OpenAI, Venice.ai, a
self-hosted vLLM) or ``POST /chat/completions`` (dialect ``chat``: Ollama, llama.cpp, vLLM, most
aggregators): ``dialect`` picks Venice's nested tool shapes, OpenAI's flat ones or chat
completions, and ``accepts`` lists the generation settings the upstream honours, so that the
others are refused with a 400 instead of being dropped on the way. Venice is a preset of it
(backends/venice.py).

The upstream keeps nothing, so every call sends the full rebuilt context; ``instructions``
become a leading system message; Venna's own fields (store, background, metadata,
previous_response_id) never go up. Venice's dialect is translated both ways: nested function
tools and tool_choice going up; ``response.reasoning.delta``, plain-string reasoning summaries,
``response.web_search.done`` and ``[DONE]`` coming down. The upstream is always asked to stream,
so there is one translation path, and the first event reaches the client as early as possible.

Failures are mapped to Venna's error kinds: the caller's mistakes stay 400s with the upstream's
message, our own key's rejection is a server-side error (never the caller's 401), rate limits
carry the upstream's retry hint. Connect errors, 429, 502, 503 and 504 are retried with
exponential backoff and jitter — only before anything has been produced, and never other 4xx,
which upstreams such as Venice count against the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp

from venna.backends import base
from venna.backends.responses.chat import (
    CHAT_ACCEPTS,
    CHAT_PATH,
    ChatTranslator,
    chat_request,
    refuse_unsupported,
    whole_chat_events,
)
from venna.backends.responses.errors import retry_after_seconds, truncated, upstream_error
from venna.backends.responses.requests import upstream_model, upstream_request
from venna.backends.responses.streams import SseEvent, StreamTranslator, sse_batches, whole_response_events
from venna.backends.tracing import upstream_trace_configs

# Venice's Responses API, OpenAI's, or chat completions (backends/responses/chat.py).
DIALECTS = ("venice", "openai", "chat")
# What each dialect's upstream honours by default.
DEFAULT_ACCEPTS = {
    # Venice takes every optional setting but logprobs (its parts have none), max_tool_calls and
    # the penalties (its Responses API has none).
    "venice": base.OPTIONAL_SETTINGS
    - {"top_logprobs", "max_tool_calls", "presence_penalty", "frequency_penalty"},
    "openai": frozenset(
        {
            "temperature",
            "top_p",
            "max_output_tokens",
            "prompt_cache_key",
            "reasoning",
            "tools",
            "tool_choice",
            "presence_penalty",
            "frequency_penalty",
        }
    ),
    "chat": CHAT_ACCEPTS,
}
_RETRIED_STATUSES = frozenset({429, 502, 503, 504})
# Statuses by which an upstream says it has no such endpoint (an optional one: token counting).
_NOT_OFFERED = frozenset({404, 405, 501})
# What OpenAI's token counting takes of a request (its TokenCountsBody), as the upstream gets it.
_COUNTED_FIELDS = frozenset({"model", "input", "instructions", "tools", "tool_choice", "text", "reasoning"})
# A Retry-After longer than this is handed to the caller rather than waited out.
_MAX_RETRY_WAIT = 10.0
# How long a finished stream may take to send its closing [DONE] before the connection is dropped.
_DRAIN_SECONDS = 2.0
# How long an upstream's model list is reused, and how long fetching it may take.
MODELS_CACHE_SECONDS = 300.0
_MODELS_TIMEOUT = 5.0
_MODELS_RETRY_SECONDS = 30.0

log = logging.getLogger(__name__)


class ResponsesUpstream:
    """Serves ``<prefix><upstream-model>`` through one pooled HTTP client."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = "",
        *,
        prefix: str,
        dialect: str = "openai",
        accepts: frozenset[str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        backoff_base: float = 0.25,
        name: str = "",
        observer: base.UpstreamObserver = base.UNOBSERVED,
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
        unknown = (accepts or frozenset()) - base.OPTIONAL_SETTINGS
        if unknown:
            raise ValueError(
                f"unknown settings in accepts: {', '.join(sorted(unknown))}; "
                f"expected some of {', '.join(sorted(base.OPTIONAL_SETTINGS))}"
            )
        self.base_url = base_url.rstrip("/")
        self.prefix = prefix
        self.dialect = dialect
        self.accepts = DEFAULT_ACCEPTS[dialect] if accepts is None else accepts
        # None: the upstream takes no key (a local server); "": it needs one and none is set,
        # so its models are refused and not listed.
        self._api_key = api_key
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        # How this upstream is named in metrics: its routing-table name.
        self.name = name or prefix.rstrip("/") or self.base_url
        self._observer = observer
        self._draining: set[asyncio.Task[None]] = set()
        # The upstream's models and when they were fetched; one fetch at a time.
        self._models: tuple[float, list[base.ModelInfo]] | None = None
        self._models_lock = asyncio.Lock()
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        # Made on first use, inside the event loop that uses it.
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        """The pooled HTTP client. aiohttp, not httpx: measured here at about a third of the
        CPU per streamed request, and without httpx's per-request pool scan that made the cost
        grow with concurrency (scripts/bench_c.py, section upstream)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256),
                timeout=self._timeout,
                # A span per request, with traceparent sent up, when tracing is on.
                trace_configs=upstream_trace_configs(),
            )
        return self._session

    def validate(self, request: base.GenerationRequest) -> None:
        if self._api_key == "":
            raise base.BackendError(
                base.ErrorKind.UNAVAILABLE,
                f"'{self.prefix}' models are not configured on this gateway (no upstream API key is set).",
                code="server_error",
            )
        if not upstream_model(request.model, self.prefix):
            raise base.BackendError(
                base.ErrorKind.INVALID_REQUEST,
                f"Invalid 'model': expected '{self.prefix}<model>', got '{request.model}'.",
                code="invalid_value",
                param="model",
            )
        base.refuse_unaccepted(request, self.accepts)
        if self.dialect == "chat":
            refuse_unsupported(request)  # structured output included: response_format carries it
        elif request.settings.text_format_kind not in (None, "text"):
            raise base.BackendError(
                base.ErrorKind.INVALID_REQUEST,
                "Structured output ('text.format' other than 'text') is not supported by this "
                "upstream's Responses API.",
                code="unsupported_parameter",
                param="text.format",
            )

    async def generate(self, request: base.GenerationRequest) -> AsyncGenerator[base.BackendEvent, None]:
        chat = self.dialect == "chat"
        if chat:
            body = chat_request(request, prefix=self.prefix)
        else:
            body = upstream_request(request, prefix=self.prefix, dialect=self.dialect)
        response = await self._open(CHAT_PATH if chat else "/responses", body)
        translator: StreamTranslator | ChatTranslator = ChatTranslator() if chat else StreamTranslator()
        try:
            batches: AsyncIterator[list[SseEvent]]
            if response.headers.get("content-type", "").startswith("application/json"):
                # An upstream that answered unstreamed.
                content = await response.read()
                batches = _one(whole_chat_events(content) if chat else whole_response_events(content))
            else:
                batches = sse_batches(_body_chunks(response))
            async for batch in batches:
                for event_type, payload in batch:
                    for event in translator.translate(event_type, payload):
                        yield event
                    if translator.finished:
                        return
            if not translator.finished:
                raise truncated()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise base.BackendError(
                base.ErrorKind.TIMEOUT, "The upstream model timed out.", code="server_error"
            ) from None
        except aiohttp.ClientError as error:
            raise base.BackendError(
                base.ErrorKind.UNAVAILABLE,
                f"The upstream stream failed: {_described(error)}.",
                code="server_error",
            ) from None
        finally:
            if translator.finished:
                # Read the rest ([DONE]) off the critical path, so the connection goes back to
                # the pool instead of being dropped.
                task = asyncio.get_running_loop().create_task(_drain(response))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            else:
                # Closing the response closes the upstream connection: cancellation reaches the
                # upstream at once, and it stops generating (and billing) for nobody.
                response.close()

    async def count_input_tokens(self, request: base.GenerationRequest) -> int | None:
        """The upstream's own count (OpenAI's ``POST /responses/input_tokens``), on the
        Responses dialect; None where the upstream has no such endpoint (then Venna estimates).
        Venice's and chat-completions servers have none, so they are not asked."""
        if self.dialect != "openai":
            return None
        whole = upstream_request(request, prefix=self.prefix, dialect=self.dialect)
        body = {key: value for key, value in whole.items() if key in _COUNTED_FIELDS}
        response = await self._post(
            "/responses/input_tokens", body, accept="application/json", not_offered=_NOT_OFFERED
        )
        if response is None:
            return None
        try:
            counted = (await response.json(content_type=None)).get("input_tokens")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        finally:
            response.release()
        return counted if isinstance(counted, int) and counted >= 0 else None

    async def list_models(self) -> list[base.ModelInfo]:
        """The upstream's ``GET /models`` under this prefix, cached for MODELS_CACHE_SECONDS; []
        when the upstream is not configured (no key) or does not answer (then asked again after
        _MODELS_RETRY_SECONDS)."""
        if self._api_key == "":
            return []
        async with self._models_lock:
            if self._models is not None and time.monotonic() - self._models[0] < MODELS_CACHE_SECONDS:
                return self._models[1]
            headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            try:
                async with self._http().get(
                    f"{self.base_url}/models",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=_MODELS_TIMEOUT),
                ) as answer:
                    answer.raise_for_status()
                    listed = (await answer.json(content_type=None)).get("data")
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as error:
                log.warning("could not list the models of %s: %s", self.base_url, _described(error))
                # Asked again in a while, not at every listing: a down upstream must not make
                # every GET /v1/models wait for its timeout.
                self._models = (time.monotonic() - MODELS_CACHE_SECONDS + _MODELS_RETRY_SECONDS, [])
                return []
            models = [
                base.ModelInfo(
                    id=f"{self.prefix}{entry['id']}",
                    owned_by=str(entry.get("owned_by") or self.prefix.rstrip("/")),
                    created=entry["created"] if isinstance(entry.get("created"), int) else None,
                )
                for entry in listed or []
                if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]
            ]
            self._models = (time.monotonic(), models)
            return models

    async def aclose(self) -> None:
        if self._draining:
            await asyncio.wait(set(self._draining))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _open(self, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """Starts the upstream stream, retrying what is safe to retry; raises mapped errors."""
        response = await self._post(path, body, accept="text/event-stream")
        assert response is not None  # no status is taken for "not offered" here
        return response

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        accept: str,
        not_offered: frozenset[int] = frozenset(),
    ) -> aiohttp.ClientResponse | None:
        """POSTs ``body``, retrying what is safe to retry; raises mapped errors. None for a status
        in ``not_offered``: the upstream has no such endpoint."""
        headers = {"accept": accept, "content-type": "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode()
        observe = self._observer.upstream_request
        for attempt in range(1, self._max_attempts + 1):
            last = attempt == self._max_attempts
            started = time.perf_counter()
            try:
                response = await self._http().post(f"{self.base_url}{path}", data=data, headers=headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                observe(self.name, "connect_error", time.perf_counter() - started)
                # Nothing reached the upstream: safe to try again.
                if last:
                    raise base.BackendError(
                        base.ErrorKind.UNAVAILABLE,
                        f"Cannot reach the upstream model: {_described(error)}.",
                        code="server_error",
                    ) from None
                self._observer.upstream_retry(self.name, "connect_error")
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            except (TimeoutError, aiohttp.ServerTimeoutError):
                observe(self.name, "timeout", time.perf_counter() - started)
                # The upstream may be working (and billing) on it: never send it twice.
                raise base.BackendError(
                    base.ErrorKind.TIMEOUT, "The upstream model did not answer in time.", code="server_error"
                ) from None
            except aiohttp.ClientError as error:
                observe(self.name, "error", time.perf_counter() - started)
                raise base.BackendError(
                    base.ErrorKind.UNAVAILABLE,
                    f"The upstream connection failed: {_described(error)}.",
                    code="server_error",
                ) from None
            if 200 <= response.status < 300:
                observe(self.name, "ok", time.perf_counter() - started)
                return response
            observe(self.name, f"http_{response.status}", time.perf_counter() - started)
            if response.status in not_offered:
                response.release()
                return None
            try:
                content = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                content = b""
            finally:
                response.release()
            retry_after = retry_after_seconds(response.headers)
            if response.status in _RETRIED_STATUSES and not last:
                wait = self._backoff(attempt, retry_after)
                if wait <= _MAX_RETRY_WAIT:
                    self._observer.upstream_retry(self.name, f"http_{response.status}")
                    await asyncio.sleep(wait)
                    continue
            raise upstream_error(response.status, content, retry_after)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        delay: float = self._backoff_base * 2 ** (attempt - 1)
        return delay + random.uniform(0, delay)  # jitter on top of the exponential step


async def _one(events: list[SseEvent]) -> AsyncGenerator[list[SseEvent], None]:
    yield events


async def _body_chunks(response: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
    """The body as it arrives. When the connection is cut, aiohttp raises before handing over
    the bytes it had already received: those are handed over first, so that everything the
    upstream sent before the cut is kept (and stored with the failed response)."""
    content = response.content
    try:
        async for chunk in content.iter_any():
            yield chunk
    except aiohttp.ClientPayloadError:
        # The reader's buffer is not public API: read defensively, salvage nothing if it moved.
        buffered = getattr(content, "_buffer", None)
        if buffered:
            received = b"".join(buffered)
            buffered.clear()
            yield received
        raise


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Reads a finished stream to the end of its body (briefly): only a fully read response
    returns its connection to the pool."""
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in response.content.iter_any():
                pass
    except (TimeoutError, aiohttp.ClientError):
        response.close()
    else:
        response.release()


def _described(error: BaseException) -> str:
    """An aiohttp error in a few words (some carry no message of their own)."""
    return str(error) or type(error).__name__
