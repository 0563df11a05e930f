"""Runs one backend generation through a ResponseBuilder."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from venna.backends import base
from venna.server.builder import Event, ResponseBuilder
from venna.server.compaction import with_context_management


class Execution:
    """Drives ``backend`` for one response, yielding batches of stream events.

    The last batch holds the terminal event (completed, incomplete or failed). A backend that
    fails before producing anything raises its BackendError instead, so that the caller can
    answer with an error status rather than a stream that starts and fails at once.
    """

    def __init__(
        self, builder: ResponseBuilder, backend: base.Backend, generation: base.GenerationRequest
    ) -> None:
        self.builder = builder
        self.backend = with_context_management(backend, generation)
        self.generation = generation
        # The failure reported in-band as response.failed, if any.
        self.error: base.BackendError | None = None

    async def batches(self) -> AsyncGenerator[list[Event], None]:
        stream = self.backend.generate(self.generation)
        produced = exhausted = False
        try:
            async for event in stream:
                produced = True
                batch, ended = self._fold(event)
                if batch:
                    yield batch
                if ended:
                    return
            exhausted = True
            yield self.builder.completed()
        except base.BackendError as error:
            yield self._failure(error, produced)
        finally:
            if not exhausted:
                # Stop the backend now (closing any upstream connection), not when it is collected.
                await stream.aclose()

    async def run(self) -> None:
        """Drives the backend to the end when nobody reads the events (a unary create): the
        same folding as ``batches`` without a generator between the backend and the builder."""
        stream = self.backend.generate(self.generation)
        produced = exhausted = False
        try:
            async for event in stream:
                produced = True
                if self._fold(event)[1]:
                    return
            exhausted = True
            self.builder.completed()
        except base.BackendError as error:
            self._failure(error, produced)
        finally:
            if not exhausted:
                await stream.aclose()

    def _fold(self, event: base.BackendEvent) -> tuple[list[Event], bool]:
        """The stream events one backend event causes, and whether it ended the response."""
        if isinstance(event, base.Incomplete):
            return self.builder.incomplete(event.reason), True
        return self.builder.apply(event), False

    def _failure(self, error: base.BackendError, produced: bool) -> list[Event]:
        """A failure after the backend produced something is reported in-band (response.failed);
        before, it is raised, so that the caller answers with an error status instead."""
        if not produced:
            raise error
        self.error = error
        return self.builder.failed(error.code, error.message)
