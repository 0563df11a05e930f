#!/usr/bin/env python3
"""Two `venna serve` replicas on one PostgreSQL database; one is killed with SIGKILL under load
again and again, and the other must make up for it without a restart.

Each round runs the crash soak's load (foreground streams over gRPC and SSE, background
responses created over gRPC and HTTP and followed with StreamResponse) against one replica
and SIGKILLs it, every other round the instant a client receives a response.completed. The
other replica, untouched, must then:

* report every response a client saw complete as ``completed`` (GET);
* settle the lost replica's work within its lease: nothing queued or in progress left in the
  database (queued work run, running work failed), measured from the kill;
* give every background response a stream with exactly one terminal event, its last, matching
  its final status (replayed through ResumeResponseStream).

The killed replica is then started again and takes the other's role for the next round.

    python scripts/replica_soak.py [--kills 10] [--seconds-between 3] [--lease-seconds 2] [--seed 1]

Exit status 1 if anything acknowledged was lost, work stayed unsettled past the lease and a
margin, a stream ended wrongly or a restart failed. It starts a throwaway PostgreSQL cluster
from the installed binaries and stops only the processes it starts, by their pid.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # The harnesses live with the tests, in the repository, not in an installed package.
    sys.path.insert(0, str(ROOT))

from tests.postgres_harness import throwaway_cluster  # noqa: E402
from tests.process_harness import (  # noqa: E402
    UNFINISHED,
    LoadShape,
    ServeProcess,
    StartFailed,
    check_health,
    create_key,
    load_and_kill,
    lost_answers,
    resumed_problems,
    start_serve,
)

# Seconds past the lease (and one renewal period) within which the survivor must have settled
# everything: its claim, then the runs of the queued responses it took.
SETTLE_MARGIN = 20.0


@dataclass
class Figures:
    kills: int = 0
    acknowledged: int = 0
    followed_completions: int = 0
    lost: list[str] = field(default_factory=list)
    background_created: int = 0
    resumed_checked: int = 0
    terminal_problems: dict[str, str] = field(default_factory=dict)
    settle_seconds: list[float] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    failed_restarts: list[str] = field(default_factory=list)
    errors: int = 0

    @property
    def bad(self) -> bool:
        return bool(
            self.lost or self.terminal_problems or self.unsettled or self.failed_restarts or self.errors
        )

    def report(self, elapsed: float) -> str:
        settle = sorted(self.settle_seconds)
        lines: list[tuple[str, object]] = [
            ("kills (SIGKILL of one replica)", self.kills),
            ("restarts that failed", len(self.failed_restarts)),
            ("responses acknowledged (foreground response.completed received)", self.acknowledged),
            ("background completions seen by followers", self.followed_completions),
            ("acknowledged-then-lost", len(self.lost)),
            ("background responses created (answered)", self.background_created),
            ("background streams replayed through the survivor", self.resumed_checked),
            ("responses with double or misplaced terminal events", len(self.terminal_problems)),
            ("rounds left unsettled past the lease and margin", len(self.unsettled)),
            (
                "settled by the survivor after a kill, median s",
                f"{settle[len(settle) // 2]:.1f}" if settle else "-",
            ),
            ("settled by the survivor after a kill, max s", f"{settle[-1]:.1f}" if settle else "-"),
            ("errors before a kill", self.errors),
        ]
        width = max(len(label) for label, _ in lines)
        body = "\n".join(f"  {label:<{width}}  {value!s:>8}" for label, value in lines)
        return f"replica soak: {elapsed:.0f} s\n{body}"


def start_replica(url: str, log: Path, lease_seconds: float, figures: Figures) -> ServeProcess:
    try:
        return start_serve(url, log, "--lease-seconds", str(lease_seconds))
    except StartFailed as failure:
        figures.failed_restarts.append(str(failure))
        raise


async def unfinished(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        count = await connection.fetchval(
            "SELECT COUNT(*) FROM responses WHERE status = ANY($1::integer[])", list(UNFINISHED)
        )
    finally:
        await connection.close()
    return int(count)


async def settled(url: str, since: float, limit: float) -> tuple[int, float]:
    """Polls the database until nothing is queued or in progress, or ``limit`` seconds after
    ``since`` have passed: (what is left, seconds since ``since``)."""
    while True:
        left = await unfinished(url)
        took = time.monotonic() - since
        if not left or took >= limit:
            return left, took
        await asyncio.sleep(0.1)


async def soak(options: argparse.Namespace, workdir: Path, url: str) -> Figures:
    keys = [create_key(url, "alpha"), create_key(url, "beta")]
    rng = random.Random(options.seed)
    shape = LoadShape(
        grpc_streams=options.streams,
        sse_streams=options.streams,
        grpc_background=options.background,
        http_background=options.background,
        followed_background=options.background,
    )
    figures = Figures()
    logs = [workdir / "a.log", workdir / "b.log"]
    replicas = [start_replica(url, log, options.lease_seconds, figures) for log in logs]
    limit = options.lease_seconds * 4 / 3 + SETTLE_MARGIN
    try:
        for kill in range(1, options.kills + 1):
            victim, survivor = (kill - 1) % 2, kill % 2
            await check_health(replicas[survivor])
            on_completion = kill % 2 == 1
            kill_after = rng.uniform(0.5, 1.5) * options.seconds_between
            seen = await load_and_kill(
                replicas[victim], keys, shape, kill_after, rng, on_completion=on_completion
            )
            killed = time.monotonic()
            figures.kills += 1
            figures.acknowledged += len(seen.acknowledged)
            figures.followed_completions += len(seen.background_completed)
            figures.background_created += len(seen.background)
            figures.errors += sum(seen.errors.values())

            lost = await lost_answers(replicas[survivor], [*seen.acknowledged, *seen.background_completed])
            figures.lost += lost
            left, took = await settled(url, killed, limit)
            if left:
                figures.unsettled.append(f"kill {kill}: {left} unfinished {took:.0f} s after the kill")
            else:
                figures.settle_seconds.append(took)
            problems = await resumed_problems(replicas[survivor], seen.background)
            figures.resumed_checked += len(seen.background)
            new_problems = {problem.split(":", 1)[0]: problem for problem in problems}
            figures.terminal_problems.update(new_problems)
            when = "on a completion" if on_completion else "at random"
            print(
                f"kill {kill}/{options.kills} of replica {'ab'[victim]} ({when}, {kill_after:.1f} s in): "
                f"{len(seen.acknowledged)} acknowledged, {len(seen.background)} background; "
                f"settled by {'ab'[survivor]} in {took:.1f} s; lost {len(lost)}, stream problems "
                f"{len(new_problems)}" + (f", errors {dict(seen.errors)}" if seen.errors else ""),
                flush=True,
            )
            for line in [*lost, *new_problems.values()][:10]:
                print(f"    {line}", flush=True)
            replicas[victim] = start_replica(url, logs[victim], options.lease_seconds, figures)
    finally:
        for replica in replicas:
            replica.kill()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="how many times a replica is killed")
    parser.add_argument(
        "--seconds-between",
        type=float,
        default=3.0,
        help="mean seconds of load before each kill (0.5x to 1.5x)",
    )
    parser.add_argument("--lease-seconds", type=float, default=2.0, help="the replicas' --lease-seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--streams", type=int, default=8, help="foreground streams of each kind at once")
    parser.add_argument("--background", type=int, default=4, help="background clients of each kind at once")
    options = parser.parse_args()

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="venna-replica-soak-"))
    with throwaway_cluster() as server:
        admin = server.url("postgres")

        async def create_database() -> None:
            connection = await asyncpg.connect(admin)
            try:
                await connection.execute('CREATE DATABASE "venna_soak"')
            finally:
                await connection.close()

        asyncio.run(create_database())
        figures = asyncio.run(soak(options, workdir, server.url("venna_soak")))
    if figures.bad:
        print(f"replica logs kept in {workdir}")
    else:
        shutil.rmtree(workdir)
    print(figures.report(time.monotonic() - began))
    return 1 if figures.bad else 0


if __name__ == "__main__":
    sys.exit(main())
