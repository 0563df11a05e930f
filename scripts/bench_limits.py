"""What limits per workspace cost a creation: POST /v1/responses (echo, store on) through the
shim, driven by wrk, for a workspace without limits and for one with limits too high to reach
(so that every request takes the admission path: one atomic update of its rate window in the
store), alternating in one run against one server. Reported as the limited workspace's rate
over the unlimited one's.

    python scripts/bench_limits.py [--seconds 4] [--rounds 3] [--database postgresql://…]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench_c import wrk
from benchkit.config import QUICK
from benchkit.processes import Bench, venna_cli

CONNECTIONS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", help="an empty postgresql:// database (default: a SQLite file)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        bench = Bench(Path(scratch), QUICK, client_processes=1)
        with bench.venna(database=options.database) as venna:
            limited = venna_cli("keys", "create", "--workspace", "limited", "--db", str(venna.db_path))
            unreachable = {
                "--requests-per-minute": 10**12,
                "--tokens-per-minute": 10**15,
                "--monthly-tokens": 10**15,
            }
            flags = [str(part) for pair in unreachable.items() for part in pair]
            venna_cli("limits", "set", "--workspace", "limited", *flags, "--db", str(venna.db_path))
            body = {"model": "echo", "input": "limits per workspace cost"}
            rates: dict[str, list[float]] = {"unlimited": [], "limited": []}
            for _ in range(options.rounds):
                for name, key in (("unlimited", venna.key), ("limited", limited)):
                    load = wrk(
                        f"{venna.http_base}/responses",
                        body,
                        {"authorization": f"Bearer {key}", "content-type": "application/json"},
                        options.seconds,
                        CONNECTIONS,
                    )
                    if load.failed:
                        print(f"{name}: {load.failed} failed requests", file=sys.stderr)
                        return 1
                    rates[name].append(load.rate)
    unlimited, limited_rate = statistics.median(rates["unlimited"]), statistics.median(rates["limited"])
    engine = "PostgreSQL" if options.database else "SQLite"
    print(f"POST /v1/responses (echo), wrk c{CONNECTIONS}, {engine}, median of {options.rounds} rounds")
    print(f"  workspace without limits   {unlimited:8.0f} req/s")
    print(f"  workspace with limits      {limited_rate:8.0f} req/s")
    print(f"  ratio                      {limited_rate / unlimited:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
