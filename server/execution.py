"""Runs one backend generation through a ResponseBuilder."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from backends import base
from server.builder import Event, ResponseBuilder


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
        self.backend = backend
        self.generation = generation
        # The failure reported in-band as response.failed, if any.
        self.error: base.BackendError | None = None

    async def batches(self) -> AsyncGenerator[list[Event], None]:
        stream = self.backend.generate(self.generation)
        produced = False
        try:
            async for event in stream:
                produced = True
                if isinstance(event, base.Incomplete):
                    yield self.builder.incomplete(event.reason)
                    return
                batch = self.builder.apply(event)
                if batch:
                    yield batch
            yield self.builder.completed()
        except base.BackendError as error:
            if not produced:
                raise
            self.error = error
            yield self.builder.failed(error.code, error.message)
        finally:
            # Stop the backend now (closing any upstream connection), not when it is collected.
            await stream.aclose()

    async def run(self) -> None:
        """Drives the backend to the end when nobody reads the events (a unary create)."""
        async with aclosing(self.batches()) as batches:
            async for _ in batches:
                pass
