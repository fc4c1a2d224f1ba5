"""Stall: what clients that pipeline requests and never read their replies cost the others.

`--attackers` clients (one process each) connect to one dq-server process and send `get`
of a 3 KB job (or, `--request add`, an add) back to back without ever reading a reply,
until the server stops taking them; every `--cycle` seconds each drops its connection and
starts again on a new one. Meanwhile a canary, on its own connection, does an add and a
get every 100 ms and times both, and a second canary PINGs the Redis shard directly (the
floor: a stall it does not see is dq-server's own).

    python bench/stall.py --attackers 5 --seconds 30
    python bench/stall.py --attackers 5 --seconds 30 --cycle 1000  # each one connection
    python bench/stall.py --attackers 0 --seconds 30               # the canary alone

Starts its own redis-server (one shard) and dq-master (one server process). Last line:
RESULT canary_p99_ms=... canary_max_ms=... (add + get, one sample each 100 ms)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import dq_stack, percentile
from dq.client import DqClient


def _frame(text: str) -> bytes:
    data = text.encode()
    return b"%04d" % len(data) + data


REQUESTS = {
    "get": _frame('{"cmd":"get","topic":"bench","id":"fat"}'),  # a 3 KB reply each
    "add": _frame('{"cmd":"add","topic":"bench","id":"a","body":{},"delay":86400}'),
}


def _attacker(port: int, stop: Event, cycle: float, request: bytes) -> None:
    """Pipeline `request` without reading, reconnecting every `cycle` seconds."""
    burst = request * 2000
    while not stop.is_set():
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        view, pos = memoryview(burst), 0
        until = time.monotonic() + cycle
        try:
            while not stop.is_set() and time.monotonic() < until:
                try:
                    pos = (pos + sock.send(view[pos:])) % len(burst)
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    break  # the server closed it: start again
        finally:
            sock.close()


def _redis_ping(port: int, stop: threading.Event, out: list[float]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        while not stop.is_set():
            t0 = time.perf_counter()
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            sock.recv(64)
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.1)


def _canary(port: int, seconds: float) -> tuple[list[float], int]:
    """(add + get latencies in ms, failures), one add + get every 100 ms."""
    lat, failed = [], 0
    client = DqClient([f"127.0.0.1:{port}"], timeout=10.0)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            client.add("bench", f"canary-{i}", {"i": i}, delay=86400)
            if client.get("bench", f"canary-{i}") is None:
                failed += 1
        except Exception:
            failed += 1
        lat.append((time.perf_counter() - t0) * 1000)
        i += 1
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
    client.close()
    return lat, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attackers", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--cycle", type=float, default=5.0,
                    help="seconds an attacker holds a connection before starting anew")
    ap.add_argument("--request", choices=sorted(REQUESTS), default="get",
                    help="what the attackers pipeline")
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    with dq_stack(servers=1, shards=1) as (port, redis_pids):
        with DqClient([f"127.0.0.1:{port}"], timeout=30.0) as c:  # the first: scripts load
            c.add("bench", "fat", {"s": "x" * 3000}, delay=86400)
        redis_port = _redis_port(redis_pids[0])
        stop = ctx.Event()
        attackers = [ctx.Process(target=_attacker, args=(port, stop, args.cycle,
                                                           REQUESTS[args.request]))
                     for _ in range(args.attackers)]
        for p in attackers:
            p.start()
        pings: list[float] = []
        ping_stop = threading.Event()
        pinger = threading.Thread(target=_redis_ping, args=(redis_port, ping_stop, pings))
        pinger.start()
        try:
            time.sleep(0.5)  # the attack under way
            lat, failed = _canary(port, args.seconds)
        finally:
            stop.set()
            ping_stop.set()
            for p in attackers:
                p.join(10)
            pinger.join(10)
    print(f"canary: {len(lat)} add+get, p50 {percentile(lat, 50):.2f} ms, "
          f"{sum(x > 20 for x in lat)} over 20 ms; redis PING: "
          f"{len(pings)}, p99 {percentile(pings, 99):.2f} ms, max {max(pings):.2f} ms")
    print(f"RESULT canary_p99_ms={percentile(lat, 99):.2f} canary_max_ms={max(lat):.1f} "
          f"canary_failed={failed} attackers={args.attackers} request={args.request} "
          f"redis_ping_p99_ms={percentile(pings, 99):.2f}")


def _redis_port(pid: int) -> int:
    """The port the redis-server with this pid listens on (its process title says
    `redis-server 127.0.0.1:PORT`)."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
    return int(title[1].rsplit(b":", 1)[1])


if __name__ == "__main__":
    main()
