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
import dataclasses
import time
from collections.abc import AsyncGenerator

import orjson

from venna.backends import base
from venna.backends.token_estimate import estimate_input_tokens
from venna.responses.v1 import response_pb2
from venna.server.ids import new_id

# Marks Venna's own encoding, so that anything else is refused rather than misread.
_PREFIX = "venna.compaction.v1."
SUMMARY_HEADING = "Summary of the conversation so far:"
# context_management's compact_threshold when the request gives none (input tokens).
DEFAULT_COMPACT_THRESHOLD = 100_000
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
    """The context a backend receives. A compaction item replaces everything before it but the
    user messages (it summarizes all of that, earlier compactions included), and reaches the
    backend as a developer message holding its summary (validation made sure it decodes)."""
    last = max((index for index, item in enumerate(context) if item.HasField("compaction")), default=None)
    if last is None:
        return context
    expanded: list[response_pb2.Item] = [
        item
        for item in context[:last]
        if item.HasField("message") and item.message.role == response_pb2.ROLE_USER
    ]
    for item in context[last:]:
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


@dataclasses.dataclass(slots=True)
class Summary:
    text: str
    usage: base.UsageReport


async def summarize(backend: base.Backend, generation: base.GenerationRequest) -> Summary:
    """Runs ``backend`` on ``generation`` (a summarizing request) and keeps its text and usage;
    raises BackendError if it fails or stops short (then nothing may be compacted)."""
    texts: list[str] = []
    usage = base.UsageReport(input_tokens=0, output_tokens=0)
    stream = backend.generate(generation)
    try:
        async for event in stream:
            if isinstance(event, base.TextDelta):
                texts.append(event.text)
            elif isinstance(event, base.UsageReport):
                usage = event
            elif isinstance(event, base.Incomplete):
                raise base.BackendError(
                    base.ErrorKind.UNAVAILABLE,
                    "The model stopped before it finished the summary; nothing was compacted.",
                    code="server_error",
                )
    finally:
        await stream.aclose()
    return Summary("".join(texts), usage)


def _added(first: base.UsageReport, second: base.UsageReport) -> base.UsageReport:
    return base.UsageReport(
        input_tokens=first.input_tokens + second.input_tokens,
        output_tokens=first.output_tokens + second.output_tokens,
        reasoning_tokens=first.reasoning_tokens + second.reasoning_tokens,
        cached_tokens=first.cached_tokens + second.cached_tokens,
    )


class CompactingBackend:
    """Context management (``{"type": "compaction", "compact_threshold": N}`` on a create): a
    backend whose context, once it reaches the threshold in input tokens (the backend's own
    count, or the estimate), is first compacted by the same model. The compaction item comes
    first in the output, the model then answers from the kept user messages and the summary,
    and the response's usage is both passes together."""

    def __init__(self, inner: base.Backend, threshold: int) -> None:
        self.inner = inner
        self.threshold = threshold

    def validate(self, request: base.GenerationRequest) -> None:
        self.inner.validate(request)

    async def _input_tokens(self, request: base.GenerationRequest) -> int:
        if isinstance(self.inner, base.InputTokenCounter):
            counted = await self.inner.count_input_tokens(request)
            if counted is not None:
                return counted
        return estimate_input_tokens(request)

    async def generate(self, request: base.GenerationRequest) -> AsyncGenerator[base.BackendEvent, None]:
        if await self._input_tokens(request) < self.threshold:
            async for event in self.inner.generate(request):
                yield event
            return
        summarizing = summarizing_request(
            request.model, list(request.context), request.instructions, request.settings.prompt_cache_key
        )
        summary = await summarize(self.inner, summarizing)
        compaction = response_pb2.Compaction(id=new_id("cmp"), encrypted_content=encode_summary(summary.text))
        yield base.Compacted(compaction)
        kept = [*kept_messages(list(request.context)), response_pb2.Item(compaction=compaction)]
        compacted = dataclasses.replace(request, context=expand_compactions(kept))
        async for event in self.inner.generate(compacted):
            yield _added(summary.usage, event) if isinstance(event, base.UsageReport) else event


def with_context_management(backend: base.Backend, generation: base.GenerationRequest) -> base.Backend:
    """``backend``, compacting first when the request asks for context management."""
    threshold = generation.settings.compact_threshold
    return backend if threshold is None else CompactingBackend(backend, threshold)
