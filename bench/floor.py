"""The floor under dq-server's CPU per add: what a server that does nothing but answer
costs per request on this machine, with the closed-loop client of bench/add.py.

    python bench/floor.py --conns 50 --n 2000

Runs dqload (one request in flight per connection) against, in turn:
  - `uvloop-echo`: an asyncio Protocol on uvloop that splits frames and answers each with
    dq's success frame, no JSON, no Redis: the least any Python/uvloop server pays
    (one read and one write system call per request at one request in flight);
  - `redis-ping`: redis-server answering PING from redis-benchmark at the same shape, a
    C server's floor (for scale; its client is redis-benchmark, not dqload).
Last line: RESULT echo_qps=... echo_us_per_req=... redis_ping_us_per_req=...
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_us, dqload_binary, free_port, redis_servers, tempdir, wait_port
from dq.wire.frames import OK_EMPTY


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n, pos = 0, 0
        while len(buf) - pos >= 4:
            size = int(buf[pos:pos + 4])
            if len(buf) - pos - 4 < size:
                break
            pos += 4 + size
            n += 1
        self.buf = buf[pos:]
        if n and self.transport is not None:
            self.transport.write(OK_EMPTY * n)


def serve_echo(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def echo_floor(conns: int, n: int) -> tuple[float, float]:
    port = free_port()
    pid = os.fork()
    if pid == 0:
        try:
            serve_echo(port)
        finally:
            os._exit(0)
    try:
        wait_port(port)
        binary = dqload_binary()
        if binary is None:
            sys.exit("dqload needs a C compiler and ../shared/tools/dqload.c")
        c0 = cpu_us([pid])
        out = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(port), "-t", "bench",
                              "-c", str(conns), "-n", str(n), "-b", "64", "-m", "add",
                              "-f", "86400"], capture_output=True, text=True, check=True).stdout
        used = cpu_us([pid]) - c0
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    stats = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    return float(stats["qps"]), used / (conns * n)


def redis_ping_floor(conns: int, n: int) -> float:
    with tempdir() as t, redis_servers(1, Path(t)) as shards:
        url, proc = shards[0]
        port = int(re.findall(r":(\d+)", url)[-1])
        wait_port(port)
        total = conns * n
        c0 = cpu_us([proc.pid])
        subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(conns), "-n",
                        str(total), "-q", "-t", "ping_mbulk"], capture_output=True, check=True)
        time.sleep(0.2)
        return (cpu_us([proc.pid]) - c0) / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--n", type=int, default=2000, help="requests per connection")
    args = ap.parse_args()
    qps, echo_us = echo_floor(args.conns, args.n)
    ping_us = redis_ping_floor(args.conns, args.n)
    print(f"RESULT conns={args.conns} echo_qps={qps:.0f} echo_us_per_req={echo_us:.1f} "
          f"redis_ping_us_per_req={ping_us:.1f}")


if __name__ == "__main__":
    main()
