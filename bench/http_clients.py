"""Callback HTTP clients head to head: N signed form POSTs (like a dq callback) with C in
flight, against the lean receiver of bench/roles.py in its own process.

Each client runs in a fresh child process, once on the default asyncio loop and once on
uvloop; the child reports requests/s and its own CPU (getrusage, user+system) per request,
measured after a warm-up that opens the connections.

    python bench/http_clients.py --n 20000 --c 64
    python bench/http_clients.py --clients httpx,aiohttp --loops asyncio,uvloop --repeat 3

Clients: `httpx` (AsyncClient used the way dq 0.1 used it: build_request, send(stream=True),
capped aiter_bytes, aclose, inside asyncio.timeout), `aiohttp` (one ClientSession with a
TCPConnector limited to C, capped content.read, release), `raw` (a hand-written HTTP/1.1
keep-alive client on asyncio.Protocol: the floor, not a candidate), and `dq` (whatever
dq.roles.callback.call does now, so a regression there shows up here).

Last line: `RESULT n=... c=... <client>/<loop>=<req/s>:<cpu us per req> ...` (best of the
repeats by CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_us, free_port
from bench.roles import Receiver

CAP = 256 * 1024
TIMEOUT = 10.0
Send = Callable[[int], Awaitable[int]]  # job number -> HTTP status


def _callback(i: int) -> tuple[dict[str, str], bytes]:
    """Headers and form body of job i's callback, signed like dq signs it."""
    body = f"i={i}&notify_time={int(time.time())}&dq_set_time=1700000000000".encode()
    ts = str(int(time.time()))
    sig = hmac.new(b"s3cret", ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"User-Agent": "dq/0.1", "X-Dq-Topic": "bench", "X-Dq-Id": str(i),
            "X-Dq-Attempt": "1", "Content-Type": "application/x-www-form-urlencoded",
            "X-Dq-Timestamp": ts, "X-Dq-Signature": sig}, body


# the clients ----------------------------------------------------------------------------
async def _httpx(url: str, c: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import httpx

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    client = httpx.AsyncClient(limits=limits, follow_redirects=False, trust_env=False)

    async def send(i: int) -> int:
        headers, body = _callback(i)
        req = client.build_request("POST", url, content=body, headers=headers, timeout=TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            resp = await client.send(req, stream=True)
            try:
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size >= CAP:
                        break
            finally:
                await resp.aclose()
        return resp.status_code

    return send, client.aclose


async def _aiohttp(url: str, c: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c), trust_env=False)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)

    async def send(i: int) -> int:
        headers, body = _callback(i)
        async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                timeout=timeout) as resp:
            size = 0
            while size < CAP and (chunk := await resp.content.read(CAP - size)):
                size += len(chunk)
            return resp.status

    return send, session.close


async def _dq(url: str, c: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from dq.registry.core import Topic
    from dq.roles.callback import ExprCache, call, open_session
    from dq.storage.store import Claimed

    session = open_session(c)
    topic = Topic(topic="bench", name="bench", callback=url, method="POST", secret="s3cret",
                  timeout_ms=int(TIMEOUT * 1000))
    exprs = ExprCache()

    async def send(i: int) -> int:
        job = Claimed(shard=None, tid=f"bench:{i}", topic="bench",  # type: ignore[arg-type]
                      id=str(i), version="v", priority=2, due_ms=0, attempt=0, set_ms=0,
                      body={"i": i, "notify_time": int(time.time())}, claimed_ms=0)
        return (await call(session, exprs, topic, job, TIMEOUT)).status

    return send, session.close


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time, Content-Length replies only."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in self.buf[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        self.buf = self.buf[end + 4 + length:]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("closed"))


async def _raw(url: str, c: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    host, _, rest = url.removeprefix("http://").partition("/")
    ip, _, port = host.partition(":")
    path = "/" + rest
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []

    async def send(i: int) -> int:
        headers, body = _callback(i)
        conn = idle.pop() if idle else (await loop.create_connection(_Conn, ip, int(port)))[1]
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        assert conn.transport is not None
        conn.waiter = loop.create_future()
        conn.transport.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        async with asyncio.timeout(TIMEOUT):
            status = await conn.waiter
        idle.append(conn)
        return status

    async def close() -> None:
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()

    return send, close


CLIENTS = {"httpx": _httpx, "aiohttp": _aiohttp, "raw": _raw, "dq": _dq}


# one measurement (child process) --------------------------------------------------------
def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _drive(client: str, url: str, n: int, c: int) -> tuple[float, float, int]:
    send, close = await CLIENTS[client](url, c)
    errors = 0

    async def worker(jobs: range) -> None:
        nonlocal errors
        for i in jobs:
            try:
                if await send(i) != 200:
                    errors += 1
            except Exception:
                errors += 1

    async def batch(start: int, count: int) -> None:
        await asyncio.gather(*(worker(range(start + w, start + count, c)) for w in range(c)))

    await batch(0, 4 * c)  # warm-up: every connection opened
    t0, cpu0 = time.perf_counter(), _cpu_s()
    await batch(4 * c, n)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    await close()
    return wall, cpu, errors


def _child(client: str, loop: str, url: str, n: int, c: int, out: Connection) -> None:
    if loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out.send(runner.run(_drive(client, url, n, c)))
    else:
        out.send(asyncio.run(_drive(client, url, n, c)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="measured requests per run")
    ap.add_argument("--c", type=int, default=64, help="requests in flight")
    ap.add_argument("--clients", default="httpx,aiohttp,raw,dq")
    ap.add_argument("--loops", default="asyncio,uvloop")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    ctx = mp.get_context("fork")  # no event loop runs in this process
    port = free_port()
    url = f"http://127.0.0.1:{port}/cb"
    best: dict[str, tuple[float, float]] = {}
    with Receiver(ctx, port) as receiver:
        for _ in range(args.repeat):
            for client in args.clients.split(","):
                for loop in args.loops.split(","):
                    got, sent = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=_child, args=(client, loop, url, args.n, args.c, sent))
                    p.start()
                    rx_cpu0 = cpu_us([receiver.pid])
                    wall, cpu, errors = got.recv()
                    rx_cpu = cpu_us([receiver.pid]) - rx_cpu0
                    p.join()
                    measured = args.n - 4 * args.c
                    rps, us = measured / wall, cpu / measured * 1e6
                    key = f"{client}/{loop}"
                    print(f"{key:16} {rps:8.0f} req/s {us:7.0f} us CPU/req   (receiver "
                          f"{rx_cpu / args.n:4.0f} us/req){f'  ERRORS {errors}' if errors else ''}",
                          flush=True)
                    if key not in best or us < best[key][1]:
                        best[key] = (rps, us)
    print(f"RESULT n={args.n} c={args.c} "
          + " ".join(f"{k}={rps:.0f}:{us:.0f}" for k, (rps, us) in best.items()))


if __name__ == "__main__":
    main()
