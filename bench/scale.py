"""Scale: 1,000,000 pending jobs. Redis bytes per job, add latency and timer throughput with
1M pending versus an empty store.

    python bench/scale.py --pending 1000000 --due 20000

Starts two redis-servers: one gets the pending jobs ("full"), the other stays empty. Add
latency and timer throughput are measured on both interleaved (an add on one, then on the
other; timer rounds alternate), so the machine's drift and neighbours' load fall on both
alike. "Bytes beyond the body" is the full server's used_memory growth per job minus the
length of the client's JSON body. Last line:
RESULT pending=... bytes_per_job=... bytes_beyond_body=... add_p50_us_empty=...
add_p50_us_full=... add_p99_us_empty=... add_p99_us_full=... move_per_s_empty=...
move_per_s_full=...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, redis_servers, tempdir
from dq.sharding.shards import ShardSet
from dq.storage.store import Store

BODY = {"order_id": 1234567, "user": "u-42", "action": "cancel"}


async def used_memory(store: Store) -> int:
    info = await store.shards.shards[0].client.info("memory")
    return int(info["used_memory"])


async def add_latency(stores: list[Store], n: int) -> list[tuple[float, float]]:
    """Closed loop, one add at a time, alternating between the stores: (p50, p99) in
    microseconds per store."""
    lat: list[list[float]] = [[] for _ in stores]
    for i in range(n):
        for k, store in enumerate(stores):
            t0 = time.perf_counter()
            await store.add("scale", f"lat-{i}", BODY, delay_ms=86_400_000)
            lat[k].append((time.perf_counter() - t0) * 1e6)
    return [(percentile(x, 50), percentile(x, 99)) for x in lat]


async def fill(store: Store, n: int, prefix: str, delay_ms: int, chunk: int = 2000) -> None:
    for start in range(0, n, chunk):
        await asyncio.gather(*(store.add("scale", f"{prefix}-{i}", BODY, delay_ms=delay_ms)
                               for i in range(start, min(n, start + chunk))))


async def move_rate(store: Store, n: int, tag: str) -> float:
    """Jobs per second the timer script moves to ready, with n jobs due now."""
    shard = store.shards.shards[0]
    await fill(store, n, f"due-{tag}", 0)
    t0 = time.perf_counter()
    moved = 0
    while moved < n:
        got, _, _ = await store.move_due(shard, range(store.buckets), limit=1000)
        moved += got
        if got == 0:
            break
    rate = moved / (time.perf_counter() - t0)
    # Drop what was moved (ready entries and payloads), so the next round starts clean.
    for key in store.keys.ready:
        await shard.call("DEL", key)
    for start in range(0, n, 1000):
        await shard.call("HDEL", store.keys.jobs, *(f"scale:due-{tag}-{i}"
                                                  for i in range(start, min(n, start + 1000))))
    return rate


async def run(pending: int, due: int, rounds: int) -> None:
    with tempdir() as t, redis_servers(2, Path(t)) as shards:
        empty, full = (Store(ShardSet.from_urls([url])) for url, _ in shards)
        body_len = len(json.dumps(BODY, separators=(",", ":")))
        await add_latency([empty, full], 200)  # warm up both (scripts, connections)
        base = await used_memory(full)
        t0 = time.perf_counter()
        await fill(full, pending, "pending", 86_400_000)
        fill_s = time.perf_counter() - t0
        per_job = (await used_memory(full) - base) / pending
        (e50, e99), (f50, f99) = await add_latency([empty, full], 5000)
        rates: list[list[float]] = [[], []]
        for r in range(rounds):
            for k, store in enumerate((empty, full)):
                rates[k].append(await move_rate(store, due, f"{r}"))
        for store in (empty, full):
            await store.shards.close()
    e_move, f_move = (statistics.median(x) for x in rates)
    print(f"filled {pending} jobs in {fill_s:.1f}s ({pending / fill_s:.0f}/s in-process); "
          f"timer rounds empty {[round(x) for x in rates[0]]} full {[round(x) for x in rates[1]]}")
    print(f"RESULT pending={pending} due={due} bytes_per_job={per_job:.0f} "
          f"bytes_beyond_body={per_job - body_len:.0f} add_p50_us_empty={e50:.0f} "
          f"add_p50_us_full={f50:.0f} add_p99_us_empty={e99:.0f} add_p99_us_full={f99:.0f} "
          f"move_per_s_empty={e_move:.0f} move_per_s_full={f_move:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pending", type=int, default=1_000_000)
    ap.add_argument("--due", type=int, default=20_000,
                    help="jobs made due at once to time the timer's script")
    ap.add_argument("--rounds", type=int, default=3, help="timer rounds per store (median)")
    args = ap.parse_args()
    asyncio.run(run(args.pending, args.due, args.rounds))


if __name__ == "__main__":
    main()
