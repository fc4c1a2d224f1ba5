"""dq on a real Redis Cluster (3 masters + 3 replicas, `redis-cli --cluster create`): a
`redis+cluster://` URL is cut into hash-tagged partitions that land on every master;
jobs reach a real HTTP receiver; a reshard under load and a master killed -9 lose
nothing (every acknowledged add is delivered)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from dq.client import AsyncDqClient
from dq.config import load_settings
from dq.errors import UNAVAILABLE, ConfigError, DqError
from dq.sharding.clustermap import SILENT, ClusterMap
from dq.sharding.clusterurl import join_parts, key_slot, parse_url, partition_tags
from dq.sharding.shards import ShardSet
from dq.storage.store import Store
from tests.support.chaos import add_acked, register
from tests.support.masters import Master
from tests.support.receiver import Receiver, Reply, Request
from tests.support.rediscluster import RedisCluster, cli
from tests.support.redisproc import RedisProcess
from tests.support.tls import make_certs
from tests.support.waits import until

pytestmark = pytest.mark.slow

PARTITIONS = 16


# -- settings ------------------------------------------------------------------------------

def test_cluster_urls_from_every_source_and_bad_ones_say_what_to_write(tmp_path: Path,
                                                                       ) -> None:
    url = "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001"
    env = {"DQ_REDIS": f"{url},redis://10.0.0.3:6379/0", "DQ_CLUSTER_PARTITIONS": "64"}
    s = load_settings(env=env)
    assert s.redis == (url, "redis://10.0.0.3:6379/0") and s.cluster_partitions == 64
    toml = tmp_path / "dq.toml"
    toml.write_text(f'redis = ["{url}"]\ncluster_partitions = 8\n')
    s = load_settings(config_file=str(toml), env={})
    assert s.redis == (url,) and s.cluster_partitions == 8
    assert load_settings({"redis": [url]}, env={}).redis == (url,)
    assert parse_url(url).seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert join_parts(["redis+cluster://a:1", "b:2", "redis://c"]) == \
        ("redis+cluster://a:1,b:2", "redis://c")
    for bad, says in (("redis+cluster://", "names no cluster node"),
                      ("redis+cluster://h:notaport", "is not host:port"),
                      ("redis+cluster://h:7000/3", "only database 0")):
        with pytest.raises(ConfigError, match=says):
            load_settings({"redis": [bad]}, env={})
    with pytest.raises(ConfigError, match="cluster_partitions must be 1 to 256"):
        load_settings({"redis": [url], "cluster_partitions": 0}, env={})
    with pytest.raises(ConfigError) as err:
        load_settings({"redis": ["redis+cluster://:secret@h:x"]}, env={})
    assert "secret" not in str(err.value)


def test_a_map_refresh_asks_a_silent_node_last() -> None:
    """After a failover the old master, hung, is still among the masters the map knows:
    asked first for the slot map, it held every add waiting on the map until it woke
    (1.05-1.56 s). A node that owes replies and has said nothing for SILENT s goes last."""
    cmap = ClusterMap(parse_url("redis+cluster://127.0.0.1:7001"), connect_timeout=1.0,
                      command_timeout=5.0)
    hung, busy, idle = ("127.0.0.1", 7000), ("127.0.0.1", 7002), ("127.0.0.1", 7003)
    cmap.masters = {hung, busy, idle}
    now = time.monotonic()
    for addr, heard in ((hung, now - 2 * SILENT), (busy, now)):
        conn = cmap.conn(addr)
        conn.waiting.append(lambda *_: None)  # a reply it owes
        conn.heard = heard
    assert cmap.candidates() == [busy, idle, ("127.0.0.1", 7001), hung]
    cmap.conn(hung).heard = now  # it answered again
    assert cmap.candidates()[0] == hung


def test_partition_tags_spread_over_the_slots() -> None:
    for n in (1, 3, 16, 64):
        slots = [key_slot(t.encode()) for t in partition_tags(n)]
        assert len(set(partition_tags(n))) == n
        assert all(i * 16384 // n <= s < (i + 1) * 16384 // n for i, s in enumerate(slots))


# -- a real cluster and a real dq ----------------------------------------------------------

@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def dq_on(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []

    def make(url: str, db: str, **env: str) -> Master:
        from tests.support.procs import free_port
        m = Master(tmp_path / f"dq{len(started)}", free_port(),
                   ["--no-web", "--redis", url, "--db", db, "--timers", "2",
                    "--consumers", "2"],
                   {"DQ_RETRY_UNIT": "1", "DQ_LEASE": "5", "DQ_TIMER_TICK": "0.2",
                    "DQ_MAX_ATTEMPTS": "50", "DQ_CLUSTER_PARTITIONS": str(PARTITIONS),
                    "DQ_SHARD_DOWN_AFTER": "3", **env})
        started.append(m)
        m.wait_titles({"dq-server-0", "dq-timer-0", "dq-timer-1", "dq-consumer-0",
                       "dq-consumer-1", "dq-checker"}, exact=False)
        return m

    yield make
    for m in started:
        m.stop(timeout=10)


class Seen:
    """The receiver's handler: records each job id given a 2xx."""

    def __init__(self) -> None:
        self.ok: dict[str, int] = {}

    async def __call__(self, req: Request) -> Reply:
        self.ok[req.job_id] = self.ok.get(req.job_id, 0) + 1
        return 200, b'{"code":0}'


async def wait_delivered(seen: Seen, want: set[str], timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want <= set(seen.ok):
        await asyncio.sleep(0.2)
    return want - set(seen.ok)


def partitions_per_master(c: RedisCluster) -> dict[int, set[str]]:
    """The partitions (by tag) whose keys each master holds."""
    return {m.port: {t for t in partition_tags(PARTITIONS)
                     if int(m.cli("CLUSTER", "COUNTKEYSINSLOT", str(key_slot(t.encode())))
                            .strip()) > 0}
            for m in c.masters()}


def partitions_served(c: RedisCluster) -> dict[int, set[str]]:
    """The partitions (by tag) whose slot each master serves, by CLUSTER SLOTS."""
    r = redis.Redis(port=c.alive()[0].port)
    try:
        rows = r.execute_command("CLUSTER SLOTS")
    finally:
        r.close()
    out: dict[int, set[str]] = {}
    for t in partition_tags(PARTITIONS):
        slot = key_slot(t.encode())
        for row in rows:
            if int(row[0]) <= slot <= int(row[1]):
                out.setdefault(int(row[2][1]), set()).add(t)
    return out


def keys_per_master(c: RedisCluster) -> dict[int, int]:
    return {m.port: int(m.cli("DBSIZE").strip()) for m in c.masters()}


async def test_jobs_are_stored_on_every_master_and_delivered(
        redis_cluster: RedisCluster, dq_on: Callable[..., Master], tmp_path: Path) -> None:
    seen = Seen()
    async with Receiver(seen) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "cl", rcv.url("/cb"))
        m = await asyncio.to_thread(dq_on, redis_cluster.url, db)
        client = AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=5.0)
        try:
            # delayed enough to be seen stored before they fall due
            due = int((time.time() + 4) * 1000)
            jobs = [{"topic": "cl", "id": f"j{i}", "body": {"i": i}, "due_ms": due}
                    for i in range(600)]
            await add_acked(client, jobs, set(), time.monotonic() + 60)
            per_master = await asyncio.to_thread(keys_per_master, redis_cluster)
            assert len(per_master) == 3 and all(n > 0 for n in per_master.values()), \
                per_master
            tags = {t for t in partition_tags(PARTITIONS)}
            found: set[str] = set()
            for node in redis_cluster.masters():
                for key in node.cli("--scan", "--pattern", "*dq:jobs").split():
                    found.add(key[:key.index("}") + 1])
            assert found == tags, "every partition holds jobs, on the master of its slot"
            missing = await wait_delivered(seen, {f"j{i}" for i in range(600)}, 60)
            assert not missing, f"{len(missing)} never delivered, e.g. {sorted(missing)[:5]}"
            got = await client.get("cl", "j7")
            assert got is None or got.get("i") == 7
        finally:
            await client.close()


async def test_rediss_cluster_stores_on_every_master_over_tls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rediss+cluster://: the nodes listen for clients and for each other on TLS ports only
    (the plain ports are this harness's), the cluster's map names those ports, and dq
    follows it over TLS to every master. The CA is a throwaway one, trusted through
    SSL_CERT_FILE."""
    tls = make_certs(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    cluster = RedisCluster(tmp_path / "cluster", tls=tls)
    try:
        await asyncio.to_thread(cluster.start)
        assert cluster.url.startswith("rediss+cluster://")
        store = Store(ShardSet.from_urls([cluster.url], cluster_partitions=PARTITIONS))
        try:
            await asyncio.gather(*(store.add("cl", f"t{i}", {"i": i}, delay_ms=600_000)
                                   for i in range(300)))
            per_master = await asyncio.to_thread(keys_per_master, cluster)
            assert len(per_master) == 3 and all(n > 0 for n in per_master.values()), \
                per_master
            for i in range(0, 300, 7):
                info = await store.lookup("cl", f"t{i}")
                assert info is not None and info.body["i"] == i
        finally:
            await store.shards.close()
    finally:
        cluster.stop()


async def add_stream(client: AsyncDqClient, stop: asyncio.Event, acked: list[str],
                     prefix: str) -> None:
    """Waves of adds, each retried until acknowledged; the acknowledged ids go to `acked`."""
    i = 0
    while not stop.is_set():
        due = int((time.time() + 1) * 1000)
        jobs = [{"topic": "cl", "id": f"{prefix}{k}", "body": {}, "due_ms": due}
                for k in range(i, i + 50)]
        await add_acked(client, jobs, set(), time.monotonic() + 60)
        acked.extend(j["id"] for j in jobs)
        i += 50
        await asyncio.sleep(0.05)


async def test_a_reshard_under_load_loses_nothing(
        redis_cluster: RedisCluster, dq_on: Callable[..., Master], tmp_path: Path) -> None:
    seen = Seen()
    async with Receiver(seen) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "cl", rcv.url("/cb"))
        m = await asyncio.to_thread(dq_on, redis_cluster.url, db)
        client = AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=5.0)
        stop, acked = asyncio.Event(), []
        stream = asyncio.create_task(add_stream(client, stop, acked, "r"))
        try:
            await until(lambda: len(acked) >= 300, 30, "adds flowing")
            masters = await asyncio.to_thread(redis_cluster.masters)
            src, dst = masters[0], masters[1]
            before = await asyncio.to_thread(partitions_per_master, redis_cluster)
            # half the source's slots (with their partitions) move while adds flow
            await asyncio.to_thread(
                cli, "--cluster", "reshard", f"127.0.0.1:{src.port}", "--cluster-from",
                redis_cluster.node_id(src), "--cluster-to", redis_cluster.node_id(dst),
                "--cluster-slots", "3000", "--cluster-yes", "--cluster-pipeline", "5",
                timeout=180)
            after = await asyncio.to_thread(partitions_per_master, redis_cluster)
            n = len(acked)
            await until(lambda: len(acked) >= n + 300, 30, "adds after the reshard")
            stop.set()
            await stream
            moved = before[src.port] - after[src.port]
            assert moved and moved <= after[dst.port], (before, after)
            missing = await wait_delivered(seen, set(acked), 90)
            print(f"\nreshard: {len(acked)} adds acknowledged; partitions {sorted(moved)} "
                  f"moved from :{src.port} to :{dst.port}", file=sys.stderr)
            assert not missing, f"{len(missing)} acknowledged adds never delivered, e.g. " \
                f"{sorted(missing)[:5]}"
        finally:
            stop.set()
            await asyncio.gather(stream, return_exceptions=True)
            await client.close()


@pytest.mark.parametrize("acks", [0, 1])
async def test_a_master_killed_9_fails_over_and_dq_goes_on(
        redis_cluster: RedisCluster, dq_on: Callable[..., Master], tmp_path: Path,
        acks: int) -> None:
    """With replica_acks = 1 an add is answered once a replica has it: the adds go on
    through the kill, and the killed node is restarted 3 s later (as a supervisor would)
    to be the new master's replica, without which its partitions refuse adds."""
    seen = Seen()
    async with Receiver(seen) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "cl", rcv.url("/cb"))
        m = await asyncio.to_thread(dq_on, redis_cluster.url, db,
                                    DQ_REPLICA_ACKS=str(acks))
        client = AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=5.0)
        stop, acked = asyncio.Event(), []
        stream = asyncio.create_task(add_stream(client, stop, acked, "f"))
        try:
            await until(lambda: len(acked) >= 300, 30, "adds flowing")
            victim = (await asyncio.to_thread(redis_cluster.masters))[0]
            await asyncio.sleep(0.5)  # let the replicas catch up (no replica_acks here)
            victim.kill9()
            killed, at_kill = time.monotonic(), len(acked)
            # adds go on, and jobs added after the kill are delivered, within 15 s
            back = 0.0
            while time.monotonic() - killed < 15:
                later = set(acked[at_kill + 50:])  # past the batch in flight at the kill
                if later & set(seen.ok):
                    back = time.monotonic() - killed
                    break
                await asyncio.sleep(0.2)
            assert back, "dq did not go on adding and delivering within 15 s of the kill"
            if acks:
                await asyncio.sleep(max(0.0, killed + 3 - time.monotonic()))
                await asyncio.to_thread(victim.start)
            await asyncio.to_thread(redis_cluster.wait_ok)
            n = len(acked)
            await until(lambda: len(acked) >= n + 300, 30, "adds after the failover")
            stop.set()
            await stream
            missing = await wait_delivered(seen, set(acked), 90)
            print(f"\nfailover (replica_acks {acks}): adding and delivering again "
                  f"{back:.1f} s after "
                  f"kill -9 of a master; {len(acked)} adds acknowledged, {len(missing)} "
                  f"not delivered", file=sys.stderr)
            # Redis sends a write to its replicas in the event-loop turn it answers it, so
            # on loopback an acknowledged add is on the replica before the kill can strike.
            assert not missing, f"{len(missing)} acknowledged adds never delivered, e.g. " \
                f"{sorted(missing)[:5]}"
        finally:
            stop.set()
            await asyncio.gather(stream, return_exceptions=True)
            await client.close()


async def timed_adds(client: AsyncDqClient, stop: asyncio.Event, prefix: str,
                     answers: list[tuple[float, float, str]], acked: list[str]) -> None:
    """One add at a time until `stop`: (when sent, seconds to the answer, 'ok' or the
    error) for each; the acknowledged ids go to `acked`."""
    i = 0
    while not stop.is_set():
        job_id = f"{prefix}{i}"
        i += 1
        t0 = time.monotonic()
        try:
            await client.add("cl", job_id, {}, delay=1)
            answers.append((t0, time.monotonic() - t0, "ok"))
            acked.append(job_id)
        except DqError as exc:
            answers.append((t0, time.monotonic() - t0, exc.err))
            await asyncio.sleep(0.02)


async def test_adds_are_answered_within_the_deadline_while_a_master_hangs_and_fails_over(
        redis_cluster: RedisCluster, dq_on: Callable[..., Master], tmp_path: Path) -> None:
    """A master stopped (SIGSTOP: its connections stay open, nothing answers) until the
    cluster has failed it over: its partitions hang, then the cluster answers CLUSTERDOWN,
    then the replica takes over. Meanwhile no add waits out TRYAGAIN retries or the
    watchdog: each is answered after about add_timeout (0.4 s) at most, stored on a
    partition elsewhere or `unavailable`, and every acknowledged add is delivered."""
    seen = Seen()
    async with Receiver(seen) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "cl", rcv.url("/cb"))
        logs = tmp_path / "logs"  # the request log: each add's time in the server
        m = await asyncio.to_thread(dq_on, redis_cluster.url, db, DQ_LOG_DIR=str(logs))
        clients = [AsyncDqClient([f"127.0.0.1:{m.port}"], timeout=5.0) for _ in range(8)]
        for k, c in enumerate(clients):  # the server serves, each client is connected
            await add_acked(c, [{"topic": "cl", "id": f"warm{k}", "body": {}}], set(),
                            time.monotonic() + 60)
        stop, acked = asyncio.Event(), []
        answers: list[tuple[float, float, str]] = []
        workers = [asyncio.create_task(timed_adds(c, stop, f"h{k}-", answers, acked))
                   for k, c in enumerate(clients)]
        try:
            await until(lambda: len(answers) >= 500, 30, "adds flowing")
            victim = (await asyncio.to_thread(redis_cluster.masters))[0]
            victim.pause()
            paused = time.monotonic()
            try:
                await asyncio.to_thread(redis_cluster.wait_failed_over, victim)
                failed_over = time.monotonic()
                await asyncio.sleep(2.0)
            finally:
                victim.resume()
                resumed = time.monotonic()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)
            during = [a for a in answers if paused <= a[0] < failed_over]
            # add_timeout is 0.4 s; the bound sits far above it, so a busy machine does not
            # trip it, and below what this guards against: an add held by TRYAGAIN retries
            # (3 s) or waiting for the redis_timeout watchdog (5 s) on the hung node.
            slow = sorted((a for a in answers if a[1] >= 2.5), key=lambda a: -a[1])
            unavailable = sum(1 for a in during if a[2] != "ok")
            in_server = [float(ms) / 1000 for f in logs.glob("request_*.txt")
                         for ms in re.findall(r"^.*\badd topic=cl id=h.* ms=([0-9.]+)",
                                              f.read_text(), re.M)]

            def shown(adds: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
                """(sent at + s from the pause, took s, answer)"""
                return [(round(t0 - paused, 2), round(took, 2), what) for t0, took, what in adds]

            print(f"\nmaster hung {failed_over - paused:.1f} s until failed over, resumed at "
                  f"+{resumed - paused:.1f} s: {len(during)} adds answered meanwhile "
                  f"({unavailable} unavailable); the slowest add in "
                  f"{max(a[1] for a in answers):.2f} s (in the server, of {len(in_server)} "
                  f"logged: {max(in_server):.2f} s); slowest (sent at +s, took s, answer): "
                  f"{shown(sorted(answers, key=lambda a: -a[1])[:4])}", file=sys.stderr)
            assert not slow, f"{len(slow)} adds answered after 2.5 s or more, e.g. " \
                f"{shown(slow[:5])}"
            assert max(in_server) < 2.5, max(in_server)
            assert all(a[2] in ("ok", UNAVAILABLE) for a in answers), \
                {a[2] for a in answers}
            assert sum(1 for a in during if a[2] == "ok") > 0, "no add stored meanwhile"
            await asyncio.to_thread(redis_cluster.wait_ok)
            missing = await wait_delivered(seen, set(acked), 90)
            assert not missing, f"{len(missing)} acknowledged adds never delivered, e.g. " \
                f"{sorted(missing)[:5]}"
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            for c in clients:
                await c.close()


async def test_console_and_metrics_show_a_cluster_as_one_shard_summed_over_partitions(
        redis_cluster: RedisCluster, tmp_path: Path) -> None:
    from tests.support.health import prom_samples
    from tests.support.web import open_web

    async with open_web(redis_cluster.url, f"sqlite:///{tmp_path / 'dq.sqlite3'}",
                        cluster_partitions=PARTITIONS) as w:
        assert len(w.store.shards.shards) == PARTITIONS
        due = int((time.time() + 3600) * 1000)
        for i in range(300):
            await w.store.add("cl", f"m{i}", {}, due_ms=due)
        shards = (await w.api.get("/api/shards")).json()
        assert [(s["url"], s["up"], s["depths"]["delayed"]) for s in shards] == \
            [(redis_cluster.url, True, 300)], shards
        assert "on 3 masters" in shards[0]["memory"]
        r = await w.api.get("/metrics")
        m = prom_samples(r.text)
        label = frozenset({("shard", redis_cluster.url), ("state", "delayed")})
        assert m[("dq_shard_jobs", label)] == 300
        assert m[("dq_shard_used_memory_bytes", frozenset({("shard", redis_cluster.url)}))] > 0
        # a cluster can be added as a registry row too (probed, not yet used)
        other = redis_cluster.url.replace("redis+cluster://", "redis+cluster://:pw@")
        r = await w.api.post("/api/shards", json={"name": "cl2", "url": other})
        assert r.status_code == 201, r.text
        rows = {s["name"]: s for s in (await w.api.get("/api/shards")).json()}
        assert rows["cl2"]["url"].startswith("redis+cluster://:***@")
        assert not rows["cl2"]["up"] and "AUTH" in rows["cl2"]["error"]  # it has none
        from tests.support.web import login

        await login(w.anon)
        for page in ("/", "/shards"):  # the pages show it too
            r = await w.anon.get(page)
            assert r.status_code == 200 and redis_cluster.url in r.text, page


async def test_dq_move_takes_a_plain_store_onto_the_cluster_with_due_times(
        redis_cluster: RedisCluster, redis_server: RedisProcess, dq_on: Callable[..., Master],
        tmp_path: Path) -> None:
    """dq-move: delayed jobs keep their due time to the ms, ready and in-flight ones are
    delivered from the cluster, a dead letter stays on the old store."""
    old = Store(ShardSet.from_urls([redis_server.url]))
    shard = old.shards.shards[0]
    later = int((time.time() + 3600) * 1000)
    try:
        for i in range(200):
            await old.add("cl", f"later{i}", {"i": i}, due_ms=later + i)
        for i in range(100):
            await old.add("cl", f"now{i}", {"i": i}, delay_ms=0)
        await old.add("cl", "dead", {}, delay_ms=0)
        await asyncio.sleep(0.05)
        await old.move_due(shard, range(old.buckets), limit=10_000)
        claimed = await old.claim(shard, 30, (1, 2, 3), 600_000)  # in flight at the move
        assert len(claimed) == 30
        dead = [c for c in claimed if c.id == "dead"] or \
            [c for c in await old.claim(shard, 100, (1, 2, 3), 600_000) if c.id == "dead"]
        assert await old.bury(dead[0], {"error": "test"})
        depths = await old.stats.depths(shard)
        assert depths["ready"] and depths["inflight"] and depths["dead"] == 1, depths
    finally:
        await old.shards.close()

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DQ_")},
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", "from dq.cli import move_main; move_main()",
                         "--from", redis_server.url, "--to", redis_cluster.url,
                         "--cluster-partitions", str(PARTITIONS), "--buckets", "8"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "moved 300 jobs" in out.stdout and "1 dead letters stay there" in out.stdout, \
        out.stdout
    src = redis.Redis(port=redis_server.port)
    assert src.hlen("dq:jobs") == 1 and src.zcard("dq:dead") == 1
    src.close()

    new = Store(ShardSet.from_urls([redis_cluster.url], cluster_partitions=PARTITIONS))
    try:
        for i in range(0, 200, 7):
            info = await new.lookup("cl", f"later{i}")
            assert info is not None and info.state == "delayed" and info.due_ms == later + i
            assert info.body["i"] == i
        assert await new.lookup("cl", "dead") is None
    finally:
        await new.shards.close()
    seen = Seen()
    async with Receiver(seen) as rcv:
        db = register(tmp_path / "reg" / "dq.sqlite3", "cl", rcv.url("/cb"))
        await asyncio.to_thread(dq_on, redis_cluster.url, db)
        missing = await wait_delivered(seen, {f"now{i}" for i in range(100)}, 60)
        assert not missing, f"{len(missing)} moved jobs never delivered"
        assert not {k for k in seen.ok if k.startswith("later")}


async def test_a_master_lost_is_one_mail_for_all_its_partitions(
        redis_cluster: RedisCluster, tmp_path: Path) -> None:
    """The partitions on a master that dies go down in the same round: one mail says so
    (not one per partition), and one says they are back after the failover."""
    from dq.roles.checker import Checker
    from dq.runtime.context import Context
    from tests.support.health import make_settings

    settings = make_settings(tmp_path, [redis_cluster.url], shard_down_after=0.5,
                             cluster_partitions=PARTITIONS)
    shards = ShardSet.from_urls(settings.redis, command_timeout=2.0,
                                cluster_partitions=PARTITIONS)
    c = Checker(Context(settings, "checker"), shards, mail_every=100.0)
    sent: list[tuple[str, str]] = []

    async def fake_send(subject: str, text: str) -> bool:
        sent.append((subject, text))
        return True

    c._send = fake_send  # type: ignore[method-assign]
    try:
        await c.check()
        victim = (await asyncio.to_thread(redis_cluster.masters))[0]
        on_victim = (await asyncio.to_thread(partitions_served, redis_cluster))[victim.port]
        assert len(on_victim) >= 2
        victim.kill9()
        deadline = time.monotonic() + 30
        while len(sent) < 2 and time.monotonic() < deadline:
            await c.check()
            await asyncio.sleep(0.2)
        subjects = [s for s, _ in sent]
        assert subjects[:1] == [f"[dq] {len(on_victim)} redis shards changed state: "
                                f"{len(on_victim)} DOWN"], subjects
        assert subjects[1:2] == [f"[dq] {len(on_victim)} redis shards changed state: "
                                 f"{len(on_victim)} back UP"], subjects
        assert all(f"{redis_cluster.url}#" in sent[0][1] for _ in on_victim)
    finally:
        await shards.close()


async def test_jobs_under_another_partition_count_are_reported_not_silently_stranded(
        redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture) -> None:
    from dq.sharding.cluster import warn_stray

    old = Store(ShardSet.from_urls([redis_cluster.url], cluster_partitions=4))
    new = ShardSet.from_urls([redis_cluster.url], cluster_partitions=PARTITIONS)
    try:
        for i in range(40):
            await old.add("cl", f"s{i}", {}, delay_ms=3_600_000)
        assert await warn_stray(old.shards.shards, "dq:") == {redis_cluster.url: {}}
        found = await warn_stray(new.shards, "dq:")
        stray = found[redis_cluster.url]
        assert set(stray) == set(partition_tags(4)) - set(partition_tags(PARTITIONS))
        assert sum(stray.values()) == 40
        assert "cluster_partitions = 16 does not read" in caplog.text
    finally:
        await old.shards.close()
        await new.close()
