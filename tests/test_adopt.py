"""php-delayqueue's pending jobs at cut-over: adopted into dq's layout and delivered, each
once, on real redis-servers holding jobs written as the original writes them, with a real
dq (store, timer and consumer in-process; then dq-master) and a real HTTP receiver."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from dq.config import Settings
from dq.registry.core import Registry, Topic
from dq.roles import consumer, timer
from dq.runtime.context import Context, open_store
from dq.storage.adopt import Adopter
from dq.storage.store import Store
from tests.support.masters import Master
from tests.support.procs import free_port
from tests.support.receiver import Receiver
from tests.support.redisproc import RedisProcess

# php-delayqueue's Redis layout, as its source has it (facts, not its code):
# DqConf::$prefix = 'dq_', DqConf::$bucket = 2; DqRedis::getJobKey() = prefix.'job_info'
# (tid "<topic>:<id>" -> json_encode(body), body carrying notify_time and dq_set_time,
# 'Y-m-d H:i:s'); getBucketKey($topic) = prefix.'bucket_'.(crc32($topic) % $bucket), scored
# by the due time in epoch seconds; getReadyQueueKey($priority) = prefix.$priority
# .'ready_queue', holding tids; a job's shard is crc32($tid) % count(servers), the servers
# being the dq_redis rows as DqMysql::select returns them: ORDER BY id DESC.
PREFIX = "dq_"
ORIG_BUCKETS = 2


def php_date(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def php_json(body: dict[str, Any]) -> str:
    """json_encode's defaults: ASCII only (\\uXXXX) and escaped slashes."""
    return json.dumps(body, separators=(",", ":")).replace("/", "\\/")


class Original:
    """Writes jobs as php-delayqueue's DqRedis::handle and its timer leave them."""

    def __init__(self, servers_by_id: dict[int, RedisProcess]) -> None:
        order = [servers_by_id[i] for i in sorted(servers_by_id, reverse=True)]
        self.clients = [redis.Redis(port=s.port) for s in order]

    def shard(self, tid: str) -> redis.Redis:
        return self.clients[zlib.crc32(tid.encode()) % len(self.clients)]

    def add(self, topic: str, job_id: str, body: dict[str, Any], due: int) -> str:
        tid = f"{topic}:{job_id}"
        full = {**body, "notify_time": php_date(due), "dq_set_time": php_date(time.time())}
        r = self.shard(tid)
        r.hset(f"{PREFIX}job_info", tid, php_json(full))
        r.zadd(f"{PREFIX}bucket_{zlib.crc32(topic.encode()) % ORIG_BUCKETS}", {tid: due})
        return tid

    def make_ready(self, topic: str, job_id: str, priority: int) -> None:
        """What its timer does with a due job: out of the bucket, onto the ready list."""
        tid = f"{topic}:{job_id}"
        r = self.shard(tid)
        r.zrem(f"{PREFIX}bucket_{zlib.crc32(topic.encode()) % ORIG_BUCKETS}", tid)
        r.rpush(f"{PREFIX}{priority}ready_queue", tid)

    def keys_left(self) -> list[bytes]:
        return [k for r in self.clients for k in r.keys(f"{PREFIX}*")]

    def close(self) -> None:
        for r in self.clients:
            r.close()


@pytest.fixture
def two_shards(redis_factory: Callable[..., RedisProcess]) -> tuple[RedisProcess, RedisProcess]:
    return redis_factory(), redis_factory()


@pytest.fixture
def settings(two_shards: tuple[RedisProcess, RedisProcess], tmp_path: Path) -> Settings:
    return Settings(redis=tuple(s.url for s in two_shards),
                    db=f"sqlite:///{tmp_path / 'dq.sqlite3'}", buckets=4, timers=1,
                    retry_unit=1.0, lease=5.0, timer_tick=0.2, grace=5.0,
                    registry_refresh=0.2, add_timeout=5.0)  # see tests/test_add_path.py


async def test_original_jobs_adopted_once_by_racing_adopters_and_delivered(
        settings: Settings, registry: Registry, store: Store, receiver: Receiver,
        two_shards: tuple[RedisProcess, RedisProcess]) -> None:
    for key, prio in (("order", 1), ("pay", 3)):
        registry.save_topic(Topic(topic=key, name=key, callback=receiver.url(f"/{key}"),
                                  method="POST", priority=prio))
    orig = Original({1: two_shards[0], 2: two_shards[1]})
    now = int(time.time())
    want: dict[str, dict[str, Any]] = {}  # tid -> fields the callback must carry
    for i in range(20):  # waiting in a bucket
        body = {"i": i, "url": "http://shop/o/1", "名": "订单"}
        tid = orig.add("order", f"d{i}", body, now + 2)
        want[tid] = {"i": str(i), "url": "http://shop/o/1", "名": "订单",
                     "notify_time": php_date(now + 2)}
    for i in range(20):  # moved to the ready list by the original's timer, not delivered
        tid = orig.add("order", f"r{i}", {"i": i}, now - 5)
        orig.make_ready("order", f"r{i}", 1)
        want[tid] = {"i": str(i), "notify_time": php_date(now - 5)}
    for i in range(3):  # due already, its timer stopped before moving them
        tid = orig.add("pay", f"p{i}", {"i": i, "exp_notify_nums": 2}, now - 60)
        want[tid] = {"i": str(i), "exp_notify_nums": "2"}
    orig.shard("pay:lost").hset(f"{PREFIX}job_info", "pay:lost", php_json({"lost": 1}))
    want["pay:lost"] = {"lost": "1"}  # popped by its consumer, which died: in no queue
    orig.shard("order:ghost").rpush(f"{PREFIX}1ready_queue", "order:ghost")  # no body

    # Traffic through dq before adoption: re-adds win over the original's stale copies
    # (one whose dq owner is the shard the original used, one whose owner is the other),
    # and a delete removes the original's copy.
    same = next(f"d{i}" for i in range(1, 19)
                if store.shards.owner(f"order:d{i}").url == _url(orig.shard(f"order:d{i}")))
    other = next(f"d{i}" for i in range(1, 19)
                 if store.shards.owner(f"order:d{i}").url != _url(orig.shard(f"order:d{i}")))
    for job_id in (same, other):
        await store.add("order", job_id, {"again": job_id}, delay_ms=0, priority=1)
        want[f"order:{job_id}"] = {"again": job_id}
    assert await store.delete("order", "d19") is True
    del want["order:d19"]
    # The original's job is found by get before adoption too.
    assert (await store.get("order", "r3") or {}).get("notify_time") == php_date(now - 5)

    # Two adopters (two dq instances) at once: each job adopted by one of them, once.
    other_store = open_store(settings)
    try:
        prios = {"order": 1, "pay": 3}
        a, b = await asyncio.gather(Adopter(store).adopt_all(prios),
                                    Adopter(other_store).adopt_all(prios))
    finally:
        await other_store.shards.close()
    total = Counter[str]()
    for counts in (*a.values(), *b.values()):
        total.update(counts)
    assert total["adopted"] == 19 - 2 + 20 + 3 + 1, total
    assert total["superseded"] == 2 and total["changed"] == 0, total
    assert orig.keys_left() == []
    stored = Counter(t.decode() for s in two_shards
                     for t in redis.Redis(port=s.port).hkeys("dq:jobs"))
    assert set(stored) == set(want) and max(stored.values()) == 1

    body = await store.get("order", "d7")
    assert body == {"i": 7, "url": "http://shop/o/1", "名": "订单",
                    "notify_time": php_date(now + 2), "dq_set_time": body["dq_set_time"]}
    info = await store.lookup("pay", "p1")
    assert info is not None and info.priority == 3 and info.attempt == 2

    tasks = []
    for role, fn in (("timer", timer.run), ("consumer", consumer.run)):
        ctx = Context(settings, role, 0)
        tasks.append((ctx, asyncio.create_task(fn(ctx))))
    try:
        await receiver.wait_calls(len(want), timeout=30)
        await asyncio.sleep(1.0)  # a duplicate would arrive now
    finally:
        for ctx, _ in tasks:
            ctx.stopping.set()
        await asyncio.gather(*(t for _, t in tasks))
    calls = receiver.requests
    got = Counter(f"{c.path.strip('/')}:{c.job_id}" for c in calls)
    assert set(got) == set(want) and max(got.values()) == 1, got
    for c in calls:
        fields = c.fields()
        tid = f"{c.path.strip('/')}:{c.job_id}"
        assert {k: fields.get(k) for k in want[tid]} == want[tid], (tid, fields)
    orig.close()


def _url(r: redis.Redis) -> str:
    return f"redis://127.0.0.1:{r.connection_pool.connection_kwargs['port']}/0"


async def test_adoption_beside_adds_and_unreadable_bodies(
        settings: Settings, registry: Registry, store: Store,
        two_shards: tuple[RedisProcess, RedisProcess]) -> None:
    """Adds flowing through dq while adopters run never lose to the original's copies, and
    a body dq cannot read is kept (a dead letter to inspect), never dropped."""
    orig = Original({1: two_shards[0], 2: two_shards[1]})
    now = int(time.time())
    for i in range(600):
        orig.add("order", str(i), {"old": i}, now + 3600)
    orig.shard("order:bad").hset(f"{PREFIX}job_info", "order:bad", "not json")

    async def adds() -> None:
        for i in range(0, 600, 3):
            await store.add("order", str(i), {"new": i}, delay_ms=3_600_000)

    adopter = Adopter(store)
    done = await asyncio.gather(adds(), adopter.adopt_all({}), adopter.adopt_all({}))
    assert orig.keys_left() == []
    for i in range(600):
        body = await store.get("order", str(i))
        assert body is not None
        assert body.get("new" if i % 3 == 0 else "old") == i, (i, body)
    counts = Counter[str]()
    for c in (*done[1].values(), *done[2].values()):
        counts.update(c)
    assert counts["adopted"] + counts["superseded"] == 601
    info = await store.lookup("order", "bad")
    assert info is not None and info.unreadable
    orig.close()


@pytest.mark.slow
def test_dq_master_adopts_on_boot_and_delivers(
        two_shards: tuple[RedisProcess, RedisProcess], tmp_path: Path) -> None:
    """dq-master started on the original's database and Redis (its jobs pending) delivers
    them all, once, and its log says how many it adopted from which shard."""
    db = tmp_path / "dq.sqlite3"
    reg = Registry(f"sqlite:///{db}")
    reg.close()

    async def main() -> None:
        async with Receiver() as rec:
            con = sqlite3.connect(db)
            for s in two_shards:  # as the original console writes them
                con.execute("INSERT INTO dq_redis (t_name, t_content) VALUES (?, ?)",
                            (f"r{s.port}", f"127.0.0.1:{s.port}"))
            con.execute("INSERT INTO dq_topic (t_name, topic, callback, method, priority) "
                        "VALUES ('o', 'order', ?, 'POST', 2)", (rec.url("/order"),))
            con.commit()
            ids = [r[0] for r in con.execute("SELECT id FROM dq_redis ORDER BY id")]
            con.close()
            orig = Original(dict(zip(ids, two_shards, strict=True)))
            now = int(time.time())
            for i in range(20):
                orig.add("order", f"r{i}", {"i": i}, now - 5)
                orig.make_ready("order", f"r{i}", 2)
            for i in range(20):
                orig.add("order", f"d{i}", {"i": i}, now + 1)
            master = Master(tmp_path / "m", free_port(),
                            ["--db", f"sqlite:///{db}", "--no-web", "--timers", "1",
                             "--consumers", "1",
                             *(a for s in two_shards for a in ("--redis", s.url))], {})
            try:
                await rec.wait_calls(40, timeout=40)
                await asyncio.sleep(1.0)
                got = Counter(c.job_id for c in rec.requests)
                assert len(got) == 40 and max(got.values()) == 1
                assert {c.fields()["i"] for c in rec.requests} == {str(i) for i in range(20)}
                lines = re.findall(r"adopted (\d+) job\(s\) php-delayqueue left on shard "
                                   r"(\S+)", master.output())
                assert sum(int(n) for n, _ in lines) == 40, master.output()[-3000:]
                assert {shard for _, shard in lines} == {s.url for s in two_shards}
                assert orig.keys_left() == []
                # The original console's counters move too (dq/roles/statexport.py, every 5 s).
                want = {"1:total_notfiy": 40, f"1:tn:{time.strftime('%Y%m%d')}": 40}

                def moved() -> bool:
                    con = sqlite3.connect(db)
                    rows = dict(con.execute("SELECT u_key, num FROM dq_stat").fetchall())
                    con.close()
                    shards = sum(rows.get(f"redis:{i}:dq_notify_total_nums", 0) for i in ids)
                    return all(rows.get(k) == n for k, n in want.items()) and shards == 40
                await asyncio.to_thread(master.wait, "dq_stat counters", moved, 20)
            finally:
                master.stop()
                orig.close()

    asyncio.run(main())


def test_dq_adopt_command_says_what_it_adopted(redis_server: RedisProcess,
                                               tmp_path: Path) -> None:
    orig = Original({1: redis_server})
    now = int(time.time())
    for i in range(7):
        orig.add("order", str(i), {"i": i}, now + 600)
    orig.add("order", "r", {"r": 1}, now - 1)
    orig.make_ready("order", "r", 2)
    argv = [sys.executable, "-c", "import sys; from dq.cli import adopt_main; "
            "adopt_main(sys.argv[1:])", "--redis", redis_server.url,
            "--db", f"sqlite:///{tmp_path / 'dq.sqlite3'}", "--data-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{redis_server.url}: adopted 8 (ready 1, delayed 7, in no queue 0)" in out.stdout
    assert "adopted 8 job(s) php-delayqueue left on shard" in out.stderr
    assert orig.keys_left() == []
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert f"{redis_server.url}: adopted 0 " in again.stdout
    orig.close()
