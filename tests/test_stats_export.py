"""dq's counters exported to the original console's dq_stat rows (dq/roles/statexport.py), on SQLite
and on real MariaDB, from a real redis-server whose counters dq's own scripts bumped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa

from dq.registry.core import Registry, Topic
from dq.roles.statexport import StatExporter
from dq.sharding.shards import ShardSet
from dq.storage.store import Store
from tests.support.redisproc import RedisProcess

# php-delayqueue's dq_stat keys (DqRedis::incr_nums / redis_self_incr, DqModule::notify,
# read back by DqWeb/index.php): per topic "<dq_topic.id>:<key>", per shard
# "redis:<dq_redis.id>:<key>"; days as date('Ymd').
TOPIC_KEYS = ("total_write", "tw:{d}", "total_notfiy", "tn:{d}", "te:{d}", "total_del",
              "tdel:{d}")
SHARD_KEYS = ("dq_write_total_nums", "dq_notify_total_nums", "dq_del_total_nums")


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    reg = Registry(db_url)
    yield reg
    reg.close()


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[Store]:
    s = Store(ShardSet.from_urls([redis_server.url]), buckets=2)
    yield s
    await s.shards.close()


def stat_rows(reg: Registry) -> dict[str, int]:
    with reg.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT u_key, num FROM dq_stat")).all()
    return {k: int(n) for k, n in rows}


async def traffic(store: Store, topic: str, n: int, *, ok: int, retry: int, bury: int,
                  dels: int) -> None:
    """n adds due now, then ok acks, retry retries and bury burials of them (through dq's
    scripts, as its consumers make them), and dels more jobs added and deleted."""
    shard = store.shards.shards[0]
    for i in range(n):
        await store.add(topic, f"j{i}-{id(store)}-{asyncio.get_running_loop().time()}",
                        {"i": i}, delay_ms=0)
    await asyncio.sleep(0.01)
    await store.move_due(shard, range(store.buckets))
    claimed = await store.claim(shard, n, (1, 2, 3), 60_000)
    assert len(claimed) == n
    for c in claimed[:ok]:
        assert await store.ack(c)
    for c in claimed[ok:ok + retry]:
        assert await store.retry(c, 60_000)
    for c in claimed[ok + retry:ok + retry + bury]:
        assert await store.bury(c, {"error": "x"})
    for i in range(dels):
        await store.add(topic, f"del{i}", {"i": i}, delay_ms=60_000)
        assert await store.delete(topic, f"del{i}")


async def test_counters_keep_the_original_console_moving(
        registry: Registry, store: Store, redis_server: RedisProcess) -> None:
    order = registry.save_topic(Topic(topic="order", callback="http://h/o"))
    pay = registry.save_topic(Topic(topic="pay", callback="http://h/p"))
    rid = registry.save_shard("r1", f"127.0.0.1:{redis_server.port}").id
    day = store.clock.day()
    registry.stat_incr(f"{order.id}:total_write", 100)  # the original's, before cut-over
    registry.stat_incr(f"redis:{rid}:dq_notify_total_nums", 50)
    await traffic(store, "order", 5, ok=3, retry=1, bury=1, dels=1)
    await traffic(store, "pay", 2, ok=2, retry=0, bury=0, dels=0)

    exporter = StatExporter(store, registry)
    await exporter.export()
    rows = stat_rows(registry)
    o, p = order.id, pay.id
    # writes count adds and retries' re-adds, as the original's handle() did for both
    assert {k: rows.get(k) for k in (f"{o}:total_write", f"{o}:tw:{day}", f"{o}:total_notfiy",
                                     f"{o}:tn:{day}", f"{o}:te:{day}", f"{o}:total_del",
                                     f"{o}:tdel:{day}")} == {
        f"{o}:total_write": 100 + 6 + 1, f"{o}:tw:{day}": 7, f"{o}:total_notfiy": 5,
        f"{o}:tn:{day}": 5, f"{o}:te:{day}": 2, f"{o}:total_del": 1, f"{o}:tdel:{day}": 1}
    assert (rows[f"{p}:total_write"], rows[f"{p}:total_notfiy"]) == (2, 2)
    assert f"{p}:te:{day}" not in rows
    assert (rows[f"redis:{rid}:dq_write_total_nums"], rows[f"redis:{rid}:dq_notify_total_nums"],
            rows[f"redis:{rid}:dq_del_total_nums"]) == (9, 50 + 7, 1)

    # Nothing new: nothing added, however often it runs (no double counting).
    for _ in range(3):
        assert await exporter.export() == {}
    assert stat_rows(registry) == rows

    # More traffic, exported by two instances at once (each its own registry and store):
    # every gain lands once.
    await traffic(store, "order", 4, ok=4, retry=0, bury=0, dels=2)
    other_reg = Registry(str(registry.engine.url.render_as_string(hide_password=False)))
    other_store = Store(ShardSet.from_urls([redis_server.url]), buckets=2)
    try:
        await asyncio.gather(exporter.export(), StatExporter(other_store, other_reg).export())
    finally:
        other_reg.close()
        await other_store.shards.close()
    rows2 = stat_rows(registry)
    assert rows2[f"{o}:total_write"] == 107 + 4 + 2
    assert rows2[f"{o}:total_notfiy"] == 5 + 4
    assert rows2[f"{o}:tdel:{day}"] == 3
    assert rows2[f"redis:{rid}:dq_notify_total_nums"] == 57 + 4


def test_exports_racing_in_threads_count_each_gain_once(
        registry: Registry, redis_server: RedisProcess) -> None:
    """Four exporters at once, each in its own thread with its own registry, while dq's
    counters grow: dq_stat ends equal to them."""
    order = registry.save_topic(Topic(topic="order", callback="http://h/o"))
    url = registry.engine.url.render_as_string(hide_password=False)
    stop = threading.Event()
    errors: list[BaseException] = []

    def exporter() -> None:
        async def main() -> None:
            reg = Registry(url)
            st = Store(ShardSet.from_urls([redis_server.url]), buckets=2)
            try:
                while not stop.is_set():
                    await StatExporter(st, reg).export()
            finally:
                reg.close()
                await st.shards.close()
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    async def writes() -> None:
        st = Store(ShardSet.from_urls([redis_server.url]), buckets=2)
        try:
            for i in range(300):
                await st.add("order", str(i), {}, delay_ms=60_000)
        finally:
            await st.shards.close()

    threads = [threading.Thread(target=exporter) for _ in range(4)]
    for t in threads:
        t.start()
    asyncio.run(writes())
    stop.set()
    for t in threads:
        t.join(60)
    assert errors == []

    async def final() -> None:
        st = Store(ShardSet.from_urls([redis_server.url]), buckets=2)
        try:
            await StatExporter(st, registry).export()
        finally:
            await st.shards.close()
    asyncio.run(final())
    assert stat_rows(registry)[f"{order.id}:total_write"] == 300
