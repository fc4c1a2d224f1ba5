"""Adopting php-delayqueue's pending jobs: how fast dq moves the jobs the original left in
its Redis into its own layout (dq/storage/adopt.py), and what a pass costs when there are none.

    python bench/adopt.py --n 100000

Starts a redis-server, writes N jobs as the original leaves them (the hash dq_job_info,
one in ten on its ready list dq_2ready_queue, the rest in its bucket dq_bucket_<n> an hour
ahead), adopts them with one Adopter pass, then times 100 passes with nothing left. Last
line: RESULT jobs=... seconds=... per_s=... idle_ms=...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import redis_servers, tempdir
from dq.sharding.shards import ShardSet
from dq.storage.adopt import Adopter
from dq.storage.store import Store


async def run(url: str, n: int) -> None:
    store = Store(ShardSet.from_urls([url]), buckets=8, orig_prefix="dq_")
    shard = store.shards.shards[0]
    try:
        await shard.call("PING")  # connected: send_then writes only on an open connection
        now = int(time.time())
        bucket = f"dq_bucket_{zlib.crc32(b'order') % 2}"
        for start in range(0, n, 1000):
            for i in range(start, min(n, start + 1000)):
                tid = f"order:{i}"
                body = {"order_id": i, "notify_time": "2030-01-01 10:00:00",
                        "dq_set_time": "2030-01-01 09:00:00"}
                shard.conn.send_then(lambda *_: None, "HSET", "dq_job_info", tid,
                                     json.dumps(body))
                if i % 10 == 0:
                    shard.conn.send_then(lambda *_: None, "RPUSH", "dq_2ready_queue", tid)
                else:
                    shard.conn.send_then(lambda *_: None, "ZADD", bucket, now + 3600, tid)
            await shard.call("PING")
        adopter = Adopter(store)
        t0 = time.perf_counter()
        done = await adopter.adopt_all({"order": 2})
        took = time.perf_counter() - t0
        counts = done[shard.label]
        t1 = time.perf_counter()
        for _ in range(100):
            await adopter.adopt_all({})
        idle_ms = (time.perf_counter() - t1) * 10
        print(f"adopted {counts['adopted']} ({counts['ready']} ready, {counts['delayed']} "
              f"delayed) in {took:.2f}s; left: {await shard.call('EXISTS', 'dq_job_info')} "
              f"original keys; dq holds {await shard.call('HLEN', store.keys.jobs)}")
        print(f"RESULT jobs={counts['adopted']} seconds={took:.2f} per_s={n / took:.0f} "
              f"idle_ms={idle_ms:.2f}")
    finally:
        await store.shards.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100000)
    args = ap.parse_args()
    with tempdir() as t, redis_servers(1, Path(t)) as shards:
        asyncio.run(run(shards[0][0], args.n))


if __name__ == "__main__":
    main()
