"""The Usage service: a workspace's token totals, from the usage records its responses leave."""

from __future__ import annotations

from venna.backends.store import ResponseStore, UsageTotal, sum_usage
from venna.responses.v1 import usage_pb2, usage_pb2_grpc
from venna.server import auth
from venna.server.validation import Violation, raise_if_any


class UsageService(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, store: ResponseStore) -> None:
        self._store = store

    async def GetUsage(
        self, request: usage_pb2.GetUsageRequest, context: auth.Context
    ) -> usage_pb2.GetUsageResponse:
        return await usage_report(
            self._store,
            auth.workspace_id(),
            request.start_time if request.HasField("start_time") else None,
            request.end_time if request.HasField("end_time") else None,
            group_by_model=request.group_by_model,
        )


async def usage_report(
    store: ResponseStore, workspace_id: str, start: int | None, end: int | None, *, group_by_model: bool
) -> usage_pb2.GetUsageResponse:
    """The workspace's totals over [start, end); raises for a range that makes no sense."""
    violations: list[Violation] = []
    for field, value in (("start_time", start), ("end_time", end)):
        if value is not None and value < 0:
            violations.append(Violation(field, f"Invalid '{field}': expected unix seconds, got {value}."))
    if start is not None and end is not None and start > end:
        violations.append(Violation("end_time", f"Invalid 'end_time': {end} is before 'start_time' {start}."))
    raise_if_any(violations)
    totals = await store.usage_totals(
        workspace_id,
        since=start,
        until=end,
        group_by_model=group_by_model,
    )
    return usage_pb2.GetUsageResponse(
        object="usage",
        start_time=start,
        end_time=end,
        buckets=[_bucket(total) for total in totals],
        total=_bucket(sum_usage(totals)),
    )


def _bucket(total: UsageTotal) -> usage_pb2.UsageBucket:
    return usage_pb2.UsageBucket(
        model=total.model,
        responses=total.responses,
        input_tokens=total.input_tokens,
        output_tokens=total.output_tokens,
        reasoning_tokens=total.reasoning_tokens,
        cached_tokens=total.cached_tokens,
        total_tokens=total.total_tokens,
    )
