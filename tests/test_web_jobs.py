"""The admin API's jobs, dead letters, statistics, metrics and docs, and `web.app.run`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from dq.config import Settings
from dq.runtime.context import Context
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.web import Web, assert_error, bury, fail_once, make_topic, open_web
from web.app import run


@pytest.fixture(name="web")
async def web_fixture(redis_server: RedisProcess, db_url: str) -> AsyncIterator[Web]:
    async with open_web(redis_server.url, db_url) as w:
        yield w


# -- jobs -------------------------------------------------------------------------------


async def test_add_get_delete_job(web: Web) -> None:
    await make_topic(web, topic="order", delay=120, priority=1)
    before = int(time.time() * 1000)
    r = await web.api.post("/api/jobs", json={"topic": "order", "id": 42, "body": {"n": 1}})
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["id"] == "42" and added["replaced"] is False
    assert before + 119_000 <= added["due_ms"] <= before + 125_000  # the topic's delay

    r = await web.api.post("/api/jobs", json={"topic": "order", "id": "42", "delay": 5})
    assert r.status_code == 200 and r.json()["replaced"] is True

    r = await web.api.get("/api/jobs/order/42")
    assert r.status_code == 200
    job = r.json()
    assert job["state"] == "delayed" and job["attempts"] == 0 and job["priority"] == 1
    assert job["body"]["notify_time"] == job["due"] and job["error"] is None

    r = await web.api.post("/api/jobs", json={"topic": "order", "id": "a/b c",
                                              "fix_time": "2030-01-31 08:00:00"})
    assert r.status_code == 201
    assert r.json()["due"] == "2030-01-31 08:00:00"
    assert (await web.api.get("/api/jobs/order/a/b c")).json()["id"] == "a/b c"
    r = await web.api.post("/api/jobs", json={"topic": "order", "id": "ms",
                                              "due_ms": 1893456000000})
    assert r.json()["due_ms"] == 1893456000000

    r = await web.api.delete("/api/jobs/order/42")
    assert r.status_code == 200 and r.json()["ok"] is True
    assert_error(await web.api.get("/api/jobs/order/42"), 404, "not_found")
    assert_error(await web.api.delete("/api/jobs/order/42"), 404, "not_found")


async def test_a_retrying_job_shows_its_last_error(redis_server: RedisProcess,
                                                   tmp_path: Path) -> None:
    """While a job waits for its next attempt the API says so: its last error (a real 500
    from a real receiver, through a real consumer), the attempts so far and when the next
    one is due; not "error": null."""
    db = f"sqlite:///{tmp_path / 'dq.sqlite3'}"
    async with open_web(redis_server.url, db, db=db, timers=1, retry_unit=600.0,
                        timer_tick=0.2, registry_refresh=0.2) as web:
        before = int(time.time() * 1000)
        await fail_once(web.settings, "flaky", "7", (500, b"upstream is down"))
        job = (await web.api.get("/api/jobs/flaky/7")).json()
    assert job["state"] == "delayed" and job["retrying"] is True and job["attempts"] == 1
    error = job["error"]
    assert (error["status"], error["error"], error["reply"], error["attempts"]) == \
        (500, "HTTP 500", "upstream is down", 1)
    assert before <= error["at"] <= int(time.time() * 1000)
    assert error["at_time"] == web.store.clock.fmt_time(error["at"])
    # the first retry waits one retry_unit (dq.roles.consumer.retry_delay_ms(0))
    assert job["due_ms"] >= error["at"] + 590_000 and job["next_attempt"] == job["due"]


async def test_fix_time_uses_the_configured_zone(redis_server: RedisProcess,
                                                 tmp_path: Path) -> None:
    async with open_web(redis_server.url, f"sqlite:///{tmp_path / 'r.db'}",
                        timezone="Asia/Shanghai") as w:
        await w.api.post("/api/topics", json={"topic": "z", "callback": "http://h/"})
        r = await w.api.post("/api/jobs", json={"topic": "z", "id": "1",
                                                "fix_time": "2030-01-31 08:00:00"})
        # the other spellings PHP's strtotime() read (dq/wire/fixtime.py)
        others = [await w.api.post("/api/jobs", json={"topic": "z", "id": str(i),
                                                      "fix_time": v})
                  for i, v in enumerate(["2030/01/31 08:00", "2030-01-31T00:00:00Z",
                                         1896048000, "@1896048000"], 2)]
        before = time.time() * 1000
        rel = await w.api.post("/api/jobs", json={"topic": "z", "id": "r", "fix_time": "+1 day"})
    want = datetime(2030, 1, 31, 8, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp() * 1000
    assert r.json()["due_ms"] == want
    assert [o.json()["due_ms"] for o in others] == [want] * 4
    assert before + 86_395_000 <= rel.json()["due_ms"] <= time.time() * 1000 + 86_405_000


async def test_add_refusals_match_the_tcp_server(web: Web) -> None:
    await make_topic(web, topic="order")
    await make_topic(web, topic="paused", status="offline")
    r = await web.api.post("/api/jobs", json={"topic": "nope", "id": "1"})
    assert_error(r, 404, "unknown_topic")
    r = await web.api.post("/api/jobs", json={"topic": "paused", "id": "1"})
    assert_error(r, 409, "topic_offline")
    bad = [({"id": "1"}, "topic"), ({"topic": "a:b", "id": "1"}, "topic"),
           ({"topic": "order"}, "id"), ({"topic": "order", "id": ""}, "id"),
           ({"topic": "order", "id": "1", "body": "text"}, "body"),
           ({"topic": "order", "id": "1", "delay": -1}, "delay"),
           ({"topic": "order", "id": "1", "delay": "soon"}, "delay"),
           ({"topic": "order", "id": "1", "fix_time": "tomorrow"}, "fix_time"),
           ({"topic": "order", "id": "1", "fix_time": "2030-02-30 00:00:00"}, "fix_time"),
           ({"topic": "order", "id": "1", "due_ms": "x"}, "due_ms"),
           ({"topic": "order", "id": "1", "delay": 1, "due_ms": 5}, None),
           ({"topic": "order", "id": "1", "when": 5}, "when")]
    for body, field in bad:
        assert_error(await web.api.post("/api/jobs", json=body), 400, "bad_request", field)
    assert await web.store.get("order", "1") is None


# -- dead letters -----------------------------------------------------------------------

async def test_dead_letters_and_redrive(web: Web) -> None:
    await make_topic(web, topic="order")
    await make_topic(web, topic="mail")
    await bury(web.store, "order", "1")
    await bury(web.store, "mail", "2")
    await bury(web.store, "mail", "3")

    r = await web.api.get("/api/dead")
    assert r.status_code == 200
    dead = r.json()["dead"]
    assert {(j["topic"], j["id"]) for j in dead} == {("order", "1"), ("mail", "2"), ("mail", "3")}
    assert all(j["state"] == "dead" and j["error"] == {"status": 500, "error": "boom"}
               for j in dead)
    r = await web.api.get("/api/dead", params={"topic": "order"})
    assert [j["id"] for j in r.json()["dead"]] == ["1"]
    assert len((await web.api.get("/api/dead", params={"limit": 2})).json()["dead"]) == 2
    assert_error(await web.api.get("/api/dead", params={"limit": 5000}), 422, "invalid", "limit")

    r = await web.api.post("/api/dead/order/1/redrive")
    assert r.status_code == 200, r.text
    job = (await web.api.get("/api/jobs/order/1")).json()
    assert job["state"] == "delayed" and job["attempts"] == 0 and job["error"] is None
    assert_error(await web.api.post("/api/dead/order/1/redrive"), 404, "not_found")
    assert_error(await web.api.post("/api/dead/order/nope/redrive"), 404, "not_found")

    r = await web.api.post("/api/dead/redrive", params={"topic": "mail"})
    assert r.status_code == 200 and r.json()["detail"].startswith("2 ")
    assert (await web.api.get("/api/dead")).json() == {"dead": []}


async def test_an_unreadable_dead_letter_is_listed_and_deleted_not_redriven(web: Web) -> None:
    """A dead letter whose stored form cannot be read (written by hand, or damaged) is shown
    with why, is left alone by a bulk redrive, refused alone with a clear error, and can be
    deleted."""
    await make_topic(web, topic="order")
    await bury(web.store, "order", "1")
    await bury(web.store, "order", "2")
    shard = web.store.shards.shards[0]
    raw = await shard.call("HGET", web.store.keys.jobs, "order:2")
    await shard.call("HSET", web.store.keys.jobs, "order:2", raw.split(b"|", 1)[0] + b"|2|0|x")

    dead = {j["id"]: j for j in (await web.api.get("/api/dead")).json()["dead"]}
    assert set(dead) == {"1", "2"}
    assert dead["2"]["body"] == {} and dead["2"]["error"] == {"status": 500, "error": "boom"}
    job = (await web.api.get("/api/jobs/order/2")).json()
    assert job["state"] == "dead"
    r = await web.api.post("/api/dead/order/2/redrive")
    assert_error(r, 400, "bad_request")
    assert "cannot read" in r.json()["detail"] and "delete it" in r.json()["detail"]
    r = await web.api.post("/api/dead/redrive")
    assert r.status_code == 200 and r.json()["detail"].startswith("1 "), r.text
    assert (await web.api.delete("/api/jobs/order/2")).status_code == 200
    assert (await web.api.get("/api/dead")).json() == {"dead": []}


# -- statistics, metrics, docs ----------------------------------------------------------

async def test_stats(web: Web) -> None:
    await make_topic(web, topic="order")
    for i in range(3):
        await web.api.post("/api/jobs", json={"topic": "order", "id": str(i), "delay": 60})
    await bury(web.store, "order", "x")
    r = await web.api.get("/api/stats")
    assert r.status_code == 200
    stats = r.json()
    [order] = stats["topics"]
    assert order["topic"] == "order" and order["today"]["writes"] == 4
    assert order["total"]["writes"] == 4 and order["today"]["dead"] == 1
    assert order["today"]["fail"] == 1
    [shard] = stats["shards"]
    assert shard["up"] and shard["depths"]["delayed"] == 3 and shard["depths"]["dead"] == 1
    assert len(stats["minutes"]) == 60
    assert sum(m["writes"] for m in stats["minutes"]) == 4
    assert sum(m["fail"] for m in stats["minutes"]) == 1


async def test_metrics(web: Web, redis_server: RedisProcess, tmp_path: Path) -> None:
    await make_topic(web, topic="order")
    await web.api.post("/api/jobs", json={"topic": "order", "id": "1", "delay": 60})
    assert_error(await web.anon.get("/metrics"), 401, "unauthorized")
    r = await web.api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'dq_topic_events_total{event="writes",topic="order"} 1.0' in r.text
    assert 'dq_shard_jobs{' in r.text and "dq_shard_up{" in r.text

    async with open_web(redis_server.url, f"sqlite:///{tmp_path / 'p.db'}",
                        metrics_public=True) as public:
        assert (await public.anon.get("/metrics")).status_code == 200
        assert (await public.anon.get("/api/stats")).status_code == 401


async def test_openapi_and_docs(web: Web) -> None:
    r = await web.api.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert "/api/topics/{topic}" in spec["paths"] and "/api/jobs" in spec["paths"]
    body = spec["paths"]["/api/topics"]["post"]["requestBody"]["content"]["application/json"]
    assert "callback" in body["schema"]["properties"]
    r = await web.api.get("/docs")
    assert r.status_code == 200 and "/api/dead/{topic}/{job_id}/redrive" in r.text
    r = await web.anon.get("/docs")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/docs"


# -- run() ------------------------------------------------------------------------------

def test_bind_host() -> None:
    assert Settings().web_bind_host == "127.0.0.1"
    assert Settings(web_password="x").web_bind_host == "0.0.0.0"
    assert Settings(web_host="10.1.2.3").web_bind_host == "10.1.2.3"


async def test_run_serves_until_stopping(redis_server: RedisProcess, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    settings = Settings(redis=(redis_server.url,), web_port=port,
                        db=f"sqlite:///{tmp_path / 'r.db'}")
    ctx = Context(settings, "web")
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(run(ctx))
        await asyncio.wait_for(ctx.ready.wait(), 10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            r = await client.get("/api/topics")  # no password: open, on loopback only
            assert r.status_code == 200
            r = await client.get("/api/topics", headers={"Host": "evil.example"})
            assert_error(r, 403, "forbidden")
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
    assert "no web_password: console bound to 127.0.0.1 only" in caplog.text
    assert "dq-web stopped: requests=3" in caplog.text
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)


async def test_run_refuses_a_busy_port(redis_server: RedisProcess, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = Settings(redis=(redis_server.url,), web_port=busy.getsockname()[1],
                            db=f"sqlite:///{tmp_path / 'r.db'}")
        with pytest.raises(OSError, match="cannot listen"):
            await run(Context(settings, "web"))

