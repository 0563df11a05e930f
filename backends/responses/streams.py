"""Response translation: an upstream's SSE stream (or whole JSON response) into backend events,
parsed once; Venice's dialect (reasoning deltas, plain-string summaries, web search events,
``[DONE]``) included."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

import orjson

from venna.backends import base
from venna.backends.responses.errors import clipped, stream_error, truncated
from venna.responses.v1 import response_pb2

SseEvent = tuple[str, dict[str, Any] | None]


class SseParser:
    """An SSE body fed in chunks of any size, parsed into (event type, JSON payload) pairs;
    ``[DONE]`` arrives as ("[DONE]", None).

    Synchronous and per chunk: an upstream that sends a burst of events costs one call, not
    one await per line. A line may be any length (one data line can carry a whole response);
    a chunk without a line break is kept aside, not re-scanned with every chunk that follows.
    """

    __slots__ = ("_data", "_event_type", "_partial")

    def __init__(self) -> None:
        self._partial: list[bytes] = []
        self._event_type = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if b"\n" not in chunk:
            self._partial.append(chunk)
            return []
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial = []
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            self._partial.append(rest)
        events: list[SseEvent] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line.startswith(b"event:"):
                self._event_type = line[6:].strip()
            elif not line and self._data:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
        return events

    def _dispatch(self) -> SseEvent | None:
        text = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        event_type, self._event_type = self._event_type, b""
        if text.strip() == b"[DONE]":
            return "[DONE]", None
        try:
            payload = orjson.loads(text)  # several times faster than json: once per event
        except ValueError:
            return None  # not ours to crash on: skip a malformed frame
        if not isinstance(payload, dict):
            return None
        kind = payload.get("type")
        return (str(kind) if kind else event_type.decode(errors="replace")), payload


async def sse_batches(chunks: AsyncIterable[bytes]) -> AsyncGenerator[list[SseEvent], None]:
    """The events of an SSE body, a list per chunk that completed any."""
    parser = SseParser()
    async for chunk in chunks:
        events = parser.feed(chunk)
        if events:
            yield events


_TERMINAL_STATUSES = {"completed", "incomplete", "failed"}


def whole_body(content: bytes) -> dict[str, Any]:
    """The JSON object of an unstreamed answer; UNAVAILABLE if it is not JSON, truncated if it
    is not an object."""
    try:
        data = orjson.loads(content)
    except ValueError:
        raise base.BackendError(
            base.ErrorKind.UNAVAILABLE, "The upstream sent a response that is not JSON.", code="server_error"
        ) from None
    if not isinstance(data, dict):
        raise truncated()
    return data


def whole_response_events(content: bytes) -> list[SseEvent]:
    """A non-streamed Response body as the events that would have streamed it: each output item
    done (its content included), then the terminal event."""
    data = whole_body(content)
    events: list[SseEvent] = [
        ("response.output_item.done", {"item": item})
        for item in data.get("output") or []
        if isinstance(item, dict)
    ]
    status = data.get("status") if data.get("status") in _TERMINAL_STATUSES else "completed"
    events.append((f"response.{status}", {"response": data}))
    return events


class StreamTranslator:
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
                raise truncated()
            return []
        if event_type == "error" or (data.get("error") and not event_type.startswith("response.")):
            raise stream_error(data)  # an in-band error frame, in OpenAI's or chat-completions' shape
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
                    clipped(str(error.get("message") or "The upstream model failed.")),
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
