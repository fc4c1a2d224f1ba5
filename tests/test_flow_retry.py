"""Issue 20, second half: retry policies, Retry-After, the circuit breaker and fixed
request headers, against a real redis-server, real receivers, real consumers and timers
(in-process), a real SMTP server and the registry on SQLite (MariaDB for the API)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from dq.config import Settings
from dq.registry import headers as hdr
from dq.registry.core import AlertConf, Registry, Topic
from dq.registry.retry_policy import RetryPolicyError, normalise, parse
from dq.roles.callback import retry_after
from dq.roles.consumer import alerts as consumer_alerts
from dq.storage import alerts as alerts_module
from dq.storage.jobs import JobInfo
from dq.storage.store import Store
from tests.support.procs import free_port
from tests.support.receiver import Receiver, Reply, Request
from tests.support.redisproc import RedisProcess
from tests.support.roles import Mailbox, Roles
from tests.support.waits import until
from tests.support.web import Web, login, open_web

S = 1000  # ms


# -- the schedule, without Redis --------------------------------------------------------

def test_linear_is_the_default_and_php_delayqueues_schedule() -> None:
    for text in ("", "linear", " LINEAR "):
        assert [parse(text).delay_ms(n, 60) for n in range(4)] == [60 * S, 180 * S, 300 * S,
                                                                    420 * S]
    assert [parse("linear:30s").delay_ms(n, 60) for n in range(3)] == [30 * S, 90 * S, 150 * S]
    assert Topic().retry_policy == "linear" and Topic(retry_policy=" ").retry_policy == "linear"


def test_exponential_and_list_schedules() -> None:
    exp = parse("exp:30s,2,1h")
    assert [exp.delay_ms(n, 60) for n in range(9)] == [
        30 * S, 60 * S, 120 * S, 240 * S, 480 * S, 960 * S, 1920 * S, 3600 * S, 3600 * S]
    assert exp.delay_ms(10_000, 60) == 3600 * S  # no overflow for a huge attempt number
    assert parse("exp:1.5s,1.5,10s").delay_ms(2, 60) == 3375
    lst = parse("list:1m,5m,30m,2h")
    assert [lst.delay_ms(n, 60) for n in range(6)] == [60 * S, 300 * S, 1800 * S, 7200 * S,
                                                       7200 * S, 7200 * S]
    assert parse("list: 2s ,3s").delay_ms(1, 60) == 3000  # spaces are ignored
    assert normalise(" List: 1M, 5m ") == "list:1m,5m" and normalise("") == "linear"


@pytest.mark.parametrize(("text", "says"), [
    ("fast", "is not one of the forms linear, linear:30s, exp:30s,2,1h or list:1m,5m,30m,2h"),
    ("exp:30s,2", "exp takes a base, a factor and a cap, e.g. exp:30s,2,1h"),
    ("exp:1h,2,30s", "the cap '30s' is below the base '1h'"),
    ("exp:30s,0.5,1h", "the factor '0.5' must be a number from 1 to 100"),
    ("exp:30x,2,1h", "the base '30x' is not a duration: write a number with a unit ms, s, m"),
    ("list:", "list takes 1 to 100 waits"),
    ("list:1m,,5m", "wait 2 '' is not a duration"),
    ("list:0s", "wait 1 '0s' is out of range: from 1s to 7d"),
    ("list:8d", "out of range"),
    ("linear:1s,2s", "linear takes one unit"),
])
def test_bad_policies_say_what_to_write(text: str, says: str) -> None:
    with pytest.raises(RetryPolicyError) as err:
        parse(text)
    assert says in str(err.value)


def test_retry_after_values() -> None:
    now = time.time()
    assert retry_after("4", now) == 4.0 and retry_after(" 120 ", now) == 120.0
    later = retry_after(formatdate(now + 30, usegmt=True), now)
    assert later is not None and 28 <= later <= 31
    assert retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    for junk in (None, "", "soon", "-5", "4.5"):
        assert retry_after(junk, now) is None


def test_headers_are_checked_kept_and_masked() -> None:
    got = hdr.parse({"Authorization": "Bearer t0k", "X-Api-Key": "k1"})
    assert got == (("Authorization", "Bearer t0k"), ("X-Api-Key", "k1"))
    assert hdr.parse("Authorization: Bearer t0k\n\nX-Api-Key: k1") == got
    assert hdr.masked(got) == {"Authorization": "***", "X-Api-Key": "***"}
    assert hdr.masked_text(got) == "Authorization: ***\nX-Api-Key: ***"
    # *** keeps the stored value of that name; a left-out name is removed
    assert hdr.parse({"authorization": "***"}, keep=got) == (("authorization", "Bearer t0k"),)
    assert hdr.loads(hdr.dumps(got)) == got and hdr.loads("not json") == ()
    for bad, says in [({"Host": "x"}, "cannot be set"), ({"content-length": "1"}, "cannot be set"),
                      ({"X-Dq-Attempt": "9"}, "cannot be set"), ({"Connection": "close"}, "cannot"),
                      ({"Bad Name": "x"}, "is not valid"), ({"A": "x\r\nB: y"}, "control"),
                      ({"A": "***"}, "none is stored"), ("no colon here", "has no ':'"),
                      ({"A": ["x"]}, "must be text"), ({"a": "1", "A": "2"}, "given twice"),
                      ({"A": "caf\u00e9"}, "must be ASCII")]:
        with pytest.raises(hdr.HeaderError, match=says):
            hdr.parse(bad)


# -- end to end -------------------------------------------------------------------------

@pytest.fixture
def settings(redis_server: RedisProcess, redis_factory: Callable[..., RedisProcess],
             tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """One shard, or as many as the test's indirect parameter says."""
    extra = tuple(redis_factory().url for _ in range(getattr(request, "param", 1) - 1))
    return Settings(redis=(redis_server.url, *extra), db=f"sqlite:///{tmp_path / 'dq.sqlite3'}",
                    buckets=4, timers=1, concurrency=64, retry_unit=1.0, lease=10.0,
                    timer_tick=0.2, grace=5.0, registry_refresh=0.2, max_attempts=5,
                    add_timeout=5.0)  # 0.4 s is for a shard with a core; tests/test_add_path.py


def first_then(first: Reply, then: Reply = (200, b'{"code":0}')) -> Callable[[Request], Reply]:
    seen: set[str] = set()

    def handle(req: Request) -> Reply:
        if req.job_id in seen:
            return then
        seen.add(req.job_id)
        return first
    return handle


async def test_503_with_retry_after_waits_and_uses_no_attempt(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    # max_attempts 1: had the 503 used the attempt, the job would be a dead letter now
    topic("busy", max_attempts=1)
    topic("dated", max_attempts=1)
    receiver.routes["/busy"] = first_then((503, b"busy", {"Retry-After": "4"}))
    when = formatdate(time.time() + 4, usegmt=True)
    receiver.routes["/dated"] = first_then((429, b"slow down", {"Retry-After": when}))
    roles.start("timer")
    roles.start("consumer")
    await store.add("busy", "b1", {"x": 1}, delay_ms=0)
    await store.add("dated", "d1", {"x": 1}, delay_ms=0)
    busy = await receiver.wait_calls(1, job_id="b1", timeout=10)

    async def error_shown() -> JobInfo | None:
        got = await store.lookup("busy", "b1")
        return got if got is not None and got.error is not None else None
    info = await until(error_shown, 5, "b1's error stored")  # waiting, no attempt counted
    assert info is not None and info.state == "delayed" and info.attempt == 0
    assert info.error is not None and info.error["status"] == 503
    assert "Retry-After 4s" in info.error["error"]
    busy = await receiver.wait_calls(2, job_id="b1", timeout=15)
    dated = await receiver.wait_calls(2, job_id="d1", timeout=15)
    for calls, least in ((busy, 4.0), (dated, 2.9)):  # an HTTP date has whole seconds
        gap = calls[1].at - calls[0].at
        assert gap >= least - 0.05, f"called again after {gap:.2f}s"
        assert gap < least + 5
        assert [c.attempt for c in calls] == [1, 1]  # the same attempt, sent again
    async def finished() -> bool:
        return await store.lookup("busy", "b1") is None
    await until(finished, 5, "b1 finished")
    assert len(receiver.calls(job_id="b1")) == 2
    stats = await store.stats.topic_stats("busy")  # both calls counted, one failed, none dead
    assert (stats["notifies"], stats["fail"], stats["ok"], stats.get("dead", 0)) == (2, 1, 1, 0)


async def test_retry_after_is_capped_by_retry_after_max(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("cap", max_attempts=1)
    receiver.routes["/cap"] = first_then((503, b"", {"Retry-After": "86400"}))
    roles.start("timer")
    roles.start("consumer", retry_after_max=2.0)
    await store.add("cap", "c1", {}, delay_ms=0)
    calls = await receiver.wait_calls(2, job_id="c1", timeout=15)
    assert 1.9 <= calls[1].at - calls[0].at < 8 and [c.attempt for c in calls] == [1, 1]


async def test_exponential_and_list_policies_end_to_end(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("exp", max_attempts=4, retry_policy="exp:1s,2,10s")
    topic("lst", max_attempts=4, retry_policy="list:1s,3s")
    receiver.routes["/exp"] = receiver.routes["/lst"] = lambda req: (500, b"no")
    roles.start("timer")
    roles.start("consumer")
    await store.add("exp", "e1", {}, delay_ms=0)
    await store.add("lst", "l1", {}, delay_ms=0)
    for job, waits in (("e1", [1, 2, 4]), ("l1", [1, 3, 3])):
        calls = await receiver.wait_calls(4, job_id=job, timeout=30)
        gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
        for gap, want in zip(gaps, waits, strict=True):
            assert want - 0.05 <= gap < want + 1.5, f"{job}: gaps {gaps}, want {waits}"
        assert [c.attempt for c in calls] == [1, 2, 3, 4]


def ids_on_every_shard(store: Store, topic: str, n: int) -> list[str]:
    """`n` job ids that between them land on every shard (the shards' names hold their random
    ports, so which shard an id hashes to differs from run to run)."""
    by_shard: dict[str, list[str]] = {}
    for i in range(1000):
        by_shard.setdefault(store.shards.owner(f"{topic}:k{i}").name, []).append(f"k{i}")
        if len(by_shard) == len(store.shards.shards) and sum(map(len, by_shard.values())) >= n:
            break
    firsts = [ids[0] for ids in by_shard.values()]
    rest = [k for ids in by_shard.values() for k in ids[1:]]
    return (firsts + rest)[:n]


@pytest.mark.parametrize("settings", [1, 2], indirect=True, ids=["1shard", "2shards"])
async def test_breaker_opens_holds_without_attempts_probes_and_closes_with_two_mails(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        registry: Registry, smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    registry.save_alert(AlertConf(host="127.0.0.1", port=port, sender="dq@example.test"))
    topic("brk", max_attempts=10, retry_policy="list:1s", breaker_threshold=3,
          breaker_cooloff=4, emails=("ops@example.test",))
    healthy = False
    receiver.routes["/brk"] = lambda req: (200, b"ok") if healthy else (500, b"down")
    roles.start("timer")
    roles.start("consumer", 0)
    roles.start("consumer", 1)
    for i in range(3):
        await store.add("brk", f"j{i}", {}, delay_ms=0)
    await receiver.wait_calls(3, path="/brk", timeout=10)
    deadline = time.monotonic() + 10
    while (await store.alerts.breaker_state("brk")).get("state") != "open":
        assert time.monotonic() < deadline, "the breaker did not open"
        await asyncio.sleep(0.05)
    opened = time.time()
    ks = ids_on_every_shard(store, "brk", 5)
    for k in ks:  # added while open: they must wait, and use no attempt
        await store.add("brk", k, {}, delay_ms=0)
    await asyncio.sleep(2.5)  # the j jobs' retries (after 1 s) fall due meanwhile
    assert len(receiver.calls(path="/brk")) == 3, "called while the breaker was open"
    infos = [await store.lookup("brk", k) for k in ks]
    assert all(info is not None and info.attempt == 0 for info in infos)
    # with 2 shards, jobs on both wait for the one breaker (on the topic's home shard)
    assert len({info.shard for info in infos if info}) == len(store.shards.shards)
    healthy = True
    calls = await receiver.wait_calls(3 + 8, path="/brk", timeout=30)
    later = calls[3:]
    assert min(c.at for c in later) >= opened + 4 - 0.3, "probe before the cool-off ended"
    assert sorted(later, key=lambda c: c.at)[0].at < opened + 9
    by_job = {c.job_id: c.attempt for c in later}
    assert by_job == {**{f"j{i}": 2 for i in range(3)}, **{k: 1 for k in ks}}
    deadline = time.monotonic() + 10
    while len(box.messages) < 2:
        assert time.monotonic() < deadline, f"mails: {box.messages}"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    subjects = [m[1] for m in box.messages]
    assert len(box.messages) == 2 and all(m[0] == ["ops@example.test"] for m in box.messages)
    assert "circuit breaker open" in subjects[0] and "circuit breaker closed" in subjects[1]
    state = await store.alerts.breaker_state("brk")
    assert (state["state"], state["opens"], state["closes"], state["fails"]) == \
        ("closed", 1, 1, 0)
    shard = store.alerts.breaker_home("brk")
    assert await shard.call("ZCARD", store.keys.breaker_mail) == 0  # no mail still owed


async def test_a_failed_probe_reopens_for_another_cooloff(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("rep", max_attempts=10, retry_policy="list:1s", breaker_threshold=1,
          breaker_cooloff=2)
    receiver.routes["/rep"] = lambda req: (500, b"down")
    roles.start("timer")
    roles.start("consumer")
    await store.add("rep", "r1", {}, delay_ms=0)
    calls = await receiver.wait_calls(3, job_id="r1", timeout=20)
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert all(g >= 2 - 0.1 for g in gaps), f"probes {gaps} apart, cool-off 2 s"
    assert (await store.alerts.breaker_state("rep"))["opens"] == 1  # a reopening mails nothing


async def test_breaker_script_opens_once_hands_out_one_probe_and_owes_two_mails(
        store: Store) -> None:
    async def ask(op: str) -> tuple[str, Any]:
        return await store.alerts.breaker("t", op, threshold=2, cooloff_ms=300, probe_ms=5000,
                                   error="HTTP 500")
    assert await ask("check") == ("call", 0)
    assert (await ask("fail"))[0] == "closed"
    assert await ask("check") == ("call", 1)
    assert (await ask("ok"))[0] == "ok"  # a success resets the failures in a row
    assert (await ask("fail"))[0] == "closed"
    verdict, member = await ask("fail")
    assert verdict == "opened" and '"event":"open"' in member and '"fails":2' in member
    assert (await ask("fail"))[0] == "open"  # a late failure: no second opening, no mail
    verdict, wait = await ask("check")
    assert verdict == "wait" and 0 < int(wait) <= 300
    await asyncio.sleep(0.35)
    assert (await ask("check"))[0] == "probe"
    verdict, wait = await ask("check")  # the probe is out: nobody else calls
    assert verdict == "wait" and 4000 < int(wait) <= 5000
    assert (await ask("fail"))[0] == "open"  # the probe failed: a new cool-off
    assert (await ask("check"))[0] == "wait"
    await asyncio.sleep(0.35)
    assert (await ask("check"))[0] == "probe"
    verdict, member = await ask("ok")
    assert verdict == "closed" and '"event":"close"' in member
    assert (await ask("ok"))[0] == "ok" and await ask("check") == ("call", 0)
    state = await store.alerts.breaker_state("t")
    assert (state["state"], state["opens"], state["closes"]) == ("closed", 1, 1)
    assert await store.alerts.breaker_home("t").call("ZCARD", store.keys.breaker_mail) == 2


async def test_a_breaker_mail_the_mail_server_refused_is_mailed_once_it_answers(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic],
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The opening's mail is owed in Redis until sent: one the mail server could not take
    is mailed by consumer 0's sweep once it answers, once."""
    monkeypatch.setattr(consumer_alerts, "ALERT_SWEEP", 0.2)
    monkeypatch.setattr(alerts_module, "ALERT_HEAD_START_MS", 300)
    port = free_port()  # nothing listens there yet
    registry.save_alert(AlertConf(host="127.0.0.1", port=port, sender="dq@example.test"))
    topic("down", max_attempts=5, breaker_threshold=1, breaker_cooloff=600,
          emails=("ops@example.test",))
    receiver.routes["/down"] = lambda req: (500, b"down")
    roles.start("timer")
    roles.start("consumer")
    await store.add("down", "d1", {}, delay_ms=0)
    home = store.alerts.breaker_home("down")
    async with asyncio.timeout(10):
        while not await home.call("ZCARD", store.keys.breaker_mail):
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.6)  # the sweep finds the mail server still down: still owed
    assert await home.call("ZCARD", store.keys.breaker_mail) == 1
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
    assert rcpt == ["ops@example.test"] and "circuit breaker open" in mail
    assert await home.call("ZCARD", store.keys.breaker_mail) == 0
    assert len(receiver.calls(path="/down")) == 1  # open for 600 s: called once


async def test_headers_arrive_at_the_receiver(
        store: Store, receiver: Receiver, roles: Roles, topic: Callable[..., Topic]) -> None:
    topic("auth", headers=(("Authorization", "Bearer t0k"), ("X-Api-Key", "k1")))
    roles.start("timer")
    roles.start("consumer")
    await store.add("auth", "a1", {"x": 1}, delay_ms=0)
    (call,) = await receiver.wait_calls(1, job_id="a1", timeout=10)
    assert call.headers["authorization"] == "Bearer t0k" and call.headers["x-api-key"] == "k1"
    assert call.headers["x-dq-attempt"] == "1"


# -- the API and the console ------------------------------------------------------------

@pytest.fixture(name="web")
async def web_fixture(redis_server: RedisProcess, db_url: str) -> AsyncIterator[Web]:
    async with open_web(redis_server.url, db_url) as w:
        yield w


NEW = {"topic": "hooks", "callback": "https://example.com/hook"}


async def test_api_validates_policies_and_masks_headers(web: Web) -> None:
    r = await web.api.post("/api/topics", json={**NEW, "retry_policy": "exp:30s,2",
                                                "headers": {"Host": "evil"}})
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert "exp takes a base, a factor and a cap" in errors["retry_policy"]
    assert "header Host cannot be set" in errors["headers"]
    r = await web.api.post("/api/topics", json={**NEW, "breaker_threshold": -1})
    assert r.status_code == 422 and "breaker_threshold" in r.json()["errors"]

    r = await web.api.post("/api/topics", json={
        **NEW, "retry_policy": " EXP:30s, 2, 1h", "breaker_threshold": 5, "breaker_cooloff": 30,
        "headers": {"Authorization": "Bearer t0k"}})
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["retry_policy"] == "exp:30s,2,1h" and got["headers"] == {"Authorization": "***"}
    assert (got["breaker_threshold"], got["breaker_cooloff"]) == (5, 30)
    assert "t0k" not in r.text
    r = await web.api.get("/api/topics/hooks")
    assert "t0k" not in r.text and r.json()["breaker"] == "closed"
    # what GET returns can be PUT back: *** keeps the stored value
    r = await web.api.put("/api/topics/hooks", json=r.json())
    assert r.status_code == 200, r.text
    stored = web.registry.get_topic("hooks")
    assert stored is not None and stored.headers == (("Authorization", "Bearer t0k"),)
    r = await web.api.put("/api/topics/hooks", json={"headers": {}})
    assert r.status_code == 200 and r.json()["headers"] == {}
    defaults = (await web.api.post("/api/topics", json={**NEW, "topic": "plain"})).json()
    assert (defaults["retry_policy"], defaults["breaker_threshold"], defaults["breaker_cooloff"],
            defaults["headers"], defaults["breaker"]) == ("linear", 0, 60, {}, None)


async def test_console_form_masks_headers_and_explains_errors(web: Web) -> None:
    web.registry.save_topic(Topic(topic="hooks", callback="https://example.com/h",
                                  headers=(("Authorization", "Bearer t0k"),),
                                  breaker_threshold=2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(web.app),
                                 base_url="http://127.0.0.1") as client:
        csrf = await login(client)
        page = await client.get("/topics/hooks/edit")
        assert "Authorization: ***" in page.text and "t0k" not in page.text
        assert "closed" in page.text  # the breaker's state
        form = {"csrf": csrf, "callback": "https://example.com/h", "method": "GET",
                "timeout_ms": "3000", "priority": "2", "status": "online", "delay": "0",
                "max_attempts": "0", "body_format": "form", "headers": "Authorization: ***",
                "retry_policy": "list:1m,5x", "breaker_threshold": "2", "breaker_cooloff": "60"}
        r = await client.post("/topics/hooks/edit", data=form)
        assert r.status_code == 422 and "wait 2 &#39;5x&#39; is not a duration" in r.text
        r = await client.post("/topics/hooks/edit", data={**form, "retry_policy": "list:1m,5m"})
        assert r.status_code == 303, r.text
        stored = web.registry.get_topic("hooks")
        assert stored is not None and stored.headers == (("Authorization", "Bearer t0k"),)
        assert stored.retry_policy == "list:1m,5m"
        await web.store.alerts.breaker("hooks", "fail", threshold=1, cooloff_ms=60_000,
                                       probe_ms=5000)
        page = await client.get("/topics")
        assert "breaker open" in page.text
        metrics = await client.get("/metrics", auth=("admin", "s3cret-pw"))
        assert 'dq_breaker_open{topic="hooks"} 1.0' in metrics.text
        assert 'dq_breaker_transitions_total{to="open",topic="hooks"} 1.0' in metrics.text
