"""The add path when a shard cannot take a job: a shard that refuses writes (out of memory,
a read-only replica) says so in a line, and a shard that hangs does not hold adds."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from dq.registry.core import Registry, Topic
from dq.sharding.shards import ShardSet
from dq.storage.store import Store
from tests.support.masters import Master
from tests.support.procs import free_port
from tests.support.receiver import Receiver
from tests.support.redisproc import RedisProcess
from tests.support.server import Running, frame, raw_exchange, start_server
from tests.support.waits import until

SECRET = "body-marker-" + "x" * 200  # in every job's body: must never reach a log line


async def stop(running: Running, ctx: Any, task: asyncio.Task[None]) -> None:
    ctx.stopping.set()
    await asyncio.wait_for(task, 10)
    await running.store.shards.close()
    running.registry.close()


def add(i: int | str) -> dict[str, Any]:
    return {"cmd": "add", "topic": "order", "id": str(i), "body": {"s": SECRET}, "delay": 60}


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "write(s) refused" in r.getMessage()]


def assert_no_body_logged(caplog: pytest.LogCaptureFixture) -> None:
    for r in caplog.records:
        assert SECRET not in r.getMessage() and r.exc_info is None, r.getMessage()


async def test_a_shard_out_of_memory_says_so_and_logs_one_line(
        tmp_path: Path, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture) -> None:
    running, ctx, task = await start_server(tmp_path, [redis_server.url])
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        [ok] = await asyncio.to_thread(raw_exchange, running.port, frame(add("before")))
        assert ok["code"] == 1
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # every write that needs memory is refused
        caplog.set_level(logging.INFO)
        replies = await asyncio.to_thread(
            raw_exchange, running.port, b"".join(frame(add(i)) for i in range(20)), read=20)
        for reply in replies:
            assert reply["code"] == 0 and reply["err"] == "unavailable", reply
            assert (f"redis shard {redis_server.url} is out of memory (maxmemory): job not "
                    "stored") in reply["msg"]
            assert "ResponseError" not in reply["msg"]
        many = {"cmd": "add_many", "jobs": [{k: v for k, v in add(f"m{i}").items() if k != "cmd"}
                                             for i in range(3)]}
        [reply] = await asyncio.to_thread(raw_exchange, running.port, frame(many))
        assert [d["err"] for d in reply["data"]] == ["unavailable"] * 3
        assert "out of memory (maxmemory): job not stored" in reply["data"][0]["msg"]
        # one line for all of them (rate-limited), without the jobs' bodies or a traceback
        [line] = refusal_lines(caplog)
        assert "is out of memory (maxmemory)" in line.getMessage()
        assert_no_body_logged(caplog)
        # it still answers reads: the job stored before is there, and get works
        [got] = await asyncio.to_thread(raw_exchange, running.port,
                                        frame({"cmd": "get", "topic": "order", "id": "before"}))
        assert got["code"] == 1 and got["data"]["s"] == SECRET
        await admin.config_set("maxmemory", 0)
        [ok] = await asyncio.to_thread(raw_exchange, running.port, frame(add("after")))
        assert ok["code"] == 1
        assert await running.store.get("order", "0") is None
        assert await running.store.get("order", "after") is not None
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
        await stop(running, ctx, task)


async def test_a_read_only_replica_says_so(
        tmp_path: Path, redis_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    master, replica = redis_factory(), redis_factory()
    admin = aioredis.Redis.from_url(replica.url)
    await admin.execute_command("REPLICAOF", "127.0.0.1", master.port)
    running, ctx, task = await start_server(tmp_path, [replica.url])
    try:
        caplog.set_level(logging.INFO)
        replies = await asyncio.to_thread(
            raw_exchange, running.port, b"".join(frame(add(i)) for i in range(5)), read=5)
        for reply in replies:
            assert reply["code"] == 0 and reply["err"] == "unavailable", reply
            assert f"redis shard {replica.url} is a read-only replica: job not stored" \
                in reply["msg"]
            assert "redis+sentinel://" in reply["msg"]
        [line] = refusal_lines(caplog)
        assert "is a read-only replica" in line.getMessage()
        assert_no_body_logged(caplog)
        [pong] = await asyncio.to_thread(raw_exchange, running.port, frame({"cmd": "ping"}))
        assert pong["code"] == 1
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await admin.aclose()
        await stop(running, ctx, task)


# -- a shard that hangs: every add answered within the PHP client's 1 s --------------------

class PhpLikeClient:
    """What php-delayqueue's PHP client does: one connection, opened once and never
    reopened, and a 1 s receive timeout (SO_RCVTIMEO) on each reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(1.0)
        self.buf = b""

    def exchange(self, obj: dict[str, Any]) -> tuple[dict[str, Any], float]:
        t0 = time.monotonic()
        self.sock.sendall(frame(obj))
        while len(self.buf) < 4 or len(self.buf) < 4 + int(self.buf[:4]):
            chunk = self.sock.recv(65536)  # socket.timeout after 1 s: the PHP client fails
            assert chunk, "the server closed the connection"
            self.buf += chunk
        n = int(self.buf[:4])
        reply, self.buf = json.loads(self.buf[4:4 + n]), self.buf[4 + n:]
        return reply, time.monotonic() - t0

    def close(self) -> None:
        self.sock.close()


def wait_ping(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if raw_exchange(port, frame({"cmd": "ping"}), timeout=1.0)[0]["code"] == 1:
                return
        time.sleep(0.1)
    raise AssertionError("dq-server did not answer ping")


@pytest.mark.parametrize(("redis_timeout", "stop_for"), [("5", 3.0), ("1.5", 3.5)],
                         ids=["wakes-before-redis-timeout", "wakes-after-redis-timeout"])
async def test_adds_are_answered_within_a_second_while_a_shard_hangs_and_fire_once(
        tmp_path: Path, redis_factory: Any, redis_timeout: str, stop_for: float) -> None:
    """A real dq-master on two shards; one is stopped (SIGSTOP: its connections stay open,
    nothing is answered) while a PHP-like client adds jobs: each add is answered, stored,
    well within 1 s (before, the first ones waited redis_timeout, 5 s). The adds given up
    on the stopped shard were written to the other one; when it wakes it runs the ones
    it had received (on the connection still open, or on one dropped meanwhile): past
    their deadline, they write nothing. Each job fires exactly once."""
    a, b = redis_factory(), redis_factory()
    db = f"sqlite:///{tmp_path / 'dq.sqlite3'}"
    registry = Registry(db)
    owners = ShardSet.from_urls([a.url, b.url])
    sa, sb = aioredis.Redis.from_url(a.url), aioredis.Redis.from_url(b.url)
    async with Receiver() as rcv:
        registry.save_topic(Topic(topic="t", name="t", callback=rcv.url("/t"), method="POST"))
        registry.close()
        m = Master(tmp_path / "m", free_port(),
                   ["--timers", "1", "--consumers", "1", "--no-web", "--db", db,
                    "--redis", a.url, "--redis", b.url],
                   {"DQ_TIMER_TICK": "0.2", "DQ_REGISTRY_REFRESH": "0.3",
                    "DQ_REDIS_TIMEOUT": redis_timeout})
        try:
            await asyncio.to_thread(wait_ping, m.port)
            client = await asyncio.to_thread(PhpLikeClient, m.port)
            # Every job falls due as the shard wakes: before the checker's guest mover
            # could tidy up a second copy (it keeps the later one), so only the add path
            # itself can keep one from firing.
            due_at = time.time() + stop_for

            def add(i: int) -> tuple[dict[str, Any], float]:
                return client.exchange({"cmd": "add", "topic": "t", "id": f"j{i}",
                                        "body": {"i": i},
                                        "delay": max(0.0, due_at - time.time())})

            warm = [await asyncio.to_thread(add, i) for i in range(6)]  # both shards in use
            assert all(r["code"] == 1 for r, _ in warm), warm
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                t0, results, i = time.monotonic(), [], 6
                while time.monotonic() - t0 < stop_for:
                    results.append(await asyncio.to_thread(add, i))
                    i += 1
                    await asyncio.sleep(0.05)
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            # The stopped shard runs what was queued to it as it wakes: none of it may
            # leave a copy there of a job written to the other shard meanwhile.
            until = time.monotonic() + 2.0  # the removals are a round trip or two away
            while True:
                on_both = [set(await c.hkeys("dq:jobs")) for c in (sa, sb)]
                if not on_both[0] & on_both[1] or time.monotonic() > until:
                    break
                await asyncio.sleep(0.05)
            assert on_both[0] & on_both[1] == set(), on_both
            failed = [r for r, _ in results if r["code"] != 1]
            assert not failed, failed
            slowest = max(took for _, took in results)
            assert slowest < 1.0, slowest  # the PHP client's limit (its socket would fail)
            on_a = [f"j{k}" for k in range(6, i) if owners.owner(f"t:j{k}").name == a.url]
            assert len(on_a) >= 3, on_a  # adds whose owner was the stopped shard
            ids = [f"j{k}" for k in range(i)]
            await rcv.wait_calls(len(ids), path="/t", timeout=due_at - time.time() + 30)
            await asyncio.sleep(3.0)  # a second copy would have fired by now
            calls = collections.Counter(r.job_id for r in rcv.calls(path="/t"))
            assert set(calls) == set(ids)
            assert [j for j, n in calls.items() if n != 1] == [], calls
            assert all(r.attempt == 1 for r in rcv.calls(path="/t"))
            client.close()
        finally:
            m.stop()
            await sa.aclose()
            await sb.aclose()


class HoldingProxy:
    """A TCP proxy in front of a real redis-server that can hold back Redis's replies
    (`hold`) while passing commands on at once: a shard that ran a command in time but
    whose answer comes late (a network that stalls one way). With `lag`, every reply is
    passed on that many seconds after it came: a shard that answers, slowly."""

    def __init__(self, target_port: int, lag: float = 0.0) -> None:
        self.target_port = target_port
        self.lag = lag
        self.port = 0
        self.held = asyncio.Event()
        self.held.set()  # set: replies flow
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def hold(self) -> None:
        self.held.clear()

    def release(self) -> None:
        self.held.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        lagged: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       gate: asyncio.Event | None) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if gate is not None and self.lag:
                        lagged.put_nowait((time.monotonic() + self.lag, data))
                        continue
                    if gate is not None:
                        await gate.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        async def pass_lagged() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while True:
                    at, data = await lagged.get()
                    await asyncio.sleep(at - time.monotonic())
                    writer.write(data)
                    await writer.drain()

        for t in (asyncio.create_task(pump(reader, up_w, None)),
                  asyncio.create_task(pump(up_r, writer, self.held)),
                  asyncio.create_task(pass_lagged())):
            self._tasks.add(t)


async def test_an_add_stored_in_time_but_answered_late_leaves_no_second_copy(
        redis_factory: Any) -> None:
    """The shard ran the add before its deadline, but its answer came after the add was
    given up and written to the next shard: the copy it wrote is removed (only that
    version: a later add of the job is kept)."""
    a, b = redis_factory(), redis_factory()
    async with HoldingProxy(a.port) as proxy:
        store = Store(ShardSet.from_urls([proxy.url, b.url]), buckets=4, add_timeout=0.3)
        direct_a = aioredis.Redis.from_url(a.url)
        try:
            sa, sb = store.shards.shards
            job = next(f"j{i}" for i in range(100) if store.shards.owner(f"t:j{i}") is sa)
            await store.shards.load_scripts()  # connected, scripts loaded
            proxy.hold()
            t0 = time.monotonic()
            res = await store.add("t", job, {"x": 1}, delay_ms=60_000)
            assert res.shard == sb.name and time.monotonic() - t0 < 1.0
            assert await direct_a.hexists("dq:jobs", f"t:{job}")  # A ran it, in time
            assert not sa.up  # passed over for a while
            proxy.release()
            deadline = time.monotonic() + 5
            while await direct_a.hexists("dq:jobs", f"t:{job}"):
                assert time.monotonic() < deadline, "the late copy is still there"
                await asyncio.sleep(0.05)
            # the copy goes in the script's run; the count when its answer is read
            assert await until(lambda: store.fence.undone == 1, 5, "the undo counted")
            body = await store.get("t", job)
            assert body is not None and body["x"] == 1  # the copy on B
        finally:
            await direct_a.aclose()
            await store.shards.close()


async def _keep_talking(store: Store, shard_index: int, stop: asyncio.Event) -> None:
    """PING the shard on its connection every 50 ms: its replies keep coming (it is not
    silent), each one `lag` late."""
    shard = store.shards.shards[shard_index]
    calls: set[asyncio.Task[Any]] = set()
    while not stop.is_set():
        task = asyncio.ensure_future(shard.call("PING"))
        calls.add(task)
        task.add_done_callback(calls.discard)
        await asyncio.sleep(0.05)
    await asyncio.gather(*calls, return_exceptions=True)


async def test_a_shard_that_answers_too_slowly_for_the_deadline_is_passed_over_in_time(
        redis_factory: Any) -> None:
    """A shard whose every answer comes 1.5 s late but keeps coming (not silent: the
    fence waits for a slow shard, not a silent one) still cannot hold an add past its
    budget, add_timeout plus ADD_SPARE: the add goes to the next shard within it, and
    the copy the slow shard wrote in time is removed when its answer comes. With no
    other shard, the add is answered "unavailable" within it too. (Before, the add
    waited for the slow answer, 1.5 s.)"""
    from dq.errors import DqError
    from dq.storage.fence import ADD_SPARE

    a, b = redis_factory(), redis_factory()
    async with HoldingProxy(a.port) as proxy:
        store = Store(ShardSet.from_urls([proxy.url, b.url]), buckets=4, add_timeout=0.3)
        lone = Store(ShardSet.from_urls([proxy.url]), buckets=4, add_timeout=0.3)
        direct_a = aioredis.Redis.from_url(a.url)
        stop = asyncio.Event()
        talk: list[asyncio.Task[None]] = []
        try:
            sa, sb = store.shards.shards
            job = next(f"j{i}" for i in range(100) if store.shards.owner(f"t:j{i}") is sa)
            await store.shards.load_scripts()
            await lone.shards.load_scripts()
            proxy.lag = 1.5
            talk = [asyncio.create_task(_keep_talking(s, 0, stop)) for s in (store, lone)]
            await asyncio.sleep(1.7)  # the lagged PINGs' answers are coming in now
            t0 = time.monotonic()
            res = await store.add("t", job, {"x": 1}, delay_ms=60_000)
            took = time.monotonic() - t0
            assert res.shard == sb.name, res
            assert took < 0.3 + ADD_SPARE + 0.5, took  # budget 0.4 s; the answer: 1.5 s
            assert await direct_a.hexists("dq:jobs", f"t:{job}")  # A ran it, in time
            # its answer comes 1.5 s late: the copy on A goes then
            assert await until(lambda: store.fence.undone == 1, 10, "the late copy undone")
            assert not await direct_a.hexists("dq:jobs", f"t:{job}")
            t0 = time.monotonic()
            with pytest.raises(DqError, match=r"add_timeout") as info:
                await lone.add("t", "alone", {"x": 2}, delay_ms=60_000)
            took = time.monotonic() - t0
            assert info.value.err == "unavailable"
            assert took < 0.3 + ADD_SPARE + 0.5, took
        finally:
            stop.set()
            await asyncio.gather(*talk, return_exceptions=True)
            await direct_a.aclose()
            for s in (store, lone):
                await s.fence.close()
                await s.shards.close()


async def test_a_replacing_add_answered_late_with_no_copy_elsewhere_keeps_the_job(
        redis_server: RedisProcess) -> None:
    """One shard: a job is stored (acknowledged), then added again; the shard runs that
    add in time but its answer comes after the add was given up ("unavailable", and no
    other shard to write it to). The late copy is the only copy of the job: it stays
    (before, it was removed, and with it the job the client had stored first)."""
    from dq.errors import DqError

    async with HoldingProxy(redis_server.port) as proxy:
        store = Store(ShardSet.from_urls([proxy.url]), buckets=4, add_timeout=0.3)
        try:
            await store.add("t", "j", {"x": 1}, delay_ms=60_000)  # acknowledged
            proxy.hold()
            with pytest.raises(DqError, match=r"add_timeout"):
                await store.add("t", "j", {"x": 2}, delay_ms=60_000)
            proxy.release()
            deadline = time.monotonic() + 10
            while store.fence.late == 0 or store.fence._tasks:
                assert time.monotonic() < deadline, "the late answer never came"
                await asyncio.sleep(0.05)
            body = await store.get("t", "j")
            assert body is not None, "the job stored first is gone"
            assert body["x"] in (1, 2)
        finally:
            await store.fence.close()
            await store.shards.close()


async def test_an_add_run_after_its_deadline_writes_nothing(redis_server: RedisProcess) -> None:
    store = Store(ShardSet.from_urls([redis_server.url]), buckets=4, add_timeout=0.3)
    try:
        shard = store.shards.shards[0]
        await shard.connect()
        assert shard.conn.clock_ms is not None
        _, job = store.add_job("t", "late", {}, delay_ms=0)
        past = str(int(time.time() * 1000) - 1000)
        with pytest.raises(ResponseError, match=r"^LATE"):
            await shard.evalsha(store.batch.add_args([job], past))
        assert await shard.call("HEXISTS", store.keys.jobs, "t:late") == 0
        # a deadline built from the compared clocks is in the future on the shard's clock
        await shard.evalsha(store.batch.add_args([job], shard.conn.deadline(0.3)))
        assert await shard.call("HEXISTS", store.keys.jobs, "t:late") == 1
    finally:
        await store.shards.close()


async def test_a_lone_shard_that_hangs_gets_unavailable_within_a_second(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    """With no other shard to write to, an add on a silent shard is answered
    "unavailable" (not stored: the client may add it again) within the PHP client's 1 s,
    and adds work again as soon as it answers."""
    running, ctx, task = await start_server(tmp_path, [redis_server.url], add_timeout=0.4)
    try:
        client = await asyncio.to_thread(PhpLikeClient, running.port)
        reply, _ = await asyncio.to_thread(client.exchange, add("warm"))
        assert reply["code"] == 1
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            for i in range(4):
                reply, took = await asyncio.to_thread(client.exchange, add(f"h{i}"))
                assert reply["code"] == 0 and reply["err"] == "unavailable", reply
                assert "did not answer an add within add_timeout (0.4 s)" in reply["msg"]
                assert took < 1.0, took
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.5)
        for i in range(4):
            assert await running.store.get("order", f"h{i}") is None  # told: not stored
        reply, took = await asyncio.to_thread(client.exchange, add("after"))
        assert reply["code"] == 1, reply
        client.close()
    finally:
        await stop(running, ctx, task)


async def test_a_batch_on_a_partition_whose_slot_moved_is_given_up_at_its_cap() -> None:
    """A batch of adds went out to a cluster partition's node, which hangs; meanwhile the
    slot map has moved the slot to a node not yet connected to. The batch is given up at
    add_timeout + SLOW_SPARE all the same (before, "a connection still being made" kept
    it waiting until one was: 1.5-1.7 s seen during a failover), and the partition's
    slot map is read again."""
    from dq.errors import UNAVAILABLE
    from dq.sharding.cluster import PartitionConnection
    from dq.storage.fence import SLOW_SPARE, GivenUp, _Batch

    store = Store(ShardSet.from_urls(["redis+cluster://127.0.0.1:1"], cluster_partitions=4),
                  buckets=4, add_timeout=0.4)
    try:
        shard = store.shards.shards[0]
        assert not shard.conn.connected  # its slot's node: none yet
        told: list[BaseException | None] = []
        sent = time.monotonic() - 0.4 - SLOW_SPARE - 0.01  # sent, then nothing heard
        batch = _Batch(shard, [], [lambda _res, exc: told.append(exc)], sent)
        store.fence._overdue(batch, True)
        assert batch.given_up
        assert len(told) == 1 and isinstance(told[0], GivenUp), told
        assert told[0].err == UNAVAILABLE
        conn = shard.conn
        assert isinstance(conn, PartitionConnection)
        assert conn._tasks, "the slot map is not being read again"
    finally:
        await store.fence.close()
        await store.shards.close()
