"""What a benchmark run measures and how much work it does, and the shape of its results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
BASELINES = ROOT / "scripts" / "bench_baselines.py"
SECTIONS = (
    "grpc_unary",
    "grpc_stream",
    "http_unary",
    "http_sse",
    "chain",
    "memory",
    "background",
    "postgres",
)
UNARY_TEXT = "hello benchmark world"
STARTUP_TIMEOUT = 60.0
CLIENT_NOTE = (
    "The load generator is Python (asyncio, grpc.aio, httpx) on the same machine as the servers; "
    "against the bare baselines the client is often the bottleneck, so their figures are lower "
    "bounds. The same client drives both sides, so the ratio remains a fair comparison."
)

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Profile:
    """How much work each measurement does."""

    duration: float = 4.0  # seconds measured per closed-loop point and side
    warmup: float = 0.5  # seconds of discarded load before each round of a point
    # Venna and baseline alternate this many times per point, each round doing 1/rounds of the
    # closed-loop duration (streams: all of the work, so stream points do it ``rounds`` times).
    rounds: int = 2
    concurrency: tuple[int, ...] = (1, 16, 64)
    long_words: int = 20_000  # one long stream: ~this many delta events
    many_streams: int = 64
    many_words: int = 2_000  # per stream of the concurrent ones
    chain_depths: tuple[int, ...] = (1, 10, 100, 1_000)
    rebuild_runs: int = 9  # load_context timings per depth (median)
    continue_runs: int = 20  # CreateResponse continuing from each depth
    memory_streams: int = 1_000
    memory_delay_ms: int = 1_000  # between deltas of a held stream
    memory_words: int = 120  # so a held stream stays open ~2 minutes
    memory_samples: int = 8
    background_count: int = 1_500
    background_concurrency: int = 16


QUICK = Profile(
    duration=0.4,
    warmup=0.1,
    rounds=1,
    long_words=1_000,
    many_words=100,
    chain_depths=(1, 10, 100),
    rebuild_runs=3,
    continue_runs=3,
    memory_streams=100,
    memory_samples=3,
    background_count=100,
)


@dataclass(slots=True)
class Row:
    """One line of the table: Venna's figure, the baseline's, and the target if there is one."""

    metric: str
    unit: str
    venna: float
    baseline: float | None = None
    baseline_label: str = "bare"
    target: str = ""
    # Whether the target is met; None when the row has no target.
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.venna / self.baseline


@dataclass(slots=True)
class SectionResult:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
