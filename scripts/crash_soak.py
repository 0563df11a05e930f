#!/usr/bin/env python3
"""Kills `venna serve` with SIGKILL again and again under load, and counts what did not survive.

Each round runs, against one real server process on one SQLite file: foreground streams over
gRPC (StreamResponse) and over SSE (POST /v1/responses, stream: true), background responses
created over gRPC and HTTP, and background responses followed with StreamResponse. After a
while the server is killed: every other round the instant a client receives a
response.completed (the moment a save that trails the answer would be lost), otherwise at a
moment chosen by chance alone. Before it is restarted on the same file, rows that cannot be
decoded are written into it. Then:

* every response a client saw complete must be stored ``completed`` (GET);
* the restart must print its start-up line and answer health on both transports;
* once recovery has settled everything, every background response in the file must have
  exactly one terminal event, its last, matching its final status (checked in the file, and
  through ResumeResponseStream for a sample).

    python scripts/crash_soak.py [--kills 20] [--seconds-between 3] [--seed 1] [--keep]

Exit status 1 if anything acknowledged was lost, a stream ended wrongly or a restart failed.
The script stops only the processes it starts, by their pid.
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # The harness lives with the tests, in the repository, not in an installed package.
    sys.path.insert(0, str(ROOT))

from tests.process_harness import (  # noqa: E402
    LoadShape,
    ServeProcess,
    StartFailed,
    background_problems,
    check_health,
    create_key,
    load_and_kill,
    lost_answers,
    resumed_problems,
    start_serve,
    wait_settled,
    write_poison_rows,
)

# Attempts at restarting before the soak gives up (each failure is counted).
RESTART_ATTEMPTS = 3


@dataclass
class Figures:
    kills: int = 0
    acknowledged: int = 0
    followed_completions: int = 0
    lost: list[str] = field(default_factory=list)
    background_created: int = 0
    background_checked: int = 0
    resumed_checked: int = 0
    # Background responses whose stream ended wrongly: id → what is wrong.
    terminal_problems: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    failed_restarts: list[str] = field(default_factory=list)
    poison_rows: int = 0
    busy: int = 0
    errors: int = 0

    @property
    def bad(self) -> bool:
        return bool(self.lost or self.terminal_problems or self.failed_restarts or self.errors)

    def report(self, elapsed: float) -> str:
        lines = [
            ("kills (SIGKILL)", self.kills),
            ("restarts", self.restarts),
            ("restarts that failed", len(self.failed_restarts)),
            ("responses acknowledged (foreground response.completed received)", self.acknowledged),
            ("background completions seen by followers", self.followed_completions),
            ("acknowledged-then-lost", len(self.lost)),
            ("background responses created (answered)", self.background_created),
            ("background responses checked in the file (at the end)", self.background_checked),
            ("background streams replayed through the API", self.resumed_checked),
            ("responses with double or misplaced terminal events", len(self.terminal_problems)),
            ("undecodable rows written before restarts", self.poison_rows),
            ("calls refused by a limit before a kill (429 / RESOURCE_EXHAUSTED)", self.busy),
            ("other errors before a kill", self.errors),
        ]
        width = max(len(label) for label, _ in lines)
        body = "\n".join(f"  {label:<{width}}  {value:>8}" for label, value in lines)
        return f"crash soak: {elapsed:.0f} s\n{body}"


async def restart(db: Path, log: Path, figures: Figures) -> ServeProcess | None:
    """A restart that must succeed; failures are counted and retried a few times. None: the
    server would not start at all."""
    for attempt in range(1, RESTART_ATTEMPTS + 1):
        began = time.monotonic()
        try:
            server = start_serve(db, log)
        except StartFailed as failure:
            figures.failed_restarts.append(str(failure))
            summary = str(failure).splitlines()
            print(f"  restart attempt {attempt} failed: {summary[0]} … {summary[-1]}", flush=True)
            continue
        try:
            await check_health(server)
        except Exception as failure:
            server.kill()
            figures.failed_restarts.append(f"unhealthy: {failure!r}")
            print(f"  restart attempt {attempt} unhealthy: {failure!r}", flush=True)
            continue
        figures.restarts += 1
        print(f"  restarted in {time.monotonic() - began:.1f} s", flush=True)
        return server
    print(f"venna serve did not restart in {RESTART_ATTEMPTS} attempts; its log: {log}", flush=True)
    return None


async def soak(options: argparse.Namespace, workdir: Path) -> Figures:
    db, log = workdir / "venna.db", workdir / "serve.log"
    keys = [create_key(db, "alpha"), create_key(db, "beta")]
    rng = random.Random(options.seed)
    shape = LoadShape(
        grpc_streams=options.streams,
        sse_streams=options.streams,
        grpc_background=options.background,
        http_background=options.background,
        followed_background=options.background,
    )
    figures = Figures()
    poison: set[str] = set()
    server = await restart(db, log, figures)
    try:
        for kill in range(1, options.kills + 1):
            if server is None:
                break
            on_completion = kill % 2 == 1
            kill_after = rng.uniform(0.5, 1.5) * options.seconds_between
            seen = await load_and_kill(server, keys, shape, kill_after, rng, on_completion=on_completion)
            figures.kills += 1
            figures.acknowledged += len(seen.acknowledged)
            figures.followed_completions += len(seen.background_completed)
            figures.background_created += len(seen.background)
            figures.busy += sum(seen.busy.values())
            figures.errors += sum(seen.errors.values())
            when = "on a completion" if on_completion else "at random"
            print(
                f"kill {kill}/{options.kills} ({when}, {kill_after:.1f} s in): "
                f"{len(seen.acknowledged)} acknowledged, {len(seen.background)} background created, "
                f"{len(seen.background_completed)} followed to completion"
                + (f", errors {dict(seen.errors)}" if seen.errors else ""),
                flush=True,
            )
            if options.poison:
                rows = write_poison_rows(db, "alpha")
                poison.update(rows)
                figures.poison_rows += len(rows)
            server = await restart(db, log, figures)
            if server is None:
                break
            lost = await lost_answers(server, [*seen.acknowledged, *seen.background_completed])
            figures.lost += lost
            await wait_settled(db, timeout=120)
            checked, problems = background_problems(db, skip=poison)
            sample = rng.sample(seen.background, min(100, len(seen.background)))
            problems += await resumed_problems(server, sample)
            figures.background_checked = checked
            figures.resumed_checked += len(sample)
            new_problems: dict[str, str] = {}
            for problem in problems:
                response_id = problem.split(":", 1)[0]
                if response_id not in figures.terminal_problems:
                    new_problems.setdefault(response_id, problem)
            figures.terminal_problems.update(new_problems)
            print(f"  lost {len(lost)}, responses with new stream problems {len(new_problems)}", flush=True)
            for line in [*lost, *new_problems.values()][:10]:
                print(f"    {line}", flush=True)
    finally:
        if server is not None:
            server.kill()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="how many times the server is killed")
    parser.add_argument(
        "--seconds-between",
        type=float,
        default=3.0,
        help="mean seconds of load between a start and the next kill (each round: 0.5x to 1.5x)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--streams", type=int, default=12, help="foreground streams of each kind at once")
    parser.add_argument("--background", type=int, default=4, help="background clients of each kind at once")
    parser.add_argument("--no-poison", dest="poison", action="store_false", help="write no undecodable rows")
    parser.add_argument(
        "--keep", action="store_true", help="keep the database and the server log (kept anyway on failure)"
    )
    options = parser.parse_args()

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="venna-crash-soak-"))
    figures = asyncio.run(soak(options, workdir))
    if options.keep or figures.bad:
        print(f"database and server log kept in {workdir}")
    else:
        shutil.rmtree(workdir)
    print(figures.report(time.monotonic() - began))
    return 1 if figures.bad else 0


if __name__ == "__main__":
    sys.exit(main())
