"""OpenAI JSON <-> contract protos, driven by the descriptors and the contract's JSON options.

Plain proto3 JSON is not OpenAI's JSON: OpenAI flattens unions into objects tagged by "type",
writes enums as lower-case words, reports absent values as ``null``, and accepts strings where
lists are expected. The rules here are generic — a message option names each type tag — so a new
item or event type needs a proto change, not codec code. Each message type's converter is built
once from its descriptor and cached: the codec runs on every streamed event.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar, cast

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, OneofDescriptor
from google.protobuf.message import Message

from venna.responses.v1 import options_pb2

M = TypeVar("M", bound=Message)
Encoder = Callable[[Any], Any]
Decoder = Callable[[Message, Any, str], None]  # (target, JSON value, path of the value)

_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_TYPE = FieldDescriptor
# The deepest nesting of objects and arrays a request may have. Generous for any real request
# (the service sets the tighter limits of each field); it keeps every conversion here, and
# protobuf's own, far from Python's recursion limit.
MAX_JSON_DEPTH = 64
# How much of a client's value (or key) an error message quotes.
_QUOTE_CHARS = 100


class CodecError(ValueError):
    """A JSON request that does not fit the contract; ``param`` is the JSON path at fault."""

    def __init__(self, param: str, message: str, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


# A JSON string where the API also takes a list: what that string stands for.
_STRING_SHORTHANDS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "venna.responses.v1.CreateResponseRequest.input": lambda text: [{"role": "user", "content": text}],
    "venna.responses.v1.CountInputTokensRequest.input": lambda text: [{"role": "user", "content": text}],
    "venna.responses.v1.CompactResponseRequest.input": lambda text: [{"role": "user", "content": text}],
    "venna.responses.v1.CreateConversationRequest.items": lambda text: [{"role": "user", "content": text}],
    "venna.responses.v1.Message.content": lambda text: [{"type": "input_text", "text": text}],
}

# Lists of strings for which one string stands for a list of one, as in OpenAI's ``stop``.
_SINGLE_STRING_LISTS = frozenset({"venna.responses.v1.CreateResponseRequest.stop"})


def json_type(descriptor: Descriptor) -> str | None:
    """The "type" tag a message carries in JSON, if any."""
    tag = descriptor.GetOptions().Extensions[options_pb2.json_type]
    return str(tag) if tag else None


def _real_oneof(descriptor: Descriptor) -> OneofDescriptor | None:
    """The message's union, ignoring the synthetic oneofs of proto3 ``optional`` fields."""
    for oneof in descriptor.oneofs:
        if not (len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name):
            return oneof
    return None


def _omit_unset(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[options_pb2.json_omit_unset]) and field.has_presence


def _enum_names(enum: EnumDescriptor) -> dict[int, str | None]:
    """number -> JSON string; the zero value (UNSPECIFIED) is null."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    names: dict[int, str | None] = {}
    for value in enum.values:
        override = value.GetOptions().Extensions[options_pb2.json_value]
        names[value.number] = (
            None if value.number == 0 else (override or value.name.removeprefix(prefix).lower())
        )
    return names


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _quote(text: str) -> str:
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "…"


def _join(path: str, key: str) -> str:
    key = _quote(key)
    return f"{path}.{key}" if path else key


# A value's place in the document while checking depth: (parent's place, key or index).
_Trail = tuple["_Trail", str | int] | None


def _trail_path(trail: _Trail, root: str) -> str:
    keys: list[str | int] = []
    while trail is not None:
        trail, key = trail
        keys.append(key)
    path = root
    for key in reversed(keys):
        path = f"{path}[{key}]" if isinstance(key, int) else _join(path, key)
    return path


def check_depth(data: Any, path: str = "", limit: int = MAX_JSON_DEPTH) -> None:
    """Refuses JSON nested deeper than ``limit`` objects and arrays, naming where.

    Walks the value with a stack of its own, so no depth of input can exhaust Python's.
    """
    pending: list[tuple[Any, int, _Trail]] = [(data, 1, None)]
    while pending:
        value, depth, trail = pending.pop()
        children: Any
        if isinstance(value, dict):
            children = value.items()
        elif isinstance(value, list):
            children = enumerate(value)
        else:
            continue
        if depth > limit:
            where = _quote(_trail_path(trail, path) or "body")
            raise CodecError(
                where,
                f"Invalid value for '{where}': JSON may be nested at most {limit} levels deep.",
                "invalid_value",
            )
        for key, child in children:
            if isinstance(child, dict | list):
                pending.append((child, depth + 1, (trail, key)))


def _invalid_type(path: str, expected: str, value: object) -> CodecError:
    return CodecError(
        path,
        f"Invalid type for '{path}': expected {expected}, but got {_type_name(value)} instead.",
        "invalid_type",
    )


class Codec:
    """Converts messages of the contract to and from OpenAI's JSON shapes."""

    def __init__(self) -> None:
        self._encoders: dict[str, Encoder] = {}
        self._decoders: dict[str, Decoder] = {}

    # ------------------------------------------------------------------ encoding

    def encode(self, message: Message) -> Any:
        return self._encoder(cast(Descriptor, message.DESCRIPTOR))(message)

    def _encoder(self, descriptor: Descriptor) -> Encoder:
        encoder = self._encoders.get(descriptor.full_name)
        if encoder is None:
            # Register a forwarder first: message types refer to each other recursively.
            self._encoders[descriptor.full_name] = lambda message: built(message)
            built = self._build_encoder(descriptor)
            self._encoders[descriptor.full_name] = encoder = built
        return encoder

    def _build_encoder(self, descriptor: Descriptor) -> Encoder:
        if descriptor.full_name == _STRUCT:
            return lambda message: json_format.MessageToDict(message)
        tag = json_type(descriptor)
        union = _real_oneof(descriptor)
        members = {field.name: self._value_encoder(field) for field in union.fields} if union else {}
        fields = [
            (field.name, self._field_encoder(field))
            for field in descriptor.fields
            if (union is None or field.containing_oneof is not union) and not _omit_unset(field)
        ]
        # Fields written only while set; the rest are written always (null when unset).
        sometimes = [
            (field.name, self._field_encoder(field)) for field in descriptor.fields if _omit_unset(field)
        ]
        union_name = union.name if union else ""

        def encode(message: Message) -> Any:
            result: dict[str, Any] = {"type": tag} if tag else {}
            if union_name:
                chosen = message.WhichOneof(union_name)
                if chosen is None:
                    if not fields:
                        return None
                else:
                    value = members[chosen](getattr(message, chosen))
                    if not isinstance(value, dict):
                        return value  # a bare member, such as tool_choice "auto"
                    result.update(value)
            for name, encode_field in fields:
                result[name] = encode_field(message)
            for name, encode_field in sometimes:
                if message.HasField(name):
                    result[name] = encode_field(message)
            return result

        return encode

    def _field_encoder(self, field: FieldDescriptor) -> Callable[[Message], Any]:
        name = field.name
        encode_value = self._value_encoder(field)
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                encode_item = self._value_encoder(value_field)
                return lambda message: {
                    key: encode_item(item) for key, item in getattr(message, name).items()
                }
            if field.message_type is None and field.enum_type is None:
                return lambda message: list(getattr(message, name))
            return lambda message: [encode_value(item) for item in getattr(message, name)]
        if field.has_presence:
            return lambda message: encode_value(getattr(message, name)) if message.HasField(name) else None
        if field.message_type is None and field.enum_type is None:
            return attrgetter(name)  # a plain scalar is its own JSON value: one call per event field
        return lambda message: encode_value(getattr(message, name))

    def _value_encoder(self, field: FieldDescriptor) -> Encoder:
        if field.message_type is not None:
            return self._encoder(field.message_type)
        if field.enum_type is not None:
            names = _enum_names(field.enum_type)
            return lambda number: names.get(number)
        return lambda value: value

    # ------------------------------------------------------------------ decoding

    def prepare(self, descriptor: Descriptor) -> None:
        """Builds the converters of a message type (and of all it contains) ahead of use."""
        self._decoder(descriptor)
        self._encoder(descriptor)

    def decode(self, data: Any, message_class: type[M], path: str = "") -> M:
        """Builds a request message from JSON; raises CodecError naming the offending field."""
        check_depth(data, path)
        message = message_class()
        self._decoder(cast(Descriptor, message_class.DESCRIPTOR))(message, data, path)
        return message

    def _decoder(self, descriptor: Descriptor) -> Decoder:
        decoder = self._decoders.get(descriptor.full_name)
        if decoder is None:
            self._decoders[descriptor.full_name] = lambda target, data, path: built(target, data, path)
            built = self._build_decoder(descriptor)
            self._decoders[descriptor.full_name] = decoder = built
        return decoder

    def _build_decoder(self, descriptor: Descriptor) -> Decoder:
        if descriptor.full_name == _STRUCT:
            return _decode_struct
        union = _real_oneof(descriptor)
        if union is not None and len(union.fields) == len(descriptor.fields):
            return self._build_union_decoder(union)
        tag = json_type(descriptor)
        fields = {field.name: (field, self._field_decoder(field)) for field in descriptor.fields}

        def decode(target: Message, data: Any, path: str) -> None:
            if not isinstance(data, dict):
                raise _invalid_type(path or "body", "an object", data)
            for key, value in data.items():
                if key == "type" and tag is not None:
                    if value != tag:
                        raise CodecError(
                            _join(path, key),
                            f"Invalid value for '{_join(path, key)}': expected '{tag}'.",
                            "invalid_value",
                        )
                    continue
                known = fields.get(key)
                if known is None:
                    raise CodecError(
                        _join(path, key), f"Unknown parameter: '{_join(path, key)}'.", "unknown_parameter"
                    )
                if value is None:
                    continue  # null means "not given"
                known[1](target, value, _join(path, key))

        return decode

    def _build_union_decoder(self, union: OneofDescriptor) -> Decoder:
        """A union: a bare value for a scalar member, else an object chosen by its "type"."""
        default_tag = union.GetOptions().Extensions[options_pb2.json_default_type] or None
        tagged: dict[str, FieldDescriptor] = {}
        untagged: FieldDescriptor | None = None
        scalar: FieldDescriptor | None = None
        for field in union.fields:
            if field.message_type is None:
                scalar = field
            elif (tag := json_type(field.message_type)) is not None:
                tagged[tag] = field
            else:
                untagged = field
        scalar_decoder = self._field_decoder(scalar) if scalar else None
        member_decoders = {
            field.name: self._decoder(field.message_type) for field in union.fields if field.message_type
        }
        expected = ", ".join(f"'{tag}'" for tag in tagged)

        def decode(target: Message, data: Any, path: str) -> None:
            if scalar is not None and scalar_decoder is not None and not isinstance(data, dict):
                scalar_decoder(target, data, path)
                return
            if not isinstance(data, dict):
                raise _invalid_type(path, "an object", data)
            tag = data.get("type", default_tag)
            member = tagged.get(tag) if isinstance(tag, str) else None
            if member is None:
                member = untagged
            if member is None:
                where = _join(path, "type")
                if tag is None:
                    raise CodecError(
                        where, f"Missing required parameter: '{where}'.", "missing_required_parameter"
                    )
                raise CodecError(
                    where,
                    f"Invalid value: '{_quote(str(tag))}'. Supported values are: {expected}.",
                    "invalid_value",
                )
            chosen = getattr(target, member.name)
            # Chosen even when it carries no field (`{"type": "web_search"}`): the type is the value.
            chosen.SetInParent()
            member_decoders[member.name](chosen, data, path)

        return decode

    def _field_decoder(self, field: FieldDescriptor) -> Decoder:
        name = field.name
        shorthand = _STRING_SHORTHANDS.get(field.full_name)
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                return self._map_decoder(field)
            if field.message_type is not None:
                decode_item = self._decoder(field.message_type)

                def decode_messages(target: Message, data: Any, path: str) -> None:
                    if shorthand is not None and isinstance(data, str):
                        data = shorthand(data)
                    if not isinstance(data, list):
                        raise _invalid_type(path, "an array", data)
                    container = getattr(target, name)
                    for index, item in enumerate(data):
                        decode_item(container.add(), item, f"{path}[{index}]")

                return decode_messages
            convert = _scalar_converter(field)
            single = field.full_name in _SINGLE_STRING_LISTS

            def decode_scalars(target: Message, data: Any, path: str) -> None:
                if single and isinstance(data, str):
                    data = [data]
                if not isinstance(data, list):
                    raise _invalid_type(path, "an array", data)
                getattr(target, name).extend(
                    convert(item, f"{path}[{index}]") for index, item in enumerate(data)
                )

            return decode_scalars
        if field.message_type is not None:
            decode_message = self._decoder(field.message_type)

            def decode_message_field(target: Message, data: Any, path: str) -> None:
                child = getattr(target, name)
                child.SetInParent()
                decode_message(child, data, path)

            return decode_message_field
        convert = _scalar_converter(field)
        return lambda target, data, path: setattr(target, name, convert(data, path))

    def _map_decoder(self, field: FieldDescriptor) -> Decoder:
        name = field.name
        assert field.message_type is not None
        convert_value = _scalar_converter(field.message_type.fields_by_name["value"])

        def decode_map(target: Message, data: Any, path: str) -> None:
            if not isinstance(data, dict):
                raise _invalid_type(path, "an object", data)
            container = getattr(target, name)
            for key, value in data.items():
                _check_unicode(key, path)
                container[key] = convert_value(value, _join(path, key))

        return decode_map


def _check_unicode(text: str, path: str) -> None:
    """JSON may escape lone UTF-16 surrogates ("\\ud800"), which no proto string can hold."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise CodecError(
                path, f"Invalid value for '{path}': not valid Unicode text.", "invalid_value"
            ) from None


def _decode_struct(target: Message, data: Any, path: str) -> None:
    if not isinstance(data, dict):
        raise _invalid_type(path, "an object", data)
    assert isinstance(target, struct_pb2.Struct)
    try:
        target.update(data)
    except (ValueError, TypeError):
        # Struct holds only JSON: the one way to fail here is text that is not valid Unicode.
        raise CodecError(
            path, f"Invalid value for '{path}': not valid Unicode text.", "invalid_value"
        ) from None


_INT_LIMITS = {
    _TYPE.TYPE_INT32: 2**31,
    _TYPE.TYPE_SINT32: 2**31,
    _TYPE.TYPE_INT64: 2**63,
    _TYPE.TYPE_SINT64: 2**63,
}


def _scalar_converter(field: FieldDescriptor) -> Callable[[Any, str], Any]:
    """JSON scalar -> proto scalar, with OpenAI-style errors."""
    kind = field.type
    if kind == _TYPE.TYPE_STRING:

        def to_string(value: Any, path: str) -> str:
            if not isinstance(value, str):
                raise _invalid_type(path, "a string", value)
            _check_unicode(value, path)
            return value

        return to_string
    if kind == _TYPE.TYPE_BOOL:

        def to_bool(value: Any, path: str) -> bool:
            if not isinstance(value, bool):
                raise _invalid_type(path, "a boolean", value)
            return value

        return to_bool
    if kind in (_TYPE.TYPE_DOUBLE, _TYPE.TYPE_FLOAT):

        def to_float(value: Any, path: str) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _invalid_type(path, "a number", value)
            return float(value)

        return to_float
    if kind in _INT_LIMITS:
        limit = _INT_LIMITS[kind]

        def to_int(value: Any, path: str) -> int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _invalid_type(path, "an integer", value)
            if not -limit <= value < limit:
                raise CodecError(path, f"Invalid value for '{path}': integer out of range.", "invalid_value")
            return value

        return to_int
    if field.enum_type is not None:
        numbers = {name: number for number, name in _enum_names(field.enum_type).items() if name}
        supported = ", ".join(f"'{name}'" for name in numbers)

        def to_enum(value: Any, path: str) -> int:
            if not isinstance(value, str):
                raise _invalid_type(path, "a string", value)
            number = numbers.get(value)
            if number is None:
                raise CodecError(
                    path,
                    f"Invalid value: '{_quote(value)}'. Supported values are: {supported}.",
                    "invalid_value",
                )
            return number

        return to_enum
    raise TypeError(f"field {field.full_name} has a type the JSON codec does not map")
