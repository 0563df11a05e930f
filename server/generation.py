"""The backends' view of a create request: the model, the rebuilt context and the generation
settings as plain values. Backends never see the wire request, so a change of the contract
touches this module, not every backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from venna.backends import base
from venna.responses.v1 import response_pb2, service_pb2
from venna.server.compaction import DEFAULT_COMPACT_THRESHOLD, expand_compactions


def generation_request(
    request: service_pb2.CreateResponseRequest, *, model: str, context: Sequence[response_pb2.Item]
) -> base.GenerationRequest:
    """What ``model``'s backend receives for ``request``, its context already rebuilt."""
    return base.GenerationRequest(
        model=model,
        context=expand_compactions(list(context)),
        settings=generation_settings(request),
        instructions=request.instructions if request.HasField("instructions") else None,
    )


def generation_settings(request: service_pb2.CreateResponseRequest) -> base.GenerationSettings:
    reasoning = request.reasoning if request.HasField("reasoning") else None
    return base.GenerationSettings(
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        max_output_tokens=request.max_output_tokens if request.HasField("max_output_tokens") else None,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        prompt_cache_key=request.prompt_cache_key if request.HasField("prompt_cache_key") else None,
        reasoning_effort=(
            _enum_word(response_pb2.ReasoningEffort.Name(reasoning.effort))
            if reasoning is not None and reasoning.HasField("effort")
            else None
        ),
        reasoning_summary=(
            _enum_word(response_pb2.ReasoningSummary.Name(reasoning.summary))
            if reasoning is not None and reasoning.HasField("summary")
            else None
        ),
        tools=tuple(request.tools),
        tool_choice=request.tool_choice if request.HasField("tool_choice") else None,
        text_format=(
            request.text.format if request.HasField("text") and request.text.HasField("format") else None
        ),
        top_logprobs=request.top_logprobs if request.HasField("top_logprobs") else None,
        max_tool_calls=request.max_tool_calls if request.HasField("max_tool_calls") else None,
        compact_threshold=_compact_threshold(request),
        presence_penalty=request.presence_penalty if request.HasField("presence_penalty") else None,
        frequency_penalty=request.frequency_penalty if request.HasField("frequency_penalty") else None,
        vendor=(
            {"venice_parameters": _plain(request.venice_parameters)}
            if request.HasField("venice_parameters")
            else {}
        ),
        requested=frozenset(
            field.name for field, _ in request.ListFields() if field.name in base.OPTIONAL_SETTINGS
        ),
    )


def _compact_threshold(request: service_pb2.CreateResponseRequest) -> int | None:
    """The threshold of a context_management compaction entry; None without one."""
    for entry in request.context_management:
        if entry.type == "compaction":
            return (
                entry.compact_threshold if entry.HasField("compact_threshold") else DEFAULT_COMPACT_THRESHOLD
            )
    return None


def _enum_word(name: str) -> str:
    """``REASONING_EFFORT_HIGH`` -> ``high``: the API's spelling of an enum value."""
    return name.rsplit("_", 1)[-1].lower()


def _plain(message: Message) -> dict[str, Any]:
    """A flat settings message as the JSON an upstream takes: enums by their API word."""
    plain: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.enum_type is not None:
            plain[field.name] = _enum_word(field.enum_type.values_by_number[value].name)
        else:
            plain[field.name] = value
    return plain
