"""Shard health, write failover and metrics against real redis-servers, a real HTTP receiver,
a real SMTP inbox (aiosmtpd) and a SQLite registry; every role runs as a task of this loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dq.client import AsyncDqClient
from dq.config import Settings
from dq.errors import UNAVAILABLE, DqError
from dq.registry.core import AlertConf, Registry, Topic
from dq.roles import checker, consumer, server, timer
from dq.roles.checker import Checker
from dq.roles.server.handler import log_request
from dq.runtime.context import Context, open_store
from dq.runtime.logs import JsonFormatter
from dq.sharding.health import HealthReader, ShardHealth, health_path, read_health, write_health
from dq.sharding.shards import COOLOFF_MIN, Shard, ShardSet
from dq.storage.store import Store
from tests.support.health import make_settings, prom_samples
from tests.support.receiver import Receiver
from tests.support.redisproc import RedisProcess
from tests.support.roles import Mailbox
from tests.support.waits import until

RoleFn = Callable[[Context], Awaitable[None]]


class Roles:
    """Roles running as tasks of this loop, each with its own Context (and own store)."""

    def __init__(self) -> None:
        self.running: list[tuple[Context, asyncio.Task[None]]] = []

    def start(self, fn: RoleFn, settings: Settings, role: str, index: int = 0) -> Context:
        ctx = Context(settings, role, index)
        self.running.append((ctx, asyncio.create_task(fn(ctx), name=ctx.name)))
        return ctx

    async def stop(self) -> None:
        for ctx, _ in self.running:
            ctx.stopping.set()
        async with asyncio.timeout(20):
            results = await asyncio.gather(*(t for _, t in self.running),
                                           return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.fixture
async def roles() -> AsyncIterator[Roles]:
    r = Roles()
    yield r
    await r.stop()


# --------------------------------------------------------------------------------------
# the pieces


async def test_breaker_fails_fast_then_closes(redis_server: RedisProcess) -> None:
    shard = Shard("s", redis_server.url)
    try:
        assert await shard.call("PING") == b"PONG"
        await asyncio.to_thread(redis_server.stop)
        with pytest.raises(DqError) as first:
            await shard.call("PING")
        assert first.value.err == UNAVAILABLE and not shard.up
        t0 = time.monotonic()
        with pytest.raises(DqError):  # open: no connect attempt at all
            await shard.call("PING")
        assert time.monotonic() - t0 < 0.5  # no connect timeout, no backoff wait
        await asyncio.to_thread(redis_server.start)
        with pytest.raises(DqError):  # still cooling off
            await shard.call("PING")
        # the cool-off (COOLOFF_MIN) ends: a trial call may go
        await until(lambda: shard.up, 5 + COOLOFF_MIN, "the cool-off over")
        assert await shard.call("PING") == b"PONG"
        assert shard.up and shard.open_until == 0.0
    finally:
        await shard.close()


@contextlib.contextmanager
def hung(proc: RedisProcess) -> Iterator[None]:
    """The shard stops answering and keeps its connections open (a stopped process, or a
    network that drops packets)."""
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)


async def test_a_hung_shard_fails_its_commands_after_redis_timeout(
        redis_server: RedisProcess) -> None:
    shard = Shard("s", redis_server.url, command_timeout=0.6)
    try:
        assert await shard.call("PING") == b"PONG"
        with hung(redis_server):
            t0 = time.monotonic()
            async with asyncio.timeout(5):
                calls = await asyncio.gather(shard.call("PING"), shard.call("GET", "x"),
                                             return_exceptions=True)
            took = time.monotonic() - t0
            assert all(isinstance(c, DqError) and c.err == UNAVAILABLE for c in calls), calls
            assert "no reply within 0.6 s" in str(calls[0])
            # at the timeout or after it, not when the hang ends (asyncio.timeout's 5 s)
            assert 0.55 < took < 4.0, took
            assert not shard.up  # the breaker is open: callers go elsewhere meanwhile
        await until(lambda: shard.up, 5 + COOLOFF_MIN, "the cool-off over")
        assert await shard.call("PING") == b"PONG"  # a new connection, once it answers
        # A quiet connection is never dropped: the clock runs only while commands wait.
        await asyncio.sleep(1.0)
        assert shard.conn.connected and await shard.call("PING") == b"PONG"
    finally:
        await shard.close()


async def test_a_hung_shard_leaves_the_other_shards_delivering_and_adding(
        redis_factory: Callable[[], RedisProcess], tmp_path: Path) -> None:
    """A consumer's claim on a hung shard holds only that shard's share of the callback
    slots, so jobs on the other shard are still called; an add whose owner hangs is
    answered once redis_timeout passes, written to the other shard."""
    a, b = redis_factory(), redis_factory()
    settings = Settings(redis=(a.url, b.url), db=f"sqlite:///{tmp_path / 'dq.sqlite3'}",
                        buckets=4, timers=1, concurrency=8, lease=30.0, timer_tick=0.2,
                        grace=1.0, registry_refresh=0.2, redis_timeout=1.0,
                        data_dir=str(tmp_path))
    reg = Registry(settings.db)
    store = open_store(settings)
    sa, sb = store.shards.shards

    def owned_by(shard: Shard, tag: str) -> str:
        return next(f"{tag}{i}" for i in range(1000) if store.shards.owner(f"t:{tag}{i}") is shard)

    ctxs = [Context(settings, "timer", 0), Context(settings, "consumer", 0)]
    tasks = [asyncio.create_task(timer.run(ctxs[0])), asyncio.create_task(consumer.run(ctxs[1]))]
    try:
        async with Receiver() as rcv:
            reg.save_topic(Topic(topic="t", name="t", callback=rcv.url("/t"), method="POST"))
            for shard, tag in ((sa, "warm-a"), (sb, "warm-b")):
                await store.add("t", owned_by(shard, tag), {}, delay_ms=0)
            await rcv.wait_calls(2, timeout=5)
            with hung(a):
                await asyncio.sleep(0.5)  # the consumer's next claim on A is waiting now
                late = owned_by(sb, "late")
                await store.add("t", late, {}, delay_ms=0)
                t0 = time.monotonic()
                await rcv.wait_calls(1, job_id=late, timeout=3)  # not held up by A
                assert time.monotonic() - t0 < 1.0
                away = owned_by(sa, "away")
                t0 = time.monotonic()
                async with asyncio.timeout(5):
                    res = await store.add("t", away, {}, delay_ms=0)
                assert res.shard == sb.name and time.monotonic() - t0 < 2.5
                await rcv.wait_calls(1, job_id=away, timeout=3)
    finally:
        for c in ctxs:
            c.stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        await store.shards.close()
        reg.close()


async def test_writable_skips_down_and_excluded_shards(tmp_path: Path) -> None:
    shards = ShardSet.from_urls(["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0",
                                 "redis://127.0.0.1:3/0"])
    path = tmp_path / "health.json"
    reader = HealthReader(path, every=0.0)
    shards.attach_health(reader)
    try:
        order = shards.order("t:1")
        assert shards.writable("t:1") is order[0]
        assert shards.writable("t:1", exclude=(order[0].name,)) is order[1]
        write_health(path, {order[0].name: ShardHealth(False, time.time(), "gone"),
                            order[1].name: ShardHealth(True, time.time(), guests=True)})
        assert shards.writable("t:1") is order[1] and not order[0].marked_up
        assert [s.has_guests for s in order] == [False, True, False]
        for s in order:
            s.mark(False)
        # none healthy: the first one not excluded, which will say why it fails
        assert shards.writable("t:1", exclude=(order[0].name,)) is order[1]
        path.unlink()
        reader.poll()
        assert all(s.up for s in order)
    finally:
        await shards.close()


async def test_store_add_fails_over_once_and_get_del_find_it(
        redis_factory: Callable[[], RedisProcess]) -> None:
    r1, r2 = redis_factory(), redis_factory()
    store = Store(ShardSet.from_urls([r1.url, r2.url]), buckets=4)
    try:
        job = next(f"j{i}" for i in range(100)
                   if store.shards.owner(f"t:j{i}").url == r2.url)
        await asyncio.to_thread(r2.stop)
        res = await store.add("t", job, {"x": 1}, delay_ms=60_000)
        assert res.shard == r1.url  # the owner refused: written to the next shard
        body = await store.get("t", job)
        assert body is not None and body["x"] == 1
        assert await store.delete("t", job)
    finally:
        await store.shards.close()


def test_health_record_roundtrip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    assert read_health(path) == {}
    write_health(path, {"redis://u:***@h:1/0": ShardHealth(False, 12.5, "refused")})
    assert read_health(path) == {"redis://u:***@h:1/0": ShardHealth(False, 12.5, "refused")}
    write_health(path, {"a": ShardHealth(True, 1.0, "", guests=True)})
    assert read_health(path)["a"].guests is True
    path.write_text('{"a": {"up": true, "since": 1.0, "error": ""}}')  # dq 0.2.0's record
    assert read_health(path)["a"] == ShardHealth(True, 1.0, "", guests=False)
    assert [p.name for p in tmp_path.iterdir()] == ["health.json"]  # no tmp file left
    path.write_text("{not json")
    with pytest.raises(ValueError):
        read_health(path)


async def test_checker_mails_once_per_outage_and_on_recovery(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["redis://127.0.0.1:1/0"], shard_down_after=2.0)
    shards = ShardSet.from_urls(settings.redis)
    c = Checker(Context(settings, "checker"), shards, mail_every=100.0)
    sent: list[str] = []

    async def fake_send(subject: str, text: str) -> bool:
        sent.append(subject)
        return True

    c._send = fake_send  # type: ignore[method-assign]
    st = c.states[settings.redis[0]]

    async def step(now: float, error: str) -> None:
        if c.observe(st, error, now):
            c.save()
        c.mail_due(now)
        await asyncio.sleep(0)

    try:
        await step(0.0, "refused")
        await step(1.9, "refused")
        assert st.up and sent == []
        await step(2.0, "refused")  # down after 2 s of failures
        assert not st.up and sent == ["[dq] redis shard redis://127.0.0.1:1/0 is DOWN"]
        assert read_health(health_path(settings))[st.name].up is False
        await step(3.0, "")
        assert st.up and sent[-1].endswith("is back UP") and len(sent) == 2
        await step(4.0, "refused")
        await step(6.5, "refused")  # down again within the mail window: no mail yet
        assert not st.up and len(sent) == 2
        await step(7.0, "")
        await step(8.0, "refused")
        await step(10.0, "refused")
        assert len(sent) == 2
        await step(103.5, "refused")  # 100 s after the last mail, and it is still down
        assert len(sent) == 3 and sent[-1].endswith("is DOWN")
        await step(104.0, "")
        assert len(sent) == 4 and sent[-1].endswith("is back UP")
    finally:
        await shards.close()


# --------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
async def test_shard_outage_failover_alert_and_recovery(
        tmp_path: Path, redis_factory: Callable[[], RedisProcess], receiver: Receiver,
        smtp: tuple[Mailbox, int], roles: Roles) -> None:
    box, smtp_port = smtp
    r1, r2 = redis_factory(), redis_factory()
    settings = make_settings(tmp_path, [r1.url, r2.url])
    registry = Registry(settings.db)
    registry.save_topic(Topic(topic="ho", name="ho", callback=receiver.url("/ho"),
                              method="POST"))
    registry.save_alert(AlertConf(host="127.0.0.1", port=smtp_port, sender="dq@example.test",
                                  redis_emails=("ops@example.test",)))
    ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    ctx = Context(settings, "server")
    roles.running.append((ctx, asyncio.create_task(server.run(ctx, ready=ready))))
    port = (await asyncio.wait_for(ready, 10)).port
    roles.start(timer.run, settings, "timer")
    roles.start(consumer.run, settings, "consumer")
    roles.start(checker.run, settings, "checker")
    probe = open_store(settings)  # to see where jobs went
    added: list[str] = []
    client = AsyncDqClient([f"127.0.0.1:{port}"], timeout=5.0)

    async def stream(seconds: float, prefix: str) -> list[str]:
        ids = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            job = f"{prefix}{len(added)}"
            await client.add("ho", job, {"n": len(added)}, delay=0.4 + (len(added) % 7) / 10)
            added.append(job)
            ids.append(job)
            await asyncio.sleep(0.01)
        return ids

    try:
        before = await stream(1.0, "a")
        on_r2 = [j for j in before if probe.shards.owner(f"ho:{j}").url == r2.url]
        assert on_r2, "no job belongs to the shard that is about to stop"

        stopped = time.monotonic()
        stop = asyncio.create_task(asyncio.to_thread(r2.stop))
        during = await stream(1.0, "b")  # while it stops and before the checker knows
        await stop
        mail_task = asyncio.create_task(box.wait_subject("is DOWN", timeout=8))
        after = await stream(2.0, "c")
        during += after
        await mail_task
        assert time.monotonic() - stopped < settings.shard_down_after + 4
        [(rcpt, text)] = [m for m in box.messages if "is DOWN" in m[1]]
        assert rcpt == ["ops@example.test"] and f"127.0.0.1:{r2.port}" in text
        record = read_health(health_path(settings))
        assert record[r2.url].up is False and record[r1.url].up is True

        # every job added since r2 stopped went to r1: all are delivered while r2 is down
        await _wait_delivered(receiver, after, timeout=8)
        assert r2.proc is None
        # jobs due much later that belong to r2 wait on r1 as guests
        later = [j for j in (f"z{i}" for i in range(200))
                 if probe.shards.owner(f"ho:{j}").url == r2.url][:5]
        for j in later:
            await client.add("ho", j, {"later": True}, delay=3600)
        on_r1, on_r2 = (next(s for s in probe.shards.shards if s.url == r.url) for r in (r1, r2))
        # the checker's record says r1 holds guests, so adds on their owners evict them
        deadline = time.monotonic() + 5
        while not read_health(health_path(settings))[r1.url].guests:
            assert time.monotonic() < deadline, "the record never said r1 holds guests"
            await asyncio.sleep(0.1)

        await asyncio.to_thread(r2.start)  # same port, AOF: its jobs come back
        await box.wait_subject("is back UP", timeout=6)
        await _wait_delivered(receiver, added, timeout=15)
        # the checker moves the guests home, so adding one again cannot make two copies
        deadline = time.monotonic() + 5
        while await on_r1.call("SCARD", probe.keys.guests) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for j in later:
            assert await on_r1.call("HGET", probe.keys.jobs, f"ho:{j}") is None
            assert await on_r2.call("HGET", probe.keys.jobs, f"ho:{j}") is not None
        # Added again: one copy, on its owner (at once, or, if this server has not yet
        # read that r2 is back, after the next sweep moves the new guest home).
        await client.add("ho", later[0], {"again": True}, delay=3600)
        deadline = time.monotonic() + 5
        while await on_r1.call("HGET", probe.keys.jobs, f"ho:{later[0]}") is not None \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await on_r1.call("HGET", probe.keys.jobs, f"ho:{later[0]}") is None
        assert b'"again":true' in await on_r2.call("HGET", probe.keys.jobs, f"ho:{later[0]}")
        assert read_health(health_path(settings))[r2.url].up is True
        deadline = time.monotonic() + 5
        while read_health(health_path(settings))[r1.url].guests:
            assert time.monotonic() < deadline, "the record still says r1 holds guests"
            await asyncio.sleep(0.1)
        assert len(box.messages) == 2
        print(f"\n{len(added)} adds ({len(before)} before the outage, {len(during)} during "
              f"it), {len(receiver.calls(path='/ho'))} callbacks")
    finally:
        await client.close()
        await probe.shards.close()
        registry.close()


async def _wait_delivered(receiver: Receiver, jobs: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        seen = {r.job_id for r in receiver.calls(path="/ho")}
        missing = [j for j in jobs if j not in seen]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} of {len(jobs)} jobs never delivered, "
                                 f"e.g. {missing[:5]}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------
# /metrics


async def test_metrics_match_jobs_added_and_delivered(
        tmp_path: Path, redis_factory: Callable[[], RedisProcess], receiver: Receiver,
        roles: Roles, caplog: pytest.LogCaptureFixture) -> None:
    from web.app import create_app

    caplog.set_level(logging.INFO, logger="dq.notify")

    r1, r2 = redis_factory(), redis_factory()
    settings = make_settings(tmp_path, [r1.url, r2.url])
    registry = Registry(settings.db)
    registry.save_topic(Topic(topic="m", name="m", callback=receiver.url("/m"), method="POST"))
    registry.save_topic(Topic(topic="idle", name="idle", callback=receiver.url("/idle")))
    store = open_store(settings)
    try:
        roles.start(timer.run, settings, "timer")
        roles.start(consumer.run, settings, "consumer")
        n_now, n_later = 30, 5
        await asyncio.gather(*(store.add("m", f"n{i}", {"i": i}, delay_ms=100)
                               for i in range(n_now)))
        for i in range(n_later):
            await store.add("m", f"l{i}", {"i": i}, delay_ms=3_600_000)
        assert await store.delete("m", "l0") and await store.delete("m", "l1")
        await receiver.wait_calls(n_now, path="/m", timeout=10)
        async with asyncio.timeout(5):
            while (await store.stats.topic_stats("m")).get("ok", 0) < n_now:
                await asyncio.sleep(0.02)

        app = create_app(settings, registry=registry, store=store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://127.0.0.1") as http:
            assert (await http.get("/metrics")).status_code == 401
            resp = await http.get("/metrics", headers={"Authorization": "Bearer pw"})
        assert resp.status_code == 200
        m = prom_samples(resp.text)

        def ev(event: str, topic: str = "m") -> float:
            return m[("dq_topic_events_total", frozenset({("topic", topic),
                                                          ("event", event)}))]

        assert ev("writes") == n_now + n_later and ev("ok") == n_now
        assert ev("notifies") == n_now and ev("dels") == 2
        assert ev("fail") == ev("retries") == ev("dead") == 0
        assert ev("writes", "idle") == 0
        for name in ("dq_delivery_lateness_seconds", "dq_callback_duration_seconds"):
            labels = frozenset({("topic", "m")})
            assert m[(name + "_count", labels)] == n_now
            assert m[(name + "_bucket", labels | {("le", "+Inf")})] == n_now
            assert m[(name + "_sum", labels)] >= 0
            assert m[(name + "_count", frozenset({("topic", "idle")}))] == 0
        # a job due 100 ms after its add is delivered well within a second of it
        assert m[("dq_delivery_lateness_seconds_bucket",
                  frozenset({("topic", "m"), ("le", "1.0")}))] == n_now
        for r in (r1, r2):
            shard = frozenset({("shard", r.url)})
            assert m[("dq_shard_up", shard)] == 1
            assert m[("dq_shard_used_memory_bytes", shard)] > 0
        delayed = sum(m[("dq_shard_jobs", frozenset({("shard", r.url), ("state", "delayed")}))]
                      for r in (r1, r2))
        assert delayed == n_later - 2
        notes = [r for r in caplog.records if r.name == "dq.notify"]
        assert len(notes) == n_now
        assert {(r.topic, r.attempt, r.status) for r in notes} == {("m", 1, 200)}  # type: ignore[attr-defined]
        assert {r.id for r in notes} == {f"n{i}" for i in range(n_now)}  # type: ignore[attr-defined]
    finally:
        await store.shards.close()
        registry.close()


def test_json_log_lines_carry_request_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("dq.request")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        log_request("add", "order", "42", "ok", time.monotonic(), "s1")
        log_request("add", "order", "43", UNAVAILABLE, time.monotonic(), "s2", "shard gone")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    ok, failed = (json.loads(line) for line in out.getvalue().splitlines())
    assert ok["logger"] == "dq.request" and ok["level"] == "INFO"
    assert (ok["topic"], ok["id"], ok["status"], ok["shard"]) == ("order", "42", "ok", "s1")
    assert ok["ms"] >= 0 and "topic=order id=42 status=ok" in ok["msg"]
    assert failed["level"] == "WARNING" and failed["error"] == "shard gone"
