"""The echo model: a deterministic backend, so that tests of the whole gateway mean something.

It answers with the last user message (or the output of a function call it just made), word by
word, and counts one token per whitespace-separated word. Options in the model name make it slow
or make it fail, for tests of streaming, cancellation and failed responses::

    echo                      answer at once
    echo:delay_ms=50          wait 50 ms before every delta after the first
    echo:fail_after=3         fail once three words have been written

A ``stop`` sequence cuts the text answer where it first occurs, as it would a model's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from venna.backends.base import (
    OPTIONAL_SETTINGS,
    BackendError,
    BackendEvent,
    ErrorKind,
    FunctionCallArgumentsDelta,
    FunctionCallStart,
    GenerationRequest,
    GenerationSettings,
    Incomplete,
    TextDelta,
    UsageReport,
    refuse_unaccepted,
)
from venna.backends.registry import BackendKind, BuildContext
from venna.responses.v1 import response_pb2

MODEL_NAMES = ("echo", "venna-1")
# Sampling settings are accepted and trivially honoured (the answer is deterministic), ``stop``
# cuts the answer; Venice's own parameters mean nothing here.
ACCEPTED_SETTINGS = OPTIONAL_SETTINGS - {"venice_parameters"}

# The largest value each option accepts.
_OPTION_LIMITS = {"delay_ms": 60_000, "fail_after": 1_000_000_000}
# Digits only and short enough for int(): rejects signs, spaces, underscores and huge strings.
_INTEGER = re.compile(r"[0-9]{1,10}")
# Words written between turns of the event loop when there is no delay.
_WORDS_PER_TURN = 32
# Characters per arguments delta: small, so that function call arguments stream observably.
_ARGUMENTS_CHUNK = 16


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a request asks of the echo model, checked by validate() and used by generate()."""

    delay_ms: int
    fail_after: int | None
    # The function to call instead of answering with text.
    function: str | None


class EchoBackend:
    """Serves MODEL_NAMES; holds no state, so one instance serves any number of requests."""

    def validate(self, request: GenerationRequest) -> None:
        refuse_unaccepted(request, ACCEPTED_SETTINGS)
        _plan(request)

    async def count_input_tokens(self, request: GenerationRequest) -> int | None:
        """Exact: the count the usage of a response to the same request reports."""
        return _input_tokens(request)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[BackendEvent, None]:
        plan = _plan(request)
        settings = request.settings
        answer = _answer(request.context)
        if plan.function is None:
            answer = _until_stop(answer, settings.stop)
        words = answer.split()
        cut = settings.max_output_tokens is not None and len(words) > settings.max_output_tokens
        if cut:
            words = words[: settings.max_output_tokens]
            answer = " ".join(words)
        failing = plan.fail_after is not None and plan.fail_after <= len(words)

        if plan.function is not None:
            # A call's words count as written only once its arguments are complete, so a call
            # that would fail is never started.
            if failing:
                raise _failure()
            yield FunctionCallStart(name=plan.function, call_id="call_" + secrets.token_hex(12))
            arguments = json.dumps({"input": answer})
            for start in range(0, len(arguments), _ARGUMENTS_CHUNK):
                if start:
                    await asyncio.sleep(plan.delay_ms / 1000)
                yield FunctionCallArgumentsDelta(arguments[start : start + _ARGUMENTS_CHUNK])
        else:
            if failing:
                words = words[: plan.fail_after]
            for index, word in enumerate(words):
                if index and (plan.delay_ms or index % _WORDS_PER_TURN == 0):
                    # Without a delay, the loop is still given a turn now and then: like a
                    # network upstream whose every read carries several events.
                    await asyncio.sleep(plan.delay_ms / 1000)
                yield TextDelta(" " + word if index else word)
            if failing:
                raise _failure()
            if not words:
                # Still one (empty) message, as a model that says nothing produces.
                yield TextDelta("")

        yield UsageReport(input_tokens=_input_tokens(request), output_tokens=len(words))
        if cut:
            yield Incomplete()


def _plan(request: GenerationRequest) -> _Plan:
    """Parses the model options and the forced function; raises INVALID_REQUEST if they are bad."""
    delay_ms, fail_after = _options(request.model)
    return _Plan(delay_ms, fail_after, _forced_function(request.settings))


@functools.lru_cache(maxsize=256)
def _options(model: str) -> tuple[int, int | None]:
    """The ``:key=value`` options after the base name: (delay_ms, fail_after).

    Remembered per model name (a name that fails to parse raises every time)."""
    options: dict[str, int] = {}
    for suffix in model.split(":")[1:]:
        key, equals, value = suffix.partition("=")
        if not equals or not key:
            raise _invalid_model(f"'{suffix}' in '{model}' is not a key=value option.")
        limit = _OPTION_LIMITS.get(key)
        if limit is None:
            supported = ", ".join(_OPTION_LIMITS)
            raise _invalid_model(f"unknown option '{key}' in '{model}'; supported options: {supported}.")
        if key in options:
            raise _invalid_model(f"option '{key}' is given twice in '{model}'.")
        if not _INTEGER.fullmatch(value) or int(value) > limit:
            raise _invalid_model(f"option '{key}' must be an integer from 0 to {limit}, got '{value}'.")
        options[key] = int(value)
    return options.get("delay_ms", 0), options.get("fail_after")


def _forced_function(settings: GenerationSettings) -> str | None:
    """The function that tool_choice makes the model call, if any."""
    choice = settings.tool_choice
    if choice is None:
        return None
    functions = [tool.function.name for tool in settings.tools if tool.WhichOneof("tool") == "function"]
    kind = choice.WhichOneof("choice")
    if kind == "function":
        if choice.function.name not in functions:
            raise BackendError(
                ErrorKind.INVALID_REQUEST,
                f"Invalid 'tool_choice': function '{choice.function.name}' is not among the tools.",
                code="invalid_value",
                param="tool_choice",
            )
        return choice.function.name
    if kind == "mode" and choice.mode == response_pb2.TOOL_CHOICE_MODE_REQUIRED and functions:
        return functions[0]
    if kind == "allowed_tools" and choice.allowed_tools.mode == response_pb2.TOOL_CHOICE_MODE_REQUIRED:
        # The model must call one of the allowed tools: the first allowed function it was given.
        allowed = {
            tool.function.name for tool in choice.allowed_tools.tools if tool.WhichOneof("tool") == "function"
        }
        callable_ = [name for name in functions if name in allowed]
        if not callable_:
            raise BackendError(
                ErrorKind.INVALID_REQUEST,
                "Invalid 'tool_choice': none of the allowed tools is a function among the tools.",
                code="invalid_value",
                param="tool_choice.tools",
            )
        return callable_[0]
    return None


def _answer(context: Sequence[response_pb2.Item]) -> str:
    """The text to echo: a function result just sent back, else the last user message."""
    if context and context[-1].WhichOneof("item") == "function_call_output":
        return context[-1].function_call_output.output
    for item in reversed(context):
        if item.WhichOneof("item") == "message" and item.message.role == response_pb2.ROLE_USER:
            return "".join(
                part.input_text.text
                for part in item.message.content
                if part.WhichOneof("part") == "input_text"
            )
    return ""


def _until_stop(answer: str, stop: Sequence[str]) -> str:
    """The answer up to (without) the first stop sequence in it, as a model stops there."""
    cut = min((index for sequence in stop if (index := answer.find(sequence)) >= 0), default=len(answer))
    return answer[:cut]


def _input_tokens(request: GenerationRequest) -> int:
    """Words of the whole context and the instructions, so that chaining shows in the usage."""
    words = len(request.instructions.split()) if request.instructions else 0
    for item in request.context:
        kind = item.WhichOneof("item")
        if kind == "message":
            for part in item.message.content:
                part_kind = part.WhichOneof("part")
                if part_kind == "input_text":
                    words += len(part.input_text.text.split())
                elif part_kind == "output_text":
                    words += len(part.output_text.text.split())
                elif part_kind == "refusal":
                    words += len(part.refusal.refusal.split())
        elif kind == "function_call":
            words += len(item.function_call.name.split()) + len(item.function_call.arguments.split())
        elif kind == "function_call_output":
            words += len(item.function_call_output.output.split())
        elif kind == "reasoning":
            words += sum(len(summary.text.split()) for summary in item.reasoning.summary)
    return words


def _invalid_model(problem: str) -> BackendError:
    return BackendError(
        ErrorKind.INVALID_REQUEST, f"Invalid 'model': {problem}", code="invalid_value", param="model"
    )


def _failure() -> BackendError:
    return BackendError(ErrorKind.INTERNAL, "echo model failed on request", code="server_error")


# ---------------------------------------------------------------------------------------------
# The kind: built in as ``echo`` and ``venna-1``; ``kind = "echo"`` in an ``[upstreams.NAME]``
# section serves ``NAME/<anything>`` the same way (options after ``:`` included).


@dataclass(frozen=True, slots=True)
class EchoConfig:
    """An ``[upstreams.NAME]`` section of kind ``echo``: nothing to set."""


_SHARED = EchoBackend()


def build(config: EchoConfig, context: BuildContext) -> EchoBackend:
    return _SHARED  # stateless: one instance serves every name


KIND = BackendKind("echo", EchoConfig, build, "the deterministic local echo model")
