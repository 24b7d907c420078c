"""Single-query searches from several client threads at once: one thread per search when another
is scanning (indexes/hamming.py `_InFlight`) against always spreading each over the pool.

    .venv/bin/python -m bench.concurrent_search --n 1000000 --json F

The peer is the same index with the in-flight rule switched off (every search hands pieces to
the pool, as before the rule). Both modes run in alternated rounds over one index of random
64-bit codes; prints and writes, per client count, the medians of queries/s and of the p50
latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from indexes import hamming
from indexes.hamming import HammingIndex


def run(index: HammingIndex, queries: np.ndarray, *, clients: int, seconds: float) -> list[float]:
    """[queries/s, p50 ms] of `clients` threads each searching one query at a time."""
    done = [0] * clients
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        i = c
        while time.monotonic() < stop:
            start = time.perf_counter()
            index.search(queries[i % len(queries)][None, :], 10)
            latencies.append(time.perf_counter() - start)
            done[c] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [sum(done) / seconds, statistics.median(latencies) * 1000]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="codes (default 1M)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per run (default 3)")
    parser.add_argument("--json", type=Path, help="where to write the result")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**63, size=(args.n, 1), dtype=np.int64).astype(np.uint64)
    index = HammingIndex(64, threads=2)
    index.add(codes, np.arange(args.n, dtype=np.int64))
    queries = rng.integers(0, 2**63, size=(4000, 1), dtype=np.int64).astype(np.uint64)
    rule = hamming._IN_FLIGHT.enter

    def always_alone() -> bool:  # the peer: count the search, but always spread it
        rule()
        return True

    result: dict[str, object] = {"n": args.n, "rounds": args.rounds, "seconds": args.seconds}
    for clients in (1, 2, 4):
        figures: dict[str, list[list[float]]] = {"in_flight_rule": [], "always_spread": []}
        for r in range(args.rounds):
            modes = list(figures) if r % 2 == 0 else list(figures)[::-1]
            for mode in modes:
                hamming._IN_FLIGHT.enter = rule if mode == "in_flight_rule" else always_alone  # type: ignore[method-assign]
                figures[mode].append(run(index, queries, clients=clients, seconds=args.seconds))
        hamming._IN_FLIGHT.enter = rule  # type: ignore[method-assign]
        result[str(clients)] = {
            mode: {
                "qps": statistics.median(f[0] for f in runs),
                "p50_ms": statistics.median(f[1] for f in runs),
            }
            for mode, runs in figures.items()
        }
        print(clients, json.dumps(result[str(clients)]))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
