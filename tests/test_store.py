"""The job state machine against real redis-server processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.exceptions import NoScriptError, ResponseError

from dq.config import WAKE_WITHIN, load_settings
from dq.errors import UNAVAILABLE, ConfigError, DqError
from dq.sharding.shards import ShardSet
from dq.storage.store import ADD_BATCH, Store, make_tid
from tests.support.redisproc import RedisProcess


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[Store]:
    s = Store(ShardSet.from_urls([redis_server.url]), buckets=4)
    yield s
    await s.shards.close()


async def test_add_get_delete_roundtrip(store: Store) -> None:
    res = await store.add("order", "42", {"a": 1}, delay_ms=60_000)
    assert not res.replaced
    body = await store.get("order", "42")
    assert body is not None and body["a"] == 1
    assert set(body) == {"a", "notify_time", "dq_set_time"}
    assert await store.delete("order", "42") is True
    assert await store.get("order", "42") is None
    assert await store.delete("order", "42") is False
    stats = await store.stats.topic_stats("order")
    assert stats["writes"] == 1 and stats["dels"] == 1


async def test_readd_replaces_body_and_due(store: Store) -> None:
    r1 = await store.add("t", "1", {"x": 1}, delay_ms=60_000)
    r2 = await store.add("t", "1", {"x": 2}, delay_ms=1_000)
    assert r2.replaced and r2.due_ms < r1.due_ms
    body = await store.get("t", "1")
    assert body is not None and body["x"] == 2
    shard = store.shards.shards[0]
    assert await shard.client.zcard(store.keys.delay[store.keys.bucket("t:1")]) == 1


async def test_due_jobs_move_claim_ack(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "a", {"n": 1}, delay_ms=0, priority=1)
    await store.add("t", "b", {"n": 2}, delay_ms=0, priority=3)
    await store.add("t", "later", {"n": 3}, delay_ms=60_000)
    moved, nxt, now = await store.move_due(shard, range(store.buckets))
    assert moved == 2
    assert nxt is not None and nxt > now + 50_000
    claimed = await store.claim(shard, 10, [3, 2, 1], 30_000)
    assert [c.id for c in claimed] == ["b", "a"]  # order follows the lists asked
    assert await shard.client.zcard(store.keys.inflight) == 2
    for c in claimed:
        assert await store.ack(c)
    assert await shard.client.zcard(store.keys.inflight) == 0
    assert await store.get("t", "a") is None
    assert (await store.stats.topic_stats("t"))["ok"] == 2


async def test_deleted_or_replaced_ready_job_is_not_claimed(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "gone", {}, delay_ms=0)
    await store.add("t", "moved", {}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    await store.delete("t", "gone")
    await store.add("t", "moved", {"new": True}, delay_ms=60_000)  # re-added while ready
    assert await store.claim(shard, 10, [1, 2, 3], 30_000) == []


async def test_readd_during_delivery_not_clobbered_by_old_ack(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "1", {"gen": 1}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    [c] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    await store.add("t", "1", {"gen": 2}, delay_ms=60_000)
    assert await store.ack(c) is False
    body = await store.get("t", "1")
    assert body is not None and body["gen"] == 2
    assert not await store.retry(c, 1000)
    assert not await store.bury(c, {"error": "x"})


async def test_retry_then_bury_and_redrive(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "1", {}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    [c] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert await store.retry(c, 1000)  # due in another second than the add was
    info = await store.lookup("t", "1")
    assert info is not None and info.state == "delayed" and info.attempt == 1
    await asyncio.sleep(1.05)
    await store.move_due(shard, range(store.buckets))
    [c2] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert c2.attempt == 1 and c2.version != c.version
    # as the original: notify_time is the retry's due time, exp_notify_nums the failures
    assert c2.body["exp_notify_nums"] == 1 and c2.body["dq_set_time"] == c.body["dq_set_time"]
    assert c2.body["notify_time"] == store.clock.fmt_time(c2.due_ms) != c.body["notify_time"]
    assert await store.retry(c2, 0)
    await store.move_due(shard, range(store.buckets))
    [c2] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert c2.attempt == 2 and c2.body["exp_notify_nums"] == 2
    assert await store.bury(c2, {"status": 500})
    info = await store.lookup("t", "1")
    assert info is not None and info.state == "dead" and info.error == {"status": 500}
    dead = await store.dead_letters("t")
    assert [d.id for d in dead] == ["1"]
    assert await store.redrive("t", "1")
    info = await store.lookup("t", "1")
    assert info is not None and info.state == "delayed" and info.attempt == 0
    assert "exp_notify_nums" not in info.body
    stats = await store.stats.topic_stats("t")
    assert stats["retries"] == 2 and stats["dead"] == 1 and stats["fail"] == 3


async def test_a_retrying_job_keeps_its_last_error_until_it_is_done(store: Store) -> None:
    """retry.lua keeps the failed attempt's error with the job while it waits; a later
    success (ack), a replacing add and a delete each take it away, so none is left behind
    and a fresh job never shows an old error."""
    shard = store.shards.shards[0]

    async def claim() -> Any:
        await store.move_due(shard, range(store.buckets))
        [c] = await store.claim(shard, 1, [1, 2, 3], 30_000)
        return c

    async def errors() -> int:
        return int(await shard.call("HLEN", store.keys.dead_err))

    await store.add("t", "1", {}, delay_ms=0)
    c = await claim()
    err = {"status": 500, "error": "HTTP 500", "reply": "down", "attempts": 1, "at": 1}
    assert await store.retry(c, 60_000, error=err)
    info = await store.lookup("t", "1")
    assert info is not None and (info.state, info.attempt, info.error) == ("delayed", 1, err)
    assert info.retrying and info.due_ms >= int(time.time() * 1000) + 50_000

    await store.add("t", "2", {}, delay_ms=0)
    c2 = await claim()
    assert await store.retry(c2, 0, error={**err, "error": "timeout"})
    assert await store.ack(await claim())  # the retry succeeded: its error goes with it
    assert await store.lookup("t", "2") is None and await errors() == 1

    await store.add("t", "1", {"new": True}, delay_ms=60_000)  # replaced: a fresh job
    info = await store.lookup("t", "1")
    assert info is not None and info.error is None and not info.retrying
    assert await errors() == 0

    await store.add("t", "3", {}, delay_ms=0)
    assert await store.retry(await claim(), 60_000, error=err)
    assert await store.delete("t", "3") and await errors() == 0

    # an error left on this shard by an earlier job of the id (a guest since moved home)
    # is not a fresh job's
    await store.add("t", "4", {}, delay_ms=60_000)
    await shard.call("HSET", store.keys.dead_err, make_tid("t", "4"), json.dumps(err))
    info = await store.lookup("t", "4")
    assert info is not None and info.error is None and not info.retrying


async def test_expired_lease_requeues(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "1", {}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    [c] = await store.claim(shard, 1, [1, 2, 3], 50)
    assert await store.maintenance.requeue_expired(shard) == 0
    await asyncio.sleep(0.1)
    assert await store.maintenance.requeue_expired(shard) == 1
    [again] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert again.tid == c.tid and again.version == c.version
    assert (c.attempt, again.attempt) == (0, 1)  # the delivery cut off counts
    assert again.body == c.body and (again.due_ms, again.set_ms) == (c.due_ms, c.set_ms)


async def test_expired_lease_of_a_dq01_payload_counts_too(store: Store) -> None:
    """A dq 0.1 JSON payload keeps its form; its "n" goes up, whatever its body holds."""
    shard = store.shards.shards[0]
    tid = make_tid("t", "old")
    old = json.dumps({"v": "abc1", "p": 2, "topic": "t", "id": "old", "due": 1000, "n": 3,
                      "set": 900, "body": {"n": 7, "x": ',"n":1'}}, separators=(",", ":"))
    await shard.client.hset(store.keys.jobs, tid, old)
    await shard.client.rpush(store.keys.ready[1], f"abc1|{tid}")
    [c] = await store.claim(shard, 1, [1, 2, 3], 10)
    await asyncio.sleep(0.05)
    assert await store.maintenance.requeue_expired(shard) == 1
    [again] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert (c.attempt, again.attempt) == (3, 4) and again.version == "abc1"
    assert again.body["n"] == 7 and again.body["x"] == ',"n":1'


async def test_park_puts_a_job_back_without_counting(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "p", {}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    [c] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert await store.park(c, 200)
    info = await store.lookup("t", "p")
    assert info is not None and info.state == "delayed" and info.attempt == 0
    await asyncio.sleep(0.3)
    await store.move_due(shard, range(store.buckets))
    [again] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert again.attempt == 0 and again.version == c.version
    await store.add("t", "p", {"new": 1}, delay_ms=60_000)  # replaced while claimed
    assert not await store.park(again, 0)
    info = await store.lookup("t", "p")
    assert info is not None and info.state == "delayed" and info.body["new"] == 1


async def test_add_wakes_timer_only_for_new_earliest(store: Store) -> None:
    shard = store.shards.shards[0]
    tid = make_tid("t", "x")
    wake = store.keys.wake[store.keys.bucket(tid)]
    await store.add("t", "x", {}, delay_ms=10_000)
    assert await shard.client.llen(wake) == 1
    await shard.client.delete(wake)
    await store.add("t", "x", {}, delay_ms=20_000)  # still the earliest (only one)
    assert await shard.client.llen(wake) == 1
    await shard.client.delete(wake)
    # another job of the bucket, due after x: the timer already sleeps until x
    later = next(f"y{i}" for i in range(100)
                 if store.keys.bucket(make_tid("t", f"y{i}")) == store.keys.bucket(tid))
    await store.add("t", later, {}, delay_ms=30_000)
    assert await shard.client.llen(wake) == 0
    # and due before x: it is the bucket's earliest now
    await store.add("t", later, {}, delay_ms=5_000)
    assert await shard.client.llen(wake) == 1


async def test_add_due_beyond_the_longest_tick_wakes_no_timer(store: Store) -> None:
    """A timer looks at its buckets at least every timer_tick <= WAKE_WITHIN on its own:
    a job due later than that needs no wake (and the add no look at its bucket)."""
    shard = store.shards.shards[0]
    wake = store.keys.wake[store.keys.bucket(make_tid("t", "far"))]
    await store.add("t", "far", {}, delay_ms=int(WAKE_WITHIN * 1000) + 5_000)
    assert await shard.client.llen(wake) == 0
    await store.add("t", "far", {}, delay_ms=int(WAKE_WITHIN * 1000) - 5_000)
    assert await shard.client.llen(wake) == 1


def test_timer_tick_longer_than_the_wake_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="timer_tick must be"):
        load_settings({"timer_tick": WAKE_WITHIN + 1}, env={})
    assert load_settings({"timer_tick": WAKE_WITHIN}, env={}).timer_tick == WAKE_WITHIN


async def test_body_with_empty_list_survives_delivery(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "1", {"items": [], "m": {}, "u": "héllo"}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    [c] = await store.claim(shard, 1, [1, 2, 3], 30_000)
    assert c.body["items"] == [] and c.body["m"] == {} and c.body["u"] == "héllo"


@pytest.mark.parametrize("nshards", [2, 3])
async def test_adding_a_shard_keeps_jobs_reachable(
    redis_factory: Callable[[], RedisProcess], nshards: int
) -> None:
    servers = [redis_factory() for _ in range(nshards + 1)]
    named = [(f"s{i}", r.url) for i, r in enumerate(servers)]
    before = Store(ShardSet.from_urls(named[:nshards]))
    ids = [str(i) for i in range(200)]
    for i in ids:
        await before.add("t", i, {"i": i}, delay_ms=60_000)
    per_shard = [await s.client.hlen(before.keys.jobs) for s in before.shards.shards]
    assert all(n > 0 for n in per_shard) and sum(per_shard) == 200
    # each job is on the shard routing picks
    for i in ids[:20]:
        owner = before.shards.owner(make_tid("t", i))
        assert await owner.client.hexists(before.keys.jobs, make_tid("t", i))
    await before.shards.close()

    after = Store(ShardSet.from_urls(named))
    owners_moved = sum(after.shards.owner(make_tid("t", i)).name == f"s{nshards}" for i in ids)
    assert 0 < owners_moved < 200 * 2 / (nshards + 1)  # only the new shard's share moves
    for i in ids:
        body = await after.get("t", i)
        assert body is not None and body["i"] == i
    for i in ids[:100]:
        assert await after.delete("t", i)
    assert all([await after.get("t", i) is None for i in ids[:100]])
    await after.shards.close()


async def test_payload_prefix_is_version_then_priority(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "1", {"v": "nested"}, delay_ms=1000, priority=3)
    raw = await shard.client.hget(store.keys.jobs, "t:1")
    version, prio, attempt, due_hex, ahead, body = raw.split(b"|", 5)
    assert int(version, 16) and prio == b"3" and attempt == b"0"
    due, set_ms = int(due_hex, 16), int(due_hex, 16) - int(ahead, 16)
    assert abs(due - (time.time() * 1000 + 1000)) < 2000 and int(ahead, 16) == 1000
    assert abs(set_ms - time.time() * 1000) < 2000
    # notify_time and dq_set_time are derived when read, not stored
    assert json.loads(body) == {"v": "nested"}
    got = await store.get("t", "1")
    assert got == {"v": "nested", "notify_time": store.clock.fmt_time(due),
                   "dq_set_time": store.clock.fmt_time(set_ms)}


async def test_client_notify_time_is_overwritten_in_place(store: Store) -> None:
    due = int(time.time() * 1000) + 3_600_000
    await store.add("t", "1", {"a": 1, "notify_time": "x", "dq_set_time": "mine", "b": 2},
                    due_ms=due)
    body = await store.get("t", "1")
    assert body is not None
    assert list(body) == ["a", "notify_time", "dq_set_time", "b"]
    assert body["notify_time"] == store.clock.fmt_time(due) and body["dq_set_time"] == "mine"


async def test_dq01_json_payload_is_still_delivered(store: Store) -> None:
    """A job written by dq 0.1 (JSON payload) survives the upgrade: got, moved, claimed,
    acked."""
    shard = store.shards.shards[0]
    tid = make_tid("t", "old")
    old = json.dumps({"v": "abc1", "p": 1, "due": 1000, "n": 0, "set": 900,
                      "body": {"k": "v", "notify_time": "2020-01-01 00:00:00"}},
                     separators=(",", ":"))
    await shard.client.hset(store.keys.jobs, tid, old)
    await shard.client.zadd(store.keys.delay[store.keys.bucket(tid)], {tid: 1000})
    body = await store.get("t", "old")
    assert body is not None and body["k"] == "v" and body["notify_time"] == "2020-01-01 00:00:00"
    moved, _, _ = await store.move_due(shard, range(store.buckets))
    assert moved == 1
    assert await shard.client.lrange(store.keys.ready[0], 0, -1) == [b"abc1|t:old"]
    [c] = await store.claim(shard, 10, [1, 2, 3], 60_000)
    assert (c.version, c.priority, c.due_ms, c.set_ms) == ("abc1", 1, 1000, 900)
    assert await store.ack(c) and await store.get("t", "old") is None


async def test_adds_in_one_loop_turn_are_one_script_call(store: Store) -> None:
    shard = store.shards.shards[0]
    await store.add("t", "warm", {})  # loads the scripts
    await shard.client.config_resetstat()
    res = await asyncio.gather(*(store.add("t", str(i), {"i": i}, delay_ms=i * 1000)
                                 for i in range(200)))
    assert [r.replaced for r in res] == [False] * 200
    assert [r.due_ms - res[0].due_ms for r in res] == [i * 1000 for i in range(200)]
    stats = await shard.client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    # a bigger burst is split into calls of at most ADD_BATCH jobs, each answered right
    await shard.client.config_resetstat()
    n, base = ADD_BATCH * 2 + 7, int(time.time() * 1000) + 60_000
    res = await asyncio.gather(*(store.add("t", f"b{i}", {"i": i}, due_ms=base + i)
                                 for i in range(n)))
    assert [r.due_ms for r in res] == [base + i for i in range(n)]
    stats = await shard.client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3
    assert (await store.get("t", f"b{n - 1}") or {}).get("i") == n - 1
    assert (await store.stats.topic_stats("t"))["writes"] == 201 + n
    assert all([(await store.get("t", str(i)) or {}).get("i") == i for i in range(200)])
    # the same job twice in one batch: the second replaces the first
    again = await asyncio.gather(store.add("t", "dup", {"n": 1}), store.add("t", "dup", {"n": 2}))
    assert [r.replaced for r in again] == [False, True]
    assert (await store.get("t", "dup") or {}).get("n") == 2


async def test_move_due_moves_only_due_jobs_in_limited_steps(store: Store) -> None:
    shard = store.shards.shards[0]
    now = int(time.time() * 1000)
    for i in range(30):
        await store.add("t", f"due{i}", {}, due_ms=now - 1000 + i)
    for i in range(20):
        await store.add("t", f"later{i}", {}, due_ms=now + 3_600_000 + i)
    moved_total = 0
    while True:
        moved, nxt, _ = await store.move_due(shard, range(store.buckets), limit=3)
        if not moved:
            break
        moved_total += moved
    assert moved_total == 30 and nxt == now + 3_600_000
    ready = await shard.client.lrange(store.keys.ready[1], 0, -1)
    assert sorted(e.split(b"|")[1] for e in ready) == sorted(
        f"t:due{i}".encode() for i in range(30))
    assert sum([await shard.client.zcard(k) for k in store.keys.delay]) == 20


def test_rendezvous_weights_are_stable() -> None:
    """Routing must not change between versions: a re-add would land on another shard
    and the job would exist twice. The weight is blake2b-64 of "<name>\\0<tid>"."""
    import hashlib

    from dq.sharding.shards import _weight

    shards = ShardSet.from_urls([("a", "redis://127.0.0.1:1"), ("b", "redis://127.0.0.1:2"),
                                 ("c", "redis://127.0.0.1:3")])
    for tid in ("order:1", "order:2", "t:中文", "x:" + "9" * 200):
        for s in shards.shards:
            want = int.from_bytes(hashlib.blake2b(f"{s.name}\0{tid}".encode(),
                                                  digest_size=8).digest(), "big")
            assert s.weight(tid.encode()) == _weight(s.name, tid) == want
        order = shards.order(tid)
        assert order == sorted(shards.shards, key=lambda s: _weight(s.name, tid), reverse=True)
        assert shards.owner(tid) is order[0] and shards.writable(tid) is order[0]
    # a golden value (computed by dq 0.1), so a change of hash function cannot pass unnoticed
    assert [s.name for s in shards.order("order:42")] == ["b", "c", "a"]


async def test_body_with_integers_beyond_64_bits_round_trips(store: Store) -> None:
    body = {"n": 2**70 + 1, "f": 1.5, "s": "中文", "l": [1, -2**65]}
    await store.add("t", "big", body, delay_ms=60_000)
    got = await store.get("t", "big")
    assert got is not None
    assert {k: got[k] for k in body} == body and type(got["n"]) is int


async def test_acks_in_one_loop_turn_are_one_script_call(store: Store) -> None:
    shard = store.shards.shards[0]
    for topic in ("t", "u"):
        for i in range(30):
            await store.add(topic, str(i), {}, delay_ms=0)
    await store.add("t", "stale", {}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    claimed = await store.claim(shard, 100, [1, 2, 3], 30_000)
    assert len(claimed) == 61
    stale = next(c for c in claimed if c.id == "stale")
    await store.add("t", "stale", {"new": 1}, delay_ms=60_000)  # replaced while in flight
    await shard.client.config_resetstat()
    res = await asyncio.gather(*(store.ack(c, took_ms=7 if c.topic == "t" else 70)
                                 for c in claimed))
    assert (await shard.client.info("commandstats"))["cmdstat_evalsha"]["calls"] == 1
    assert [r for c, r in zip(claimed, res, strict=True) if c is not stale] == [True] * 60
    assert res[claimed.index(stale)] is False
    assert (await store.get("t", "stale") or {}).get("new") == 1  # the new job survives
    assert await shard.client.zcard(store.keys.inflight) == 0
    assert await shard.client.hlen(store.keys.jobs) == 1  # only the replaced job is left
    t, u = await store.stats.topic_stats("t"), await store.stats.topic_stats("u")
    assert (t["ok"], t["notifies"], u["ok"], u["notifies"]) == (31, 31, 30, 30)
    h_t, h_u = (await store.stats.histograms("t"))["cb"], (await store.stats.histograms("u"))["cb"]
    assert (h_t.count, h_u.count) == (31, 30)
    assert h_t.sum == pytest.approx(31 * 0.007) and h_u.sum == pytest.approx(30 * 0.07)


async def test_a_batch_that_cannot_be_sent_fails_its_jobs(store: Store) -> None:
    """A job part Redis cannot be sent (a bug) fails that batch's jobs with the error
    instead of leaving their callers waiting forever."""
    shard = store.shards.shards[0]
    await store.add("t", "warm", {})  # connects
    got: list[BaseException | None] = []
    store.batch.queue("add", shard, ((store.keys.delay[0], store.keys.wake[0],
                                      store.keys.stat("t")),
                               ("t:x", object(), "", 0, 0)), lambda res, exc: got.append(exc))
    store.batch.queue("add", shard, ((store.keys.delay[0], store.keys.wake[0],
                                      store.keys.stat("t")),
                               ("t:y", "1|2|0|1|0|{}", "", 0, 0)),
                lambda res, exc: got.append(exc))
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(got) == 2 and all(isinstance(e, TypeError) for e in got)
    # the connection and later adds are unaffected
    assert not (await store.add("t", "after", {"a": 1})).replaced


async def until(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_send_then_hands_each_reply_or_error_to_its_callback(store: Store) -> None:
    """The hot path's reply callbacks: each gets its own command's reply or error, a
    callback that raises does not leave the replies after it unmatched, and a lost or
    closed connection fails them with an unavailable error that says which shard."""
    conn = store.shards.shards[0].conn
    await conn.connect()
    got: dict[str, tuple[object, BaseException | None]] = {}

    def keep(name: str, fail: bool = False) -> Callable[[object, BaseException | None], None]:
        def cb(res: object, exc: BaseException | None) -> None:
            got[name] = (res, exc)
            if fail:
                raise RuntimeError("a bug in a callback")
        return cb

    conn.send_then(keep("set", fail=True), "SET", "k", "v")
    conn.send_then(keep("get"), "GET", "k")
    conn.send_then(keep("noscript"), "EVALSHA", "0" * 40, 0)
    conn.send_then(keep("wrongtype"), "INCR", "k")
    conn.send_then(keep("blocked"), "BLPOP", "nothing", 5)
    await until(lambda: "wrongtype" in got)
    assert got["set"] == (b"OK", None) and got["get"] == (b"v", None)
    assert got["noscript"][0] is None and isinstance(got["noscript"][1], NoScriptError)
    assert isinstance(got["wrongtype"][1], ResponseError)
    assert "blocked" not in got
    conn.close()  # the reply never comes
    await until(lambda: "blocked" in got)
    err = got["blocked"][1]
    assert isinstance(err, DqError) and err.err == UNAVAILABLE and conn.name in err.msg
    conn.send_then(keep("closed"), "PING")  # not connected: told at once
    err = got["closed"][1]
    assert isinstance(err, DqError) and err.err == UNAVAILABLE


async def test_a_batch_tells_every_job_then_runs_after_settle_once(store: Store) -> None:
    """One job's callback failing does not strand the others of its batch, and the store's
    after_settle hooks (the server writes its replies there) run once the whole batch
    has been told."""
    shard = store.shards.shards[0]
    await store.add("t", "warm", {})  # connects
    got: list[str] = []
    hooks: list[list[str]] = []

    def broken_hook() -> None:
        raise RuntimeError("a bug in another hook")

    store.batch.on_batch_settled += [broken_hook, lambda: hooks.append(list(got))]

    def job(name: str) -> None:
        def cb(res: object, exc: BaseException | None) -> None:
            assert exc is None
            got.append(name)
            if name == "b":
                raise RuntimeError("a bug in one job's callback")
        store.batch.queue("add", shard, ((store.keys.delay[0], store.keys.wake[0],
                                          store.keys.stat("t")),
                                   (f"t:{name}", "1|2|0|1|0|{}", "", 0, 0)), cb)

    for name in "abc":
        job(name)
    await until(lambda: bool(hooks))
    assert got == ["a", "b", "c"] and hooks == [["a", "b", "c"]]


async def test_a_failed_write_to_redis_fails_its_commands_once(store: Store) -> None:
    """A write the transport refuses (not seen with real transports: a bug) closes the
    connection, so each command's waiter is told once that the shard is unavailable, and
    the next call reconnects."""
    conn = store.shards.shards[0].conn
    await conn.connect()
    assert conn.transport is not None
    told: list[BaseException | None] = []

    def refuse(data: bytes) -> None:
        raise RuntimeError("refused")

    conn.transport.write = refuse  # type: ignore[method-assign]
    conn.send_then(lambda res, exc: told.append(exc), "PING")
    await until(lambda: bool(told))
    await asyncio.sleep(0.05)
    assert len(told) == 1 and isinstance(told[0], DqError) and told[0].err == UNAVAILABLE
    assert await store.shards.shards[0].call("PING") == b"PONG"


def test_resp_pack_spells_each_argument_type_and_names_a_bad_one() -> None:
    from dq.sharding.respproto import pack

    assert pack(("SET", "k€", b"\x00\xff", 12, -3, 1.5)) == (
        b"*6\r\n$3\r\nSET\r\n$4\r\nk\xe2\x82\xac\r\n$2\r\n\x00\xff\r\n$2\r\n12\r\n"
        b"$2\r\n-3\r\n$3\r\n1.5\r\n")
    with pytest.raises(TypeError, match="cannot send NoneType to redis"):
        pack(("SET", "k", None))


def test_a_forked_child_makes_job_versions_of_its_own() -> None:
    """dq-server processes are forked: a version prefix (and counter) shared with the
    parent would let two servers give two adds of one job the same version."""
    import os

    from dq.storage.payload import new_version

    parent = new_version()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next version and leave at once
        os.write(w, new_version().encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 100).decode()
    os.close(r)
    assert child and child[:8] != parent[:8]
    assert new_version()[:8] == parent[:8]  # the parent's own prefix is unchanged


async def test_a_changed_buckets_setting_moves_the_delayed_jobs(redis_server: RedisProcess,
                                                                ) -> None:
    """Jobs written with 8 buckets, then the setting becomes 3: timer 0's rebucket moves
    each to its new bucket (none left where no timer looks, no stale entry of a job added
    again or deleted meanwhile), again for jobs a process still on 8 adds after it."""
    old = Store(ShardSet.from_urls([redis_server.url]), buckets=8)
    new = Store(ShardSet.from_urls([redis_server.url]), buckets=3)
    shard = new.shards.shards[0]

    async def entries() -> dict[str, list[tuple[int, float]]]:
        out: dict[str, list[tuple[int, float]]] = {}
        for b in range(8):
            for tid, score in await shard.client.zrange(f"dq:delay:{b}", 0, -1,
                                                        withscores=True):
                out.setdefault(tid.decode(), []).append((b, score))
        return out

    try:
        for i in range(30):  # no layout recorded yet: as written by an older dq
            await old.add("t", f"j{i}", {"i": i}, delay_ms=0 if i < 15 else 60_000)
        before = await entries()
        assert any(b >= 3 for v in before.values() for b, _ in v)
        await new.add("t", "j20", {"again": True}, delay_ms=0)  # added again on 3
        assert await new.delete("t", "j21")  # deleted on 3: its old entry stays behind
        moved = await new.maintenance.rebucket(shard)
        after = await entries()
        assert sorted(after) == sorted(t for t in before if t != "t:j21")
        for tid, places in after.items():
            assert places == [(new.keys.bucket(tid), places[0][1])], (tid, places)
            if tid != "t:j20":  # the others keep their due times
                assert places[0][1] == before[tid][0][1]
        assert after["t:j20"][0][1] < before["t:j20"][0][1]  # the later add's
        assert moved == sum(old.keys.bucket(t) != new.keys.bucket(t) for t in after) - (
            old.keys.bucket("t:j20") != new.keys.bucket("t:j20"))
        layout = await shard.client.hgetall("dq:layout")
        assert layout[b"buckets"] == b"3" and layout[b"most"] == b"8"
        # the due ones are all moved by timers that look at buckets 0-2 only
        moved_due, _, _ = await new.move_due(shard, range(3))
        assert moved_due == 16

        # A process still on 8 (a reload's draining generation) adds one more: the next
        # call, within REBUCKET_AGAIN_MS of the change, moves it too; nothing else moves.
        late = next(f"late{i}" for i in range(100) if old.keys.bucket(f"t:late{i}") >= 3)
        await old.add("t", late, {}, delay_ms=60_000)
        assert await new.maintenance.rebucket(shard) == 1
        assert (await entries())[f"t:{late}"][0][0] == new.keys.bucket(f"t:{late}")
        # A shard whose layout is in force and unchanged for long is not gone through.
        await shard.client.hset("dq:layout", "changed", 1)
        stray = next(f"stray{i}" for i in range(100) if old.keys.bucket(f"t:stray{i}") >= 3)
        await old.add("t", stray, {}, delay_ms=60_000)
        assert await new.maintenance.rebucket(shard) == 0
        assert (await entries())[f"t:{stray}"][0][0] >= 3
    finally:
        await old.shards.close()
        await new.shards.close()
