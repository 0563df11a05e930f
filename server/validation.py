"""Checks of a CreateResponseRequest, with the limits of the Responses API.

All violations are collected, so a client fixes its request in one round trip; the first one
names the error's ``param``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from server.errors import ServiceError
from venna.responses.v1 import response_pb2, service_pb2

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MIN_MAX_OUTPUT_TOKENS = 16
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    message: str
    # ErrorInfo reason; its lower-case form is OpenAI's error ``code``.
    reason: str = "INVALID_VALUE"


MISSING = "MISSING_REQUIRED_PARAMETER"

# Records a violation of ``field`` with ``message`` (and a reason) unless ``ok``.
_Check = Callable[..., None]
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# OpenAI's IncludeEnum.
INCLUDABLE = frozenset(
    {
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "reasoning.encrypted_content",
        "message.output_text.logprobs",
    }
)


def check_include(include: list[str] | tuple[str, ...], violations: list[Violation]) -> None:
    for value in include:
        if value not in INCLUDABLE:
            violations.append(
                Violation(
                    "include", f"Invalid value '{value}': expected one of {', '.join(sorted(INCLUDABLE))}."
                )
            )


def raise_if_any(violations: list[Violation]) -> None:
    if violations:
        first = violations[0]
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            first.message if len(violations) == 1 else f"{first.message} (and {len(violations) - 1} more)",
            reason=first.reason,
            param=first.field,
            violations=[(violation.field, violation.message) for violation in violations],
        )


def validate_create(request: service_pb2.CreateResponseRequest) -> None:
    """Raises INVALID_ARGUMENT with a BadRequest listing every field violation."""
    violations: list[Violation] = []

    def check(ok: bool, field: str, message: str, reason: str = "INVALID_VALUE") -> None:
        if not ok:
            violations.append(Violation(field, message, reason))

    check(bool(request.model), "model", "Missing required parameter: 'model'.", MISSING)
    check(
        len(request.metadata) <= MAX_METADATA_PAIRS,
        "metadata",
        f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs are allowed, got {len(request.metadata)}.",
    )
    for key, value in request.metadata.items():
        check(
            len(key) <= MAX_METADATA_KEY,
            "metadata",
            f"Invalid 'metadata': key '{key[:20]}…' is longer than {MAX_METADATA_KEY} characters.",
        )
        check(
            len(value) <= MAX_METADATA_VALUE,
            "metadata",
            f"Invalid 'metadata': the value of '{key}' is longer than {MAX_METADATA_VALUE} characters.",
        )
    if request.HasField("temperature"):
        check(
            0 <= request.temperature <= 2,
            "temperature",
            f"Invalid 'temperature': {request.temperature:g} is not between 0 and 2.",
        )
    if request.HasField("top_p"):
        check(0 <= request.top_p <= 1, "top_p", f"Invalid 'top_p': {request.top_p:g} is not between 0 and 1.")
    if request.HasField("max_output_tokens"):
        check(
            request.max_output_tokens >= MIN_MAX_OUTPUT_TOKENS,
            "max_output_tokens",
            f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
            f"{MIN_MAX_OUTPUT_TOKENS}, but got {request.max_output_tokens} instead.",
        )
    if request.HasField("top_logprobs"):
        check(0 <= request.top_logprobs <= 20, "top_logprobs", "Invalid 'top_logprobs': expected 0 to 20.")
    if request.HasField("max_tool_calls"):
        check(request.max_tool_calls >= 1, "max_tool_calls", "Invalid 'max_tool_calls': expected at least 1.")
    if request.HasField("safety_identifier"):
        check(
            len(request.safety_identifier) <= 64,
            "safety_identifier",
            "Invalid 'safety_identifier': at most 64 characters.",
        )
    check(
        len(request.stop) <= MAX_STOP_SEQUENCES,
        "stop",
        f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences are allowed, got {len(request.stop)}.",
    )
    for index, sequence in enumerate(request.stop):
        check(
            0 < len(sequence) <= MAX_STOP_LENGTH,
            f"stop[{index}]",
            f"Invalid 'stop[{index}]': a stop sequence has 1 to {MAX_STOP_LENGTH} characters.",
        )
    if request.HasField("venice_parameters"):
        venice = request.venice_parameters
        check(
            not venice.enable_e2ee,
            "venice_parameters.enable_e2ee",
            "Unsupported value: 'venice_parameters.enable_e2ee' must be false. End-to-end encryption "
            "needs a client that encrypts its own requests; false selects TEE-only inference.",
            "UNSUPPORTED_VALUE",
        )
        check(
            not venice.HasField("character_slug") or bool(venice.character_slug),
            "venice_parameters.character_slug",
            "Invalid 'venice_parameters.character_slug': empty string.",
        )
    if request.background:
        check(
            not request.HasField("store") or request.store,
            "store",
            "Background responses must be stored: 'background': true requires 'store': true.",
        )
    check_include(list(request.include), violations)
    _check_input(request, check)
    _check_tools(request, check)
    raise_if_any(violations)


def _check_input(request: service_pb2.CreateResponseRequest, check: _Check) -> None:
    for index, item in enumerate(request.input):
        where = f"input[{index}]"
        kind = item.WhichOneof("item")
        if kind is None:
            check(False, where, f"Invalid '{where}': the item has no type.")
        elif kind == "message":
            message = item.message
            check(
                message.role != response_pb2.ROLE_UNSPECIFIED,
                f"{where}.role",
                f"Missing '{where}.role'.",
                MISSING,
            )
            for part_index, part in enumerate(message.content):
                check(
                    part.WhichOneof("part") is not None,
                    f"{where}.content[{part_index}]",
                    f"Invalid '{where}.content[{part_index}]': the content part has no type.",
                )
                if part.WhichOneof("part") == "input_image":
                    image = part.input_image
                    check(
                        image.HasField("image_url") or image.HasField("file_id"),
                        f"{where}.content[{part_index}]",
                        "An input_image needs 'image_url' or 'file_id'.",
                    )
        elif kind == "function_call":
            call = item.function_call
            check(bool(call.call_id), f"{where}.call_id", f"Missing '{where}.call_id'.", MISSING)
            check(bool(call.name), f"{where}.name", f"Missing '{where}.name'.", MISSING)
        elif kind == "function_call_output":
            check(
                bool(item.function_call_output.call_id),
                f"{where}.call_id",
                f"Missing '{where}.call_id'.",
                MISSING,
            )
        elif kind == "item_reference":
            check(bool(item.item_reference.id), f"{where}.id", f"Missing '{where}.id'.", MISSING)


def _check_tools(request: service_pb2.CreateResponseRequest, check: _Check) -> None:
    function_names: set[str] = set()
    for index, tool in enumerate(request.tools):
        kind = tool.WhichOneof("tool")
        check(kind is not None, f"tools[{index}]", f"Invalid 'tools[{index}]': the tool has no type.")
        if kind == "function":
            name = tool.function.name
            check(
                bool(_FUNCTION_NAME.match(name)),
                f"tools[{index}].name",
                f"Invalid 'tools[{index}].name': '{name}' does not match '^[a-zA-Z0-9_-]{{1,64}}$'.",
            )
            check(
                name not in function_names,
                f"tools[{index}].name",
                f"Invalid 'tools[{index}].name': duplicate function name '{name}'.",
            )
            function_names.add(name)
    if request.HasField("tool_choice"):
        choice = request.tool_choice
        choice_kind = choice.WhichOneof("choice")
        if choice_kind == "function":
            check(
                choice.function.name in function_names,
                "tool_choice",
                f"Invalid 'tool_choice': function '{choice.function.name}' is not among the tools.",
            )
        elif choice_kind == "mode":
            check(
                choice.mode != response_pb2.TOOL_CHOICE_MODE_UNSPECIFIED,
                "tool_choice",
                "Invalid 'tool_choice': missing mode.",
            )
            check(
                choice.mode != response_pb2.TOOL_CHOICE_MODE_REQUIRED or len(request.tools) > 0,
                "tool_choice",
                "Invalid 'tool_choice': 'required' needs at least one tool.",
            )
