"""Delivery end to end: timers and consumers in-process against a real redis-server, a real
HTTP receiver, a real SMTP server and a SQLite registry."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import pytest
import redis
from aiosmtpd.controller import Controller

from dq.config import Settings
from dq.errors import DqError
from dq.registry.core import AlertConf, Registry, Topic
from dq.registry.topics import TopicCache
from dq.roles import consumer
from dq.roles.consumer import alerts as consumer_alerts
from dq.roles.consumer import priority_order, retry_delay_ms
from dq.runtime.context import Context, open_store
from dq.storage import alerts as alerts_module
from dq.storage.store import Store
from tests.support.procs import free_port
from tests.support.receiver import Receiver, Reply, Request
from tests.support.redisproc import RedisProcess
from tests.support.roles import Mailbox, Roles


@pytest.fixture
def settings(redis_server: RedisProcess, tmp_path: Path) -> Settings:
    return Settings(redis=(redis_server.url,), db=f"sqlite:///{tmp_path / 'dq.sqlite3'}",
                    buckets=4, timers=1, concurrency=64, retry_unit=1.0, lease=5.0,
                    timer_tick=0.2, grace=5.0, registry_refresh=0.2, max_attempts=5,
                    add_timeout=5.0)  # 0.4 s is for a shard with a core; tests/test_add_path.py


def after(n: int, replies: list[Reply], then: Reply = (200, b'{"code":0}')) -> Callable[
        [Request], Reply]:
    """A handler answering replies[i] to the i-th call, then `then`."""
    count = Counter[str]()

    def handle(req: Request) -> Reply:
        i = count[req.job_id]
        count[req.job_id] += 1
        return replies[i] if i < len(replies) else then
    return handle


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --------------------------------------------------------------------------------------
def test_priority_order_is_weighted() -> None:
    rng = random.Random(7)
    firsts = Counter(priority_order((5, 3, 2), rng)[0] for _ in range(20000))
    assert abs(firsts[1] / 20000 - 0.5) < 0.02
    assert abs(firsts[2] / 20000 - 0.3) < 0.02
    assert all(sorted(priority_order((5, 3, 2), rng)) == [1, 2, 3] for _ in range(100))
    assert all(priority_order((0, 1, 0), rng)[0] == 2 for _ in range(100))
    # the second is drawn by weight among the rest: after 1, 2 comes next 3 times in 5
    after_1 = [o[1] for o in (priority_order((5, 3, 2), rng) for _ in range(20000))
               if o[0] == 1]
    assert abs(after_1.count(2) / len(after_1) - 0.6) < 0.03
    assert priority_order((0, 0, 0), rng) == [1, 2, 3]
    assert priority_order([1, 0, 0], rng) == [1, 2, 3]  # zero weights last, in order
    assert retry_delay_ms(0, 60) == 60_000 and retry_delay_ms(2, 1.5) == 7_500


async def test_thousand_jobs_each_once_never_early(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        settings: Settings) -> None:
    topic("bulk")
    for i in range(2):
        roles.start("timer", i, timers=2)
        roles.start("consumer", i)
    now_ms = int(time.time() * 1000)
    due = {str(i): now_ms + 300 + random.randint(0, 4700) for i in range(1000)}
    await asyncio.gather(*(store.add("bulk", i, {"i": i}, due_ms=d) for i, d in due.items()))
    calls = await receiver.wait_calls(1000, path="/bulk", timeout=20)
    await asyncio.sleep(0.5)  # a duplicate would show up now
    calls = receiver.calls(path="/bulk")
    ids = Counter(c.job_id for c in calls)
    assert len(calls) == 1000 and set(ids) == set(due) and max(ids.values()) == 1
    late = [c.at * 1000 - due[c.job_id] for c in calls]
    assert min(late) >= 0, f"a job arrived {-min(late):.1f} ms before its due time"
    print(f"\nlateness of 1000 jobs: p50={percentile(late, .5):.1f} ms "
          f"p99={percentile(late, .99):.1f} ms max={max(late):.1f} ms")
    assert (await store.stats.depths(store.shards.shards[0]))["jobs"] == 0


async def test_retry_schedule_then_dead_letter_and_one_mail(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        registry: Registry, smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    registry.save_alert(AlertConf(host="127.0.0.1", port=port, sender="dq@example.test"))
    topic("flaky")
    topic("broken", max_attempts=3, emails=("ops@example.test", "dev@example.test"))
    receiver.routes["/flaky"] = after(2, [(500, b"oops"), (500, b"oops")])
    receiver.routes["/broken"] = lambda req: (503, b"down for maintenance " * 50)
    roles.start("timer")
    roles.start("consumer")
    await store.add("flaky", "f1", {"x": 1}, delay_ms=0)
    await store.add("broken", "b1", {"x": 1}, delay_ms=0)

    flaky = await receiver.wait_calls(3, job_id="f1", timeout=10)
    assert [c.attempt for c in flaky] == [1, 2, 3]
    gaps = [flaky[1].at - flaky[0].at, flaky[2].at - flaky[1].at]
    assert abs(gaps[0] - 1) < 0.6 and abs(gaps[1] - 3) < 0.6, gaps
    broken = await receiver.wait_calls(3, job_id="b1", timeout=5)
    assert [c.attempt for c in broken] == [1, 2, 3]

    async with asyncio.timeout(5):
        while not box.messages:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    assert len(receiver.calls(job_id="b1")) == 3
    assert await store.get("flaky", "f1") is None
    [dead] = await store.dead_letters("broken")
    assert dead.id == "b1" and dead.error is not None
    assert dead.error["status"] == 503 and dead.error["attempts"] == 3
    assert dead.attempt == 3  # failed calls, as the console shows them
    assert len(dead.error["reply"]) == 500
    [(rcpt, mail)] = box.messages
    assert sorted(rcpt) == ["dev@example.test", "ops@example.test"]
    assert "broken" in mail and "b1" in mail and "503" in mail


async def test_retry_when_turns_a_200_into_a_retry(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("rw", retry_when="{res.code}!=0")
    receiver.routes["/rw"] = after(1, [(200, b'{"code":7,"msg":"busy"}')])
    roles.start("timer", retry_unit=0.3)
    roles.start("consumer", retry_unit=0.3)
    await store.add("rw", "1", {}, delay_ms=0)
    calls = await receiver.wait_calls(2, job_id="1", timeout=5)
    assert [c.attempt for c in calls] == [1, 2]
    assert calls[1].at - calls[0].at >= 0.3
    async with asyncio.timeout(2):
        while await store.get("rw", "1") is not None:
            await asyncio.sleep(0.02)
    assert (await store.stats.topic_stats("rw"))["ok"] == 1


async def test_killed_consumer_job_redelivered_after_lease(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("hang", timeout_ms=30_000)
    hang = asyncio.Event()

    async def first_hangs(req: Request) -> Reply:
        if len(receiver.calls(job_id=req.job_id)) == 1:
            await hang.wait()
        return 200, b"ok"
    receiver.routes["/hang"] = first_hangs
    roles.start("timer")
    _, killed = roles.start("consumer", lease=1.0)
    await store.add("hang", "k", {}, delay_ms=0)
    await receiver.wait_calls(1, job_id="k")
    roles.kill(killed)
    await asyncio.gather(killed, return_exceptions=True)
    t_kill = time.monotonic()
    roles.start("consumer", 1, lease=1.0)
    calls = await receiver.wait_calls(2, job_id="k", timeout=5)
    assert time.monotonic() - t_kill > 0.5  # only after the lease ran out
    assert [c.attempt for c in calls] == [1, 2]  # the call cut off counts as a delivery
    async with asyncio.timeout(2):
        while await store.get("hang", "k") is not None:
            await asyncio.sleep(0.02)
    hang.set()


async def test_a_job_whose_consumer_keeps_dying_is_buried_not_looped(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        smtp: tuple[Mailbox, int], registry: Registry) -> None:
    """Each delivery cut off by a dead consumer counts as an attempt: with max_attempts 2
    the job is called twice (X-Dq-Attempt 1, then 2), and when the second consumer dies
    too it becomes a dead letter that says why, without a third call, and is mailed."""
    box, port = smtp
    registry.save_alert(AlertConf(host="127.0.0.1", port=port, sender="dq@example.test"))
    topic("deadly", timeout_ms=30_000, max_attempts=2, emails=("ops@example.test",))
    hang = asyncio.Event()

    async def never_answers(req: Request) -> Reply:
        await hang.wait()
        return 200, b"ok"
    receiver.routes["/deadly"] = never_answers
    roles.start("timer")
    await store.add("deadly", "k", {}, delay_ms=0)
    for n in (1, 2):
        _, victim = roles.start("consumer", n, lease=1.0)
        await receiver.wait_calls(n, job_id="k", timeout=10)
        roles.kill(victim)
        await asyncio.gather(victim, return_exceptions=True)
    roles.start("consumer", 3, lease=1.0)
    async with asyncio.timeout(10):
        while not (dead := await store.dead_letters("deadly")):
            await asyncio.sleep(0.05)
    hang.set()
    assert [c.attempt for c in receiver.calls(job_id="k")] == [1, 2]
    [info] = dead
    assert info.attempt == 2 and info.error is not None
    assert "lease ran out" in info.error["error"] and "max_attempts is 2" in info.error["error"]
    async with asyncio.timeout(10):
        while not box.messages:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # a third call would come within a lease
    assert len(receiver.calls(job_id="k")) == 2


async def test_del_of_ready_job_prevents_delivery(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("d")
    roles.start("timer")
    await store.add("d", "gone", {}, delay_ms=0)
    async with asyncio.timeout(3):
        while (info := await store.lookup("d", "gone")) is None or info.state != "ready":
            await asyncio.sleep(0.01)
    assert await store.delete("d", "gone")
    await store.add("d", "control", {}, delay_ms=0)
    roles.start("consumer")
    await receiver.wait_calls(1, job_id="control")
    await asyncio.sleep(0.2)
    assert receiver.calls(job_id="gone") == []


async def test_del_in_flight_then_no_retry(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("d")
    release = asyncio.Event()

    async def held(req: Request) -> Reply:
        await release.wait()
        return 500, b"failed"
    receiver.routes["/d"] = held
    roles.start("timer", retry_unit=0.2)
    roles.start("consumer", retry_unit=0.2)
    await store.add("d", "x", {}, delay_ms=0)
    await receiver.wait_calls(1, job_id="x")
    assert await store.delete("d", "x")
    release.set()
    await asyncio.sleep(1.0)  # a retry would have come at +0.2 s
    assert len(receiver.calls(job_id="x")) == 1
    assert await store.get("d", "x") is None


async def test_readd_during_delivery_is_not_clobbered(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("r")
    release = asyncio.Event()

    async def first_held(req: Request) -> Reply:
        if req.fields()["gen"] == "1":
            await release.wait()
        return 200, b"ok"
    receiver.routes["/r"] = first_held
    roles.start("timer")
    roles.start("consumer")
    await store.add("r", "x", {"gen": 1}, delay_ms=0)
    await receiver.wait_calls(1, job_id="x")
    await store.add("r", "x", {"gen": 2}, delay_ms=300)
    release.set()
    calls = await receiver.wait_calls(2, job_id="x", timeout=5)
    assert [c.fields()["gen"] for c in calls] == ["1", "2"]
    assert calls[1].at - calls[0].at >= 0.25
    async with asyncio.timeout(2):
        while await store.get("r", "x") is not None:
            await asyncio.sleep(0.02)


BODY = {"a": "x y&z=1", "n": 5, "f": 1.5, "flag": True, "off": False, "none": None,
        "items": [1, "two"], "obj": {"k": "v"}, "uni": "中文"}


def _verify(req: Request, secret: str, topic_key: str, job_id: str) -> None:
    assert req.headers["x-dq-topic"] == topic_key
    assert unquote(req.headers["x-dq-id"]) == job_id
    assert req.headers["x-dq-attempt"] == "1"
    ts = req.headers["x-dq-timestamp"]
    assert abs(int(ts) - time.time()) < 5
    signed = req.query if req.method == "GET" else req.body
    want = hmac.new(secret.encode(), ts.encode() + b"." + signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["x-dq-signature"], want)


async def test_formats_headers_and_signature(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("g", method="GET", secret="s3cret", callback=receiver.url("/g?src=dq"))
    topic("p", method="POST", secret="s3cret")
    topic("j", method="POST", body_format="json", secret="s3cret")
    topic("plain", method="POST")
    roles.start("timer")
    roles.start("consumer")
    for key in ("g", "p", "j", "plain"):
        await store.add(key, "订单-1", BODY, delay_ms=0)
    for key in ("g", "p", "j"):
        [req] = await receiver.wait_calls(1, path=f"/{key}")
        _verify(req, "s3cret", key, "订单-1")
    [plain] = await receiver.wait_calls(1, path="/plain")
    assert "x-dq-signature" not in plain.headers and "x-dq-timestamp" not in plain.headers

    [g] = receiver.calls(path="/g")
    assert g.method == "GET" and g.query.startswith(b"src=dq&") and g.body == b""
    for req in (g, receiver.calls(path="/p")[0]):
        f = req.fields()
        assert f["a"] == "x y&z=1" and f["n"] == "5" and f["f"] == "1.5"
        assert f["flag"] == "1" and f["off"] == "" and f["none"] == ""  # as the original
        assert json.loads(f["items"]) == [1, "two"] and json.loads(f["obj"]) == {"k": "v"}
        assert f["uni"] == "中文" and "notify_time" in f and "dq_set_time" in f
    [p] = receiver.calls(path="/p")
    assert p.headers["content-type"] == "application/x-www-form-urlencoded"
    [j] = receiver.calls(path="/j")
    assert j.headers["content-type"] == "application/json"
    assert {k: v for k, v in j.json().items() if k in BODY} == BODY
    assert "notify_time" in j.json()


# ids that a lossy X-Dq-Id would confuse: each pair used to arrive with one header
TRICKY_IDS = ("é✓😀", "%C3%A9%E2%9C%93%F0%9F%98%80", " lead", "lead", "trail ", "a b",
              "a+b", "a%20b", "50%", "%", "a:b", "order:42|x", "|", "~._-", "中文 订单",
              "tab\u00a0nbsp", "a/b?c#d&e=f")


async def test_x_dq_id_is_unambiguous_for_any_id(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    """Every id arrives as its UTF-8 bytes with all but A-Z a-z 0-9 - . _ ~ percent-encoded:
    unquote gives the id back exactly (spaces, '%', ':', '|' and non-ASCII included), and
    no two ids share a header. X-Dq-Topic is encoded the same way."""
    topic("ids")
    topic("t.é 1")  # a key only a hand-written registry row can hold
    roles.start("timer")
    roles.start("consumer")
    for job_id in TRICKY_IDS:
        await store.add("ids", job_id, {}, delay_ms=0)
    await store.add("t.é 1", "x", {}, delay_ms=0)
    calls = await receiver.wait_calls(len(TRICKY_IDS), path="/ids")
    raw = {c.headers["x-dq-id"] for c in calls}
    assert len(raw) == len(TRICKY_IDS)  # one header per id: none taken for another
    assert sorted(unquote(h, errors="strict") for h in raw) == sorted(TRICKY_IDS)
    assert all(re.fullmatch(r"(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})+", h) for h in raw), raw
    assert {c.headers["x-dq-id"] for c in calls if c.job_id in ("é✓😀", " lead")} == {
        "%C3%A9%E2%9C%93%F0%9F%98%80", "%20lead"}
    [t] = await receiver.wait_calls(1, path="/t.%C3%A9%201")
    assert t.headers["x-dq-topic"] == "t.%C3%A9%201"


async def test_offline_topic_keeps_its_jobs(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("off", online=False)
    roles.start("timer")
    roles.start("consumer", lease=0.5)
    await store.add("off", "1", {}, delay_ms=0)
    await asyncio.sleep(1.2)
    assert receiver.calls(job_id="1") == []
    assert await store.get("off", "1") is not None
    topic("off", online=True)
    [req] = await receiver.wait_calls(1, job_id="1", timeout=5)
    assert req.attempt == 1  # parking is not an attempt
    async with asyncio.timeout(2):
        while await store.get("off", "1") is not None:
            await asyncio.sleep(0.02)


async def test_graceful_stop_finishes_callback_in_flight(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("slow")

    async def slow(req: Request) -> Reply:
        await asyncio.sleep(1.0)
        return 200, b"ok"
    receiver.routes["/slow"] = slow
    roles.start("timer")
    ctx, task = roles.start("consumer")
    await store.add("slow", "1", {}, delay_ms=0)
    await receiver.wait_calls(1, job_id="1")
    t0 = time.monotonic()
    ctx.stopping.set()
    async with asyncio.timeout(5):
        await task
    assert 0.5 < time.monotonic() - t0 < 3
    assert await store.get("slow", "1") is None
    assert (await store.stats.depths(store.shards.shards[0]))["inflight"] == 0
    assert (await store.stats.topic_stats("slow"))["ok"] == 1


async def test_unreadable_jobs_become_dead_letters_and_do_not_hold_back_their_batch(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        registry: Registry, smtp: tuple[Mailbox, int], redis_server: RedisProcess) -> None:
    """Jobs whose stored form cannot be read (written by hand, or damaged), leased in the
    same claim as good ones: the good ones are called, the others kept as dead letters with
    why, their owners mailed, and the console can show and delete them."""
    box, port = smtp
    registry.save_alert(AlertConf(host="127.0.0.1", port=port, sender="dq@example.test"))
    topic("p", emails=("ops@example.test",))
    r = redis.Redis.from_url(redis_server.url)
    now = int(time.time() * 1000)
    bad = {"notjson": f"abc|2|0|{now:x}|0|{{not json", "list": f"abd|2|0|{now:x}|0|[1,2]",
           "fields": "abe|2|zz|-|0|{}"}
    try:
        for job_id, raw in bad.items():  # ahead of the good jobs in the ready list
            r.hset("dq:jobs", f"p:{job_id}", raw)
            r.rpush("dq:ready:2", f"{raw.split('|')[0]}|p:{job_id}")
        for i in range(5):
            await store.add("p", f"good{i}", {"i": i}, delay_ms=0)
    finally:
        r.close()
    roles.start("timer", lease=1.0)
    roles.start("consumer", lease=1.0)
    await receiver.wait_calls(5, timeout=10)
    async with asyncio.timeout(5):
        while len(box.messages) < 3:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    assert sorted(c.job_id for c in receiver.calls()) == [f"good{i}" for i in range(5)]
    dead = {d.id: d for d in await store.dead_letters("p")}
    assert sorted(dead) == sorted(bad)
    for d in dead.values():
        assert d.error is not None and "cannot be read" in d.error["error"]
        assert d.error["status"] == 0 and d.body == {}
    assert "JSON list, not an object" in dead["list"].error["error"]  # type: ignore[index]
    assert all("cannot be read" in mail for _, mail in box.messages)
    with pytest.raises(DqError, match=r"cannot read.*delete it"):
        await store.get("p", "notjson")
    assert await store.delete("p", "notjson")
    assert (await store.stats.depths(store.shards.shards[0]))["jobs"] == 2


async def test_jobs_added_with_more_buckets_are_delivered_after_the_setting_shrinks(
        settings: Settings, receiver: Receiver, roles: Roles,
        topic: Callable[..., Topic]) -> None:
    """Jobs written while `buckets` was 8, then timers started with 4 (the fixture's): the
    ones in buckets 4-7, where no timer looks now, are moved to theirs and delivered."""
    topic("b")
    wide = open_store(settings.replace(buckets=8))
    try:
        for i in range(40):
            await wide.add("b", f"j{i}", {}, delay_ms=300)
        assert any(wide.keys.bucket(f"b:j{i}") >= 4 for i in range(40))
    finally:
        await wide.shards.close()
    roles.start("timer")
    roles.start("consumer")
    calls = await receiver.wait_calls(40, timeout=10)
    assert sorted(c.job_id for c in calls) == sorted(f"j{i}" for i in range(40))


async def test_a_job_is_called_only_within_what_is_left_of_its_lease(
        settings: Settings, store: Store, registry: Registry, receiver: Receiver,
        topic: Callable[..., Topic]) -> None:
    """The callback's time counts from the claim, not from the call: when the topic lookup
    (a registry slow to answer) took most of the lease, the job is not called, and its
    lease runs out as usual; otherwise the call is cut off where the lease would end."""
    topic("slow", timeout_ms=8000)
    receiver.routes["/slow"] = lambda req: (200, b"ok")
    ctx = Context(settings.replace(lease=10.0), "consumer")
    topics = TopicCache(registry, refresh=60)
    worker = consumer.Consumer(ctx, store, topics, registry)
    shard = store.shards.shards[0]
    for job_id in ("late", "early"):
        await store.add("slow", job_id, {}, delay_ms=0)
    await store.move_due(shard, range(store.buckets))
    claimed = {c.id: c for c in await store.claim(shard, 10, [1, 2, 3], 10_000)}
    async with consumer.open_session(4) as session:
        worker.session = session
        t0 = time.monotonic()
        assert worker._timeout(registry.get_topic("slow"), t0 - 4.0) == pytest.approx(  # type: ignore[arg-type]
            5.0, abs=0.1)  # 9 s of the lease's 90 %, 4 s gone: not the topic's 8 s
        await worker._deliver(claimed["late"], t0 - 8.8)  # 0.2 s left of the 9 s
        await worker._deliver(claimed["early"], t0)
    assert [c.job_id for c in receiver.calls()] == ["early"]
    assert worker.parked == 1 and worker.delivered == 1
    info = await store.lookup("slow", "late")
    # parked: delivered again after a lease's time, with no attempt counted
    assert info is not None and info.state == "delayed" and info.attempt == 0
    assert info.due_ms - time.time() * 1000 > 8_000


async def test_an_alert_the_mail_server_refused_is_mailed_once_it_answers(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead letter's alert mail is owed until sent: one the mail server could not take
    is mailed by consumer 0's sweep once it answers, once; one whose dead letter was
    deleted meanwhile is not mailed."""
    monkeypatch.setattr(consumer_alerts, "ALERT_SWEEP", 0.2)
    monkeypatch.setattr(alerts_module, "ALERT_HEAD_START_MS", 300)
    port = free_port()  # nothing listens there yet
    registry.save_alert(AlertConf(host="127.0.0.1", port=port, sender="dq@example.test"))
    topic("broken", max_attempts=1, emails=("ops@example.test",))
    receiver.routes["/broken"] = lambda req: (500, b"down")
    roles.start("timer")
    roles.start("consumer")
    for job_id in ("b1", "b2"):
        await store.add("broken", job_id, {}, delay_ms=0)
    async with asyncio.timeout(10):
        while len(await store.dead_letters("broken")) < 2:
            await asyncio.sleep(0.05)
    shard = store.shards.shards[0]
    assert sorted(await shard.client.zrange(store.keys.alerts, 0, -1)) == [b"broken:b1",
                                                                       b"broken:b2"]
    assert await store.delete("broken", "b2")
    await asyncio.sleep(0.6)  # the sweep finds the mail server still down: b1 stays owed
    box = Mailbox()
    ctl = Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        async with asyncio.timeout(10):
            while not box.messages:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # several sweeps more: no second mail
    finally:
        ctl.stop()
    [(rcpt, mail)] = box.messages
    assert rcpt == ["ops@example.test"] and "broken:b1" in mail
    assert await shard.client.zcard(store.keys.alerts) == 0
