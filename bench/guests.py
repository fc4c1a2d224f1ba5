"""Guests moved home: how fast the checker's sweep moves jobs written to another shard
while their owner was down back to the owner.

    python bench/guests.py --n 20000

Starts two redis-servers, writes N jobs owned by the second to the first as guests (as
the failover path does), then sweeps them home with GuestMover.sweep (dq/storage/guests.py) the
way the checker does. Last line:
RESULT guests=... seconds=... per_s=... moved=...
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import redis_servers, tempdir
from dq.sharding.shards import ShardSet
from dq.storage.guests import GuestMover
from dq.storage.store import Store


async def run(urls: list[str], n: int) -> None:
    store = Store(ShardSet.from_urls(urls), buckets=8)
    here, owner = store.shards.shards
    try:
        ids = (f"j{i}" for i in range(10 * n))
        mine = [j for j in ids if store.shards.owner(f"bench:{j}") is owner][:n]
        parts = []
        for j in mine:
            _, job = store.add_job("bench", j, {"order_id": j}, delay_ms=3_600_000,
                                   exclude=(owner.name,))
            parts.append(job)
        for i in range(0, len(parts), 500):
            await here.evalsha(store.batch.add_args(parts[i:i + 500]))
        mover = GuestMover(store)
        assert await mover.count(here) == len(mine)
        moved = 0
        t0 = time.perf_counter()
        while await mover.count(here):
            counts = await mover.sweep(here, lambda s: True)
            moved += counts["moved"]
        took = time.perf_counter() - t0
        left = await here.call("HLEN", store.keys.jobs)
        home = await owner.call("HLEN", store.keys.jobs)
        print(f"moved {moved} in {took:.2f}s; left on the first shard {left}, "
              f"on the owner {home}")
        print(f"RESULT guests={len(mine)} seconds={took:.2f} per_s={len(mine) / took:.0f} "
              f"moved={moved}")
    finally:
        await store.shards.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    with tempdir() as t, redis_servers(2, Path(t)) as shards:
        asyncio.run(run([url for url, _ in shards], args.n))


if __name__ == "__main__":
    main()
