"""Fairness: how long a well-behaved client's adds take while another client bulk-loads.

A bulk client (its own process) sends `add_many` batches of 20,000 jobs as fast as the
server takes them, on one connection; meanwhile a canary adds one job every 2 ms on
another connection and times each add.

    python bench/fairness.py --n 1500
    python bench/fairness.py --n 1500 --servers 2

Starts its own redis-servers (two shards) and dq-master. Last line: RESULT canary_adds=...
p50_ms=... p99_ms=... max_ms=... bulk_adds=... (the bulk client's adds meanwhile)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import dq_stack, percentile
from dq.client import AsyncDqClient


def _bulk_main(port: int, stop: Event, added: Synchronized[int]) -> None:
    async def load() -> None:
        client = AsyncDqClient([f"127.0.0.1:{port}"], timeout=30)
        batch = 0
        while not stop.is_set():
            jobs = [{"topic": "bench", "id": f"bulk-{batch}-{k}", "body": {"k": k},
                     "delay": 86400} for k in range(20_000)]
            batch += 1
            results = await client.add_many(jobs)
            added.value += sum(r is None for r in results)
        await client.close()

    asyncio.run(load())


async def _canary(port: int, n: int) -> list[float]:
    client = AsyncDqClient([f"127.0.0.1:{port}"])
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.add("bench", f"canary-{i}", {"i": i}, delay=86400)
        lat.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.002)
    await client.close()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1500, help="canary adds")
    ap.add_argument("--servers", type=int, default=1)
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    with dq_stack(args.servers) as (port, _):
        stop, added = ctx.Event(), ctx.Value("q", 0)
        bulk = ctx.Process(target=_bulk_main, args=(port, stop, added))
        bulk.start()
        try:
            time.sleep(1.0)  # the bulk load under way
            before = added.value
            lat = asyncio.run(_canary(port, args.n))
            during = added.value - before
        finally:
            stop.set()
            bulk.join(60)
    print(f"RESULT canary_adds={len(lat)} p50_ms={percentile(lat, 50):.2f} "
          f"p99_ms={percentile(lat, 99):.2f} max_ms={max(lat):.1f} bulk_adds={during}")


if __name__ == "__main__":
    main()
