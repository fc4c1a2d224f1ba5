"""Soak: mixed load against a real dq-master for a long while; does any process grow?

Starts `python -m dq.cli` in a temp dir in its default, embedded shape (its own
redis-server with AOF, SQLite registry) plus the web console, and an HTTP receiver in this
process that answers after 0-20 ms and fails `--fail` of the calls with HTTP 500. Then, for
`--seconds`: adds at `--rate` per second (due 0-5 s later), gets of recent jobs, deletes of
a tenth of them before they fall due, and a console API call every few seconds. Every
process of the master's tree is sampled by title (dq-master, dq-server-N, dq-timer-N,
dq-consumer-N, dq-checker, dq-web, redis-server): RSS after a warm-up ("start") and at the
end, and the growth. After the load it waits until every job not deleted was delivered.

    python bench/soak.py                   # 10 minutes
    python bench/soak.py --seconds 120 --rate 300

Last line: RESULT seconds=... adds=... delivered=... rss_growth_kb_max=... (then lost=,
gets=, dels=, calls=, failed_calls=, restarts=).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import free_port, register, tempdir, wait_port
from dq.client import AsyncDqClient
from dq.errors import DqError

WEB_PW = "soak-pw"


# the receiver -------------------------------------------------------------------------------

class Receiver:
    """A lean HTTP/1.1 callback receiver: keep-alive, Content-Length bodies, by X-Dq-Id."""

    def __init__(self, fail: float, rng: random.Random) -> None:
        self.fail, self.rng = fail, rng
        self.delivered: set[str] = set()
        self.calls = 0
        self.failed = 0
        self.duplicates = 0
        self.conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def close(self) -> None:
        """Close every connection; each handler then ends on its own (cancelling them would
        make Python 3.11's start_server log a CancelledError per connection)."""
        for writer in self.conns.values():
            writer.transport.abort()
        if self.conns:
            await asyncio.wait(set(self.conns), timeout=5)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.conns[task] = writer
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length, job = 0, ""
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"x-dq-id":
                        job = value.strip().decode()
                await reader.readexactly(length)
                await asyncio.sleep(self.rng.uniform(0, 0.02))
                self.calls += 1
                if self.rng.random() < self.fail:
                    self.failed += 1
                    status, body = b"500 Oops", b'{"code":0,"msg":"succ"}'
                else:
                    if job in self.delivered:
                        self.duplicates += 1
                    self.delivered.add(job)
                    status, body = b"200 OK", b'{"code":0}'
                writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.conns.pop(task, None)
            writer.close()


# the processes --------------------------------------------------------------------------------

def tree(root: int) -> dict[int, str]:
    """pid -> title of root and all its descendants."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if stat[0] != "Z":
                parent[int(entry)] = int(stat[1])
    found, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        frontier.extend(kids)
    out = {}
    for pid in found:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        title = cmd.strip().split(" ")[0]
        out[pid] = "redis-server" if "redis-server" in title else title
    return out


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(root: int) -> dict[str, tuple[int, int]]:
    """title -> (pid, RSS KiB) over the master's tree."""
    return {title: (pid, rss_kb(pid)) for pid, title in tree(root).items()
            if title.startswith(("dq-", "redis-server"))}


# the load -----------------------------------------------------------------------------------

class Load:
    def __init__(self, port: int, web_port: int, rate: int, rng: random.Random) -> None:
        self.client = AsyncDqClient([f"127.0.0.1:{port}"], timeout=5.0)
        self.web = httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}",
                                     auth=("soak", WEB_PW), timeout=10)
        self.rate, self.rng = rate, rng
        self.expected: set[str] = set()  # added and not deleted
        self.recent: deque[str] = deque(maxlen=2000)
        self.count: Counter[str] = Counter()
        self.seq = 0

    async def tick(self, dt: float) -> None:
        n = max(1, round(self.rate * dt))
        ids = [f"s{self.seq + i + 1}" for i in range(n)]
        self.seq += n
        doomed = {jid for jid in ids if int(jid[1:]) % 10 == 0}  # deleted before due
        jobs = [{"topic": "soak", "id": jid, "body": {"pad": "x" * 64},
                 "delay": 30 if jid in doomed else self.rng.uniform(0, 5)} for jid in ids]
        res = await self.client.add_many(jobs)
        for jid, err in zip(ids, res, strict=True):
            if err is None:
                self.count["adds"] += 1
                self.recent.append(jid)
                if jid in doomed:
                    await self.delete_soon(jid)
                else:
                    self.expected.add(jid)
            else:
                self.count["add_errors"] += 1
        for jid in self.rng.sample(list(self.recent), min(len(self.recent), max(1, n // 4))):
            found = await self.client.get("soak", jid)
            self.count["gets"] += 1
            self.count["gets_found"] += found is not None

    async def delete_soon(self, jid: str) -> None:
        if await self.client.delete("soak", jid):
            self.count["dels"] += 1
        else:
            self.count["del_missing"] += 1

    async def console(self) -> None:
        for path in ("/healthz", "/api/stats", "/api/topics/soak"):
            r = await self.web.get(path)
            self.count["web_ok" if r.status_code == 200 else "web_fail"] += 1

    async def close(self) -> None:
        await self.client.close()
        await self.web.aclose()


async def soak(args: argparse.Namespace, tmp: Path) -> int:
    rng = random.Random(args.seed)
    receiver = Receiver(args.fail, random.Random(rng.random()))
    http = await asyncio.start_server(receiver.serve, "127.0.0.1", 0, backlog=1024)
    callback = f"http://127.0.0.1:{http.sockets[0].getsockname()[1]}/cb"
    data = tmp / "var"
    data.mkdir()
    register(f"sqlite:///{data / 'dq.sqlite3'}", "soak", callback, delay=5, max_attempts=20)
    port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), DQ_RETRY_UNIT="1",
               DQ_LEASE="10", DQ_GRACE="5")
    argv = [sys.executable, "-m", "dq.cli", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data), "--servers", str(args.servers), "--timers",
            str(args.timers), "--consumers", str(args.consumers), "--web-port", str(web_port),
            "--web-host", "127.0.0.1", "--web-password", WEB_PW]
    log = open(tmp / "master.log", "wb")  # noqa: SIM115
    master = subprocess.Popen(argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    load: Load | None = None
    try:
        wait_port(port, 30)
        wait_port(web_port, 30)
        boot = sample(master.pid)
        print(f"dq-master pid {master.pid}: {len(boot)} processes: {sorted(boot)}", flush=True)
        load = Load(port, web_port, args.rate, rng)
        warmup = min(30.0, args.seconds / 10)
        t0 = time.monotonic()
        start: dict[str, tuple[int, int]] = {}
        peak: dict[str, int] = {}
        next_report = t0 + args.report
        next_console = t0
        tick = 0.1
        while (now := time.monotonic()) - t0 < args.seconds:
            await load.tick(tick)
            if now >= next_console:
                await load.console()
                next_console = now + 5
            if not start and now - t0 >= warmup:
                start = sample(master.pid)
            if now >= next_report:
                snap = sample(master.pid)
                for title, (_, kb) in snap.items():
                    peak[title] = max(peak.get(title, 0), kb)
                total = sum(kb for _, kb in snap.values())
                print(f"t={now - t0:6.0f}s adds={load.count['adds']} "
                      f"delivered={len(receiver.delivered)} calls={receiver.calls} "
                      f"RSS total {total / 1024:.0f} MiB", flush=True)
                next_report = now + args.report
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - now)))
        end = sample(master.pid)
        ran = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while not load.expected <= receiver.delivered and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        lost = load.expected - receiver.delivered
    finally:
        if load is not None:
            await load.close()
        master.send_signal(signal.SIGTERM)
        try:
            rc = master.wait(60)
        except subprocess.TimeoutExpired:
            master.kill()
            rc = -9
        log.close()
        http.close()
        await receiver.close()
    print(f"\n{'process':<16}{'boot KiB':>10}{'start KiB':>11}{'end KiB':>10}{'growth KiB':>12}"
          f"{'peak KiB':>10}")
    growth = {}
    for title in sorted(set(start) | set(end)):
        s, e = start.get(title, (0, 0)), end.get(title, (0, 0))
        same = s[0] == e[0]
        growth[title] = e[1] - s[1] if same else 0
        note = "" if same else "  (restarted: pid changed)"
        print(f"{title:<16}{boot.get(title, (0, 0))[1]:>10}{s[1]:>11}{e[1]:>10}"
              f"{growth[title]:>12}{peak.get(title, e[1]):>10}{note}")
    restarts = sum(1 for t in start if t in end and start[t][0] != end[t][0])
    c = load.count
    print(f"\n{c['adds']} adds ({c['add_errors']} refused), {c['gets']} gets "
          f"({c['gets_found']} found), {c['dels']} deletes, {receiver.calls} callbacks "
          f"({receiver.failed} answered 500 and retried), {len(receiver.delivered)} jobs "
          f"delivered ({receiver.duplicates} twice), {len(lost)} lost; console calls "
          f"{c['web_ok']} ok, {c['web_fail']} failed; master exit {rc}")
    worst = max(growth.values(), default=0)
    print(f"RESULT seconds={ran:.0f} adds={c['adds']} delivered={len(receiver.delivered)} "
          f"rss_growth_kb_max={worst} lost={len(lost)} gets={c['gets']} dels={c['dels']} "
          f"calls={receiver.calls} failed_calls={receiver.failed} restarts={restarts}")
    return 0 if not lost and rc == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="load duration (default 600)")
    p.add_argument("--rate", type=int, default=200, help="adds per second (default 200)")
    p.add_argument("--fail", type=float, default=0.1,
                   help="share of callbacks answered 500 (default 0.1)")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--timers", type=int, default=2)
    p.add_argument("--consumers", type=int, default=2)
    p.add_argument("--report", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempdir() as tmp:
        try:
            return asyncio.run(soak(args, Path(tmp)))
        except DqError as exc:
            print(f"soak failed: {exc.err}: {exc.msg}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
