"""The console's forms end to end over ASGI: topics, shards, alerts, jobs, dead letters."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import pytest
import redis

from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.roles import Mailbox
from tests.support.web import Web, bury, flash, follow, login, make_topic, open_web

TOPIC_FORM = {"topic": "order_timeout", "name": "Cancel unpaid orders", "delay": "1800",
              "callback": "https://shop.example.com/hook", "method": "POST", "timeout_ms": "3000",
              "body_format": "json", "priority": "2", "max_attempts": "0", "status": "online",
              "retry_when": "", "emails": "ops@example.com", "secret": "hush", "creator": "ann"}


@pytest.fixture(name="web")
async def web_fixture(redis_server: RedisProcess, db_url: str) -> AsyncIterator[Web]:
    async with open_web(redis_server.url, db_url) as w:
        yield w


async def test_topic_form(web: Web) -> None:
    token = await login(web.anon)
    client = web.anon
    r = await client.get("/topics/new")
    assert r.status_code == 200 and "Create topic" in r.text

    bad = {**TOPIC_FORM, "csrf": token, "callback": "ftp://nope", "timeout_ms": "0",
           "retry_when": "{res.code} =="}
    r = await client.post("/topics/new", data=bad)
    assert r.status_code == 422
    assert "callback must start with http:// or https://" in r.text
    assert "timeout_ms must be a whole number from 1 to 60000" in r.text
    assert "at position 13" in html.unescape(r.text)
    assert 'value="ftp://nope"' in r.text  # what was typed stays in the form
    assert "hush" not in r.text  # a secret is never echoed back
    assert web.registry.topics() == {}

    r = await client.post("/topics/new", data={**TOPIC_FORM, "csrf": token})
    page = await follow(client, r)
    assert flash(page) == "Topic order_timeout created."
    assert "order_timeout" in page.text and "shop.example.com/hook" in page.text
    stored = web.registry.get_topic("order_timeout")
    assert stored is not None and stored.secret == "hush" and stored.creator == "ann"
    assert stored.emails == ("ops@example.com",) and stored.body_format == "json"

    r = await client.post("/topics/new", data={**TOPIC_FORM, "csrf": token})
    assert r.status_code == 422 and "already exists" in r.text

    r = await client.post("/topics/order_timeout/toggle",
                          data={"csrf": token, "back": "/topics?q=order"})
    assert r.headers["location"] == "/topics?q=order"
    page = await follow(client, r)
    assert flash(page) == "Topic order_timeout is now offline." and "Put online" in page.text
    r = await client.post("/topics/order_timeout/toggle",
                          data={"csrf": token, "back": "https://evil.example/"})
    assert r.headers["location"] == "/"

    page = await follow(client, await client.post("/topics/order_timeout/pause",
                                                  data={"csrf": token, "back": "/topics"}))
    assert flash(page).startswith("Topic order_timeout is paused") and "Resume" in page.text
    assert (web.registry.get_topic("order_timeout") or stored).paused is True
    page = await follow(client, await client.post("/topics/order_timeout/pause",
                                                  data={"csrf": token, "back": "/topics"}))
    assert flash(page).startswith("Topic order_timeout is resumed")
    assert (web.registry.get_topic("order_timeout") or stored).paused is False
    r = await client.post("/topics/order_timeout/edit",
                          data={**TOPIC_FORM, "csrf": token, "rate_limit": "-2"})
    assert r.status_code == 422 and "rate_limit must be a whole number from 0 to" in r.text
    page = await follow(client, await client.post("/topics/order_timeout/edit", data={
        **TOPIC_FORM, "csrf": token, "secret": "", "rate_limit": "40", "concurrency": "3",
        "paused": "True"}))
    stored = web.registry.get_topic("order_timeout")
    assert stored is not None and (stored.rate_limit, stored.concurrency, stored.paused) == (
        40, 3, True)
    r = await client.get("/topics/order_timeout/edit")
    assert 'name="rate_limit" type="number" value="40"' in r.text
    assert '<option value="True" selected>' in r.text
    page = await follow(client, await client.post("/topics/order_timeout/edit", data={
        **TOPIC_FORM, "csrf": token, "secret": "", "rate_limit": "0", "concurrency": "0",
        "paused": "False"}))

    r = await client.get("/topics/order_timeout/edit")
    assert r.status_code == 200 and "leave empty to keep it" in r.text and "hush" not in r.text
    edit = {**TOPIC_FORM, "csrf": token, "secret": "", "delay": "60", "topic": "ignored"}
    page = await follow(client, await client.post("/topics/order_timeout/edit", data=edit))
    assert flash(page) == "Topic order_timeout saved."
    stored = web.registry.get_topic("order_timeout")
    assert stored is not None and stored.secret == "hush" and stored.delay == 60
    r = await client.post("/topics/order_timeout/edit", data={**edit, "priority": "5"})
    assert r.status_code == 422 and "priority must be a whole number from 1 to 3" in r.text
    await client.post("/topics/order_timeout/edit", data={**edit, "clear_secret": "1"})
    assert (web.registry.get_topic("order_timeout") or stored).secret == ""

    r = await client.get("/topics/missing/edit")
    assert r.status_code == 303
    page = await follow(client, await client.post("/topics/order_timeout/delete",
                                                  data={"csrf": token}))
    assert flash(page) == "Topic order_timeout deleted." and web.registry.topics() == {}


async def test_topics_search_and_paging(web: Web) -> None:
    for i in range(30):
        await make_topic(web, topic=f"t{i:02d}", name=f"Topic number {i}")
    await login(web.anon)
    r = await web.anon.get("/topics")
    assert "t00" in r.text and "t24" in r.text and "t25" not in r.text and "Page 1 of 2" in r.text
    r = await web.anon.get("/topics?page=2")
    assert "t25" in r.text and "t00" not in r.text
    r = await web.anon.get("/topics?q=NUMBER 7")
    assert "t07" in r.text and "t08" not in r.text and "1 topic" in r.text
    r = await web.anon.get("/topics?q=zzz")
    assert "No topic matches" in r.text


async def test_user_text_is_escaped(web: Web) -> None:
    evil = "<script>alert(1)</script>"
    await make_topic(web, topic="xss", name=evil, creator=evil,
                     callback='https://h.example/"><img%20src=x%20onerror=alert(1)>')
    await web.store.add("xss", evil, {"k": evil}, delay_ms=60_000)
    await login(web.anon)
    for path in ("/topics", "/", "/topics/xss/edit", f"/jobs?topic=xss&id={evil}"):
        r = await web.anon.get(path)
        assert r.status_code == 200
        assert "<script>alert(1)" not in r.text and "<img%20src" not in r.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text, path


async def test_shards_page(web: Web, redis_factory: object) -> None:
    token = await login(web.anon)
    client = web.anon
    r = await client.get("/shards")
    assert r.status_code == 200 and "notices within a few seconds and reloads" in r.text
    assert "from the config file" in r.text
    r = await client.post("/shards", data={"csrf": token, "name": "", "url": "http://x"})
    assert r.status_code == 422 and "name is required" in r.text and "url must be" in r.text

    other: RedisProcess = redis_factory()  # type: ignore[operator]
    with redis.Redis(port=other.port) as admin:
        admin.config_set("requirepass", "pa55word")
    url = f"redis://:pa55word@127.0.0.1:{other.port}/0"
    page = await follow(client, await client.post("/shards", data={"csrf": token,
                                                                   "name": "redis-2", "url": url}))
    assert "reloads to start using it" in flash(page)
    assert "pending reload" in page.text and "pa55word" not in page.text
    [conf] = web.registry.shards()

    r = await client.get(f"/shards?edit={conf.id}")
    assert "Edit shard redis-2" in r.text and "pa55word" not in r.text
    masked = f"redis://:***@127.0.0.1:{other.port}/0"
    assert masked in r.text
    page = await follow(client, await client.post(
        f"/shards/{conf.id}/edit", data={"csrf": token, "name": "redis-two", "url": masked}))
    assert "saved" in flash(page)
    [renamed] = web.registry.shards()
    assert renamed.name == "redis-two" and renamed.url == url  # the password was kept
    r = await client.post(f"/shards/{renamed.id}/edit", data={"csrf": token, "name": "x",
                                                                "url": "nope nope"})
    assert r.status_code == 422
    page = await follow(client, await client.post(f"/shards/{renamed.id}/delete",
                                                  data={"csrf": token}))
    assert "Shard removed" in flash(page) and web.registry.shards() == []
    page = await follow(client, await client.post(f"/shards/{renamed.id}/delete",
                                                  data={"csrf": token}))
    assert "already removed" in flash(page)


async def test_alert_page(web: Web, smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    token = await login(web.anon)
    client = web.anon
    r = await client.post("/alert", data={"csrf": token, "host": "127.0.0.1", "port": "99999",
                                          "tls": "none", "sender": "bad"})
    assert r.status_code == 422 and "port must be a whole number" in r.text
    assert "sender must be an email address" in r.text
    form = {"csrf": token, "host": "127.0.0.1", "port": str(port), "tls": "none", "user": "",
            "password": "mailpw", "sender": "dq@example.com", "redis_emails": "ops@example.com"}
    page = await follow(client, await client.post("/alert", data=form))
    assert flash(page) == "Alert settings saved." and "mailpw" not in page.text
    await client.post("/alert", data={**form, "password": ""})
    assert web.registry.alert().password == "mailpw"

    page = await follow(client, await client.post("/alert/test", data={"csrf": token,
                                                                       "to": "me@example.com"}))
    assert flash(page) == "Test mail sent to me@example.com."
    assert box.envelopes[0].rcpt_tos == ["me@example.com"]
    page = await follow(client, await client.post("/alert/test", data={"csrf": token,
                                                                       "to": "nobody"}))
    assert flash(page).startswith("Test mail not sent: to must be one email address")
    await client.post("/alert", data={**form, "port": str(free_port())})
    page = await follow(client, await client.post("/alert/test", data={"csrf": token,
                                                                       "to": "me@example.com"}))
    assert "did not accept the test mail" in flash(page)


async def test_jobs_page(web: Web) -> None:
    await make_topic(web, topic="order")
    await web.api.post("/api/jobs", json={"topic": "order", "id": "42", "body": {"sku": "A-1"},
                                          "delay": 600})
    token = await login(web.anon)
    r = await web.anon.get("/jobs?topic=order&id=42")
    assert r.status_code == 200 and "state-delayed" in r.text and "A-1" in r.text
    r = await web.anon.get("/jobs?topic=order&id=43")
    assert "No job" in r.text
    r = await web.anon.post("/jobs/delete", data={"csrf": token, "topic": "order", "id": "42"})
    assert r.headers["location"] == "/jobs?topic=order&id=42"
    page = await follow(web.anon, r)
    assert flash(page) == "Job order:42 deleted." and "No job" in page.text
    page = await follow(web.anon, await web.anon.post(
        "/jobs/delete", data={"csrf": token, "topic": "order", "id": "42"}))
    assert "was not found" in flash(page)


async def test_dead_page(web: Web) -> None:
    await make_topic(web, topic="order")
    await make_topic(web, topic="mail")
    for topic, job_id in (("order", "1"), ("order", "2"), ("mail", "3"), ("mail", "4")):
        await bury(web.store, topic, job_id)
    token = await login(web.anon)
    r = await web.anon.get("/dead")
    assert r.text.count('<span class="badge down">HTTP 500</span>') == 4 and "boom" in r.text
    r = await web.anon.get("/dead?topic=order")
    assert "order:1" in r.text and "mail:3" not in r.text

    r = await web.anon.post("/dead/redrive", data={"csrf": token, "topic": "order", "id": "1",
                                                   "filter": "order"})
    assert r.headers["location"] == "/dead?topic=order"
    page = await follow(web.anon, r)
    assert flash(page) == "Job order:1 redriven: it is due now."
    assert (await web.store.lookup("order", "1")).state == "delayed"  # type: ignore[union-attr]
    page = await follow(web.anon, await web.anon.post(
        "/dead/redrive", data={"csrf": token, "topic": "order", "id": "1"}))
    assert "no longer a dead letter" in flash(page)

    page = await follow(web.anon, await web.anon.post(
        "/dead/delete", data={"csrf": token, "topic": "order", "id": "2"}))
    assert flash(page) == "Dead letter order:2 deleted."
    assert await web.store.lookup("order", "2") is None
    page = await follow(web.anon, await web.anon.post(
        "/dead/redrive-all", data={"csrf": token, "filter": ""}))
    assert flash(page) == "2 dead letter(s) redriven." and "No dead letters" in page.text


async def test_dashboard_and_error_pages(web: Web) -> None:
    await make_topic(web, topic="order")
    await web.api.post("/api/jobs", json={"topic": "order", "id": "1", "delay": 60})
    await bury(web.store, "order", "2")
    await login(web.anon)
    r = await web.anon.get("/")
    assert r.status_code == 200
    assert r.text.count("<polyline") == 3 and "<svg" in r.text and "<script>" not in r.text
    assert "written 2" in r.text  # the current minute's tooltip
    r = await web.anon.get("/no/such/page")
    assert r.status_code == 404 and "text/html" in r.headers["content-type"]
    assert "there is nothing at /no/such/page" in r.text
    r = await web.anon.get("/static/app.css")
    assert r.status_code == 200 and "cache-control" not in r.headers


async def test_shards_page_counts_guests(web: Web) -> None:
    """A shard holding jobs whose owner is another shard says so (and /metrics has them as
    dq_shard_jobs{state="guests"})."""
    await login(web.anon)
    shard = web.store.shards.shards[0]
    r = await web.anon.get("/shards")
    assert "guest job(s)" not in r.text
    await shard.call("SADD", web.store.keys.guests, "t:1", "t:2")
    r = await web.anon.get("/shards")
    assert "2 guest job(s)" in r.text
    metrics = (await web.api.get("/metrics")).text
    assert 'state="guests"} 2.0' in metrics


class _FormValues(HTMLParser):
    """What a browser would submit from a page's form as it stands: inputs' values and each
    select's selected option (else its first)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self._select: str | None = None
        self._first = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        name = a.get("name") or ""
        if tag == "input" and name and a.get("type") not in ("checkbox", "submit"):
            self.values[name] = a.get("value") or ""
        elif tag == "select":
            self._select, self._first = name, ""
        elif tag == "option" and self._select:
            self._first = self._first or (a.get("value") or "")
            if "selected" in a:
                self.values[self._select] = a.get("value") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "select" and self._select:
            self.values.setdefault(self._select, self._first)
            self._select = None


async def test_new_topic_form_and_api_give_the_same_defaults(web: Web) -> None:
    """A topic created from the console's untouched new-topic form is the topic the API
    creates from the same two required fields."""
    await login(web.anon)
    page = await web.anon.get("/topics/new")
    assert "0 = the server&#39;s max_attempts setting" in page.text
    form = _FormValues()
    form.feed(page.text)
    assert form.values["method"] == "GET" and form.values["body_format"] == "form"
    r = await web.anon.post("/topics/new", data={**form.values, "topic": "from_form",
                                                 "callback": "https://h.example/x"})
    assert r.status_code == 303, r.text
    r = await web.api.post("/api/topics", json={"topic": "from_api",
                                                "callback": "https://h.example/x"})
    assert r.status_code == 201, r.text
    made = [(await web.api.get(f"/api/topics/{k}")).json() for k in ("from_form", "from_api")]
    for t in made:
        del t["topic"], t["name"], t["creator"]
    assert made[0] == made[1]
    doc = (await web.api.get("/openapi.json")).json()
    schema = doc["paths"]["/api/topics"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]
    assert schema["properties"]["method"]["default"] == made[1]["method"]
    assert schema["properties"]["body_format"]["default"] == made[1]["body_format"]
    assert "0 = the server's max_attempts setting" in \
        schema["properties"]["max_attempts"]["description"]
