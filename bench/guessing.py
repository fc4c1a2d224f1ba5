"""Hostile clients against a real dq-web process: password guesses judged a second, and
how long half-sent request heads keep their sockets.

Guessers send wrong passwords (HTTP Basic through the API, or the login form) with C in
flight, from one loopback address or spread over A addresses (127.0.0.x), for D seconds.
"judged" are the guesses whose password was looked at (401), "refused" those answered 429
without a look. Then N connections send half a request head and never finish it; the
figure is how many are still open after H seconds. `--code DIR` runs dq-web from another
checkout (a `git worktree` of an older commit), to compare before and after.

    python bench/guessing.py
    python bench/guessing.py --code /tmp/oldmain --seconds 5 --half 500 --hold 15

Last line: `RESULT api_1addr=<judged/s> api_16addr=<judged/s> form_16addr=<judged/s>
half_open=<still open>/<N>@<H>s`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, free_port, redis_servers, tempdir, wait_port

PW = "bench-console-pw"


async def _form_guess(client: httpx.AsyncClient) -> int:
    page = await client.get("/login")
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    if not match:
        return page.status_code
    r = await client.post("/login", data={"csrf": match.group(1), "password": "guess",
                                          "next": "/"})
    return r.status_code


async def guessing(url: str, addresses: int, concurrency: int, seconds: float,
                   form: bool) -> tuple[float, float]:
    """(judged, refused) guesses a second, timed once every guesser's client is made and
    connected (making 64 clients takes seconds on a loaded machine)."""
    counts = {401: 0, 429: 0}
    tls = ssl.create_default_context()  # unused (http), but one instead of one a client
    clients = [httpx.AsyncClient(base_url=url, timeout=60, transport=httpx.AsyncHTTPTransport(
        local_address=f"127.0.0.{10 + k % addresses}", verify=tls)) for k in range(concurrency)]
    await asyncio.gather(*(c.get("/healthz") for c in clients))
    stop = time.monotonic() + seconds

    async def guesser(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            if form:
                code = await _form_guess(client)
            else:
                code = (await client.get("/api/topics", auth=("admin", "guess"))).status_code
            counts[code] = counts.get(code, 0) + 1

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(guesser(c) for c in clients))
    finally:
        for c in clients:
            await c.aclose()
    took = time.monotonic() - t0
    return counts[401] / took, counts[429] / took


async def half_heads(port: int, n: int, hold: float) -> int:
    """How many of `n` connections with a half-sent head are still open after `hold` s."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    for _, w in conns:
        w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")

    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            await asyncio.wait_for(reader.read(), hold)
            return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    done = await asyncio.gather(*(closed(r) for r, _ in conns))
    for _, w in conns:
        w.close()
    return sum(not d for d in done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", default=str(ROOT), help="checkout whose dq-web runs")
    ap.add_argument("--seconds", type=float, default=5.0, help="each guessing run")
    ap.add_argument("--c", type=int, default=64, help="guesses in flight")
    ap.add_argument("--addresses", type=int, default=16)
    ap.add_argument("--half", type=int, default=500, help="half-sent heads")
    ap.add_argument("--hold", type=float, default=15.0, help="seconds to watch them")
    args = ap.parse_args()
    with tempdir() as t, redis_servers(1, Path(t)) as procs:
        port = free_port()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("DQ_")},
               "PYTHONPATH": args.code}
        log = open(Path(t) / "web.log", "wb")  # noqa: SIM115
        web = subprocess.Popen(
            [sys.executable, "-c", "from dq.cli import web_main; web_main()",
             "--web-host", "127.0.0.1", "--web-port", str(port), "--web-password", PW,
             "--redis", procs[0][0], "--db", f"sqlite:///{t}/reg.sqlite3",
             "--data-dir", t], env=env, cwd=t, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(port)
            url = f"http://127.0.0.1:{port}"
            results = {}
            for name, addrs, form in (("api_1addr", 1, False),
                                      (f"api_{args.addresses}addr", args.addresses, False),
                                      (f"form_{args.addresses}addr", args.addresses, True)):
                judged, refused = asyncio.run(guessing(url, addrs, args.c, args.seconds, form))
                print(f"{name}: {args.c} guessers from {addrs} address(es): judged "
                      f"{judged:.1f}/s, refused (429) {refused:.1f}/s", flush=True)
                results[name] = f"{judged:.1f}"
                time.sleep(3)  # let the buckets refill between runs
            still = asyncio.run(half_heads(port, args.half, args.hold))
            print(f"half-sent heads: {still} of {args.half} still open after {args.hold:g} s",
                  flush=True)
            ok = httpx.get(url + "/healthz", timeout=30).status_code
            print(f"GET /healthz afterwards: {ok}", flush=True)
        finally:
            web.terminate()
            web.wait(30)
            log.close()
        print("RESULT " + " ".join(f"{k}={v}" for k, v in results.items())
              + f" half_open={still}/{args.half}@{args.hold:g}s")


if __name__ == "__main__":
    main()
