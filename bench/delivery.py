"""Delivery benchmark: N jobs due at one instant, how fast and how late are they called back?

Starts its own redis-server (free port, temp dir, no persistence), a lean HTTP receiver in
a child process, and timer and consumer roles as child processes (the real `dq.roles.timer.run`
and `dq.roles.consumer.run`; the harness is bench/roles.py); adds N jobs, pipelined through the
Store, all due at the same instant `--ahead` seconds from the start, and waits until the
receiver has seen every one.

    python bench/delivery.py --n 2000
    python bench/delivery.py --n 20000 --consumers 2 --timers 1
    python bench/delivery.py --n 20000 --cluster   (a local 3+3 Redis Cluster)
    python bench/delivery.py --n 20000 --breaker 5    # the topic has a (closed) breaker
    python bench/delivery.py --n 20000 --setup sentinel --replica-acks 1

The last line is `RESULT delivered=... seconds=... per_s=... late_p50_ms=... late_p99_ms=...
late_max_ms=...`: `seconds` runs from the due instant to the last arrival, and lateness is
each job's arrival at the receiver minus its due time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.context import ForkContext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SETUP_HELP,
    SETUPS,
    cpu_us,
    free_port,
    percentile,
    register,
    stores,
    tempdir,
)
from bench.roles import Receiver, roles
from dq.config import Settings
from dq.runtime.context import open_store


async def _add_jobs(settings: Settings, n: int, due_ms: int, chunk: int = 2000) -> float:
    """Add n jobs due at due_ms, pipelined through the Store; seconds it took."""
    store = open_store(settings)
    t0 = time.monotonic()
    try:
        for start in range(0, n, chunk):
            await asyncio.gather(*(store.add("bench", str(i), {"i": i}, due_ms=due_ms)
                                   for i in range(start, min(n, start + chunk))))
    finally:
        await store.shards.close()
    return time.monotonic() - t0


def _report(arrivals: dict[str, float], n: int, due_ms: int) -> None:
    dups = sum(1 for k in arrivals if k.startswith("dup:"))
    got = {k: v for k, v in arrivals.items() if not k.startswith("dup:")}
    late = sorted(t * 1000 - due_ms for t in got.values())
    seconds = max(0.001, (max(got.values()) * 1000 - due_ms) / 1000) if got else float("nan")
    if dups or len(got) != n:
        print(f"WARNING: {len(got)} of {n} jobs delivered, {dups} duplicates")
    early = sum(1 for x in late if x < 0)
    if early:
        print(f"WARNING: {early} jobs arrived before their due time")
    print(f"RESULT delivered={len(got)} seconds={seconds:.3f} per_s={len(got) / seconds:.0f} "
          f"late_p50_ms={percentile(late, 50):.0f} late_p99_ms={percentile(late, 99):.0f} "
          f"late_max_ms={late[-1] if late else float('nan'):.0f}")


def _run(ctx: ForkContext, settings: Settings, args: argparse.Namespace, port: int,
         redis_pids: list[int]) -> None:
    """Receiver and roles up, jobs in, wait for every delivery, roles down, report."""
    with Receiver(ctx, port) as rx, roles(ctx, settings) as procs:
        due_ms = int((time.time() + args.ahead) * 1000)
        took = asyncio.run(_add_jobs(settings, args.n, due_ms))
        print(f"added {args.n} jobs in {took:.2f}s ({args.n / took:.0f}/s); due in "
              f"{due_ms / 1000 - time.time():.2f}s; {args.timers} timer(s), "
              f"{args.consumers} consumer(s) x {args.concurrency}, {os.cpu_count()} cpus")
        pids = [p.pid for p in procs if p.pid]
        cpu0 = cpu_us(pids)
        others0 = cpu_us(redis_pids), cpu_us([rx.pid])
        rx.wait(args.n, args.timeout)
        used = cpu_us(pids) - cpu0
        redis_used = cpu_us(redis_pids) - others0[0]
        receiver_used = cpu_us([rx.pid]) - others0[1]
        got = max(1, rx.count.value)
        print(f"timer+consumer CPU: {used / 1e6:.2f}s, {used / got:.0f} us "
              f"per delivered job (redis-server {redis_used / got:.0f} us, "
              f"receiver {receiver_used / got:.0f} us)")
    _report(rx.arrivals, args.n, due_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--timers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--ahead", type=float, default=2.0, help="seconds until the jobs are due")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--cluster", action="store_true", help="run on a local Redis Cluster "
                    "(3 masters + 3 replicas) instead of one redis-server")
    ap.add_argument("--redis", metavar="URL", action="append", default=[],
                    help="run on this shard URL (repeat), started by you")
    ap.add_argument("--breaker", type=int, default=0,
                    help="the topic's breaker_threshold (0: no breaker); it stays closed")
    ap.add_argument("--setup", choices=SETUPS, default="plain", help=SETUP_HELP)
    ap.add_argument("--replica-acks", type=int, default=0,
                    help="dq's replica_acks setting (Redis WAIT after each batch)")
    args = ap.parse_args()

    ctx = mp.get_context("fork")  # children start before this process runs any event loop
    with tempdir() as tmpdir, stores(1, Path(tmpdir), cluster=args.cluster, urls=args.redis,
                                     setup=args.setup) as (urls, redis_pids):
        settings = Settings(redis=tuple(urls), db=f"sqlite:///{Path(tmpdir) / 'dq.sqlite3'}",
                            timers=args.timers, consumers=args.consumers,
                            concurrency=args.concurrency, lease=60.0, retry_unit=1.0,
                            replica_acks=args.replica_acks)
        port = free_port()
        register(settings.db, "bench", callback=f"http://127.0.0.1:{port}/cb",
                 timeout_ms=10_000, breaker_threshold=args.breaker)
        print(f"setup={args.setup} replica_acks={args.replica_acks}")
        _run(ctx, settings, args, port, redis_pids)


if __name__ == "__main__":
    main()
