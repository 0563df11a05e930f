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
    """Raises INVALID_ARGUMENT with a BadRequest listing every field violation.

    Every check runs on every create, so a message is only formatted once its check failed.
    """
    violations: list[Violation] = []
    add = violations.append
    if not request.model:
        add(Violation("model", "Missing required parameter: 'model'.", MISSING))
    if request.metadata:
        _check_metadata(request, add)
    if request.HasField("temperature") and not 0 <= request.temperature <= 2:
        add(
            Violation(
                "temperature", f"Invalid 'temperature': {request.temperature:g} is not between 0 and 2."
            )
        )
    if request.HasField("top_p") and not 0 <= request.top_p <= 1:
        add(Violation("top_p", f"Invalid 'top_p': {request.top_p:g} is not between 0 and 1."))
    if request.HasField("max_output_tokens") and request.max_output_tokens < MIN_MAX_OUTPUT_TOKENS:
        add(
            Violation(
                "max_output_tokens",
                f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                f"{MIN_MAX_OUTPUT_TOKENS}, but got {request.max_output_tokens} instead.",
            )
        )
    if request.HasField("top_logprobs") and not 0 <= request.top_logprobs <= 20:
        add(Violation("top_logprobs", "Invalid 'top_logprobs': expected 0 to 20."))
    if request.HasField("max_tool_calls") and request.max_tool_calls < 1:
        add(Violation("max_tool_calls", "Invalid 'max_tool_calls': expected at least 1."))
    if request.HasField("safety_identifier") and len(request.safety_identifier) > 64:
        add(Violation("safety_identifier", "Invalid 'safety_identifier': at most 64 characters."))
    if request.stop:
        _check_stop(request, add)
    if request.HasField("venice_parameters"):
        _check_venice(request.venice_parameters, add)
    if request.background and request.HasField("store") and not request.store:
        add(
            Violation(
                "store", "Background responses must be stored: 'background': true requires 'store': true."
            )
        )
    if request.include:
        check_include(list(request.include), violations)
    _check_input(request, add)
    if request.tools or request.HasField("tool_choice"):
        _check_tools(request, add)
    raise_if_any(violations)


_Add = Callable[[Violation], None]


def _check_metadata(request: service_pb2.CreateResponseRequest, add: _Add) -> None:
    if len(request.metadata) > MAX_METADATA_PAIRS:
        add(
            Violation(
                "metadata",
                f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs are allowed,"
                f" got {len(request.metadata)}.",
            )
        )
    for key, value in request.metadata.items():
        if len(key) > MAX_METADATA_KEY:
            add(
                Violation(
                    "metadata",
                    f"Invalid 'metadata': key '{key[:20]}…' is longer than {MAX_METADATA_KEY} characters.",
                )
            )
        if len(value) > MAX_METADATA_VALUE:
            add(
                Violation(
                    "metadata",
                    f"Invalid 'metadata': the value of '{key}' is longer than {MAX_METADATA_VALUE}"
                    " characters.",
                )
            )


def _check_stop(request: service_pb2.CreateResponseRequest, add: _Add) -> None:
    if len(request.stop) > MAX_STOP_SEQUENCES:
        add(
            Violation(
                "stop",
                f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences are allowed,"
                f" got {len(request.stop)}.",
            )
        )
    for index, sequence in enumerate(request.stop):
        if not 0 < len(sequence) <= MAX_STOP_LENGTH:
            add(
                Violation(
                    f"stop[{index}]",
                    f"Invalid 'stop[{index}]': a stop sequence has 1 to {MAX_STOP_LENGTH} characters.",
                )
            )


def _check_venice(venice: service_pb2.VeniceParameters, add: _Add) -> None:
    if venice.enable_e2ee:
        add(
            Violation(
                "venice_parameters.enable_e2ee",
                "Unsupported value: 'venice_parameters.enable_e2ee' must be false. End-to-end encryption "
                "needs a client that encrypts its own requests; false selects TEE-only inference.",
                "UNSUPPORTED_VALUE",
            )
        )
    if venice.HasField("character_slug") and not venice.character_slug:
        add(
            Violation(
                "venice_parameters.character_slug",
                "Invalid 'venice_parameters.character_slug': empty string.",
            )
        )


def _check_input(request: service_pb2.CreateResponseRequest, add: _Add) -> None:
    for index, item in enumerate(request.input):
        kind = item.WhichOneof("item")
        if kind == "message":
            message = item.message
            if message.role == response_pb2.ROLE_UNSPECIFIED:
                add(Violation(f"input[{index}].role", f"Missing 'input[{index}].role'.", MISSING))
            for part_index, part in enumerate(message.content):
                part_kind = part.WhichOneof("part")
                if part_kind is None:
                    where = f"input[{index}].content[{part_index}]"
                    add(Violation(where, f"Invalid '{where}': the content part has no type."))
                elif part_kind == "input_image" and not (
                    part.input_image.HasField("image_url") or part.input_image.HasField("file_id")
                ):
                    add(
                        Violation(
                            f"input[{index}].content[{part_index}]",
                            "An input_image needs 'image_url' or 'file_id'.",
                        )
                    )
        elif kind is None:
            add(Violation(f"input[{index}]", f"Invalid 'input[{index}]': the item has no type."))
        elif kind == "function_call":
            call = item.function_call
            if not call.call_id:
                add(Violation(f"input[{index}].call_id", f"Missing 'input[{index}].call_id'.", MISSING))
            if not call.name:
                add(Violation(f"input[{index}].name", f"Missing 'input[{index}].name'.", MISSING))
        elif kind == "function_call_output":
            if not item.function_call_output.call_id:
                add(Violation(f"input[{index}].call_id", f"Missing 'input[{index}].call_id'.", MISSING))
        elif kind == "item_reference" and not item.item_reference.id:
            add(Violation(f"input[{index}].id", f"Missing 'input[{index}].id'.", MISSING))


def _check_tools(request: service_pb2.CreateResponseRequest, add: _Add) -> None:
    function_names: set[str] = set()
    for index, tool in enumerate(request.tools):
        kind = tool.WhichOneof("tool")
        if kind is None:
            add(Violation(f"tools[{index}]", f"Invalid 'tools[{index}]': the tool has no type."))
        elif kind == "function":
            name = tool.function.name
            if not _FUNCTION_NAME.match(name):
                add(
                    Violation(
                        f"tools[{index}].name",
                        f"Invalid 'tools[{index}].name': '{name}' does not match '^[a-zA-Z0-9_-]{{1,64}}$'.",
                    )
                )
            if name in function_names:
                add(
                    Violation(
                        f"tools[{index}].name",
                        f"Invalid 'tools[{index}].name': duplicate function name '{name}'.",
                    )
                )
            function_names.add(name)
    if request.HasField("tool_choice"):
        choice = request.tool_choice
        choice_kind = choice.WhichOneof("choice")
        if choice_kind == "function" and choice.function.name not in function_names:
            add(
                Violation(
                    "tool_choice",
                    f"Invalid 'tool_choice': function '{choice.function.name}' is not among the tools.",
                )
            )
        elif choice_kind == "mode":
            if choice.mode == response_pb2.TOOL_CHOICE_MODE_UNSPECIFIED:
                add(Violation("tool_choice", "Invalid 'tool_choice': missing mode."))
            if choice.mode == response_pb2.TOOL_CHOICE_MODE_REQUIRED and not request.tools:
                add(Violation("tool_choice", "Invalid 'tool_choice': 'required' needs at least one tool."))
