"""Checks of a CreateResponseRequest, with the limits of the Responses API.

All violations are collected, so a client fixes its request in one round trip; the first one
names the error's ``param``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from venna.responses.v1 import options_pb2, response_pb2, service_pb2
from venna.server.compaction import decode_summary
from venna.server.errors import ServiceError, quoted

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MIN_MAX_OUTPUT_TOKENS = 16
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256

# How deep a JSON value (a google.protobuf.Struct: tool parameters, a response format's schema)
# may nest, counting the outermost object as 1. protobuf refuses to parse messages nested more
# than 100 levels, and each JSON object level costs 3 of them (Struct, its map entry, Value):
# the deepest schema a stream event can still carry is 31 levels, so anything accepted here is
# readable again wherever it is stored or sent. OpenAI allows 10 levels of schema nesting, about
# 21 JSON levels. Not configurable: a higher value would let in requests that cannot be read back.
MAX_JSON_DEPTH = 28


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of a create request, checked before any other work is done for it."""

    # Items in one request's input: each costs parsing, validation and a stored row, and a
    # request's work runs on the event loop every other call shares.
    max_input_items: int = 10_000
    max_model_chars: int = 256

    def __post_init__(self) -> None:
        if self.max_input_items < 1 or self.max_model_chars < 1:
            raise ValueError("request limits must be at least 1")


def check_limits(request: service_pb2.CreateResponseRequest, limits: Limits) -> None:
    """Refuses a create request over a size limit, before anything walks its contents."""
    if len(request.input) > limits.max_input_items:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Invalid 'input': at most {limits.max_input_items} items are allowed in one request,"
            f" got {len(request.input)}.",
            reason="TOO_MANY_INPUT_ITEMS",
            param="input",
        )
    if len(request.model) > limits.max_model_chars:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Invalid 'model': at most {limits.max_model_chars} characters are allowed,"
            f" got {len(request.model)}.",
            reason="INVALID_VALUE",
            param="model",
        )


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
                    "include",
                    f"Invalid value '{quoted(value)}': expected one of {', '.join(sorted(INCLUDABLE))}.",
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


# The smallest compact_threshold of context_management (OpenAI's bound).
MIN_COMPACT_THRESHOLD = 1000


def conversation_id(request: service_pb2.CreateResponseRequest) -> str:
    """The conversation a create names, by its id or as ``{"id": …}``."""
    choice = request.conversation
    return choice.id if choice.WhichOneof("conversation") == "id" else choice.ref.id


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
    for index, entry in enumerate(request.context_management):
        where = f"context_management[{index}]"
        if entry.type != "compaction":
            add(Violation(f"{where}.type", f"Invalid '{where}.type': expected 'compaction'."))
        if entry.HasField("compact_threshold") and entry.compact_threshold < MIN_COMPACT_THRESHOLD:
            add(
                Violation(
                    f"{where}.compact_threshold",
                    f"Invalid '{where}.compact_threshold': expected at least {MIN_COMPACT_THRESHOLD}.",
                )
            )
    if len(request.context_management) > 1:
        add(Violation("context_management", "Invalid 'context_management': at most one entry."))
    for penalty in ("presence_penalty", "frequency_penalty"):
        if request.HasField(penalty) and not -2.0 <= getattr(request, penalty) <= 2.0:
            add(Violation(penalty, f"Invalid '{penalty}': expected a number from -2 to 2."))
    if request.HasField("max_tool_calls") and request.max_tool_calls < 1:
        add(Violation("max_tool_calls", "Invalid 'max_tool_calls': expected at least 1."))
    if request.HasField("safety_identifier") and len(request.safety_identifier) > 64:
        add(Violation("safety_identifier", "Invalid 'safety_identifier': at most 64 characters."))
    if request.stop:
        _check_stop(request, add)
    if request.HasField("venice_parameters"):
        _check_venice(request.venice_parameters, add)
    # Enum values this build does not know (proto3 enums are open): backends receive these
    # settings by name, so an unknown number is the caller's mistake.
    if request.HasField("reasoning"):
        _check_enum_values("reasoning", request.reasoning, add)
    if request.HasField("venice_parameters"):
        _check_enum_values("venice_parameters", request.venice_parameters, add)
    if request.HasField("conversation"):
        if not conversation_id(request):
            add(Violation("conversation", "Invalid 'conversation': expected a conversation id."))
        if request.HasField("previous_response_id"):
            add(
                Violation(
                    "conversation",
                    "'conversation' and 'previous_response_id' cannot be used together: a response"
                    " continues one or the other.",
                )
            )
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
    for path in too_deep_json(request):
        add(Violation(path, f"Invalid '{path}': nested deeper than {MAX_JSON_DEPTH} levels."))
    raise_if_any(violations)


_Add = Callable[[Violation], None]

# At most this many items go into a conversation per call, as OpenAI allows.
MAX_CONVERSATION_ITEMS = 20


def validate_conversation_items(
    items: Sequence[response_pb2.Item], metadata: Mapping[str, str] | None = None
) -> None:
    """Raises INVALID_ARGUMENT for items (and metadata) a conversation cannot take."""
    violations: list[Violation] = []
    add = violations.append
    if metadata is not None:
        check_metadata(metadata, add)
    if len(items) > MAX_CONVERSATION_ITEMS:
        add(Violation("items", f"Invalid 'items': at most {MAX_CONVERSATION_ITEMS} items, got {len(items)}."))
    _check_items(items, add, "items")
    raise_if_any(violations)


def _check_metadata(request: service_pb2.CreateResponseRequest, add: _Add) -> None:
    check_metadata(request.metadata, add)


def check_metadata(metadata: Mapping[str, str], add: _Add) -> None:
    """Metadata within OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512."""
    if len(metadata) > MAX_METADATA_PAIRS:
        add(
            Violation(
                "metadata",
                f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs are allowed, got {len(metadata)}.",
            )
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            add(
                Violation(
                    "metadata",
                    f"Invalid 'metadata': key '{quoted(key, 20)}' is longer than {MAX_METADATA_KEY}"
                    " characters.",
                )
            )
        if len(value) > MAX_METADATA_VALUE:
            add(
                Violation(
                    "metadata",
                    f"Invalid 'metadata': the value of '{quoted(key)}' is longer than {MAX_METADATA_VALUE}"
                    " characters.",
                )
            )


def _check_enum_values(path: str, message: Message, add: _Add) -> None:
    for field, value in message.ListFields():
        if field.enum_type is not None and value not in field.enum_type.values_by_number:
            add(Violation(f"{path}.{field.name}", f"Invalid '{path}.{field.name}': unknown value {value}."))


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
    _check_items(request.input, add, "input")


def _check_items(items: Sequence[response_pb2.Item], add: _Add, field: str) -> None:
    for index, item in enumerate(items):
        kind = item.WhichOneof("item")
        if kind == "message":
            message = item.message
            if message.role == response_pb2.ROLE_UNSPECIFIED:
                add(Violation(f"{field}[{index}].role", f"Missing '{field}[{index}].role'.", MISSING))
            for part_index, part in enumerate(message.content):
                part_kind = part.WhichOneof("part")
                if part_kind is None:
                    where = f"{field}[{index}].content[{part_index}]"
                    add(Violation(where, f"Invalid '{where}': the content part has no type."))
                elif part_kind == "input_image" and not (
                    part.input_image.HasField("image_url") or part.input_image.HasField("file_id")
                ):
                    add(
                        Violation(
                            f"{field}[{index}].content[{part_index}]",
                            "An input_image needs 'image_url' or 'file_id'.",
                        )
                    )
        elif kind is None:
            add(Violation(f"{field}[{index}]", f"Invalid '{field}[{index}]': the item has no type."))
        elif kind == "function_call":
            call = item.function_call
            if not call.call_id:
                add(Violation(f"{field}[{index}].call_id", f"Missing '{field}[{index}].call_id'.", MISSING))
            if not call.name:
                add(Violation(f"{field}[{index}].name", f"Missing '{field}[{index}].name'.", MISSING))
        elif kind == "function_call_output":
            if not item.function_call_output.call_id:
                add(Violation(f"{field}[{index}].call_id", f"Missing '{field}[{index}].call_id'.", MISSING))
        elif kind == "item_reference" and not item.item_reference.id:
            add(Violation(f"{field}[{index}].id", f"Missing '{field}[{index}].id'.", MISSING))
        elif kind == "compaction" and decode_summary(item.compaction.encrypted_content) is None:
            where = f"{field}[{index}].encrypted_content"
            add(
                Violation(
                    where,
                    f"Invalid '{where}': not a compaction item made by this gateway "
                    "(POST /v1/responses/compact); pass its encrypted_content back unchanged.",
                )
            )


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
                        f"Invalid 'tools[{index}].name': '{quoted(name)}' does not match"
                        " '^[a-zA-Z0-9_-]{1,64}$'.",
                    )
                )
            if name in function_names:
                add(
                    Violation(
                        f"tools[{index}].name",
                        f"Invalid 'tools[{index}].name': duplicate function name '{quoted(name)}'.",
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
                    f"Invalid 'tool_choice': function '{quoted(choice.function.name)}' is not among"
                    " the tools.",
                )
            )
        elif choice_kind == "mode":
            if choice.mode == response_pb2.TOOL_CHOICE_MODE_UNSPECIFIED:
                add(Violation("tool_choice", "Invalid 'tool_choice': missing mode."))
            if choice.mode == response_pb2.TOOL_CHOICE_MODE_REQUIRED and not request.tools:
                add(Violation("tool_choice", "Invalid 'tool_choice': 'required' needs at least one tool."))


# ------------------------------------------------------------------------------ JSON nesting

_JSON_TYPES = frozenset(
    descriptor.full_name
    for descriptor in (
        struct_pb2.Struct.DESCRIPTOR,
        struct_pb2.Value.DESCRIPTOR,
        struct_pb2.ListValue.DESCRIPTOR,
    )
)


def too_deep_json(message: Message) -> list[str]:
    """The JSON paths of the JSON values (Struct, Value, ListValue) in ``message`` nested deeper
    than ``MAX_JSON_DEPTH``. The fields that can hold one are found from the descriptors, so a
    new field is covered; fields that cannot (the input items, today) are never walked."""
    return [path for path, value in _json_values(message, "") if _deeper_than(value, MAX_JSON_DEPTH)]


def _json_values(message: Message, prefix: str) -> Iterator[tuple[str, Message]]:
    for field in _fields_with_json(message.DESCRIPTOR):
        path = _join(prefix, field)
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                entries = getattr(message, field.name)
                values = [(f"{path}.{key}", entries[key]) for key in entries]
            else:
                values = [
                    (f"{path}[{index}]", value) for index, value in enumerate(getattr(message, field.name))
                ]
        elif message.HasField(field.name):
            values = [(path, getattr(message, field.name))]
        else:
            continue
        for where, value in values:
            if value.DESCRIPTOR.full_name in _JSON_TYPES:
                yield where, value
            else:
                yield from _json_values(value, where)


def _join(prefix: str, field: FieldDescriptor) -> str:
    """The JSON path of ``field``: a member of a union tagged by "type" is flattened into its
    parent in JSON (``tools[0].parameters``, not ``tools[0].function.parameters``)."""
    union = field.containing_oneof
    flattened = (
        union is not None
        and union.name != f"_{field.name}"  # not the synthetic union of an ``optional`` field
        and field.message_type is not None
        and bool(field.message_type.GetOptions().Extensions[options_pb2.json_type])
    )
    if flattened:
        return prefix
    return f"{prefix}.{field.name}" if prefix else field.name


@functools.cache
def _fields_with_json(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The message fields of ``descriptor`` whose values are, or can contain, a JSON value."""
    return tuple(
        field
        for field in descriptor.fields
        if field.message_type is not None and _holds_json(field.message_type, frozenset())
    )


def _holds_json(descriptor: Descriptor, visiting: frozenset[str]) -> bool:
    if descriptor.full_name in _JSON_TYPES:
        return True
    if descriptor.full_name in visiting:
        return False  # a cycle without JSON values in it
    inner = visiting | {descriptor.full_name}
    return any(
        field.message_type is not None and _holds_json(field.message_type, inner)
        for field in descriptor.fields
    )


def _deeper_than(root: Message, limit: int) -> bool:
    """Whether a Struct, ListValue or Value nests objects and lists more than ``limit`` levels.

    Iterative, and it stops at the first value too deep: a message built in process (not parsed
    from the wire) can be nested arbitrarily deep."""
    pending: list[tuple[Message, int]] = []
    if isinstance(root, struct_pb2.Value):
        _push_container(root, 0, pending)
    else:
        pending.append((root, 1))
    while pending:
        node, depth = pending.pop()
        if depth > limit:
            return True
        children = node.fields.values() if isinstance(node, struct_pb2.Struct) else node.values  # type: ignore[attr-defined]
        for child in children:
            _push_container(child, depth, pending)
    return False


def _push_container(value: struct_pb2.Value, depth: int, pending: list[tuple[Message, int]]) -> None:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        pending.append((value.struct_value, depth + 1))
    elif kind == "list_value":
        pending.append((value.list_value, depth + 1))
