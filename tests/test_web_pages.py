"""The console's pages over ASGI: login and sessions, CSRF, every form, escaping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.redisproc import RedisProcess
from tests.support.web import BASE, PW, Web, csrf_of, login, open_web
from web import chart
from web.auth import SESSION_COOKIE, SESSION_TTL, Keys


@pytest.fixture(name="web")
async def web_fixture(redis_server: RedisProcess, db_url: str) -> AsyncIterator[Web]:
    async with open_web(redis_server.url, db_url) as w:
        yield w


PAGES = ["/", "/topics", "/topics/new", "/topics/x/edit", "/shards", "/alert", "/jobs",
         "/dead", "/docs"]
FORMS = ["/logout", "/topics/new", "/topics/x/edit", "/topics/x/toggle", "/topics/x/delete",
         "/shards", "/shards/1/edit", "/shards/1/delete", "/alert", "/alert/test",
         "/jobs/delete", "/dead/redrive", "/dead/redrive-all", "/dead/delete"]


# -- login and sessions -----------------------------------------------------------------

async def test_pages_need_a_login(web: Web) -> None:
    for path in PAGES:
        r = await web.anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/"), path
    for path in FORMS:
        r = await web.anon.post(path, data={})
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/", path
    r = await web.anon.get("/topics?q=a")
    assert r.headers["location"] == "/login?next=/topics%3Fq%3Da"


async def test_login(web: Web) -> None:
    page = await web.anon.get("/login")
    assert page.status_code == 200 and 'type="password"' in page.text
    token, before = csrf_of(page.text), web.anon.cookies[SESSION_COOKIE]
    cookie_header = page.headers["set-cookie"].lower()
    assert "httponly" in cookie_header and "samesite=lax" in cookie_header

    r = await web.anon.post("/login", data={"password": PW, "next": "/"})
    assert r.status_code == 403
    r = await web.anon.post("/login", data={"csrf": token, "password": "wrong", "next": "/"})
    assert r.status_code == 401 and "Wrong password." in r.text
    r = await web.anon.post("/login", data={"csrf": token, "password": PW,
                                            "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert web.anon.cookies[SESSION_COOKIE] != before  # a new session at login
    r = await web.anon.get("/")
    assert r.status_code == 200 and "Dashboard" in r.text and "Log out" in r.text
    r = await web.anon.get("/login?next=/dead")
    assert r.status_code == 200  # the form again; logging in twice is harmless


async def test_login_form_keeps_next(web: Web) -> None:
    page = await web.anon.get("/login?next=/dead%3Ftopic%3Dx")
    assert 'value="/dead?topic=x"' in page.text
    r = await web.anon.post("/login", data={"csrf": csrf_of(page.text), "password": PW,
                                            "next": "/dead?topic=x"})
    assert r.headers["location"] == "/dead?topic=x"


async def test_sessions_work_across_instances_and_end_with_the_password(
        web: Web, redis_server: RedisProcess, tmp_path: Path) -> None:
    await login(web.anon)
    cookie = web.anon.cookies[SESSION_COOKIE]
    async with open_web(redis_server.url, f"sqlite:///{tmp_path / 'b.db'}") as other:
        other.anon.cookies.set(SESSION_COOKIE, cookie)
        assert (await other.anon.get("/")).status_code == 200
    async with open_web(redis_server.url, f"sqlite:///{tmp_path / 'c.db'}",
                        web_password="changed") as changed:
        changed.anon.cookies.set(SESSION_COOKIE, cookie)
        assert (await changed.anon.get("/")).status_code == 303
    for bad in (cookie[:-2] + "xx", cookie.replace(".1.", ".0.", 1), "", "a.b.c.d",
                Keys(PW).issue(auth=True, now=0).cookie,
                Keys(PW).issue(auth=False).cookie):
        web.anon.cookies.set(SESSION_COOKIE, bad)
        assert (await web.anon.get("/")).status_code == 303, bad
    fresh = Keys(PW).issue(auth=True, now=1_000_000)
    assert Keys(PW).verify(fresh.cookie, now=1_000_000 + SESSION_TTL) is not None
    assert Keys(PW).verify(fresh.cookie, now=1_000_001 + SESSION_TTL) is None


async def test_logout(web: Web) -> None:
    token = await login(web.anon)
    r = await web.anon.post("/logout", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert SESSION_COOKIE not in web.anon.cookies
    assert (await web.anon.get("/")).status_code == 303


# -- CSRF and cross-site requests -------------------------------------------------------

async def test_every_form_needs_its_csrf_token(web: Web) -> None:
    await login(web.anon)
    other = Keys(PW).issue(auth=True).csrf  # a valid token, of another session
    for path in FORMS:
        for data in ({}, {"csrf": "forged"}, {"csrf": other}):
            r = await web.anon.post(path, data=data)
            assert r.status_code == 403, (path, data, r.status_code)
            assert "security token" in r.text
    assert web.registry.topics() == {}


async def test_cross_site_posts_are_refused(web: Web) -> None:
    token = await login(web.anon)
    r = await web.anon.post("/topics/new", data={"csrf": token, "topic": "t"},
                            headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = await web.anon.post("/topics/new", data={"csrf": token, "topic": "t"},
                            headers={"Origin": "null"})
    assert r.status_code == 403
    r = await web.api.delete("/api/topics/x", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    for site in ("cross-site", "same-site"):
        r = await web.api.post("/api/dead/t/1/redrive", headers={"Sec-Fetch-Site": site})
        assert r.status_code == 403 and r.json()["err"] == "forbidden"
    # behind a proxy that rewrites Host, the browser's own word (or X-Forwarded-Host) counts
    r = await web.api.post("/api/dead/t/1/redrive", headers={
        "Sec-Fetch-Site": "same-origin", "Origin": "https://dq.example.com"})
    assert r.status_code == 404
    r = await web.api.post("/api/dead/t/1/redrive", headers={
        "Origin": "https://dq.example.com", "X-Forwarded-Host": "dq.example.com"})
    assert r.status_code == 404
    r = await web.anon.post("/topics/new", data={"csrf": token, "topic": "t",
                                                 "callback": "http://h/"},
                            headers={"Origin": BASE})
    assert r.status_code == 303


async def test_without_a_password_only_loopback_names_are_served(
        redis_server: RedisProcess, tmp_path: Path) -> None:
    async with open_web(redis_server.url, f"sqlite:///{tmp_path / 'r.db'}",
                        web_password="") as w:
        r = await w.anon.get("/")
        assert r.status_code == 200 and "Log out" not in r.text
        assert (await w.anon.get("/login")).status_code == 303
        assert (await w.anon.get("/api/topics")).status_code == 200
        token = csrf_of((await w.anon.get("/topics/new")).text)
        r = await w.anon.post("/topics/new", data={"csrf": token, "topic": "t",
                                                   "callback": "http://h/"})
        assert r.status_code == 303
        assert (await w.anon.post("/topics/t/delete", data={})).status_code == 403
        for host in ("evil.example", "127.0.0.1.evil.example"):
            r = await w.anon.get("/", headers={"Host": host})
            assert r.status_code == 403 and r.json()["err"] == "forbidden"
        assert (await w.anon.get("/", headers={"Host": "localhost:8088"})).status_code == 200


def test_chart_ticks_are_round_numbers() -> None:
    rows = [(29_000_000 + i, {"writes": 50 if i == 30 else 5, "ok": 4, "fail": 0})
            for i in range(60)]
    assert [t.label for t in chart.build(rows).y_ticks] == ["0", "10", "20", "30", "40", "50"]
    for peak in (*range(0, 130), 999, 1001, 37_000, 123_456):
        rows = [(29_000_000, {"writes": peak}), (29_000_001, {"writes": 0})]
        values = [int(t.label.replace(",", "")) for t in chart.build(rows).y_ticks]
        step = values[1]
        assert values == list(range(0, values[-1] + 1, step)), (peak, values)
        assert values[-1] >= peak and 2 <= len(values) <= 6, (peak, values)
        assert str(step).rstrip("0") in ("1", "2", "5"), (peak, values)
