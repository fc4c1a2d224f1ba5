"""Shards on Redis Sentinel and replica_acks, against real processes on loopback: a master,
a replica and 3 sentinels (`redis-server --sentinel`, tests/support/sentinels.py), real dq roles
and a real HTTP receiver.

What these show:
- a redis+sentinel:// shard finds the master, follows it across a kill -9 failover and a
  graceful one (SENTINEL FAILOVER), and never writes to the demoted master;
- with replica_acks, an add is answered only once a replica has it, else `unavailable`
  saying so (one WAIT per batch);
- under a stream of adds from reconnecting clients through a real dq-master, the master is
  killed -9: dq goes on adding and delivering by itself, every add acknowledged with
  replica_acks = 1 is delivered, and its timers and consumers are the same processes.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from dq.client import AsyncDqClient
from dq.config import load_settings
from dq.errors import UNAVAILABLE, ConfigError, DqError
from dq.registry.values import normalise_redis_url
from dq.roles.netpolicy import own_services
from dq.sharding import refusals, replicawait
from dq.sharding.refusals import ReplicasBehind
from dq.sharding.shards import ShardSet
from dq.sharding.shardurl import parse, split_shard_urls
from dq.storage.store import Store
from tests.support.chaos import Flaky, receiving, register
from tests.support.masters import Master
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.sentinels import SERVICE, SentinelSetup, TlsSentinelSetup, cmd, info
from tests.support.tls import make_certs
from tests.support.waits import until


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "sentinel")
    try:
        yield setup.start()
    finally:
        setup.stop()


async def _store(url: str, **kw: Any) -> Store:
    return Store(ShardSet.from_urls([url], **kw), buckets=4)


async def _until(what: str, pred: Callable[[], Any], timeout: float) -> float:
    """Seconds until the (async) predicate holds; fails after `timeout`."""
    t0 = time.monotonic()
    while True:
        try:
            if await pred():
                return time.monotonic() - t0
        except DqError:
            pass
        assert time.monotonic() - t0 < timeout, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.05)


# -- URLs -------------------------------------------------------------------------------------

def test_sentinel_urls_are_taken_everywhere_and_bad_ones_say_what_to_write(
        tmp_path: Path) -> None:
    url = "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/2"
    p = parse(url)
    assert p.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (p.service, p.db, p.password, p.tls) == ("mymaster", 2, "pw", False)
    assert parse("rediss+sentinel://h:1/m").tls
    # DQ_REDIS: a sentinel URL's hosts are comma-separated too
    both = f"{url},redis://127.0.0.1:6380/0"
    assert split_shard_urls(both) == (url, "redis://127.0.0.1:6380/0")
    s = load_settings(env={"DQ_REDIS": both})
    assert s.redis == (url, "redis://127.0.0.1:6380/0")
    assert load_settings({"redis": [url]}, env={}).redis == (url,)
    toml = tmp_path / "dq.toml"
    toml.write_text(f'redis = ["{url}"]\n')
    assert load_settings(config_file=str(toml), env={}).redis == (url,)
    assert normalise_redis_url(url) == url  # a dq_redis row
    for bad, says in [("redis+sentinel://h:1", "names no service"),
                      ("redis+sentinel:///m", "names no sentinel"),
                      ("redis+sentinel://h:x/m", "bad port"),
                      ("redis+sentinel://h/m/x", "database number"),
                      ("redis+sentinel://h/m?foo=1", "unknown option"),
                      ("http://h:1/0", "not a shard URL")]:
        with pytest.raises(ConfigError, match=says):
            load_settings({"redis": [bad]}, env={})
        with pytest.raises(ValueError, match=says):
            normalise_redis_url(bad)
    # callbacks may not go to the sentinels (dq's own services)
    own = own_services(load_settings({}, env={}), [url])
    assert {o.port for o in own if o.what.startswith("Redis sentinel")} == {26379, 26380}
    with pytest.raises(ConfigError, match="replica_acks"):
        load_settings({"replica_acks": -1}, env={})
    assert load_settings(env={"DQ_REPLICA_ACKS": "1"}).replica_acks == 1


# -- replica_acks on a plain shard --------------------------------------------------------------

async def test_replica_acks_without_a_replica_answers_unavailable_saying_so(
        redis_server: RedisProcess) -> None:
    store = await _store(redis_server.url, replica_acks=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(DqError) as got:
            await store.add("t", "1", {"a": 1}, delay_ms=60_000)
        took = time.monotonic() - t0
        assert got.value.err == UNAVAILABLE
        assert "not yet on 1 replica" in got.value.msg and "same id" in got.value.msg
        assert took < 5, took  # WAIT's timeout, not the command timeout, bounds it
        # stored on the master all the same (the retry of the same id replaces it)
        assert await store.get("t", "1") is not None
        # nor does it open the shard's breaker: reads go on
        assert store.shards.shards[0].up
        # the timers' and consumers' steps go on (lost with the master they would only be
        # done again): the job stored on the master is moved, claimed and acked
        shard = store.shards.shards[0]
        with pytest.raises(DqError, match="not yet on 1 replica"):
            await store.add("t", "due", {"a": 1}, delay_ms=0)
        await asyncio.sleep(0.01)
        moved, _next, _now = await store.move_due(shard, range(4))
        assert moved == 1
        [job] = await store.claim(shard, 10, [1, 2, 3], 60_000)
        assert job.id == "due"
        assert await store.ack(job) is True
    finally:
        await store.shards.close()
    plain = await _store(redis_server.url)  # replica_acks 0: as before
    try:
        assert not (await plain.add("t", "2", {}, delay_ms=60_000)).replaced
    finally:
        await plain.shards.close()


async def test_replica_acks_waits_once_per_batch_and_answers_when_replicated(
        redis_factory: Callable[..., RedisProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    # WAIT's 150 ms is for a replica that has a core; here six test workers share two, and
    # a replica not scheduled for 150 ms would fail the first part: it waits 2 s instead
    wait_ms = 2000
    monkeypatch.setattr(replicawait, "WAIT_MS", wait_ms)
    monkeypatch.setattr(refusals, "WAIT_MS", wait_ms)
    master = redis_factory()
    replica = redis_factory()
    cmd(replica.port, "REPLICAOF", "127.0.0.1", str(master.port))
    deadline = time.monotonic() + 20
    while "state=online" not in info(master.port).get("slave0", ""):
        assert time.monotonic() < deadline, "the replica did not connect"
        await asyncio.sleep(0.05)
    cmd(master.port, "CONFIG", "RESETSTAT")
    store = await _store(master.url, replica_acks=1)
    try:
        # 300 adds in one loop turn: one script call and one WAIT, not 300
        res = await asyncio.gather(*(store.add("t", str(i), {"i": i}, delay_ms=60_000)
                                     for i in range(300)))
        assert len(res) == 300
        stats = info(master.port, "commandstats")
        waits = int(stats["cmdstat_wait"].split("calls=")[1].split(",")[0])
        assert 1 <= waits <= 3, stats["cmdstat_wait"]
        assert int(cmd(replica.port, "HLEN", "dq:jobs")) == 300  # type: ignore[arg-type]
        # the replica goes away: adds are answered unavailable, within WAIT's timeout
        replica.stop()
        t0 = time.monotonic()
        with pytest.raises(ReplicasBehind):  # any script: a job's later changes too
            await store.shards.shards[0].conn.call("EVAL", "return redis.call('SET', "
                                                   "'dq:x', 1)", 0)
        with pytest.raises(DqError, match="not yet on 1 replica"):
            await store.add("t", "late", {}, delay_ms=60_000)
        assert time.monotonic() - t0 < 5 + 2 * wait_ms / 1000
    finally:
        await store.shards.close()


# -- Sentinel ---------------------------------------------------------------------------------

async def test_sentinel_shard_follows_its_master_across_a_kill_9_failover(
        sentinel_setup: SentinelSetup) -> None:
    store = await _store(sentinel_setup.url, replica_acks=1)
    plain = await _store(sentinel_setup.url)  # replica_acks 0
    shard = store.shards.shards[0]
    assert shard.name == sentinel_setup.url  # its identity: the URL, not the master's address
    try:
        acked = []
        for i in range(200):
            await store.add("t", f"a{i}", {"i": i}, delay_ms=600_000)
            acked.append(f"a{i}")
        old = sentinel_setup.master()
        old.kill()
        t0 = time.monotonic()
        refused = 0
        while True:  # adds go on by themselves once the sentinels have promoted the replica
            try:
                await plain.add("t", "after", {}, delay_ms=600_000)
                break
            except DqError as exc:
                assert exc.err == UNAVAILABLE, exc
                refused += 1
                assert time.monotonic() - t0 < 15, f"no add stored 15 s after the kill: {exc}"
                await asyncio.sleep(0.05)
        took = time.monotonic() - t0
        assert refused > 0, "the kill did not interrupt the adds"
        new = sentinel_setup.master_port()
        assert new != old.port
        assert plain.shards.shards[0].conn.master == ("127.0.0.1", new)
        # every add acknowledged with replica_acks = 1 is on the new master
        for tid in acked:
            assert await store.get("t", tid) is not None, tid
        # the timers' blocking client (redis-py's Sentinel client) follows it too
        assert await shard.client.blpop(["dq:nothing"], timeout=0.1) is None
        # The new master has no replica left: with replica_acks = 1 an add is refused,
        # saying why, until the old master is back (restarted by its supervisor, made a
        # replica of the new one by the sentinels).
        with pytest.raises(DqError, match="not yet on 1 replica"):
            await store.add("t", "alone", {}, delay_ms=600_000)
        await asyncio.to_thread(old.start)
        t1 = time.monotonic()

        async def durable() -> bool:
            await store.add("t", "again", {}, delay_ms=600_000)
            return True
        back = await _until("a replicated add once the old master is a replica", durable, 60)
        assert info(old.port)["role"] == "slave"
        assert cmd(old.port, "HEXISTS", "dq:jobs", "t:again") == 1
        assert time.monotonic() - t1 >= back
        print(f"\nsentinel kill -9: adds stored again {took:.1f} s after the kill "
              f"({refused} refused meanwhile); with replica_acks 1, {back:.1f} s after the "
              "old master restarted", file=sys.stderr)
    finally:
        await store.shards.close()
        await plain.shards.close()


async def _graceful_failover(setup: SentinelSetup, store: Store, old: int) -> int:
    """SENTINEL FAILOVER; once the old master is a replica (it takes writes until the
    sentinels have made it one), an add "t:after" that succeeds. The new master's port."""
    cmd(setup.sentinels[0].port, "SENTINEL", "FAILOVER", SERVICE)
    new = await asyncio.to_thread(setup.wait_failover, old, 60.0)
    await _until("the old master to be a replica",
                 _async(lambda: info(old).get("role") == "slave"), 60)

    async def stored() -> bool:
        await store.add("t", "after", {}, delay_ms=600_000)
        return True
    await _until("an add after the failover", stored, 30)
    return new


async def test_sentinel_graceful_failover_never_writes_to_the_demoted_master(
        sentinel_setup: SentinelSetup) -> None:
    store = await _store(sentinel_setup.url)
    shard = store.shards.shards[0]
    try:
        await store.add("t", "before", {}, delay_ms=600_000)
        old = sentinel_setup.master_port()
        assert shard.conn.master == ("127.0.0.1", old)
        # the old master stays up and becomes a replica
        new = await _graceful_failover(sentinel_setup, store, old)
        assert shard.conn.master == ("127.0.0.1", new)
        assert await store.get("t", "before") is not None
        # the old master (a replica now) holds only what it replicated from the new one
        assert info(old)["role"] == "slave"
        await _until("the replica to catch up",
                     _async(lambda: cmd(old, "HEXISTS", "dq:jobs", "t:after") == 1), 60)
    finally:
        await store.shards.close()


async def test_rediss_sentinel_finds_its_master_over_tls_and_follows_a_failover(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rediss+sentinel://: dq asks the sentinels over TLS, and talks to the master they name,
    its TLS port (which answers nothing but TLS), over TLS; after a failover, to the new
    one. The certificates are a throwaway CA's, trusted through SSL_CERT_FILE."""
    tls = make_certs(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    setup = TlsSentinelSetup(tmp_path / "sentinel", tls)
    try:
        await asyncio.to_thread(setup.start)
        store = await _store(setup.url)
        shard = store.shards.shards[0]
        try:
            for i in range(20):
                await store.add("t", f"b{i}", {"i": i}, delay_ms=600_000)
            old = setup.master_port()
            assert shard.conn.master == ("127.0.0.1", setup.tls_port(old))
            assert cmd(old, "HLEN", "dq:jobs") == 20
            new = await _graceful_failover(setup, store, old)
            assert shard.conn.master == ("127.0.0.1", setup.tls_port(new))
            assert cmd(new, "HEXISTS", "dq:jobs", "t:after") == 1
            for i in range(20):
                assert (await store.get("t", f"b{i}") or {}).get("i") == i
        finally:
            await store.shards.close()
    finally:
        setup.stop()


async def test_sentinel_switch_master_is_followed_before_any_write_fails(
        sentinel_setup: SentinelSetup) -> None:
    """An idle shard hears the sentinels' +switch-master and drops its connection to the
    old master at once: the first add after SENTINEL FAILOVER goes to the new master, with
    no write error (without the announcement it would meet READONLY, or be written to the
    old master before its demotion)."""
    store = await _store(sentinel_setup.url)
    shard = store.shards.shards[0]
    try:
        await store.add("t", "before", {}, delay_ms=600_000)
        old = sentinel_setup.master_port()
        assert shard.conn.master == ("127.0.0.1", old) and shard.conn.connected

        def subscribed() -> bool:  # dq listens to a sentinel's +switch-master
            return any(re.search(rb"\bsub=[1-9]", cast(bytes, cmd(x.port, "CLIENT", "LIST")))
                       for x in sentinel_setup.sentinels)

        await until(subscribed, 10, "dq subscribed to +switch-master")
        cmd(sentinel_setup.sentinels[0].port, "SENTINEL", "FAILOVER", SERVICE)
        new = await asyncio.to_thread(sentinel_setup.wait_failover, old, 60.0)
        await _until("the connection to the old master dropped on +switch-master",
                     _async(lambda: not shard.conn.connected), 10)
        await store.add("t", "after", {}, delay_ms=600_000)  # no error: straight there
        assert shard.conn.master == ("127.0.0.1", new)
        assert cmd(new, "HEXISTS", "dq:jobs", "t:after") == 1
    finally:
        await store.shards.close()


def _async(pred: Callable[[], Any]) -> Callable[[], Any]:
    async def run() -> Any:
        return await asyncio.to_thread(pred)
    return run


@pytest.fixture
async def plain_store(redis_server: RedisProcess) -> AsyncIterator[Store]:
    s = await _store(redis_server.url)
    yield s
    await s.shards.close()


# -- a real dq-master under a stream of adds while the master is killed -9 --------------------

@pytest.mark.slow
async def test_dq_master_adds_and_delivers_through_a_kill_9_failover_losing_no_acked_add(
        tmp_path: Path) -> None:
    # two replicas: with replica_acks = 1, one is left to confirm adds after the failover
    setup = SentinelSetup(tmp_path / "sentinel", replicas=2)
    await asyncio.to_thread(setup.start)
    m = None
    flaky = Flaky(fail=0.0, max_ms=5)
    try:
        async with receiving(flaky) as rcv:
            db = register(tmp_path / "reg" / "dq.sqlite3", "ha", rcv.url("/cb"))
            m = Master(tmp_path / "m", free_port(),
                       ["--no-web", "--redis", setup.url, "--db", db, "--timers", "1",
                        "--consumers", "1"],
                       {"DQ_REPLICA_ACKS": "1", "DQ_RETRY_UNIT": "1", "DQ_LEASE": "3",
                        "DQ_TIMER_TICK": "0.2"})
            before = await asyncio.to_thread(
                m.wait_titles, {"dq-server-0", "dq-timer-0", "dq-consumer-0"}, exact=False)
            clients = [AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=2.0) for _ in range(3)]
            acked: dict[str, float] = {}  # job id -> when its add was acknowledged
            refused: list[float] = []
            slowest = [0.0]  # the longest wait for an add_many's answer

            stop = asyncio.Event()

            async def adder(client: AsyncDqClient, name: str) -> None:
                i = 0
                while not stop.is_set():
                    jobs: list[dict[str, Any]] = [
                        {"topic": "ha", "id": f"{name}-{i + k}", "body": {},
                         "due_ms": int((time.time() + 1.0) * 1000)} for k in range(10)]
                    i += 10
                    t0 = time.monotonic()
                    try:
                        res = await client.add_many(jobs)
                    except DqError as exc:
                        assert exc.err == UNAVAILABLE, exc
                        refused.append(time.monotonic())
                        res = []
                    slowest[0] = max(slowest[0], time.monotonic() - t0)
                    for job, err in zip(jobs, res, strict=False):
                        if err is None:
                            acked[job["id"]] = time.monotonic()
                        else:
                            assert err.err == UNAVAILABLE, err
                            refused.append(time.monotonic())
                    await asyncio.sleep(0.05)

            tasks = [asyncio.create_task(adder(c, f"c{n}")) for n, c in enumerate(clients)]
            await until(lambda: len(acked) >= 300, 30, "adds flowing")
            old = setup.master()
            old.kill()
            killed = time.monotonic()
            # adds go on: until 300 more are acknowledged after the kill, 15 s at most
            await until(lambda: sum(1 for t in acked.values() if t > killed) >= 300
                        or time.monotonic() - killed > 15, 30, "15 s")
            stop.set()
            await asyncio.gather(*tasks)
            after = sorted(t for t in acked.values() if t > killed)
            assert after, "no add was acknowledged after the kill"
            resumed = after[0] - killed
            assert resumed < 15, f"adds resumed only {resumed:.1f} s after the kill"
            assert any(t > killed for t in refused) or resumed > 0
            deadline = time.monotonic() + 40
            while not set(acked) <= flaky.delivered() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            delivered_after = [j for j, t in acked.items() if t > killed and
                               j in flaky.delivered()]
            for c in clients:
                await c.close()
            # the same timer and consumer: they resumed after the failover, no restart
            now = m.workers()
            for pid, title in before.items():
                if title.startswith(("dq-timer-", "dq-consumer-")):
                    assert now.get(pid) == title, (title, "was restarted")
            lost = set(acked) - flaky.delivered()
            print(f"\nsentinel failover under dq-master: {len(acked)} adds acknowledged, "
                  f"{len(refused)} refused; adds resumed {resumed:.1f} s after the kill -9; "
                  f"slowest answer {slowest[0] * 1000:.0f} ms; "
                  f"{len(acked) - len(lost)} delivered ({len(delivered_after)} of them added "
                  f"after the kill), {len(lost)} lost", file=sys.stderr)
            assert not lost, f"{len(lost)} acknowledged adds lost, e.g. {sorted(lost)[:5]}"
            assert delivered_after
    finally:
        if m is not None:
            await asyncio.to_thread(m.stop)
        await asyncio.to_thread(setup.stop)


async def test_moving_onto_sentinel_by_a_new_url_moves_no_job(
        sentinel_setup: SentinelSetup, tmp_path: Path) -> None:
    """A reload from redis://master to redis+sentinel://... keeps the old URL as a retired
    shard (dq/sharding/plan.py); it is the same Redis, so the checker lets it go at once
    instead of moving its jobs onto themselves for ever."""
    from dq.config import Settings
    from dq.roles.checker import Retirement
    from dq.runtime.context import Context
    from dq.sharding.plan import drained_urls

    old_url = f"redis://127.0.0.1:{sentinel_setup.master_port()}/0"
    before = await _store(old_url)
    try:
        await before.add("t", "kept", {"a": 1}, delay_ms=600_000)
    finally:
        await before.shards.close()
    settings = Settings(redis=(sentinel_setup.url,), data_dir=str(tmp_path / "var"))
    (tmp_path / "var").mkdir()
    shards = ShardSet.from_urls([(sentinel_setup.url, sentinel_setup.url)],
                                [(old_url, old_url)])
    store = Store(shards, buckets=4)
    try:
        retirement = Retirement(Context(settings, "checker"), store)
        await retirement.run(lambda _shard: True)
        assert retirement.drained == {old_url}
        assert old_url in drained_urls(settings)
        assert await store.get("t", "kept") is not None
        port = sentinel_setup.master_port()
        assert cmd(port, "SCARD", store.keys.guests) == 0  # nothing recorded to move
    finally:
        await shards.close()
