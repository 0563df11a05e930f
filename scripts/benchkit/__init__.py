"""Helpers of the benchmark scripts (scripts/bench.py, scripts/bench_peers.py): configuration,
server processes, load generation, measurement and reporting."""
