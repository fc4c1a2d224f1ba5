"""The admin API, in-process over ASGI, against a real redis-server and the registry on
SQLite and MariaDB. Every route, every validation error, every auth refusal."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from dq.registry.core import Topic
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.roles import Mailbox
from tests.support.web import (
    GOOD_TOPIC,
    PW,
    Web,
    assert_error,
    make_topic,
    open_web,
)


@pytest.fixture(name="web")
async def web_fixture(redis_server: RedisProcess, db_url: str) -> AsyncIterator[Web]:
    async with open_web(redis_server.url, db_url) as w:
        yield w


def stored_secret(w: Web, key: str) -> str:
    topic = w.registry.get_topic(key)
    assert topic is not None
    return topic.secret


# -- auth -------------------------------------------------------------------------------

ROUTES = [  # (method, route template, a path that matches it)
    ("GET", "/api/topics", "/api/topics"), ("POST", "/api/topics", "/api/topics"),
    ("GET", "/api/topics/{topic}", "/api/topics/x"),
    ("PUT", "/api/topics/{topic}", "/api/topics/x"),
    ("DELETE", "/api/topics/{topic}", "/api/topics/x"),
    ("POST", "/api/topics/{topic}/pause", "/api/topics/x/pause"),
    ("POST", "/api/topics/{topic}/resume", "/api/topics/x/resume"),
    ("GET", "/api/shards", "/api/shards"), ("POST", "/api/shards", "/api/shards"),
    ("DELETE", "/api/shards/{shard_id}", "/api/shards/1"),
    ("GET", "/api/alert", "/api/alert"), ("PUT", "/api/alert", "/api/alert"),
    ("POST", "/api/alert/test", "/api/alert/test"), ("POST", "/api/jobs", "/api/jobs"),
    ("GET", "/api/jobs/{topic}/{job_id}", "/api/jobs/t/1"),
    ("DELETE", "/api/jobs/{topic}/{job_id}", "/api/jobs/t/1"),
    ("GET", "/api/dead", "/api/dead"),
    ("POST", "/api/dead/{topic}/{job_id}/redrive", "/api/dead/t/1/redrive"),
    ("POST", "/api/dead/redrive", "/api/dead/redrive"), ("GET", "/api/stats", "/api/stats"),
    ("GET", "/metrics", "/metrics"), ("GET", "/openapi.json", "/openapi.json"),
]


async def test_route_list_covers_the_app(web: Web) -> None:
    paths = web.app.openapi()["paths"]
    served = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    assert served - {("GET", "/healthz")} == {(m, t) for m, t, _ in ROUTES if t != "/openapi.json"}


async def test_every_route_refuses_missing_and_wrong_credentials(web: Web) -> None:
    wrong = {
        "basic": "Basic " + base64.b64encode(b"admin:nope").decode(),
        "bearer": "Bearer nope",
        "garbled": "Basic !!!not-base64",
        "no-colon": "Basic " + base64.b64encode(PW.encode()).decode(),
        "scheme": f"Token {PW}",
    }
    for method, _, path in ROUTES:
        r = await web.anon.request(method, path, json={})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Basic")
        for header in wrong.values():
            r = await web.anon.request(method, path, json={}, headers={"Authorization": header})
            assert_error(r, 401, "unauthorized")


async def test_basic_with_any_user_and_bearer_are_accepted(web: Web) -> None:
    for user in ("admin", "", "someone else"):
        r = await web.anon.get("/api/topics", auth=(user, PW))
        assert r.status_code == 200, r.text
    r = await web.anon.get("/api/topics", headers={"Authorization": f"Bearer {PW}"})
    assert r.status_code == 200
    assert r.json() == {"total": 0, "topics": []}


async def test_healthz_is_open_and_headers_are_safe(web: Web) -> None:
    r = await web.anon.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "same-origin"


async def test_unknown_api_path_is_json_404(web: Web) -> None:
    assert_error(await web.api.get("/api/nothing-here"), 404, "not_found")


# -- topics -----------------------------------------------------------------------------

async def test_topic_crud_and_secret_masking(web: Web) -> None:
    created = await make_topic(web)
    assert list(created) == ["topic", "name", "delay", "callback", "method", "timeout_ms",
                             "emails", "retry_when", "priority", "status", "max_attempts",
                             "secret", "secret_set", "body_format", "creator", "rate_limit",
                             "concurrency", "paused", "retry_policy", "breaker_threshold",
                             "breaker_cooloff", "headers", "breaker"]
    assert created["secret"] is None and created["secret_set"] is True
    assert created["emails"] == ["ops@example.com", "dev@example.com"]
    assert stored_secret(web, "order_timeout") == "hush"

    r = await web.api.get("/api/topics/order_timeout")
    assert r.status_code == 200 and r.json() == created and "hush" not in r.text

    r = await web.api.put("/api/topics/order_timeout", json={"delay": 60, "secret": ""})
    assert r.status_code == 200, r.text
    assert r.json()["delay"] == 60 and r.json()["name"] == "Cancel unpaid orders"
    assert stored_secret(web, "order_timeout") == "hush"
    assert (web.registry.get_topic("order_timeout") or Topic()).delay == 60

    # what GET returns can be PUT back unchanged (secret null keeps it)
    r = await web.api.put("/api/topics/order_timeout", json=r.json())
    assert r.status_code == 200 and stored_secret(web, "order_timeout") == "hush"

    r = await web.api.put("/api/topics/order_timeout", json={"clear_secret": True,
                                                              "status": "offline"})
    assert r.json()["secret_set"] is False and r.json()["status"] == "offline"

    await make_topic(web, topic="billing.retry", name="Billing")
    r = await web.api.get("/api/topics", params={"q": "BILL"})
    assert [t["topic"] for t in r.json()["topics"]] == ["billing.retry"]
    r = await web.api.get("/api/topics", params={"offset": 1, "limit": 1})
    assert r.json()["total"] == 2 and [t["topic"] for t in r.json()["topics"]] == ["order_timeout"]

    r = await web.api.delete("/api/topics/order_timeout")
    assert r.status_code == 200 and r.json()["ok"] is True
    assert_error(await web.api.get("/api/topics/order_timeout"), 404, "not_found")
    assert_error(await web.api.delete("/api/topics/order_timeout"), 404, "not_found")
    assert_error(await web.api.put("/api/topics/order_timeout", json={"delay": 1}), 404,
                 "not_found")


async def test_flow_control_fields_and_pause_resume(web: Web) -> None:
    r = await web.api.post("/api/topics", json={**GOOD_TOPIC, "rate_limit": 40,
                                                "concurrency": 3})
    assert r.status_code == 201, r.text
    assert (r.json()["rate_limit"], r.json()["concurrency"], r.json()["paused"]) == (40, 3, False)
    r = await web.api.post("/api/topics/order_timeout/pause")
    assert r.status_code == 200 and r.json()["paused"] is True
    assert (web.registry.get_topic("order_timeout") or Topic()).paused is True
    # a paused topic takes adds (an offline one refuses them)
    r = await web.api.post("/api/jobs", json={"topic": "order_timeout", "id": "1",
                                              "body": {}, "delay": 0})
    assert r.status_code == 201, r.text
    r = await web.api.put("/api/topics/order_timeout", json={"delay": 5})
    assert r.json()["paused"] is True and r.json()["rate_limit"] == 40  # kept
    r = await web.api.post("/api/topics/order_timeout/resume")
    assert r.status_code == 200 and r.json()["paused"] is False
    r = await web.api.put("/api/topics/order_timeout", json={"paused": True, "rate_limit": 0})
    assert (r.json()["paused"], r.json()["rate_limit"]) == (True, 0)
    assert_error(await web.api.post("/api/topics/nope/pause"), 404, "not_found")
    assert_error(await web.anon.post("/api/topics/order_timeout/resume"), 401, "unauthorized")


async def test_topic_defaults(web: Web) -> None:
    r = await web.api.post("/api/topics", json={"topic": "t1", "callback": "http://h/x"})
    assert r.status_code == 201
    t = r.json()
    assert (t["method"], t["timeout_ms"], t["priority"], t["status"], t["delay"],
            t["max_attempts"], t["body_format"], t["creator"], t["name"], t["rate_limit"],
            t["concurrency"], t["paused"]) == \
        ("GET", 3000, 2, "online", 0, 0, "form", "api", "t1", 0, 0, False)


BAD_TOPIC_FIELDS = [
    ("topic", "a:b"), ("topic", ""), ("topic", "x" * 65), ("topic", "has space"),
    ("topic", 42), ("callback", "ftp://example.com/x"), ("callback", "http://"),
    ("callback", "example.com/hook"), ("callback", ""), ("callback", "http://h:port/x"),
    ("callback", "http://h/a b"), ("method", "PATCH"), ("timeout_ms", 0),
    ("timeout_ms", 60001), ("timeout_ms", "abc"), ("timeout_ms", True),
    ("emails", "not-an-address"), ("emails", ["ok@example.com", "bad@"]), ("emails", 5),
    ("retry_when", "{res.code} =="), ("retry_when", "{res.code} != 200 )"),
    ("priority", 0), ("priority", 4), ("delay", -1), ("delay", 1.5),
    ("max_attempts", 101), ("max_attempts", -1), ("secret", "s" * 256),
    ("body_format", "xml"), ("status", "maybe"), ("name", "n" * 256),
    ("name", "line\nbreak"), ("creator", ["x"]), ("surprise", 1),
    ("rate_limit", -1), ("rate_limit", 1.5), ("rate_limit", 100_001), ("concurrency", -1),
    ("concurrency", "many"), ("paused", "maybe"), ("paused", 2),
]


@pytest.mark.parametrize(("field", "value"), BAD_TOPIC_FIELDS)
async def test_topic_validation(web: Web, field: str, value: Any) -> None:
    r = await web.api.post("/api/topics", json={**GOOD_TOPIC, field: value})
    assert_error(r, 422, "invalid", field)
    assert web.registry.topics() == {}


async def test_retry_when_error_names_the_position(web: Web) -> None:
    r = await web.api.post("/api/topics", json={**GOOD_TOPIC, "retry_when": "{res.code} == )"})
    assert "at position 14" in r.json()["errors"]["retry_when"]


async def test_topic_conflicts_and_bad_bodies(web: Web) -> None:
    await make_topic(web)
    assert_error(await web.api.post("/api/topics", json=GOOD_TOPIC), 409, "exists", "topic")
    r = await web.api.put("/api/topics/order_timeout", json={"topic": "other"})
    assert_error(r, 422, "invalid", "topic")
    r = await web.api.put("/api/topics/order_timeout", json={"priority": 9})
    assert_error(r, 422, "invalid", "priority")
    r = await web.api.post("/api/topics", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")
    r = await web.api.post("/api/topics", json=["a", "list"])
    assert_error(r, 400, "bad_request")
    r = await web.api.post("/api/topics", data={"topic": "x"})
    assert_error(r, 415, "bad_request")
    r = await web.api.get("/api/topics", params={"limit": 0})
    assert_error(r, 422, "invalid", "limit")


# -- shards -----------------------------------------------------------------------------

async def test_shards(web: Web, redis_factory: Any) -> None:
    r = await web.api.get("/api/shards")
    assert r.status_code == 200
    [config] = r.json()
    assert config["source"] == "config" and config["up"] is True and config["id"] is None
    assert config["version"] and config["memory"] and config["in_use"] is True
    assert set(config["depths"]) == {"jobs", "delayed", "ready", "inflight", "dead", "guests"}

    other = redis_factory()
    with redis.Redis(port=other.port) as admin:
        admin.config_set("requirepass", "pa55word")
    url = f"redis://:pa55word@127.0.0.1:{other.port}/0"
    r = await web.api.post("/api/shards", json={"name": "redis-2", "url": url})
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["source"] == "console" and added["up"] is True and added["in_use"] is False
    assert "pa55word" not in r.text and "***" in added["url"]
    assert web.registry.shards()[0].url == url  # stored as given

    r = await web.api.post("/api/shards", json={"name": "down", "url": "redis://127.0.0.1:1/0"})
    assert r.status_code == 201 and r.json()["up"] is False and r.json()["error"]
    r = await web.api.get("/api/shards")
    assert [s["name"] for s in r.json()][1:] == ["redis-2", "down"]
    assert "pa55word" not in r.text

    for bad in ({"name": "", "url": url}, {"name": "x", "url": ""},
                {"name": "x", "url": "http://example.com"}, {"name": "x", "url": "redis://"},
                {"name": "x", "url": "a b:c"}, {"name": "x", "url": url, "extra": 1}):
        r = await web.api.post("/api/shards", json=bad)
        field = next(k for k in ("name", "url", "extra") if k in r.json()["errors"])
        assert_error(r, 422, "invalid", field)

    assert_error(await web.api.delete("/api/shards/99999"), 404, "not_found")
    r = await web.api.delete(f"/api/shards/{added['id']}")
    assert r.status_code == 200 and "reload" in r.json()["detail"]


async def test_shard_holding_jobs_needs_force(web: Web) -> None:
    r = await web.api.post("/api/shards", json={"name": "main", "url": web.settings.redis[0]})
    shard = r.json()
    assert shard["in_use"] is True
    await web.store.add("t", "1", {}, delay_ms=60_000)
    assert_error(await web.api.delete(f"/api/shards/{shard['id']}"), 409, "exists")
    r = await web.api.delete(f"/api/shards/{shard['id']}", params={"force": "true"})
    assert r.status_code == 200
    assert web.registry.shards() == []


# -- alert settings ---------------------------------------------------------------------

async def test_alert_settings(web: Web) -> None:
    r = await web.api.get("/api/alert")
    assert r.json() == {"host": "", "port": 0, "user": "", "password": None,
                        "password_set": False, "tls": "none", "sender": "",
                        "redis_emails": []}
    conf = {"host": "smtp.example.com", "port": 587, "user": "dq", "password": "mailpw",
            "tls": "starttls", "sender": "dq@example.com",
            "redis_emails": "a@example.com, b@example.com"}
    r = await web.api.put("/api/alert", json=conf)
    assert r.status_code == 200, r.text
    assert r.json()["password"] is None and r.json()["password_set"] is True
    assert r.json()["redis_emails"] == ["a@example.com", "b@example.com"]
    assert "mailpw" not in (await web.api.get("/api/alert")).text

    r = await web.api.put("/api/alert", json={"sender": "ops@example.com", "password": ""})
    assert r.json()["sender"] == "ops@example.com" and r.json()["password_set"] is True
    assert web.registry.alert().password == "mailpw"  # kept: the same server and user
    r = await web.api.put("/api/alert", json={"port": 2525, "password": ""})
    assert r.json()["port"] == 2525 and r.json()["host"] == "smtp.example.com"
    # another server: the stored password would go to it, so it must be given again
    assert r.json()["password_set"] is False and web.registry.alert().password == ""
    r = await web.api.put("/api/alert", json={"password": "mailpw"})
    r = await web.api.put("/api/alert", json={"clear_password": True, "tls": "none"})
    assert r.json()["password_set"] is False and web.registry.alert().tls == ""

    for field, value in (("port", 70000), ("port", "x"), ("tls", "maybe"),
                         ("sender", "nobody"), ("redis_emails", "bad@@x"),
                         ("host", "bad host"), ("user", "u" * 300), ("bogus", 1)):
        assert_error(await web.api.put("/api/alert", json={field: value}), 422, "invalid", field)


async def test_test_mail(web: Web, smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    r = await web.api.post("/api/alert/test", json={"to": "ops@example.com"})
    assert_error(r, 409, "not_configured", "host")
    await web.api.put("/api/alert", json={"host": "127.0.0.1", "port": port,
                                          "sender": "dq@example.com"})
    assert_error(await web.api.post("/api/alert/test", json={"to": "nobody"}), 422, "invalid",
                 "to")
    assert_error(await web.api.post("/api/alert/test", json={}), 422, "invalid", "to")
    r = await web.api.post("/api/alert/test", json={"to": "ops@example.com"})
    assert r.status_code == 200, r.text
    [mail] = box.envelopes
    assert mail.rcpt_tos == ["ops@example.com"] and mail.mail_from == "dq@example.com"
    assert b"test mail from the dq console" in mail.content

    await web.api.put("/api/alert", json={"port": free_port()})  # nothing listens there
    assert_error(await web.api.post("/api/alert/test", json={"to": "ops@example.com"}), 502,
                 "mail_failed")
