"""Per-topic flow control end to end (issue 20): rate_limit, concurrency and paused, with
timers and consumers in-process against real redis-servers, a real HTTP receiver and a
SQLite registry. Bounds are functional and generous: the machine is shared and loaded."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dq.config import Settings
from dq.registry.core import Registry, Topic
from dq.roles.flow import shard_limits, shard_share
from dq.runtime.context import open_store
from dq.storage.store import FlowLimit, Store
from tests.support.receiver import Receiver, Reply, Request
from tests.support.redisproc import RedisProcess
from tests.support.roles import Roles


def base_settings(urls: tuple[str, ...], tmp_path: Path) -> Settings:
    return Settings(redis=urls, db=f"sqlite:///{tmp_path / 'dq.sqlite3'}", buckets=4, timers=1,
                    concurrency=64, retry_unit=1.0, lease=5.0, timer_tick=0.2, grace=5.0,
                    registry_refresh=0.2, max_attempts=5,
                    add_timeout=5.0)  # 0.4 s is for a shard with a core; tests/test_add_path.py


@pytest.fixture
def settings(redis_server: RedisProcess, tmp_path: Path) -> Settings:
    return base_settings((redis_server.url,), tmp_path)


def start_instance(roles: Roles, consumers: int = 2) -> None:
    """One dq instance's timer and consumers."""
    roles.start("timer")
    for i in range(consumers):
        roles.start("consumer", i)


class InFlight:
    """A receiver handler taking `seconds` per call, counting the calls under way."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = self.most = 0

    async def __call__(self, _req: Request) -> Reply:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.now -= 1
        return 200, b'{"code":0}'


# --------------------------------------------------------------------------------------
def test_limits_are_divided_among_the_shards_without_exceeding_them() -> None:
    names = ["s-b", "s-a", "s-c"]
    t = Topic(topic="t", callback="http://h/", rate_limit=40, concurrency=7)
    shares = [shard_share(t, i, 3) for i in range(3)]
    assert sum(s.concurrency for s in shares) == 7
    assert sorted(s.concurrency for s in shares) == [2, 2, 3]
    assert sum(s.rate for s in shares) == pytest.approx(40)
    assert all(s.burst >= 1 for s in shares)
    # every shard keeps a slot: a shard with none could never call its jobs
    low = Topic(topic="low", callback="http://h/", concurrency=1)
    assert [shard_share(low, i, 3).concurrency for i in range(3)] == [1, 1, 1]
    # the same shard gets the same share whatever the order the shards are listed in
    a = shard_limits([t], (), "s-a", names)
    assert a == shard_limits([t], (), "s-a", sorted(names))
    # a topic with held jobs but no control any more is given with no limit, so they go
    assert shard_limits([Topic(topic="free", callback="http://h/")], {"free"}, "s-a",
                        names) == [FlowLimit(topic="free")]
    assert shard_limits([Topic(topic="p", callback="http://h/", paused=True)], (), "s-a",
                        names) == [FlowLimit(topic="p", paused=True)]


async def test_a_rate_limited_topic_is_called_at_its_rate_and_holds_up_no_other(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    # "a_slow" sorts first, so its jobs come first in every bucket and ready list: an
    # unlimited topic behind them must not wait for them.
    topic("a_slow", rate_limit=40)
    topic("b_fast")
    start_instance(roles)
    due = int(time.time() * 1000) + 2500
    await asyncio.gather(*(store.add(k, str(i), {"i": i}, due_ms=due)
                           for k in ("a_slow", "b_fast") for i in range(400)))
    fast = await receiver.wait_calls(400, path="/b_fast", timeout=60)
    slow = await receiver.wait_calls(400, path="/a_slow", timeout=90)
    fast_done = max(c.at for c in fast) * 1000 - due
    print(f"\nunlimited topic: all 400 called {fast_done:.0f} ms after due")
    assert fast_done < 8000, "the unlimited topic waited behind the limited one"
    slow.sort(key=lambda c: c.at)
    rate = (len(slow) - 1) / (slow[-1].at - slow[0].at)
    print(f"rate-limited topic (40/s): {rate:.1f} calls/s over {slow[-1].at - slow[0].at:.1f} s")
    assert 30 <= rate <= 50, f"{rate:.1f} calls/s, not 40 within 25%"
    # no second of the limited topic saw much more than its rate and burst
    per_second = Counter(int(c.at - slow[0].at) for c in slow)
    assert max(per_second.values()) <= 40 * 1.25 + 4, per_second
    assert max(fast, key=lambda c: c.at).at < slow[len(slow) // 2].at
    assert Counter(c.job_id for c in slow).most_common(1)[0][1] == 1


async def test_concurrency_holds_across_two_instances_and_two_shards(
        redis_factory: Callable[..., RedisProcess], tmp_path: Path,
        receiver: Receiver) -> None:
    shards = (redis_factory().url, redis_factory().url)
    settings = base_settings(shards, tmp_path)
    registry = Registry(settings.db)
    handler = InFlight(0.5)
    receiver.routes["/capped"] = handler
    registry.save_topic(Topic(topic="capped", callback=receiver.url("/capped"), concurrency=3))
    one, two = Roles(settings), Roles(settings)
    store = open_store(settings)
    try:
        start_instance(one)
        start_instance(two)
        await asyncio.gather(*(store.add("capped", str(i), {}, delay_ms=0) for i in range(24)))
        calls = await receiver.wait_calls(24, path="/capped", timeout=60)
        print(f"\nconcurrency 3, two instances, two shards: at most {handler.most} in flight")
        assert handler.most <= 3
        assert handler.most >= 2  # each shard's share was used
        assert sorted(int(c.job_id) for c in calls) == list(range(24))
        async with asyncio.timeout(10):  # every slot given back
            while any([(await store.stats.flow_state(s, "capped"))["inflight"]
                       for s in store.shards.shards]):
                await asyncio.sleep(0.05)
    finally:
        await one.stop()
        await two.stop()
        await store.shards.close()
        registry.close()


async def test_a_dead_consumers_concurrency_slot_is_freed_when_its_lease_runs_out(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        settings: Settings) -> None:
    topic("one", concurrency=1)
    roles.start("timer")
    await store.add("one", "a", {}, delay_ms=0)
    shard = store.shards.shards[0]
    # A consumer claims the job and dies (it never writes an outcome nor frees its slot).
    async with asyncio.timeout(10):
        while not (got := await store.claim(shard, 1, [1, 2, 3], 1000,
                                            [FlowLimit("one", concurrency=1)])):
            await asyncio.sleep(0.05)
    assert got[0].flow_lease and (await store.stats.flow_state(shard, "one"))["inflight"] == 1
    await store.add("one", "b", {}, delay_ms=0)
    await asyncio.sleep(0.5)
    # Its slot is taken: a living claimer holds "b" back instead of calling it.
    assert await store.claim(shard, 5, [1, 2, 3], 1000, [FlowLimit("one", concurrency=1)]) == []
    assert (await store.stats.flow_state(shard, "one"))["held"] == 1
    roles.start("consumer")
    calls = await receiver.wait_calls(2, path="/one", timeout=20)
    assert {c.job_id for c in calls} == {"a", "b"}
    assert [c.attempt for c in calls if c.job_id == "a"] == [2]  # the cut-off delivery counted
    async with asyncio.timeout(5):
        while (await store.stats.flow_state(shard, "one"))["inflight"]:
            await asyncio.sleep(0.05)


async def test_a_paused_topic_keeps_its_jobs_calls_nothing_and_holds_up_no_other(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        registry: Registry) -> None:
    paused = topic("a_paused", paused=True)
    topic("b_free")
    start_instance(roles)
    due = int(time.time() * 1000) + 500
    await asyncio.gather(*(store.add(k, str(i), {"i": i}, due_ms=due)
                           for k in ("a_paused", "b_free") for i in range(100)))
    await receiver.wait_calls(100, path="/b_free", timeout=10)
    await asyncio.sleep(10 - (time.time() * 1000 - due) / 1000)
    assert receiver.calls(path="/a_paused") == []
    info = await store.lookup("a_paused", "7")
    assert info is not None and info.state == "ready" and info.attempt == 0
    assert (await store.stats.depths(store.shards.shards[0]))["ready"] == 100

    registry.save_topic(Topic(**{**paused.__dict__, "paused": False}))
    calls = await receiver.wait_calls(100, path="/a_paused", timeout=30)
    assert sorted(int(c.job_id) for c in calls) == list(range(100))
    assert {c.attempt for c in calls} == {1}  # waiting used up no attempt
    async with asyncio.timeout(5):
        while (await store.stats.depths(store.shards.shards[0]))["jobs"]:
            await asyncio.sleep(0.05)
    assert not await store.stats.held_topics(store.shards.shards[0])


async def test_flow_control_on_a_redis_cluster_holds_over_its_partitions(
        tmp_path: Path, receiver: Receiver) -> None:
    """On a Redis Cluster each hash-tagged partition is a shard: the flow state and the held
    lists are keys of the partition (tagged like its jobs), and the limit is shared out
    over the partitions."""
    from tests.support.rediscluster import RedisCluster  # a real 3+3 cluster (redis-cli --cluster)

    cluster = RedisCluster(tmp_path / "cluster")
    cluster.start()
    try:
        settings = base_settings((cluster.url,), tmp_path).replace(cluster_partitions=3)
        registry = Registry(settings.db)
        handler = InFlight(0.3)
        receiver.routes["/capped"] = handler
        registry.save_topic(Topic(topic="capped", callback=receiver.url("/capped"),
                                  concurrency=3))
        registry.save_topic(Topic(topic="held", callback=receiver.url("/held"), paused=True))
        roles = Roles(settings)
        store = open_store(settings)
        try:
            start_instance(roles)
            await asyncio.gather(*(store.add(k, str(i), {}, delay_ms=0)
                                   for k in ("capped", "held") for i in range(24)))
            await receiver.wait_calls(24, path="/capped", timeout=60)
            assert 1 <= handler.most <= 3
            await asyncio.sleep(1.0)
            assert receiver.calls(path="/held") == []
            held = sum([(await store.stats.flow_state(s, "held"))["held"]
                        for s in store.shards.shards])
            assert held == 24
        finally:
            await roles.stop()
            await store.shards.close()
            registry.close()
    finally:
        cluster.stop()


async def test_metrics_show_a_paused_topics_held_jobs(redis_server: RedisProcess,
                                                     tmp_path: Path) -> None:
    from tests.support.web import open_web

    async with open_web(redis_server.url, f"sqlite:///{tmp_path / 'web.sqlite3'}") as web:
        web.registry.save_topic(Topic(topic="p", callback="http://127.0.0.1:9/", paused=True))
        web.registry.save_topic(Topic(topic="c", callback="http://127.0.0.1:9/",
                                      concurrency=2))
        for i in range(5):
            await web.store.add("p", str(i), {}, delay_ms=0)
        await web.store.add("c", "1", {}, delay_ms=0)
        shard = web.store.shards.shards[0]
        await web.store.move_due(shard, range(web.store.buckets))
        limits = [FlowLimit("c", concurrency=2), FlowLimit("p", paused=True)]
        [got] = await web.store.claim(shard, 10, [1, 2, 3], 30_000, limits)
        assert got.topic == "c" and got.flow_lease
        text = (await web.api.get("/metrics")).text
        assert 'dq_topic_paused{topic="p"} 1.0' in text
        assert 'dq_topic_held_jobs{topic="p"} 5.0' in text
        assert 'dq_topic_calls_in_flight{topic="c"} 1.0' in text
        assert 'dq_topic_paused{topic="c"} 0.0' in text
        assert await web.store.release(got)
        assert not await web.store.release(got)  # freed once only
        text = (await web.api.get("/metrics")).text
        assert 'dq_topic_calls_in_flight{topic="c"} 0.0' in text


async def test_a_paused_topic_takes_adds_over_tcp_where_an_offline_one_refuses(
        redis_server: RedisProcess, tmp_path: Path) -> None:
    from dq.client import AsyncDqClient
    from dq.errors import DqError
    from tests.support.server import make_topic, start_server

    running, ctx, task = await start_server(tmp_path, [redis_server.url])
    client = AsyncDqClient([running.addr])
    try:
        running.registry.save_topic(make_topic("held", paused=True))
        async with asyncio.timeout(10):  # until the server's topic cache has it
            while True:
                try:
                    await client.add("held", "1", {"a": 1}, delay=0)
                    break
                except DqError as exc:
                    assert "not registered" in exc.msg
                    await asyncio.sleep(0.1)
        assert await running.store.get("held", "1") is not None
        with pytest.raises(DqError, match="offline"):
            await client.add("off", "1", {}, delay=0)
    finally:
        await client.close()
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await running.store.shards.close()
        running.registry.close()


async def test_a_job_replaced_and_claimed_again_while_in_flight_leaks_no_slot(
        store: Store, roles: Roles, topic: Callable[..., Topic]) -> None:
    """A job added again (replaced) while its call runs can be claimed a second time before
    the first delivery frees its slot: both outcomes written, no slot stays taken (before,
    the second claim counted the tid twice under one lease entry and one slot leaked for
    good: a topic with concurrency n stopped after n such replacements)."""
    topic("two", concurrency=2)
    roles.start("timer")
    shard = store.shards.shards[0]
    limits = [FlowLimit("two", concurrency=2)]

    async def claim_one() -> list[Any]:
        async with asyncio.timeout(10):
            while not (got := await store.claim(shard, 1, [1, 2, 3], 5000, limits)):
                await asyncio.sleep(0.05)
        return got

    await store.add("two", "a", {}, delay_ms=0)
    first = await claim_one()
    await store.add("two", "a", {"again": 1}, delay_ms=0)  # replaced while in flight
    second = await claim_one()
    assert first[0].flow_lease and second[0].flow_lease
    await store.ack(second[0])
    await store.release(second[0])
    await store.release(first[0])  # its outcome (the old version) written late
    assert (await store.stats.flow_state(shard, "two"))["inflight"] == 0


async def test_dq_move_takes_a_paused_topics_held_jobs_too(
        redis_factory: Callable[[], RedisProcess], tmp_path: Path) -> None:
    """dq-move puts ready and in-flight jobs back in their buckets to move them; jobs a
    flow-controlled topic holds back (its held list) are pending too and must move (before,
    they were left on the source, 'busy' for the guest mover)."""
    from dq.storage.move import move

    src_redis, dst_redis = redis_factory(), redis_factory()
    settings = base_settings((src_redis.url,), tmp_path)
    src = open_store(settings)
    try:
        await src.add("p", "held", {"x": 1}, delay_ms=0)
        await src.add("p", "due", {"x": 2}, delay_ms=0)
        shard = src.shards.shards[0]
        async with asyncio.timeout(10):
            while (await src.stats.depths(shard))["ready"] < 2:
                await src.move_due(shard, range(settings.buckets))
                await asyncio.sleep(0.05)
        assert await src.claim(shard, 1, [1, 2, 3], 5000, [FlowLimit("p", paused=True)]) == []
        assert (await src.stats.flow_state(shard, "p"))["held"] == 2
    finally:
        await src.shards.close()
    reports = await move([src_redis.url], [dst_redis.url], settings, wait=10)
    assert reports[0].left == 0, reports
    dst = open_store(base_settings((dst_redis.url,), tmp_path))
    try:
        assert (await dst.get("p", "held") or {}).get("x") == 1
        assert (await dst.get("p", "due") or {}).get("x") == 2
    finally:
        await dst.shards.close()
