"""Steady load: a constant rate of jobs (500/s for 60 s by default), each due `--ahead`
seconds after it is added; how late is each callback, and is any early?

    python bench/steady.py --rate 500 --seconds 60

Same harness as bench/delivery.py (own redis-server; lean receiver process and real timer
and consumer roles as child processes, from bench/roles.py). Last line:
RESULT rate=... seconds=... delivered=... early=... late_p50_ms=... late_p99_ms=... late_max_ms=...
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, percentile, redis_servers, register, tempdir
from bench.roles import Receiver, roles
from dq.config import Settings
from dq.runtime.context import open_store


async def _feed(settings: Settings, rate: int, seconds: float, ahead: float) -> dict[str, int]:
    """Add `rate` jobs per second for `seconds`; returns job id -> due ms."""
    store = open_store(settings)
    due: dict[str, int] = {}
    start = time.monotonic()
    tick = 0.02  # add in small batches every 20 ms, so the rate is smooth
    per_tick = rate * tick
    sent = 0.0
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            target = int(elapsed / tick * per_tick) + int(per_tick)
            batch = []
            while sent < target:
                job = str(int(sent))
                ms = int((time.time() + ahead) * 1000)
                due[job] = ms
                batch.append(store.add("bench", job, {"i": job}, due_ms=ms))
                sent += 1
            await asyncio.gather(*batch)
            await asyncio.sleep(tick)
    finally:
        await store.shards.close()
    return due


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--ahead", type=float, default=1.0)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--timers", type=int, default=1)
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    with tempdir() as tmpdir, redis_servers(1, Path(tmpdir)) as [(url, _proc)]:
        port = free_port()
        db = f"sqlite:///{Path(tmpdir) / 'dq.sqlite3'}"
        register(db, "bench", callback=f"http://127.0.0.1:{port}/cb", delay=0)
        settings = Settings(redis=(url,), db=db, timers=args.timers, consumers=args.consumers,
                            lease=60.0, retry_unit=1.0)
        with Receiver(ctx, port) as rx, roles(ctx, settings):
            due = asyncio.run(_feed(settings, args.rate, args.seconds, args.ahead))
            rx.wait(len(due), args.ahead + 30, poll=0.05)
    arrivals = rx.arrivals
    late = sorted(arrivals[j] * 1000 - ms for j, ms in due.items() if j in arrivals)
    early = sum(1 for x in late if x < 0)
    print(f"RESULT rate={args.rate} seconds={args.seconds:g} added={len(due)} "
          f"delivered={len(late)} early={early} late_p50_ms={percentile(late, 50):.1f} "
          f"late_p99_ms={percentile(late, 99):.1f} late_max_ms={late[-1] if late else 0:.1f}")


if __name__ == "__main__":
    main()
