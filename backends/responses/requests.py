"""Request translation: the JSON body an upstream receives, the whole rebuilt context in the
upstream's dialect (Venice's nested tool shapes or OpenAI's flat ones)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from venna.backends import base
from venna.responses.v1 import response_pb2


def upstream_model(model: str, prefix: str) -> str:
    """The upstream's model name (feature suffixes kept), or '' if the name is not ours."""
    return model.removeprefix(prefix) if model.startswith(prefix) else ""


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
        tools = (tool_json(tool, nested) for tool in settings.tools)
        body["tools"] = [tool for tool in tools if tool is not None]
    if settings.tool_choice is not None:
        choice = tool_choice_json(settings.tool_choice, nested)
        if choice is not None:
            body["tool_choice"] = choice
    for name, value in (
        ("temperature", settings.temperature),
        ("top_p", settings.top_p),
        ("max_output_tokens", settings.max_output_tokens),
        ("prompt_cache_key", settings.prompt_cache_key),
        ("seed", settings.seed),
        ("presence_penalty", settings.presence_penalty),
        ("frequency_penalty", settings.frequency_penalty),
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


def tool_json(tool: response_pb2.Tool, nested: bool) -> dict[str, Any] | None:
    """A tool as the upstream takes it: function tools nested (``{"type": "function",
    "function": {...}}``, as Venice and chat completions take them) or flat (OpenAI's
    Responses API); None for a tool the upstream has no shape for."""
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


def tool_choice_json(choice: response_pb2.ToolChoice, nested: bool) -> str | dict[str, Any] | None:
    """``tool_choice`` as the upstream takes it, nested or flat as ``tool_json``."""
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
