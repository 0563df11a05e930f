"""The model backend interface: a normalized request in, a stream of small typed events out.

Backends describe *what* the model produced (text, a function call, reasoning, a web search,
usage) and nothing about the wire: the service turns these events into the canonical Responses
stream (item ids, ``output_index``, content parts, sequence numbers, lifecycle snapshots), so
every backend gets the same ordering guarantees for free and cannot get them wrong.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from venna.responses.v1 import response_pb2


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """How to generate, as the caller asked; None (or empty) where the caller set nothing.

    ``requested`` names the optional settings (OPTIONAL_SETTINGS) the caller set, so that a
    backend refuses what it cannot honour instead of ignoring it silently.
    """

    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prompt_cache_key: str | None = None
    # "minimal", "low", "medium", "high" / "auto", "concise", "detailed"
    reasoning_effort: str | None = None
    reasoning_summary: str | None = None
    tools: tuple[response_pb2.Tool, ...] = ()
    tool_choice: response_pb2.ToolChoice | None = None
    # The output format ("text", "json_schema", "json_object"), with its schema where it has one.
    text_format: response_pb2.TextFormat | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Context management: the input tokens at which the context is compacted before generating
    # (Venna does it, whatever the backend; see venna.server.compaction).
    compact_threshold: int | None = None
    # Settings of one vendor's API, passed on by the backends that speak it (``venice_parameters``).
    vendor: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    requested: frozenset[str] = frozenset()

    @property
    def text_format_kind(self) -> str | None:
        return self.text_format.WhichOneof("format") if self.text_format is not None else None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Everything a backend needs for one response, independent of the wire.

    ``context`` is the full conversation the model must see: the rebuilt history of
    ``previous_response_id`` followed by the new input, with item references resolved.
    ``instructions`` belong to this response only.
    """

    model: str
    context: Sequence[response_pb2.Item]
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    instructions: str | None = None


# ---------------------------------------------------------------------------------------------
# Events a backend yields. Consecutive events of the same kind extend the current output item;
# an event of another kind (or EndItem) closes it and opens the next one.


@dataclass(frozen=True, slots=True)
class TextDelta:
    """More assistant message text."""

    text: str


@dataclass(frozen=True, slots=True)
class TextAnnotation:
    """An annotation (e.g. a url_citation) on the message text written so far."""

    annotation: response_pb2.Annotation


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """More refusal text, in the current assistant message."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningSummaryDelta:
    """More text of reasoning summary part ``part`` (0, 1, …) of the current reasoning item."""

    text: str
    part: int = 0


@dataclass(frozen=True, slots=True)
class ReasoningTextDelta:
    """More raw reasoning text of the current reasoning item."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningEncryptedContent:
    """Opaque reasoning state of the current reasoning item, to be sent back verbatim."""

    content: str


@dataclass(frozen=True, slots=True)
class FunctionCallStart:
    """The model starts a call of function ``name``; arguments follow as deltas."""

    name: str
    call_id: str


@dataclass(frozen=True, slots=True)
class FunctionCallArgumentsDelta:
    """More JSON text of the current function call's arguments."""

    text: str


class WebSearchPhase(enum.Enum):
    IN_PROGRESS = "in_progress"
    SEARCHING = "searching"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class WebSearchProgress:
    """A built-in web search call moved to ``phase``; IN_PROGRESS opens a new call."""

    phase: WebSearchPhase
    action: response_pb2.WebSearchAction | None = None


@dataclass(frozen=True, slots=True)
class EndItem:
    """Closes the current output item, so that the next event of the same kind opens a new one."""


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Token counts of the whole response; the last report wins."""

    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Incomplete:
    """Generation stopped early; nothing may follow."""

    reason: response_pb2.IncompleteReason.ValueType = response_pb2.INCOMPLETE_REASON_MAX_OUTPUT_TOKENS


@dataclass(frozen=True, slots=True)
class Compacted:
    """The context was compacted before generating (context management): the finished
    compaction item, which comes first in the output."""

    compaction: response_pb2.Compaction


BackendEvent = (
    TextDelta
    | TextAnnotation
    | RefusalDelta
    | ReasoningSummaryDelta
    | ReasoningTextDelta
    | ReasoningEncryptedContent
    | FunctionCallStart
    | FunctionCallArgumentsDelta
    | WebSearchProgress
    | EndItem
    | UsageReport
    | Incomplete
    | Compacted
)


class ErrorKind(enum.Enum):
    """What went wrong, independent of gRPC or HTTP; the service maps it to a status."""

    INVALID_REQUEST = "invalid_request"  # the caller's mistake: never retried
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    UNAVAILABLE = "unavailable"  # the model could not be reached or is overloaded
    TIMEOUT = "timeout"
    INTERNAL = "internal"  # the model or the backend failed


@dataclass(eq=False, slots=True)
class BackendError(Exception):
    """A failure the backend understands well enough to describe to the caller."""

    kind: ErrorKind
    message: str
    # OpenAI's error code for the response's `error.code` (e.g. "server_error").
    code: str = "server_error"
    # The request field at fault, for INVALID_REQUEST.
    param: str | None = None
    # Seconds the caller should wait before retrying, when known.
    retry_after: float | None = None
    details: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


class Backend(Protocol):
    """A model backend. Implementations must be safe to call concurrently."""

    def validate(self, request: GenerationRequest) -> None:
        """Reject a request this backend cannot serve before anything is stored.

        Raises BackendError(INVALID_REQUEST) naming the offending ``param``.
        """
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[BackendEvent, None]:
        """Run the model. Cancelling the iteration must stop the work promptly."""
        ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model a backend serves, as ``GET /v1/models`` lists it."""

    # The name a request uses, the backend's prefix included ("venice/qwen3").
    id: str
    owned_by: str
    # Unix seconds, when the upstream says.
    created: int | None = None


@runtime_checkable
class ModelCatalog(Protocol):
    """A backend that can list the models it serves under its prefix (an upstream's
    ``GET /models``); a backend without a catalog serves the name it is routed under."""

    async def list_models(self) -> list[ModelInfo]:
        """The models, from a cache where fetching is costly; [] when they cannot be told."""
        ...


@runtime_checkable
class InputTokenCounter(Protocol):
    """A backend that can count the input tokens of a request without generating (a local
    tokenizer, an upstream's own counting endpoint); without one, Venna estimates."""

    async def count_input_tokens(self, request: GenerationRequest) -> int | None:
        """The model's count of the request's input; None when it cannot be told this time
        (then the count is estimated). Raises BackendError for a request the model refuses."""
        ...


# ---------------------------------------------------------------------------------------------
# Generation settings a backend may or may not honour. A request that sets one its backend does
# not accept is refused, never silently ignored: a caller relying on ``seed`` must learn that the
# model cannot give it. Settings Venna honours itself (store, background, metadata, instructions,
# previous_response_id, include, user, ...) are not among them.

OPTIONAL_SETTINGS = frozenset(
    {
        "temperature",
        "top_p",
        "max_output_tokens",
        "stop",
        "seed",
        "prompt_cache_key",
        "reasoning",
        "tools",
        "tool_choice",
        "top_logprobs",
        "max_tool_calls",
        "presence_penalty",
        "frequency_penalty",
        "venice_parameters",
    }
)


def refuse_unaccepted(request: GenerationRequest, accepted: frozenset[str]) -> None:
    """Raises INVALID_REQUEST (``unsupported_parameter``) for the first setting (by name) not
    accepted."""
    refused = request.settings.requested - accepted
    if refused:
        name = min(refused)
        raise BackendError(
            ErrorKind.INVALID_REQUEST,
            f"Unsupported parameter: '{name}' is not supported with the model '{request.model}'.",
            code="unsupported_parameter",
            param=name,
        )


class UpstreamObserver(Protocol):
    """Told of each request a backend makes to its upstream, for metrics per upstream."""

    def upstream_request(self, upstream: str, outcome: str, seconds: float) -> None:
        """One attempt ended: ``outcome`` is "ok", "http_<status>", "connect_error", "timeout"
        or "error"; ``seconds`` until the upstream's answer began (or the failure)."""
        ...

    def upstream_retry(self, upstream: str, reason: str) -> None:
        """A failed attempt is being tried again (``reason``: the failed attempt's outcome)."""
        ...


class _Unobserved:
    def upstream_request(self, upstream: str, outcome: str, seconds: float) -> None:
        pass

    def upstream_retry(self, upstream: str, reason: str) -> None:
        pass


UNOBSERVED: UpstreamObserver = _Unobserved()
