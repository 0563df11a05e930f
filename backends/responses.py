"""An OpenAI-compatible Responses endpoint as a backend: a stateful API on a stateless upstream.

One client serves any upstream that speaks ``POST /responses`` (OpenAI, Venice.ai, a
self-hosted vLLM): ``dialect`` picks Venice's nested tool shapes or OpenAI's flat ones, and
``accepts`` lists the generation settings the upstream honours, so that the others are refused
with a 400 instead of being dropped on the way. Venice is a preset of it (backends/venice.py).

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
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx
from google.protobuf import json_format

from venna.backends import base
from venna.backends.registry import BackendKind, BuildContext
from venna.responses.v1 import response_pb2

DIALECTS = ("venice", "openai")
# What each dialect's upstream honours by default.
DEFAULT_ACCEPTS = {
    # Venice takes every optional setting but logprobs (its parts have none) and max_tool_calls.
    "venice": base.OPTIONAL_SETTINGS - {"top_logprobs", "max_tool_calls"},
    "openai": frozenset(
        {"temperature", "top_p", "max_output_tokens", "prompt_cache_key", "reasoning", "tools", "tool_choice"}
    ),
}
_RETRIED_STATUSES = frozenset({429, 502, 503, 504})
# A Retry-After longer than this is handed to the caller rather than waited out.
_MAX_RETRY_WAIT = 10.0
# How long a finished stream may take to send its closing [DONE] before the connection is dropped.
_DRAIN_SECONDS = 2.0


class ResponsesUpstream:
    """Serves ``<prefix><upstream-model>`` through one pooled HTTP client."""

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        *,
        prefix: str,
        dialect: str = "openai",
        accepts: frozenset[str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        backoff_base: float = 0.25,
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
        self._api_key = api_key
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._draining: set[asyncio.Task[None]] = set()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    def validate(self, request: base.GenerationRequest) -> None:
        if not self._api_key:
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
        if request.settings.text_format_kind not in (None, "text"):
            raise base.BackendError(
                base.ErrorKind.INVALID_REQUEST,
                "Structured output ('text.format' other than 'text') is not supported by this "
                "upstream's Responses API.",
                code="unsupported_parameter",
                param="text.format",
            )

    async def generate(self, request: base.GenerationRequest) -> AsyncGenerator[base.BackendEvent, None]:
        body = upstream_request(request, prefix=self.prefix, dialect=self.dialect)
        response = await self._open(body)
        if response.headers.get("content-type", "").startswith("application/json"):
            events = _whole_response_events(response)  # an upstream that answered unstreamed
        else:
            events = _sse_events(response)
        translator = _StreamTranslator()
        try:
            async for event_type, payload in events:
                for event in translator.translate(event_type, payload):
                    yield event
                if translator.finished:
                    return
            if not translator.finished:
                raise _truncated()
        except httpx.TimeoutException:
            raise base.BackendError(
                base.ErrorKind.TIMEOUT, "The upstream model timed out.", code="server_error"
            ) from None
        except httpx.HTTPError as error:
            raise base.BackendError(
                base.ErrorKind.UNAVAILABLE, f"The upstream stream failed: {error}.", code="server_error"
            ) from None
        finally:
            if translator.finished:
                # Read the rest ([DONE]) off the critical path, so the connection goes back to
                # the pool instead of being dropped.
                task = asyncio.get_running_loop().create_task(_drain(events, response))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            else:
                # Closing the response closes the upstream connection: cancellation reaches Venice.
                # Shielded, so that a second cancellation cannot leave the request half-closed
                # (and the upstream generating, and billing, for nobody).
                closing = asyncio.get_running_loop().create_task(_close(events, response))
                self._draining.add(closing)
                closing.add_done_callback(self._draining.discard)
                await asyncio.shield(closing)

    async def aclose(self) -> None:
        if self._draining:
            await asyncio.wait(set(self._draining))
        await self._client.aclose()

    async def _open(self, body: dict[str, Any]) -> httpx.Response:
        """Starts the upstream stream, retrying what is safe to retry; raises mapped errors."""
        headers = {"authorization": f"Bearer {self._api_key}", "accept": "text/event-stream"}
        for attempt in range(1, self._max_attempts + 1):
            last = attempt == self._max_attempts
            try:
                request = self._client.build_request(
                    "POST", f"{self.base_url}/responses", json=body, headers=headers
                )
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                # Nothing reached the upstream: safe to try again.
                if last:
                    raise base.BackendError(
                        base.ErrorKind.UNAVAILABLE,
                        f"Cannot reach the upstream model: {error}.",
                        code="server_error",
                    ) from None
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            except httpx.TimeoutException:
                # The upstream may be working (and billing) on it: never send it twice.
                raise base.BackendError(
                    base.ErrorKind.TIMEOUT, "The upstream model did not answer in time.", code="server_error"
                ) from None
            except httpx.TransportError as error:
                raise base.BackendError(
                    base.ErrorKind.UNAVAILABLE,
                    f"The upstream connection failed: {error}.",
                    code="server_error",
                ) from None
            if response.is_success:
                return response
            await response.aread()
            await response.aclose()
            retry_after = _retry_after(response)
            if response.status_code in _RETRIED_STATUSES and not last:
                wait = self._backoff(attempt, retry_after)
                if wait <= _MAX_RETRY_WAIT:
                    await asyncio.sleep(wait)
                    continue
            raise _upstream_error(response, retry_after)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        delay: float = self._backoff_base * 2 ** (attempt - 1)
        return delay + random.uniform(0, delay)  # jitter on top of the exponential step


async def _close(
    events: AsyncGenerator[tuple[str, dict[str, Any] | None], None], response: httpx.Response
) -> None:
    try:
        await events.aclose()
    finally:
        await response.aclose()


async def _drain(
    events: AsyncGenerator[tuple[str, dict[str, Any] | None], None], response: httpx.Response
) -> None:
    """Reads a finished stream to the end of its body (briefly): only a fully read response
    returns its connection to the pool."""
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in events:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass
    finally:
        await events.aclose()
        await response.aclose()


def upstream_model(model: str, prefix: str) -> str:
    """The upstream's model name (feature suffixes kept), or '' if the name is not ours."""
    return model.removeprefix(prefix) if model.startswith(prefix) else ""


# ---------------------------------------------------------------------------------------------
# Request translation


def upstream_request(
    request: base.GenerationRequest, *, prefix: str, dialect: str = "openai"
) -> dict[str, Any]:
    """The JSON body the upstream receives: the whole context, in the upstream's dialect."""
    settings = request.settings
    nested = dialect == "venice"
    items: list[dict[str, Any]] = []
    if request.instructions:
        items.append(_message("system", [{"type": "input_text", "text": request.instructions}]))
    items += [translated for item in request.context if (translated := _item(item, nested)) is not None]
    body: dict[str, Any] = {"model": upstream_model(request.model, prefix), "input": items, "stream": True}
    if settings.tools:
        tools = (_tool(tool, nested) for tool in settings.tools)
        body["tools"] = [tool for tool in tools if tool is not None]
    if settings.tool_choice is not None:
        choice = _tool_choice(settings.tool_choice, nested)
        if choice is not None:
            body["tool_choice"] = choice
    for name, value in (
        ("temperature", settings.temperature),
        ("top_p", settings.top_p),
        ("max_output_tokens", settings.max_output_tokens),
        ("prompt_cache_key", settings.prompt_cache_key),
        ("seed", settings.seed),
    ):
        if value is not None:
            body[name] = value
    if settings.stop:
        body["stop"] = list(settings.stop)
    if "venice_parameters" in settings.vendor:
        body["venice_parameters"] = dict(settings.vendor["venice_parameters"])
    reasoning = {}
    if settings.reasoning_effort is not None:
        reasoning["effort"] = settings.reasoning_effort
    if settings.reasoning_summary is not None:
        reasoning["summary"] = settings.reasoning_summary
    if reasoning:
        body["reasoning"] = reasoning
    return body


def _message(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


_ROLES = {
    response_pb2.ROLE_USER: "user",
    response_pb2.ROLE_ASSISTANT: "assistant",
    response_pb2.ROLE_SYSTEM: "system",
    response_pb2.ROLE_DEVELOPER: "developer",
}
_DETAILS = {response_pb2.IMAGE_DETAIL_LOW: "low", response_pb2.IMAGE_DETAIL_HIGH: "high"}


def _item(item: response_pb2.Item, nested: bool) -> dict[str, Any] | None:
    kind = item.WhichOneof("item")
    if kind == "message":
        message = item.message
        return _message(_ROLES.get(message.role, "user"), [p for p in map(_part, message.content) if p])
    if kind == "function_call":
        call = item.function_call
        return {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        }
    if kind == "function_call_output":
        output = item.function_call_output
        return {"type": "function_call_output", "call_id": output.call_id, "output": output.output}
    if kind == "reasoning":
        reasoning = item.reasoning
        # Venice takes plain-string summaries; OpenAI's dialect, summary_text parts.
        translated: dict[str, Any] = {
            "type": "reasoning",
            "id": reasoning.id,
            "summary": [
                summary.text if nested else {"type": "summary_text", "text": summary.text}
                for summary in reasoning.summary
            ],
        }
        if reasoning.HasField("encrypted_content"):
            translated["encrypted_content"] = reasoning.encrypted_content
        return translated
    return None  # web search calls are the upstream's own doing; the text they led to is kept


def _part(part: response_pb2.ContentPart) -> dict[str, Any] | None:
    kind = part.WhichOneof("part")
    if kind == "input_text":
        return {"type": "input_text", "text": part.input_text.text}
    if kind == "output_text":
        return {"type": "output_text", "text": part.output_text.text}
    if kind == "refusal":
        return {"type": "output_text", "text": part.refusal.refusal}
    if kind == "input_image":
        image = part.input_image
        translated: dict[str, Any] = {"type": "input_image", "detail": _DETAILS.get(image.detail, "auto")}
        if image.HasField("image_url"):
            translated["image_url"] = image.image_url
        if image.HasField("file_id"):
            translated["file_id"] = image.file_id
        return translated
    if kind == "input_file":
        file = part.input_file
        return {
            "type": "input_file",
            **{
                f: getattr(file, f)
                for f in ("file_id", "filename", "file_data", "file_url")
                if file.HasField(f)
            },
        }
    return None


def _tool(tool: response_pb2.Tool, nested: bool) -> dict[str, Any] | None:
    kind = tool.WhichOneof("tool")
    if kind == "function":
        function = tool.function
        spec: dict[str, Any] = {"name": function.name}
        if function.HasField("description"):
            spec["description"] = function.description
        if function.HasField("parameters"):
            spec["parameters"] = json_format.MessageToDict(function.parameters)
        if function.HasField("strict"):
            spec["strict"] = function.strict
        return {"type": "function", "function": spec} if nested else {"type": "function", **spec}
    if kind in ("web_search", "web_search_preview"):
        return {"type": "web_search"}
    return None


def _tool_choice(choice: response_pb2.ToolChoice, nested: bool) -> str | dict[str, Any] | None:
    kind = choice.WhichOneof("choice")
    if kind == "mode":
        return {
            response_pb2.TOOL_CHOICE_MODE_NONE: "none",
            response_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
            response_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
        }.get(choice.mode)
    if kind == "function":
        if nested:
            return {"type": "function", "function": {"name": choice.function.name}}
        return {"type": "function", "name": choice.function.name}
    if kind == "allowed_tools":
        return "required" if choice.allowed_tools.mode == response_pb2.TOOL_CHOICE_MODE_REQUIRED else "auto"
    return None


# ---------------------------------------------------------------------------------------------
# Response translation


async def _sse_events(response: httpx.Response) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
    """(event type, JSON payload) pairs; ``[DONE]`` arrives as ("[DONE]", None)."""
    event_type = ""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event_type = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            text = "\n".join(data)
            data = []
            if text.strip() == "[DONE]":
                yield "[DONE]", None
            else:
                try:
                    payload = json.loads(text)
                except ValueError:
                    continue  # not ours to crash on: skip a malformed frame
                if isinstance(payload, dict):
                    yield str(payload.get("type") or event_type), payload
            event_type = ""


_TERMINAL_STATUSES = {"completed", "incomplete", "failed"}


async def _whole_response_events(
    response: httpx.Response,
) -> AsyncGenerator[tuple[str, dict[str, Any] | None], None]:
    """A non-streamed Response body as the events that would have streamed it: each output item
    done (its content included), then the terminal event."""
    try:
        data = json.loads(await response.aread())
    except ValueError:
        raise base.BackendError(
            base.ErrorKind.UNAVAILABLE, "The upstream sent a response that is not JSON.", code="server_error"
        ) from None
    if not isinstance(data, dict):
        raise _truncated()
    for item in data.get("output") or []:
        if isinstance(item, dict):
            yield "response.output_item.done", {"item": item}
    status = data.get("status") if data.get("status") in _TERMINAL_STATUSES else "completed"
    yield f"response.{status}", {"response": data}


class _StreamTranslator:
    """Upstream events -> Venna backend events. Item structure is rebuilt by Venna's builder,
    so only what the model produced matters here, not the upstream's ids or ordering."""

    def __init__(self) -> None:
        self.finished = False
        self._annotated: set[str] = set()  # upstream message ids whose annotations were emitted
        self._usage: base.UsageReport | None = None
        # Whether each upstream item (by id) streamed any content; the last one opened. An item
        # whose content arrives only with its output_item.done is taken from there.
        self._streamed: dict[str, bool] = {}
        self._last_opened = ""

    def translate(self, event_type: str, payload: dict[str, Any] | None) -> list[base.BackendEvent]:
        data = payload or {}
        if event_type.endswith(".delta"):
            item_id = str(data.get("item_id") or "")
            self._streamed[item_id if item_id in self._streamed else self._last_opened] = True
        if event_type == "[DONE]":
            if not self.finished:
                raise _truncated()
            return []
        if event_type == "error" or (data.get("error") and not event_type.startswith("response.")):
            raise _stream_error(data)  # an in-band error frame, in OpenAI's or chat-completions' shape
        match event_type:
            case "response.output_text.delta":
                return [base.TextDelta(str(data.get("delta", "")))]
            case "response.refusal.delta":
                return [base.RefusalDelta(str(data.get("delta", "")))]
            case "response.reasoning.delta" | "response.reasoning_summary_text.delta":
                return [
                    base.ReasoningSummaryDelta(str(data.get("delta", "")), int(data.get("summary_index", 0)))
                ]
            case "response.reasoning_text.delta":
                return [base.ReasoningTextDelta(str(data.get("delta", "")))]
            case "response.function_call_arguments.delta":
                return [base.FunctionCallArgumentsDelta(str(data.get("delta", "")))]
            case "response.output_text.annotation.added":
                annotation = _annotation(data.get("annotation"))
                return [base.TextAnnotation(annotation)] if annotation else []
            case "response.output_item.added":
                return self._item_added(data.get("item") or {})
            case "response.output_item.done":
                return self._item_done(data.get("item") or {})
            case "response.web_search.done" | "web_search_call":
                return [base.WebSearchProgress(base.WebSearchPhase.COMPLETED, _search_action(data))]
            case "response.web_search_call.completed":
                return [base.WebSearchProgress(base.WebSearchPhase.COMPLETED)]
            case "response.completed":
                self.finished = True
                return self._usage_events(data)
            case "response.incomplete":
                self.finished = True
                reason = ((data.get("response") or {}).get("incomplete_details") or {}).get("reason")
                code = (
                    response_pb2.INCOMPLETE_REASON_CONTENT_FILTER
                    if reason == "content_filter"
                    else response_pb2.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS
                )
                return [*self._usage_events(data), base.Incomplete(code)]
            case "response.failed":
                error = (data.get("response") or {}).get("error") or {}
                raise base.BackendError(
                    base.ErrorKind.INTERNAL,
                    _clipped(str(error.get("message") or "The upstream model failed.")),
                    code=str(error.get("code") or "server_error"),
                )
        return []  # lifecycle and part events: Venna emits its own

    def _item_added(self, item: dict[str, Any]) -> list[base.BackendEvent]:
        kind = item.get("type")
        self._last_opened = str(item.get("id") or "")
        self._streamed[self._last_opened] = bool(kind == "function_call" and item.get("arguments"))
        if kind == "function_call":
            events: list[base.BackendEvent] = [
                base.FunctionCallStart(name=str(item.get("name", "")), call_id=str(item.get("call_id", "")))
            ]
            if item.get("arguments"):
                events.append(base.FunctionCallArgumentsDelta(str(item["arguments"])))
            return events
        if kind == "web_search_call":
            return [base.WebSearchProgress(base.WebSearchPhase.IN_PROGRESS)]
        if kind in ("message", "reasoning"):
            return [base.EndItem()]  # a new item of its own, even after one of the same kind
        return []

    def _item_done(self, item: dict[str, Any]) -> list[base.BackendEvent]:
        kind = item.get("type")
        item_id = str(item.get("id") or "")
        events: list[base.BackendEvent] = []
        if not self._streamed.get(item_id, False):
            events += _content_of(item, opened=item_id in self._streamed)
            self._streamed[item_id] = True
        if kind == "reasoning" and item.get("encrypted_content"):
            events.append(base.ReasoningEncryptedContent(str(item["encrypted_content"])))
        elif kind == "message" and item.get("id") not in self._annotated:
            self._annotated.add(str(item.get("id")))
            for part in item.get("content") or []:
                for raw in part.get("annotations") or []:
                    annotation = _annotation(raw)
                    if annotation:
                        events.append(base.TextAnnotation(annotation))
        return events

    def _usage_events(self, data: dict[str, Any]) -> list[base.BackendEvent]:
        usage = (data.get("response") or {}).get("usage") or {}
        if not usage:
            return []
        return [
            base.UsageReport(
                input_tokens=int(usage.get("input_tokens") or 0),
                output_tokens=int(usage.get("output_tokens") or 0),
                reasoning_tokens=int((usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0),
                cached_tokens=int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0),
            )
        ]


def _content_of(item: dict[str, Any], *, opened: bool) -> list[base.BackendEvent]:
    """The content of an item that arrived whole with its output_item.done, as the deltas that
    would have streamed it (summaries as plain strings or summary_text parts)."""
    kind = item.get("type")
    events: list[base.BackendEvent] = []
    if kind == "reasoning":
        if not opened:
            events.append(base.EndItem())
        for index, summary in enumerate(item.get("summary") or []):
            text = summary.get("text") if isinstance(summary, dict) else summary
            if isinstance(text, str) and text:
                events.append(base.ReasoningSummaryDelta(text, index))
        for part in item.get("content") or []:
            if isinstance(part, dict) and part.get("type") == "reasoning_text" and part.get("text"):
                events.append(base.ReasoningTextDelta(str(part["text"])))
    elif kind == "message":
        if not opened:
            events.append(base.EndItem())
        for part in item.get("content") or []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "output_text" and part.get("text"):
                events.append(base.TextDelta(str(part["text"])))
            elif part.get("type") == "refusal" and part.get("refusal"):
                events.append(base.RefusalDelta(str(part["refusal"])))
    elif kind == "function_call":
        if not opened:
            events.append(
                base.FunctionCallStart(name=str(item.get("name", "")), call_id=str(item.get("call_id", "")))
            )
        if item.get("arguments"):
            events.append(base.FunctionCallArgumentsDelta(str(item["arguments"])))
    elif kind == "web_search_call" and not opened:
        events.append(base.WebSearchProgress(base.WebSearchPhase.COMPLETED, _search_action(item)))
    return events


def _annotation(raw: Any) -> response_pb2.Annotation | None:
    if not isinstance(raw, dict) or raw.get("type") != "url_citation":
        return None
    annotation = response_pb2.Annotation()
    citation = annotation.url_citation
    citation.url = str(raw.get("url", ""))
    citation.title = str(raw.get("title", ""))
    citation.start_index = int(raw.get("start_index") or 0)
    citation.end_index = int(raw.get("end_index") or 0)
    return annotation


def _search_action(data: dict[str, Any]) -> response_pb2.WebSearchAction:
    action = response_pb2.WebSearchAction()
    action.search.SetInParent()
    for result in data.get("results") or []:
        if isinstance(result, dict) and result.get("url"):
            action.search.sources.add(url=str(result["url"]))
    return action


# ---------------------------------------------------------------------------------------------
# Errors


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# How much of an upstream's own error message reaches the caller.
MAX_UPSTREAM_MESSAGE = 300


def _clipped(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_UPSTREAM_MESSAGE else text[: MAX_UPSTREAM_MESSAGE - 1] + "…"


def _error_message(response: httpx.Response) -> str | None:
    """The upstream's own message about a request it refused (a 4xx), from the JSON error
    bodies Venice and OpenAI-style servers send, clipped; None for any other body. Raw text
    (an HTML page, a stack trace) never reaches the caller."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return _clipped(message) if isinstance(message, str) and message.strip() else None
    message = error if isinstance(error, str) else body.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    issues = body.get("issues")
    if isinstance(issues, list) and issues:
        details = "; ".join(
            f"{'.'.join(map(str, issue.get('path', [])))}: {issue.get('message')}"
            for issue in issues
            if isinstance(issue, dict)
        )
        if details:
            message = f"{message}: {details}"
    elif isinstance(body.get("details"), str):
        message = f"{message}: {body['details']}"
    return _clipped(message)


def _error_code_and_param(response: httpx.Response) -> tuple[str | None, str | None]:
    try:
        body = response.json()
    except ValueError:
        return None, None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    code, param = error.get("code"), error.get("param")
    if param == "messages":  # the upstream speaks of its chat-completions form: here it is input
        param = "input"
    return (
        code if isinstance(code, str) and code else None,
        param if isinstance(param, str) and param else None,
    )


def _upstream_error(response: httpx.Response, retry_after: float | None) -> base.BackendError:
    """The error of a refused upstream call. A 5xx says only that the upstream failed, with its
    status: its body (a stack trace, a proxy's page) is the upstream's business. A 4xx keeps
    the upstream's own JSON message, which tells the caller what to fix."""
    status = response.status_code
    if status in (401, 403):
        return base.BackendError(
            base.ErrorKind.INTERNAL,
            "The gateway's upstream credentials were rejected; contact the gateway operator.",
            code="server_error",
        )
    if status == 504 or status == 408:
        return base.BackendError(
            base.ErrorKind.TIMEOUT, f"The upstream model timed out (HTTP {status}).", code="server_error"
        )
    if not 400 <= status < 500:
        return base.BackendError(
            base.ErrorKind.UNAVAILABLE, f"The upstream model failed (HTTP {status}).", code="server_error"
        )
    message = _error_message(response)
    if status == 402:
        return base.BackendError(
            base.ErrorKind.QUOTA_EXCEEDED,
            message or "The upstream account has insufficient balance (HTTP 402).",
            code="insufficient_quota",
        )
    if status == 429:
        return base.BackendError(
            base.ErrorKind.RATE_LIMITED,
            message or "The upstream model is rate limited (HTTP 429).",
            code="rate_limit_exceeded",
            retry_after=retry_after,
        )
    if status == 404:
        return base.BackendError(
            base.ErrorKind.INVALID_REQUEST,
            message or "The upstream does not know this model (HTTP 404).",
            code="model_not_found",
            param="model",
        )
    # An OpenAI-shaped body names its own code and parameter (context_length_exceeded, …).
    code, param = _error_code_and_param(response)
    return base.BackendError(
        base.ErrorKind.INVALID_REQUEST,
        message or f"The upstream model refused the request (HTTP {status}).",
        code=code or "invalid_request",
        param=param,
    )


def _truncated() -> base.BackendError:
    return base.BackendError(
        base.ErrorKind.UNAVAILABLE,
        "The upstream stream ended before the response was complete.",
        code="server_error",
    )


def _stream_error(data: dict[str, Any]) -> base.BackendError:
    error = data.get("error")
    if isinstance(error, dict):
        message = str(error.get("message") or "The upstream model failed.")
        code = str(error.get("code") or error.get("type") or "server_error")
    else:
        message = str(data.get("message") or error or "The upstream model failed.")
        code = str(data.get("code") or "server_error")
    return base.BackendError(base.ErrorKind.INTERNAL, _clipped(message), code=_clipped(code))


# ---------------------------------------------------------------------------------------------
# The kind: ``kind = "responses"`` in an ``[upstreams.NAME]`` section of venna.toml.


@dataclass(frozen=True, slots=True)
class ResponsesConfig:
    """An ``[upstreams.NAME]`` section of kind ``responses``."""

    base_url: str
    # The environment variable holding the upstream's API key (never the key itself).
    api_key_env: str = ""
    # "venice" (nested tool shapes) or "openai" (flat ones). Venice's, for sections written
    # before there were kinds.
    dialect: str = "venice"
    # The optional generation settings the upstream honours; the dialect's list by default.
    accepts: list[str] | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"'dialect' must be one of {', '.join(DIALECTS)}, got '{self.dialect}'")
        unknown = set(self.accepts or ()) - base.OPTIONAL_SETTINGS
        if unknown:
            raise ValueError(
                f"'accepts' has unknown settings {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(base.OPTIONAL_SETTINGS))}"
            )
        for name in ("connect_timeout", "read_timeout", "max_attempts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"'{name}' must be a positive number")


def build(config: ResponsesConfig, context: BuildContext) -> ResponsesUpstream:
    return ResponsesUpstream(
        config.base_url,
        context.environ.get(config.api_key_env, "") if config.api_key_env else "",
        prefix=f"{context.name}/",
        dialect=config.dialect,
        accepts=frozenset(config.accepts) if config.accepts is not None else None,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        max_attempts=config.max_attempts,
    )


KIND = BackendKind(
    "responses",
    ResponsesConfig,
    build,
    "an OpenAI-compatible Responses API upstream (POST /responses), dialect openai or venice",
)
