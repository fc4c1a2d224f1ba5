"""Crash and restart tests of the whole system: a real dq-master subprocess (`python -m
dq.cli`), its children, a real redis-server and a real HTTP receiver that is slow and fails.

What php-delayqueue got wrong and these show cannot happen here:
- a consumer killed mid-callback lost its job for good        -> test_consumer_killed_...
- a callback answering HTTP 500 with any body counted as done -> test_chaos_kill_9_...
- its restart failed to bind for 62 s (SO_REUSEADDR too late) -> test_bind_at_once_...
- `kill -USR2` stopped the whole service instead of reloading -> test_usr2_reloads_...
- a server blocked in accept() delayed the stop by 24 s       -> test_usr2_reloads_...
And a Redis shard that restarts (AOF, appendfsync always) loses no acknowledged add.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dq.client import AsyncDqClient
from dq.errors import DqError
from tests.support.chaos import Flaky, add_acked, receiving, register
from tests.support.masters import Master, kill_quietly
from tests.support.procs import free_port
from tests.support.receiver import Receiver, Reply, Request
from tests.support.redisproc import RedisProcess
from tests.support.waits import until

PING = b'0014{"cmd":"ping"}'

pytestmark = pytest.mark.slow


# -- processes ----------------------------------------------------------------------------------

def ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(PING)
            return s.recv(64).startswith(b"0033{\"code\":1")
    except OSError:
        return False


@pytest.fixture
def masters(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []

    def make(args: list[str], env: dict[str, str] | None = None, *, port: int = 0,
             home: Path | None = None) -> Master:
        m = Master(home or tmp_path / f"m{len(started)}", port or free_port(),
                   ["--no-web", *args], env or {})
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop(timeout=10)


# -- a receiver that is slow and fails ---------------------------------------------------------


# -- adding with retries -----------------------------------------------------------------------


# -- a) kill -9 a random child every second ----------------------------------------------------

ROLES = ("dq-server-", "dq-timer-", "dq-consumer-")


@dataclass
class Killer:
    master: Master
    rng: random.Random
    kills: list[tuple[float, str]] = field(default_factory=list)

    def kill_one(self) -> None:
        victims = [(pid, t) for pid, t in self.master.workers().items() if t.startswith(ROLES)]
        if victims:
            pid, title = self.rng.choice(victims)
            kill_quietly(pid)
            self.kills.append((time.time(), title))

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            self.kill_one()


def explain(dups: dict[str, list[float]], kills: list[tuple[float, str]],
            window: float) -> tuple[dict[str, str], list[str]]:
    """Why each job got a second 2xx: a consumer killed within `window` s after (or 0.1 s
    before) the request that got its first 2xx arrived had not acked it yet."""
    consumer_kills = [t for t, title in kills if title.startswith("dq-consumer-")]
    why, unexplained = {}, []
    for jid, times in dups.items():
        first = times[0]
        hit = [k for k in consumer_kills if first - 0.1 <= k <= first + window]
        if hit:
            why[jid] = f"consumer killed {hit[0] - first:+.2f}s after its first 2xx call came"
        else:
            unexplained.append(jid)
    return why, unexplained


async def test_chaos_kill_9_children_while_jobs_flow_delivers_every_job(
        masters: Callable[..., Master], redis_server: RedisProcess, tmp_path: Path) -> None:
    n_jobs, add_for, lead = 5000, 20.0, 2.0
    rng = random.Random(int(os.environ.get("DQ_CHAOS_SEED", "1")))
    flaky = Flaky(rng=random.Random(rng.random()))
    async with receiving(flaky) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "chaos", rcv.url("/cb"))
        m = masters(["--redis", redis_server.url, "--db", db, "--servers", "2",
                     "--timers", "2", "--consumers", "2"],
                    {"DQ_RETRY_UNIT": "1", "DQ_LEASE": "3", "DQ_TIMER_TICK": "0.2",
                     "DQ_MAX_ATTEMPTS": "30", "DQ_GRACE": "3"})
        await asyncio.to_thread(m.wait_titles, {"dq-server-0", "dq-server-1", "dq-timer-0",
                                                "dq-timer-1", "dq-consumer-0",
                                                "dq-consumer-1"}, exact=False)
        killer = Killer(m, random.Random(rng.random()))
        client = AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=3.0)
        retried: set[str] = set()
        reconnects = 0
        t0 = time.monotonic()
        deadline = t0 + 80
        kill_task = asyncio.create_task(killer.run(add_for + lead + 2))
        # 5,000 jobs added in 100 waves over 20 s, each due `lead` s after it is added
        waves = 100
        for w in range(waves):
            due = int((time.time() + lead) * 1000)
            jobs = [{"topic": "chaos", "id": f"j{i}", "body": {"i": i}, "due_ms": due}
                    for i in range(w * n_jobs // waves, (w + 1) * n_jobs // waves)]
            reconnects += await add_acked(client, jobs, retried, deadline)
            await asyncio.sleep(max(0.0, t0 + (w + 1) * add_for / waves - time.monotonic()))
        added_in = time.monotonic() - t0
        await kill_task
        want = {f"j{i}" for i in range(n_jobs)}
        while not want <= flaky.delivered() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        took = time.monotonic() - t0
        await client.close()
        missing = want - flaky.delivered()
        rc = await asyncio.to_thread(m.stop)
    dups = flaky.duplicates()
    why, unexplained = explain(dups, killer.kills, window=1.5)
    by_role = Counter(title.rsplit("-", 1)[0] for _, title in killer.kills)
    restarts = len(m.seen) - 6
    print(f"\nchaos: {n_jobs} jobs added in {added_in:.1f}s ({len(retried)} adds retried "
          f"after 'unavailable', {reconnects} batches resent by the client on a new "
          f"connection after its server was killed), all delivered after {took:.1f}s; "
          f"{sum(flaky.calls.values())} callbacks, {sum(flaky.failed.values())} answered 500 "
          f"and retried; kill -9: {dict(by_role)} ({len(killer.kills)} in all), "
          f"{restarts} children respawned; delivered twice: {len(dups)} "
          f"({len(why)} in flight at a consumer kill, {len(unexplained)} otherwise)",
          file=sys.stderr)
    for jid in list(why)[:5]:
        print(f"  {jid}: {why[jid]}", file=sys.stderr)
    assert not missing, f"{len(missing)} jobs never got a 2xx, e.g. {sorted(missing)[:5]}"
    assert set(flaky.calls) == want, "a callback for a job that was never added"
    assert flaky.attempts_after_500 >= sum(flaky.failed.values()) * 0.9, \
        "a 500 must be retried, whatever its body says"
    assert not unexplained, \
        f"{len(unexplained)} jobs delivered twice with no consumer killed around their first " \
        f"2xx: {[(j, dups[j]) for j in unexplained[:5]]}; kills {killer.kills}"
    assert restarts >= len(killer.kills) - 2, "the master did not replace killed children"
    assert rc == 0, m.output()[-3000:]


# -- a') the same, deterministic: kill -9 a consumer while its callback hangs ---------------

async def test_consumer_killed_mid_callback_does_not_lose_the_job(
        masters: Callable[..., Master], redis_server: RedisProcess, tmp_path: Path) -> None:
    release = asyncio.Event()
    arrivals: list[tuple[float, int]] = []

    async def hang_first(req: Request) -> Reply:
        arrivals.append((time.time(), req.attempt))
        if len(arrivals) == 1:
            await release.wait()  # the consumer is killed while this callback is open
        return 200, b'{"code":0}'

    async with Receiver(hang_first) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "held", rcv.url("/cb"))
        m = masters(["--redis", redis_server.url, "--db", db, "--timers", "1",
                     "--consumers", "1"], {"DQ_LEASE": "2", "DQ_TIMER_TICK": "0.2"})
        await asyncio.to_thread(m.wait_titles, {"dq-server-0", "dq-timer-0", "dq-consumer-0"},
                                exact=False)
        async with AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=15.0) as client:
            await client.add("held", "only-one", {"order": 1}, delay=0)
        deadline = time.monotonic() + 10
        while not arrivals and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert arrivals, "the callback never came"
        [(consumer, _)] = [(p, t) for p, t in m.workers().items() if t == "dq-consumer-0"]
        kill_quietly(consumer)
        killed = time.time()
        release.set()  # its answer now goes to a dead socket
        deadline = time.monotonic() + 15
        while len(arrivals) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        rc = await asyncio.to_thread(m.stop)
    assert len(arrivals) >= 2, "the job was lost with the consumer"
    again, attempt = arrivals[1]
    print(f"\nconsumer killed mid-callback: called again {again - killed:.1f} s after the "
          f"kill (lease 2 s), X-Dq-Attempt {attempt}", file=sys.stderr)
    assert [a for _, a in arrivals[:2]] == [1, 2], "the redelivery must say it is the second"
    assert rc == 0


# -- b) the Redis shard restarts ---------------------------------------------------------------

async def test_redis_restart_loses_no_acknowledged_add(
        masters: Callable[..., Master], redis_server: RedisProcess, tmp_path: Path) -> None:
    flaky = Flaky(fail=0.0, max_ms=5)
    async with receiving(flaky) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "durable", rcv.url("/cb"))
        m = masters(["--redis", redis_server.url, "--db", db, "--timers", "1",
                     "--consumers", "1"],
                    {"DQ_RETRY_UNIT": "1", "DQ_LEASE": "3", "DQ_TIMER_TICK": "0.2"})
        await asyncio.to_thread(m.wait_titles, {"dq-server-0", "dq-timer-0", "dq-consumer-0"},
                                exact=False)
        client = AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=2.0)
        acked: list[str] = []
        refused = 0
        outage: tuple[float, float] = (0.0, 0.0)

        async def adder(seconds: float) -> None:
            nonlocal refused
            end, i = time.monotonic() + seconds, 0
            while time.monotonic() < end:
                jobs: list[dict[str, Any]] = [{"topic": "durable", "id": f"d{i + k}", "body": {},
                         "due_ms": int((time.time() + 1.5) * 1000)} for k in range(20)]
                i += 20
                try:
                    res = await client.add_many(jobs)
                except DqError:
                    refused += len(jobs)
                    res = []
                for job, err in zip(jobs, res, strict=False):
                    if err is None:
                        acked.append(job["id"])
                    else:
                        refused += 1
                await asyncio.sleep(0.05)

        add_task = asyncio.create_task(adder(8.0))
        await asyncio.sleep(3.0)
        # kill -9: only what was fsynced survives, so only acknowledged adds may come back
        assert redis_server.proc is not None
        redis_server.proc.kill()
        redis_server.proc.wait()
        down = time.time()
        await asyncio.sleep(2.0)
        await asyncio.to_thread(redis_server.start)
        outage = (down, time.time())
        await add_task
        deadline = time.monotonic() + 30
        while not set(acked) <= flaky.delivered() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await client.close()
        rc = await asyncio.to_thread(m.stop)
    lost = set(acked) - flaky.delivered()
    print(f"\nredis restart: {len(acked)} adds acknowledged, {refused} refused while the "
          f"shard was down ({outage[1] - outage[0]:.1f} s, kill -9 and AOF reload); "
          f"{len(acked) - len(lost)} delivered, {len(lost)} lost", file=sys.stderr)
    assert refused > 0, "the outage did not happen while adds flowed"
    assert not lost, f"{len(lost)} acknowledged adds lost, e.g. {sorted(lost)[:5]}"
    assert rc == 0


# -- c) bind on the same port right after kill -9 ----------------------------------------------

def time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT on this local port (what makes a bind without SO_REUSEADDR fail)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "06":
                    n += 1
    return n


async def test_bind_at_once_after_kill_9_of_master_and_children(
        masters: Callable[..., Master], redis_server: RedisProcess, tmp_path: Path) -> None:
    db = register(tmp_path / "reg" / "dq.sqlite3", "order", "http://127.0.0.1:9/")
    args = ["--redis", redis_server.url, "--db", db, "--timers", "1", "--consumers", "1"]
    first = masters(args)
    await asyncio.to_thread(first.wait_titles, {"dq-server-0"}, exact=False)
    await asyncio.to_thread(first.wait, "ping", lambda: ping(first.port))
    # connections the server side closes first end in TIME_WAIT on the server's port
    async with AsyncDqClient([f"127.0.0.1:{first.port}"]) as client:
        await client.add("order", "before-crash", {}, delay=3600)
        held = [socket.create_connection(("127.0.0.1", first.port)) for _ in range(20)]
        for s in held:
            s.sendall(PING)
            s.recv(64)
        await asyncio.to_thread(first.kill_all)
        for s in held:  # the server's side closes first: its FIN reaches each client
            s.settimeout(30)
            assert s.recv(64) == b"", "a connection outlived the kill -9"
            s.close()
    # TIME_WAIT on the server's port once the clients' FINs are answered
    lingering = await until(lambda: (n := time_wait_on(first.port)) >= 20 and n, 30,
                            "20 TIME_WAIT sockets on the server's port")
    # the control: what php-delayqueue did (SO_REUSEADDR after bind) fails here
    with socket.socket() as naive, pytest.raises(OSError) as refused:
        naive.bind(("127.0.0.1", first.port))
        naive.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    assert refused.value.errno == errno.EADDRINUSE
    t0 = time.monotonic()
    second = masters(args, port=first.port, home=tmp_path / "m-again")
    await asyncio.to_thread(second.wait, "the new master to answer",
                            lambda: ping(second.port, 0.2), 45)
    took = time.monotonic() - t0
    print(f"\nbind after kill -9: {lingering} TIME_WAIT sockets on port {first.port}; the new "
          f"master answered after {took:.2f} s", file=sys.stderr)
    assert lingering >= 20, "the test should leave TIME_WAIT sockets on the port"
    assert "cannot listen" not in second.output()
    # TIME_WAIT lasts 60 s: a master that waited it out could not answer within 30 s
    assert took < 30.0, f"the new master took {took:.1f} s to serve"
    async with AsyncDqClient([f"127.0.0.1:{second.port}"]) as client:
        assert await client.get("order", "before-crash") is not None
    assert second.stop() == 0


# -- d) USR2 reloads, TERM stops promptly ------------------------------------------------------

async def test_usr2_reloads_and_term_stops_promptly(
        masters: Callable[..., Master], redis_server: RedisProcess, tmp_path: Path) -> None:
    flaky = Flaky(fail=0.0, max_ms=1)
    async with receiving(flaky) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "reload", rcv.url("/cb"))
        m = masters(["--redis", redis_server.url, "--db", db, "--timers", "1",
                     "--consumers", "1"], {"DQ_TIMER_TICK": "0.2"})
        old = await asyncio.to_thread(
            m.wait_titles, {"dq-server-0", "dq-timer-0", "dq-consumer-0", "dq-checker"},
            exact=False)
        async with AsyncDqClient([f"127.0.0.1:{m.port}"]) as client:
            await client.add("reload", "across", {}, delay=3)
            os.kill(m.proc.pid, signal.SIGUSR2)
            pings: list[bool] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pings.append(await asyncio.to_thread(ping, m.port))
                kids = m.workers()
                if not set(old) & set(kids) and len(kids) >= len(old):
                    break
                await asyncio.sleep(0.05)
            assert m.proc.poll() is None, "USR2 stopped the master"
            assert not set(old) & set(m.workers()), "USR2 did not replace the children"
            assert all(pings), f"{pings.count(False)} of {len(pings)} pings failed in reload"
            await client.add("reload", "after", {}, delay=0)
            deadline = time.monotonic() + 15
            while not {"across", "after"} <= flaky.delivered() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        assert {"across", "after"} <= flaky.delivered()
        # idle servers sit in accept(): TERM must still stop everything at once
        t0 = time.monotonic()
        rc = await asyncio.to_thread(m.stop)
        stop_s = time.monotonic() - t0
    print(f"\nUSR2: {len(pings)} pings during the reload, none failed; TERM of an idle "
          f"master took {stop_s:.2f} s", file=sys.stderr)
    assert rc == 0 and stop_s < 5.0
