"""Add throughput: N connections with one request in flight each (the original's bench
shape), or pipelined add_many from one client; with the CPU dq-server and redis-server
processes spent per add.

    python bench/add.py --client dqload --conns 50 --n 2000 --servers 1
    python bench/add.py --client python --conns 50 --n 400
    python bench/add.py --client pipelined --n 200000
    python bench/add.py --client pipelined --n 200000 --conns 4 --servers 2
    python bench/add.py --client dqload --conns 50 --cluster   (a local 3+3 Redis Cluster)
    python bench/add.py --client pipelined --redis redis+cluster://10.0.0.5:7000
    python bench/add.py --client dqload --shards 1 --setup sentinel --replica-acks 1

Starts its own redis-servers (two shards, like the original's measurement) and dq-master.
With --against HOST:PORT it starts nothing and drives a server already running there (the
original php-delayqueue, for a side-by-side run: bench/RESULTS.md says how it was set up)
with dqload, counting the CPU of the processes titled dq-server and of the --redis-pid
processes; its topic "bench" must be registered.

    python bench/add.py --against 127.0.0.1:6790 --redis-pid 123 --redis-pid 124
Last line: RESULT mode=... qps=... p50_ms=... p99_ms=... server_us_per_add=...
redis_us_per_add=... (dqload and pipelined also client_us_per_add=...: dqload's own CPU
per request, or this process's per add)
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SETUP_HELP,
    SETUPS,
    cpu_us,
    dq_stack,
    dqload_binary,
    percentile,
    pids_titled,
)
from dq.client import AsyncDqClient


async def python_closed_loop(port: int, conns: int, n: int) -> tuple[int, list[float]]:
    lat: list[float] = []
    fails = 0

    async def one(c: int) -> None:
        nonlocal fails
        client = AsyncDqClient([f"127.0.0.1:{port}"])
        body = {"seq": "", "pad": "x" * 40}
        for i in range(n):
            t0 = time.perf_counter()
            try:
                await client.add("bench", f"py-{c}-{i}", body, delay=86400)
            except Exception:
                fails += 1
            lat.append((time.perf_counter() - t0) * 1000)
        await client.close()

    await asyncio.gather(*(one(c) for c in range(conns)))
    return fails, lat


async def python_pipelined(port: int, n: int, conns: int) -> tuple[int, list[float], float]:
    """add_many of n jobs over `conns` connections; returns (failures, [wall ms of the
    add_many call], client CPU us per add). The CPU is this process's (the client's alone:
    dq and redis are other processes), frames included; the job list is made before."""
    client = AsyncDqClient([f"127.0.0.1:{port}"], timeout=30)
    jobs = [{"topic": "bench", "id": f"pp-{i}", "body": {"seq": i}, "delay": 86400}
            for i in range(n)]
    c0, t0 = time.process_time(), time.perf_counter()
    res = await client.add_many(jobs, connections=conns)
    lat = [(time.perf_counter() - t0) * 1000]
    client_us = (time.process_time() - c0) * 1e6 / max(n, 1)
    await client.close()
    return sum(r is not None for r in res), lat, client_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", choices=("dqload", "python", "pipelined"), default="dqload")
    ap.add_argument("--conns", type=int, help="connections (default 50; pipelined: those "
                    "add_many spreads its adds over, default 1)")
    ap.add_argument("--n", type=int, default=2000, help="requests per connection "
                    "(pipelined: in all)")
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--body", type=int, default=64)
    ap.add_argument("--cluster", action="store_true", help="run on a local Redis Cluster "
                    "(3 masters + 3 replicas) instead of --shards redis-servers")
    ap.add_argument("--redis", metavar="URL", action="append", default=[],
                    help="run on this shard URL (redis://, redis+cluster://...; repeat), "
                    "started by you, instead of starting redis-servers")
    ap.add_argument("--setup", choices=SETUPS, default="plain", help=SETUP_HELP)
    ap.add_argument("--replica-acks", type=int, default=0,
                    help="dq's replica_acks setting (Redis WAIT after each batch)")
    ap.add_argument("--against", metavar="HOST:PORT",
                    help="drive the server running there with dqload; start nothing")
    ap.add_argument("--redis-pid", type=int, action="append", default=[],
                    help="with --against: a redis-server process behind it (repeat)")
    args = ap.parse_args()
    if args.conns is None:
        args.conns = 1 if args.client == "pipelined" else 50
    if args.against:
        host, _, port = args.against.rpartition(":")
        servers = pids_titled("dq-server")
        if not servers:
            sys.exit(f"no process titled dq-server: start the server at {args.against} first")
        s0, r0 = cpu_us(servers), cpu_us(args.redis_pid)
        qps, p50, p99, total, fails, gen_us = run_dqload(host, int(port), args)
        s1, r1 = cpu_us(servers), cpu_us(args.redis_pid)
        report(args, qps, p50, p99, total, fails, s1 - s0, r1 - r0, gen_us)
        return
    if args.setup != "plain":
        args.shards = 1
    with dq_stack(args.servers, args.shards, cluster=args.cluster, urls=args.redis,
                  setup=args.setup, replica_acks=args.replica_acks) as (port, redis_pids):
        servers = pids_titled("dq-server")
        s0, r0, t0 = cpu_us(servers), cpu_us(redis_pids), time.perf_counter()
        client_us: float | None = None
        if args.client == "dqload":
            qps, p50, p99, total, fails, client_us = run_dqload("127.0.0.1", port, args)
        else:
            if args.client == "python":
                fails, lat = asyncio.run(python_closed_loop(port, args.conns, args.n))
                total = args.conns * args.n
                elapsed = time.perf_counter() - t0
            else:
                fails, lat, client_us = asyncio.run(python_pipelined(port, args.n,
                                                                     args.conns))
                total = args.n
                # the add_many call's own time: not the building of the job list
                elapsed = lat[0] / 1000
            qps = (total - fails) / elapsed
            p50, p99 = percentile(lat, 50), percentile(lat, 99)
        s1, r1 = cpu_us(servers), cpu_us(redis_pids)
    report(args, qps, p50, p99, total, fails, s1 - s0, r1 - r0, client_us)


def run_dqload(host: str, port: int, args: argparse.Namespace,
               ) -> tuple[float, float, float, int, int, float]:
    """dqload's closed loop: (qps, p50 ms, p99 ms, requests, failures, its CPU us per
    request)."""
    binary = dqload_binary()
    if binary is None:
        sys.exit("dqload needs a C compiler and ../shared/tools/dqload.c")
    out = subprocess.run(
        [binary, "-h", host, "-p", str(port), "-t", "bench", "-c", str(args.conns), "-n",
         str(args.n), "-b", str(args.body), "-m", "add", "-f", "86400"],
        capture_output=True, text=True, check=False)  # it exits 1 when an add failed
    if "RESULT" not in out.stdout:
        sys.exit(f"dqload failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    line = out.stdout.strip().splitlines()[-1]
    stats = dict(kv.split("=") for kv in line.split()[1:])
    return (float(stats["qps"]), float(stats["p50_ms"]), float(stats["p99_ms"]),
            int(stats["ok"]) + int(stats["fail"]), int(stats["fail"]),
            float(stats["gen_cpu_us_per_req"]))


def report(args: argparse.Namespace, qps: float, p50: float, p99: float, total: int,
           fails: int, server_us: float, redis_us: float, client_us: float | None) -> None:
    target = f" against={args.against}" if args.against else ""
    target += " store=cluster" if args.cluster else " store=" + ",".join(args.redis) \
        if args.redis else ""
    target += "" if args.against else f" setup={args.setup} replica_acks={args.replica_acks}"
    print(f"RESULT mode={args.client}{target} conns={args.conns} servers={args.servers} "
          f"shards={'cluster' if args.cluster else args.shards} total={total} fail={fails} "
          f"qps={qps:.0f} p50_ms={p50:.3f} "
          f"p99_ms={p99:.3f} server_us_per_add={server_us / total:.1f} "
          f"redis_us_per_add={redis_us / total:.1f}"
          + ("" if client_us is None else f" client_us_per_add={client_us:.1f}"))


if __name__ == "__main__":
    main()
