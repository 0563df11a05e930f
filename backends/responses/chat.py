"""The chat-completions dialect: the Responses API served over an upstream's
``POST /chat/completions`` (Ollama, llama.cpp's server, vLLM, SGLang, TGI, aggregators).

Going up, the rebuilt context becomes ``messages``: instructions a leading system message,
developer messages system ones (few chat servers know the developer role), function calls an
assistant message's ``tool_calls`` (consecutive calls share one message), their outputs ``tool``
messages. Reasoning items do not go up: chat servers take no reasoning input. Coming down, each
chunk's ``delta`` becomes backend events: ``reasoning_content`` (or ``reasoning``) raw reasoning
text, ``content`` message text, ``refusal``, and ``tool_calls`` by index. The first tool call
streams its arguments as they come; a later one is held until the stream ends, since servers may
interleave the argument deltas of parallel calls, and the call being streamed cannot be closed
before it is known to be complete. ``finish_reason`` ``length`` and ``content_filter`` end the
response incomplete; usage comes from the chunk ``stream_options.include_usage`` asks for.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from venna.backends import base
from venna.backends.responses.errors import stream_error, truncated
from venna.backends.responses.requests import tool_choice_json, tool_json, upstream_model
from venna.backends.responses.streams import SseEvent, whole_body
from venna.responses.v1 import response_pb2

CHAT_PATH = "/chat/completions"
# The optional settings a chat-completions upstream honours by default.
CHAT_ACCEPTS = frozenset(
    {
        "temperature",
        "top_p",
        "max_output_tokens",
        "stop",
        "seed",
        "reasoning",
        "tools",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
    }
)

_ROLES = {
    response_pb2.ROLE_USER: "user",
    response_pb2.ROLE_ASSISTANT: "assistant",
    response_pb2.ROLE_SYSTEM: "system",
    response_pb2.ROLE_DEVELOPER: "system",
}
_DETAILS = {response_pb2.IMAGE_DETAIL_LOW: "low", response_pb2.IMAGE_DETAIL_HIGH: "high"}
_INCOMPLETE = {
    "length": response_pb2.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS,
    "content_filter": response_pb2.INCOMPLETE_REASON_CONTENT_FILTER,
}


def refuse_unsupported(request: base.GenerationRequest) -> None:
    """What a chat-completions upstream cannot be given is refused before anything is stored."""
    for index, tool in enumerate(request.settings.tools):
        if tool.WhichOneof("tool") != "function":
            raise base.BackendError(
                base.ErrorKind.INVALID_REQUEST,
                f"Tool '{tool.WhichOneof('tool')}' is not supported by this model's upstream"
                " (chat completions take function tools only).",
                code="unsupported_parameter",
                param=f"tools[{index}]",
            )
    for item in request.context:
        if item.WhichOneof("item") == "message":
            for part in item.message.content:
                if part.WhichOneof("part") == "input_file":
                    raise base.BackendError(
                        base.ErrorKind.INVALID_REQUEST,
                        "Input files are not supported by this model's upstream (chat completions).",
                        code="unsupported_parameter",
                        param="input",
                    )


def chat_request(request: base.GenerationRequest, *, prefix: str) -> dict[str, Any]:
    """The JSON body of ``POST /chat/completions``: the whole context as messages, streamed."""
    settings = request.settings
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    for item in request.context:
        _add_item(messages, item)
    body: dict[str, Any] = {
        "model": upstream_model(request.model, prefix),
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.tools:
        # Function tools only (validate refused the others), in the nested shape; a function
        # without parameters gets an empty object schema, which some chat servers require.
        tools = [tool_json(tool, nested=True) for tool in settings.tools if tool.HasField("function")]
        body["tools"] = [tool for tool in tools if tool is not None]
        for tool in body["tools"]:
            tool["function"].setdefault("parameters", {"type": "object", "properties": {}})
    if settings.tool_choice is not None:
        choice = tool_choice_json(settings.tool_choice, nested=True)
        if choice is not None:
            body["tool_choice"] = choice
    for name, value in (
        ("temperature", settings.temperature),
        ("top_p", settings.top_p),
        ("max_tokens", settings.max_output_tokens),
        ("seed", settings.seed),
        ("reasoning_effort", settings.reasoning_effort),
        ("presence_penalty", settings.presence_penalty),
        ("frequency_penalty", settings.frequency_penalty),
    ):
        if value is not None:
            body[name] = value
    if settings.stop:
        body["stop"] = list(settings.stop)
    response_format = _response_format(settings.text_format)
    if response_format is not None:
        body["response_format"] = response_format
    return body


def _add_item(messages: list[dict[str, Any]], item: response_pb2.Item) -> None:
    kind = item.WhichOneof("item")
    if kind == "message":
        message = item.message
        role = _ROLES.get(message.role, "user")
        if role == "assistant":
            text = "".join(
                part.output_text.text if part.HasField("output_text") else part.refusal.refusal
                for part in message.content
                if part.HasField("output_text") or part.HasField("refusal")
            )
            messages.append({"role": "assistant", "content": text})
        else:
            messages.append({"role": role, "content": _content(message.content)})
    elif kind == "function_call":
        call = item.function_call
        tool_call = {
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            # Parallel calls, or text then calls: one assistant turn.
            last.setdefault("tool_calls", []).append(tool_call)
            if not last.get("content"):
                last["content"] = None
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [tool_call]})
    elif kind == "function_call_output":
        output = item.function_call_output
        messages.append({"role": "tool", "tool_call_id": output.call_id, "content": output.output})
    # Reasoning items and web search calls do not go up: chat upstreams take neither.


def _content(parts: Any) -> str | list[dict[str, Any]]:
    """Plain text where there is only text (what every chat server takes), else typed parts."""
    translated: list[dict[str, Any]] = []
    for part in parts:
        kind = part.WhichOneof("part")
        if kind in ("input_text", "output_text"):
            translated.append({"type": "text", "text": getattr(part, kind).text})
        elif kind == "input_image" and part.input_image.HasField("image_url"):
            image = part.input_image
            translated.append(
                {
                    "type": "image_url",
                    "image_url": {"url": image.image_url, "detail": _DETAILS.get(image.detail, "auto")},
                }
            )
    if all(part["type"] == "text" for part in translated):
        return "".join(part["text"] for part in translated)
    return translated


def _response_format(text_format: response_pb2.TextFormat | None) -> dict[str, Any] | None:
    if text_format is None:
        return None
    kind = text_format.WhichOneof("format")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = text_format.json_schema
        spec: dict[str, Any] = {"name": schema.name, "schema": json_format.MessageToDict(schema.schema)}
        if schema.HasField("description"):
            spec["description"] = schema.description
        if schema.HasField("strict"):
            spec["strict"] = schema.strict
        return {"type": "json_schema", "json_schema": spec}
    return None


def whole_chat_events(content: bytes) -> list[SseEvent]:
    """A non-streamed chat completion as the chunks that would have streamed it."""
    data = whole_body(content)
    events: list[SseEvent] = []
    for choice in data.get("choices") or []:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            message = choice.get("message") or {}
            calls = [{**call, "index": index} for index, call in enumerate(message.get("tool_calls") or [])]
            delta = {**message, "tool_calls": calls} if calls else message
            finish = choice.get("finish_reason")
            events.append(("", {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
    if data.get("usage"):
        events.append(("", {"choices": [], "usage": data["usage"]}))
    events.append(("[DONE]", None))
    return events


@dataclass(slots=True)
class _ToolCall:
    name: str = ""
    call_id: str = ""
    arguments: list[str] = field(default_factory=list)


class ChatTranslator:
    """Chat-completion chunks -> Venna backend events (choice 0 only)."""

    def __init__(self) -> None:
        self.finished = False
        self._finish_reason: str | None = None
        self._usage: base.UsageReport | None = None
        # Tool calls by index: the one streaming (``_live``) and those held for the end.
        self._calls: dict[int, _ToolCall] = {}
        self._live: int | None = None
        self._live_started = False

    def translate(self, event_type: str, payload: dict[str, Any] | None) -> list[base.BackendEvent]:
        if event_type == "[DONE]":
            if self._finish_reason is None:
                raise truncated()
            return self._end()
        data = payload or {}
        if data.get("error"):
            raise stream_error(data)
        events: list[base.BackendEvent] = []
        usage = data.get("usage")
        if isinstance(usage, dict) and usage:
            self._usage = _usage(usage)
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta, dict):
                events += self._delta(delta)
            if choice.get("finish_reason"):
                self._finish_reason = str(choice["finish_reason"])
        if self._finish_reason is not None and self._usage is not None and not data.get("choices"):
            # The usage chunk follows the last choice: nothing but [DONE] can come after it.
            events += self._end()
        return events

    def _delta(self, delta: dict[str, Any]) -> list[base.BackendEvent]:
        events: list[base.BackendEvent] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events.append(base.ReasoningTextDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            events.append(base.TextDelta(content))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            events.append(base.RefusalDelta(refusal))
        for raw in delta.get("tool_calls") or []:
            if isinstance(raw, dict):
                events += self._tool_call(raw)
        return events

    def _tool_call(self, raw: dict[str, Any]) -> list[base.BackendEvent]:
        index = int(raw.get("index") or 0)
        call = self._calls.setdefault(index, _ToolCall())
        function = raw.get("function") or {}
        if raw.get("id"):
            call.call_id = str(raw["id"])
        if function.get("name") and not call.name:
            # Servers send the name once, in the call's first chunk; one that repeats it in
            # later chunks must not have it doubled.
            call.name = str(function["name"])
        arguments = str(function.get("arguments") or "")
        if self._live is None:
            self._live = index
        if index != self._live:
            call.arguments.append(arguments)  # held: emitted whole at the end
            return []
        events: list[base.BackendEvent] = []
        if not self._live_started and call.name:
            self._live_started = True
            events.append(base.FunctionCallStart(name=call.name, call_id=call.call_id or _call_id(index)))
            events += [base.FunctionCallArgumentsDelta(text) for text in call.arguments if text]
            call.arguments = []
        if not self._live_started:
            call.arguments.append(arguments)  # no name yet: wait for it
        elif arguments:
            events.append(base.FunctionCallArgumentsDelta(arguments))
        return events

    def _end(self) -> list[base.BackendEvent]:
        if self.finished:
            return []
        self.finished = True
        events: list[base.BackendEvent] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if index == self._live and self._live_started:
                continue
            events.append(base.FunctionCallStart(name=call.name, call_id=call.call_id or _call_id(index)))
            text = "".join(call.arguments)
            if text:
                events.append(base.FunctionCallArgumentsDelta(text))
        if self._usage is not None:
            events.append(self._usage)
        reason = _INCOMPLETE.get(self._finish_reason or "")
        if reason is not None:
            events.append(base.Incomplete(reason))
        return events


def _call_id(index: int) -> str:
    """A call id for a server that gave none (some local servers omit it): unique, so that the
    call's output pairs with it alone in a later turn."""
    return f"call_{secrets.token_hex(12)}"


def _usage(usage: dict[str, Any]) -> base.UsageReport:
    return base.UsageReport(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        reasoning_tokens=int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
    )
