"""The claim script's cost per job, in Redis: N ready jobs claimed 32 at a time.

Starts its own redis-server (free port, temp dir), writes N jobs of one topic straight
into a ready list (through the Store: add, then move_due), then claims them all in calls
of 32 (a consumer's share of its slots) and reports Redis's own time for the claim calls
(INFO commandstats, evalsha) per job. `--flow K` passes K other flow-controlled topics
(rate-limited, none of them with jobs) with every claim, as a consumer does when such
topics are registered. Runs with the Store it imports, so the same file measures any
tree: `PYTHONPATH=/path/to/tree python bench/claim.py` (the file does not put its own
tree first).

The last line is `RESULT jobs=... claim_calls=... redis_us_per_job=... wall_s=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import time
from pathlib import Path
from typing import Any

if "dq" not in sys.modules:
    try:
        import dq  # noqa: F401 - the tree PYTHONPATH names
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import redis_servers, tempdir
from dq.config import Settings
from dq.runtime.context import open_store


async def _run(url: str, n: int, flow: int) -> None:
    settings = Settings(redis=(url,), buckets=8)
    store = open_store(settings)
    shard = store.shards.shards[0]
    try:
        for start in range(0, n, 2000):
            await asyncio.gather(*(store.add("bench", str(i), {"i": i}, delay_ms=0)
                                   for i in range(start, min(n, start + 2000))))
        while sum([(await store.move_due(shard, range(8), 5000))[0]]):
            pass
        extra: dict[str, Any] = {}
        if flow:
            from dq.storage.store import FlowLimit  # only in trees with flow control
            extra["flow"] = [FlowLimit(f"limited{i}", rate=40.0, burst=4.0) for i in range(flow)]
        assert not flow or "flow" in inspect.signature(store.claim).parameters
        await shard.call("CONFIG", "RESETSTAT")
        got = calls = 0
        t0 = time.monotonic()
        while True:
            jobs = await store.claim(shard, 32, [1, 2, 3], 60_000, **extra)
            calls += 1
            if not jobs:
                break
            got += len(jobs)
        wall = time.monotonic() - t0
        info = (await shard.call("INFO", "commandstats")).decode()
        usec = next(int(line.split("usec=")[1].split(",")[0]) for line in info.splitlines()
                    if line.startswith("cmdstat_evalsha:"))
        print(f"RESULT jobs={got} claim_calls={calls} redis_us_per_job={usec / max(1, got):.2f} "
              f"wall_s={wall:.2f}")
    finally:
        await store.shards.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--flow", type=int, default=0, help="other flow-controlled topics passed")
    args = ap.parse_args()
    with tempdir() as tmpdir, redis_servers(1, Path(tmpdir)) as [(url, _proc)]:
        asyncio.run(_run(url, args.n, args.flow))


if __name__ == "__main__":
    main()
