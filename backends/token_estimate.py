"""An estimate of a request's input tokens, for models whose backend cannot count them.

The rule, documented in the README: about four characters of text per token (OpenAI's rule of
thumb for English), rounded up per text; three tokens more per input item (its role and
framing, as chat formats spend) and three for the request; a function call's name and arguments
and a tool's JSON definition count as text; an image counts 85 tokens (OpenAI's figure for a
low-detail image) and a file 0, since its size is unknown here.
"""

from __future__ import annotations

import json
import math

from google.protobuf import json_format

from venna.backends.base import GenerationRequest
from venna.responses.v1 import response_pb2

CHARACTERS_PER_TOKEN = 4
TOKENS_PER_ITEM = 3
TOKENS_PER_REQUEST = 3
TOKENS_PER_IMAGE = 85


def _text(text: str) -> int:
    return math.ceil(len(text) / CHARACTERS_PER_TOKEN)


def _part(part: response_pb2.ContentPart) -> int:
    kind = part.WhichOneof("part")
    if kind == "input_text":
        return _text(part.input_text.text)
    if kind == "output_text":
        return _text(part.output_text.text)
    if kind == "refusal":
        return _text(part.refusal.refusal)
    if kind == "input_image":
        return TOKENS_PER_IMAGE
    return 0


def _item(item: response_pb2.Item) -> int:
    kind = item.WhichOneof("item")
    if kind == "message":
        return sum(_part(part) for part in item.message.content)
    if kind == "function_call":
        return _text(item.function_call.name) + _text(item.function_call.arguments)
    if kind == "function_call_output":
        return _text(item.function_call_output.output)
    if kind == "reasoning":
        return sum(_text(summary.text) for summary in item.reasoning.summary)
    return 0


def estimate_input_tokens(request: GenerationRequest) -> int:
    """The estimated input tokens of ``request``: its context, instructions and tools."""
    tokens = TOKENS_PER_REQUEST
    if request.instructions:
        tokens += TOKENS_PER_ITEM + _text(request.instructions)
    for item in request.context:
        tokens += TOKENS_PER_ITEM + _item(item)
    for tool in request.settings.tools:
        tokens += _text(json.dumps(json_format.MessageToDict(tool), separators=(",", ":")))
    return tokens
