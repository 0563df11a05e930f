"""Compaction: a long conversation summarized by its own model into one compaction item that
later turns use in place of what it replaced (POST /v1/responses/compact).

The summary is made by the model the request names, on every backend alike: it receives the
conversation written out as one transcript, with instructions to summarize it for its own later
use. Echo, which repeats its input, makes the transcript itself the summary: deterministic and
lossless. The item's ``encrypted_content`` carries the summary encoded, not encrypted (the
caller holds the conversation anyway); a backend never sees the item itself, but a developer
message holding the summary in its place (``expand_compactions``).
"""

from __future__ import annotations

import base64
import binascii
import time

import orjson

from venna.backends import base
from venna.responses.v1 import response_pb2
from venna.server.ids import new_id

# Marks Venna's own encoding, so that anything else is refused rather than misread.
_PREFIX = "venna.compaction.v1."
SUMMARY_HEADING = "Summary of the conversation so far:"
COMPACTION_INSTRUCTIONS = (
    "You are compacting a long conversation so that it can continue in a shorter context. "
    "Write a summary of the transcript you are given that keeps everything needed to go on: "
    "the goals and constraints stated, decisions made, facts and results established "
    "(including tool calls and their outputs), and what remains to do. Write only the summary."
)


def encode_summary(summary: str) -> str:
    payload = orjson.dumps({"summary": summary})
    return _PREFIX + base64.urlsafe_b64encode(payload).decode()


def decode_summary(encrypted_content: str) -> str | None:
    """The summary a compaction item of Venna's carries; None if it is not one."""
    if not encrypted_content.startswith(_PREFIX):
        return None
    try:
        data = orjson.loads(base64.urlsafe_b64decode(encrypted_content[len(_PREFIX) :]))
    except (binascii.Error, ValueError):
        return None
    summary = data.get("summary") if isinstance(data, dict) else None
    return summary if isinstance(summary, str) else None


def compaction_item(summary: str) -> response_pb2.Item:
    return response_pb2.Item(
        compaction=response_pb2.Compaction(id=new_id("cmp"), encrypted_content=encode_summary(summary))
    )


def _text_message(role: response_pb2.Role.ValueType, text: str) -> response_pb2.Item:
    return response_pb2.Item(
        message=response_pb2.Message(
            role=role,
            content=[response_pb2.ContentPart(input_text=response_pb2.InputText(text=text))],
            status=response_pb2.ITEM_STATUS_COMPLETED,
        )
    )


def expand_compactions(context: list[response_pb2.Item]) -> list[response_pb2.Item]:
    """The context a backend receives: each compaction item replaced by a developer message
    holding its summary (validation made sure every one decodes)."""
    if not any(item.HasField("compaction") for item in context):
        return context
    expanded: list[response_pb2.Item] = []
    for item in context:
        if item.HasField("compaction"):
            summary = decode_summary(item.compaction.encrypted_content) or ""
            expanded.append(_text_message(response_pb2.ROLE_DEVELOPER, f"{SUMMARY_HEADING}\n\n{summary}"))
        else:
            expanded.append(item)
    return expanded


_ROLE_NAMES = {
    response_pb2.ROLE_USER: "user",
    response_pb2.ROLE_ASSISTANT: "assistant",
    response_pb2.ROLE_SYSTEM: "system",
    response_pb2.ROLE_DEVELOPER: "developer",
}


def _message_text(message: response_pb2.Message) -> str:
    texts: list[str] = []
    for part in message.content:
        kind = part.WhichOneof("part")
        if kind == "input_text":
            texts.append(part.input_text.text)
        elif kind == "output_text":
            texts.append(part.output_text.text)
        elif kind == "refusal":
            texts.append(f"(refused) {part.refusal.refusal}")
        elif kind == "input_image":
            texts.append("(an image)")
        elif kind == "input_file":
            texts.append(f"(a file{': ' + part.input_file.filename if part.input_file.filename else ''})")
    return "\n".join(texts)


def transcript(context: list[response_pb2.Item], instructions: str | None) -> str:
    """The conversation written out for the summarizing model, one entry per item."""
    entries: list[str] = []
    if instructions:
        entries.append(f"[instructions]\n{instructions}")
    for item in expand_compactions(context):
        kind = item.WhichOneof("item")
        if kind == "message":
            role = _ROLE_NAMES.get(item.message.role, "user")
            entries.append(f"[{role}]\n{_message_text(item.message)}")
        elif kind == "function_call":
            call = item.function_call
            entries.append(f"[tool call {call.call_id}] {call.name}({call.arguments})")
        elif kind == "function_call_output":
            output = item.function_call_output
            entries.append(f"[tool result {output.call_id}]\n{output.output}")
        elif kind == "reasoning":
            summary = " ".join(part.text for part in item.reasoning.summary)
            if summary:
                entries.append(f"[reasoning]\n{summary}")
    return "\n\n".join(entries)


def summarizing_request(
    model: str, context: list[response_pb2.Item], instructions: str | None, prompt_cache_key: str | None
) -> base.GenerationRequest:
    """The generation that summarizes ``context``: its transcript as one user message."""
    requested = frozenset({"prompt_cache_key"}) if prompt_cache_key is not None else frozenset()
    return base.GenerationRequest(
        model=model,
        context=[_text_message(response_pb2.ROLE_USER, transcript(context, instructions))],
        settings=base.GenerationSettings(prompt_cache_key=prompt_cache_key, requested=requested),
        instructions=COMPACTION_INSTRUCTIONS,
    )


def kept_messages(context: list[response_pb2.Item]) -> list[response_pb2.Item]:
    """What a compacted conversation keeps as it was: its user messages."""
    return [
        item for item in context if item.HasField("message") and item.message.role == response_pb2.ROLE_USER
    ]


def created_at() -> int:
    return int(time.time())
