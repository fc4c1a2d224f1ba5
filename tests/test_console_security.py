"""The web console against strangers, forged forms, SQL injection and XSS.

Routes are enumerated from the app itself, so a route added later is covered without
editing this file. Injection strings go into every topic field, through the API and the
HTML form, on SQLite and MariaDB; XSS strings are also rendered in headless Chromium,
where a fired `alert` or an element the payload made would show.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.routing import APIRoute
from markupsafe import escape

from dq.config import Settings
from dq.registry.core import Registry, Topic
from dq.registry.models import TopicRow
from dq.runtime.context import open_store
from dq.storage.store import Store
from tests.support.browser import CHROMEDRIVER, CHROMIUM, Browser, LiveConsole, wait
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.web import BASE, PW, Web, open_web
from web.app import create_app
from web.forms import TOPIC_FIELDS

PUBLIC = {("GET", "/healthz"), ("GET", "/login"), ("POST", "/login")}
SEEDED = Topic(topic="seeded_topic", name="Seeded", delay=60,
               callback="https://seeded.example/hook-private", method="POST",
               emails=("ops@seeded.example",), creator="fixture", secret="seed-secret")
NOT_FOR_STRANGERS = ("seeded_topic", "seeded.example", "seed-secret")

SQLI = [
    "' OR '1'='1",
    "x'; DROP TABLE dq_topic; --",
    '"; DELETE FROM dq_topic; --',
    "1 UNION SELECT topic, secret FROM dq_topic --",
    "seeded_topic' --",
    "%' OR 1=1 #",
    "\\'; UPDATE dq_topic SET callback='http://evil.example/' WHERE '1'='1",
    "Robert'); DROP TABLE dq_topic;--",
]
SELECTS = ("method", "priority", "status", "body_format", "secret", "paused")  # not echoed as typed
URL_SQLI = "https://h.example/?q='OR'1'='1'--&x=\";DROP%20TABLE%20dq_topic"
XSS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(1)>",
    "</textarea><script>alert(1)</script>",
    "{{7*7}}{% raw %}",
]
URL_XSS = 'https://h.example/"><svg/onload=alert(1)>'

pytestmark = pytest.mark.slow


# -- the app over a real registry and Redis -----------------------------------------------

class Console(Web):
    """The app over a real registry (seeded with one topic) and Redis."""

    def rows(self) -> int:
        with self.registry.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(TopicRow)).scalar_one())

    def tables(self) -> set[str]:
        return set(sa.inspect(self.registry.engine).get_table_names())

    def snapshot(self) -> tuple[Any, ...]:
        return (self.registry.topics(), [(s.name, s.url, s.enabled) for s in
                                         self.registry.shards()], self.registry.alert())


@contextlib.asynccontextmanager
async def open_console(redis_url: str, db_url: str) -> AsyncIterator[Console]:
    async with open_web(redis_url, db_url) as web:
        web.registry.save_topic(SEEDED)
        yield Console(**{f.name: getattr(web, f.name) for f in fields(web)})


@pytest.fixture
async def console(redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[Console]:
    async with open_console(redis_server.url, f"sqlite:///{tmp_path / 'dq.sqlite3'}") as c:
        yield c


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no CSRF token"
    return match.group(1)


async def login(client: httpx.AsyncClient) -> str:
    """Log a client in through the form; returns its session's CSRF token."""
    page = await client.get("/login")
    r = await client.post("/login", data={"csrf": csrf_of(page.text), "password": PW,
                                          "next": "/"})
    assert r.status_code == 303, r.text
    return csrf_of((await client.get("/topics")).text)


def api_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """(path prefix, route) of every APIRoute, also inside included routers (FastAPI >= 0.120
    keeps an included router as one entry instead of copying its routes into the app)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix, route
        elif hasattr(route, "original_router"):
            context = getattr(route, "include_context", None)
            yield from api_routes(route.original_router.routes,
                                  prefix + getattr(context, "prefix", ""))


def routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app serves, parameters filled in."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return "1" if name.endswith("_id") and name != "job_id" else "seeded_topic"

    out = []
    for prefix, route in api_routes(app.routes):
        path = re.sub(r"{([^}:]+)(?::[^}]+)?}", fill, prefix + route.path)
        out += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return sorted(set(out))


def refused(r: httpx.Response) -> bool:
    """401/403, or a redirect to the login form; and nothing private in the answer."""
    if any(secret in r.text for secret in NOT_FOR_STRANGERS):
        return False
    if r.status_code in (401, 403):
        return True
    return r.status_code in (302, 303, 307) and r.headers["location"].startswith("/login")


# -- who may use it -------------------------------------------------------------------------

async def test_every_route_but_healthz_and_login_refuses_strangers(console: Console) -> None:
    all_routes = routes(console.app)
    guarded = [(m, p) for m, p in all_routes if (m, p) not in PUBLIC]
    assert len(guarded) > 40 and {("GET", "/metrics"), ("GET", "/api/topics")} <= set(guarded)
    pre_login = (await console.anon.get("/login")).cookies.get("dq_session")
    assert pre_login, "the login form should start a (not yet logged-in) session"
    strangers: dict[str, dict[str, str]] = {
        "nobody": {},
        "wrong Basic": {"Authorization": "Basic " + _b64("admin:guess")},
        "wrong Bearer": {"Authorization": "Bearer guess"},
        "empty Bearer": {"Authorization": "Bearer "},
        "forged cookie": {"Cookie": "dq_session=abc.1.9999999999.forged"},
        "pre-login session": {"Cookie": f"dq_session={pre_login}"},
    }
    let_in = []
    for who, headers in strangers.items():
        for method, path in guarded:
            kw: dict[str, Any] = {"json": {}} if path.startswith("/api/") else {"data": {}}
            async with httpx.AsyncClient(transport=console.transport,
                                         base_url=BASE) as client:
                r = await client.request(method, path, headers=headers, **kw)
            if not refused(r):
                let_in.append(f"{who}: {method} {path} -> {r.status_code} {r.text[:120]}")
    print(f"\n{len(guarded)} guarded routes x {len(strangers)} kinds of stranger: "
          f"{len(let_in)} let in", flush=True)
    assert not let_in, "\n".join(let_in)
    assert console.snapshot()[0]["seeded_topic"] == console.registry.get_topic("seeded_topic")
    assert (await console.anon.get("/healthz")).status_code == 200
    assert (await console.api.get("/api/topics")).status_code == 200  # the control


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


FORM_DATA = {"topic": "csrf_made", "name": "made by a forged form", "callback":
             "https://evil.example/", "method": "POST", "url": "redis://127.0.0.1:1/0",
             "host": "smtp.evil.example", "sender": "x@evil.example", "id": "1",
             "to": "x@evil.example", "filter": "", "back": "/topics", "password": "x"}


async def test_forms_without_the_sessions_csrf_token_are_refused(console: Console) -> None:
    async with httpx.AsyncClient(transport=console.transport, base_url=BASE) as me, \
            httpx.AsyncClient(transport=console.transport, base_url=BASE) as other:
        token = await login(me)
        other_token = await login(other)
        assert token != other_token
        forms = [(m, p) for m, p in routes(console.app)
                 if m == "POST" and not p.startswith("/api/") and p != "/login"]
        assert len(forms) >= 12
        before = console.snapshot()
        let_in = []
        attempts = {
            "no token": ({}, {}),
            "another session's token": ({"csrf": other_token}, {}),
            "empty token": ({"csrf": ""}, {}),
            "cross-site (Sec-Fetch-Site)": ({"csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
            "cross-site (Origin)": ({"csrf": token}, {"Origin": "https://evil.example"}),
            "opaque origin": ({"csrf": token}, {"Origin": "null"}),
        }
        for what, (extra, headers) in attempts.items():
            for _, path in forms:
                r = await me.post(path, data={**FORM_DATA, **extra}, headers=headers)
                if r.status_code != 403:
                    let_in.append(f"{what}: POST {path} -> {r.status_code}")
        assert not let_in, "\n".join(let_in)
        assert console.snapshot() == before, "a refused form changed something"
        # the API refuses a cross-site write even with the right credentials
        for method, path in [("DELETE", "/api/topics/seeded_topic"),
                             ("POST", "/api/topics"), ("PUT", "/api/alert")]:
            r = await console.api.request(method, path, json={"topic": "x"},
                                          headers={"Sec-Fetch-Site": "cross-site"})
            assert r.status_code == 403, (method, path, r.status_code)
        assert console.snapshot() == before
        # the control: the same form with its token, from the console itself, works
        r = await me.post("/topics/seeded_topic/toggle", data={"csrf": token, "back": "/"},
                          headers={"Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 303
        topic = console.registry.get_topic("seeded_topic")
        assert topic is not None and not topic.online
    print(f"\n{len(forms)} forms x {len(attempts)} forged posts: all refused", flush=True)


# -- SQL injection --------------------------------------------------------------------------

def base_topic(key: str) -> dict[str, Any]:
    return {"topic": key, "name": "n", "delay": 10, "callback": "https://h.example/cb",
            "method": "POST", "timeout_ms": 3000, "emails": [], "retry_when": "",
            "priority": 2, "status": "online", "max_attempts": 0, "secret": "",
            "body_format": "form", "creator": "c"}


def stored_value(topic: Topic, name: str) -> Any:
    return {"status": "online" if topic.online else "offline",
            "emails": ", ".join(topic.emails)}.get(name, getattr(topic, name, None))


async def inject(console: Console, form_client: httpx.AsyncClient, token: str,
                 strings: list[str]) -> tuple[int, int, list[str]]:
    """Every string in every topic field, by API and by form: (stored, refused, problems)."""
    stored = refused_n = 0
    problems: list[str] = []
    n = 0
    for name in TOPIC_FIELDS:
        values = [*strings, URL_SQLI] if name == "callback" else strings
        for value in values:
            n += 1
            key = value if name == "topic" else f"inj_{n}"
            for via in ("api", "form"):
                body = {**base_topic(key if via == "api" else key + "f"), name: value}
                if name == "topic":
                    body["topic"] = value
                if via == "api":
                    r = await console.api.post("/api/topics", json=body)
                    ok, bad = r.status_code == 201, r.status_code == 422
                    errors = r.json().get("errors", {}) if bad else {}
                else:
                    form = {k: (", ".join(v) if isinstance(v, list) else str(v))
                            for k, v in body.items()}
                    r = await form_client.post("/topics/new", data={**form, "csrf": token})
                    ok, bad = r.status_code == 303, r.status_code == 422
                    errors = {name: "shown"} if bad and 'class="error' in r.text else {}
                    # a refused form shows the value back, escaped (but never the secret)
                    if bad and name not in SELECTS and str(escape(value.strip())) not in r.text:
                        problems.append(f"form {name}={value!r}: value not shown back")
                if ok:
                    stored += 1
                    saved = console.registry.get_topic(body["topic"])
                    want = value.strip()
                    got = None if saved is None else stored_value(saved, name)
                    if got != want:
                        problems.append(f"{via} {name}={value!r}: stored as {got!r}")
                elif bad:
                    refused_n += 1
                    if name not in errors:
                        problems.append(f"{via} {name}={value!r}: refused without naming "
                                        f"the field ({errors})")
                else:
                    problems.append(f"{via} {name}={value!r}: HTTP {r.status_code} "
                                    f"{r.text[:200]}")
    return stored, refused_n, problems


async def test_sql_injection_in_every_topic_field_and_search_box(
        redis_server: RedisProcess, db_url: str) -> None:
    async with open_console(redis_server.url, db_url) as console, \
            httpx.AsyncClient(transport=console.transport, base_url=BASE) as browser:
        token = await login(browser)
        tables = console.tables()
        assert {"dq_topic", "dq_redis", "dq_alert", "dq_stat"} <= tables
        rows = console.rows()
        stored, refused_n, problems = await inject(console, browser, token, SQLI)
        assert not problems, "\n".join(problems)
        assert console.rows() == rows + stored, "rows appeared or vanished"
        # the search boxes and path parameters
        for s in SQLI:
            for url in (f"/topics?{urlencode({'q': s})}",
                        f"/jobs?{urlencode({'topic': s, 'id': s})}",
                        f"/dead?{urlencode({'topic': s})}"):
                r = await browser.get(url)
                assert r.status_code == 200, (url, r.status_code)
                assert s not in r.text or s == str(escape(s)), url  # shown, escaped
                assert str(escape(s)) in r.text, f"{url}: the search is not shown back"
            r = await console.api.get("/api/topics", params={"q": s})
            want = sum(s.lower() in t.topic.lower() or s.lower() in t.name.lower()
                       for t in console.registry.topics().values())
            assert r.status_code == 200 and r.json()["total"] == want
            for method, path in (("GET", f"/api/topics/{quote(s, safe='')}"),
                                 ("DELETE", f"/api/topics/{quote(s, safe='')}"),
                                 ("GET", f"/api/jobs/{quote(s, safe='')}/{quote(s)}"),
                                 ("DELETE", f"/api/jobs/{quote(s, safe='')}/{quote(s)}")):
                r = await console.api.request(method, path)
                assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
        assert console.rows() == rows + stored
        assert console.tables() == tables
        seeded = console.registry.get_topic("seeded_topic")
        assert seeded is not None and seeded.callback == SEEDED.callback
        assert seeded.secret == SEEDED.secret
    print(f"\nSQL injection ({db_url.split(':')[0]}): {stored} stored verbatim, {refused_n} "
          f"refused by validation, dq_topic rows {rows} -> {rows + stored}", flush=True)


# -- XSS --------------------------------------------------------------------------------------

async def seed_xss(api: httpx.AsyncClient, store: Store) -> list[str]:
    """Topics with XSS in every field that accepts it, a job and a dead letter carrying it.
    Returns the topic keys made."""
    keys = []
    for i, payload in enumerate(XSS):
        key = f"xss_{i}"
        body = {**base_topic(key), "name": payload, "creator": payload,
                "callback": URL_XSS, "secret": payload}
        r = await api.post("/api/topics", json=body)
        assert r.status_code == 201, r.text
        keys.append(key)
        await store.add(key, payload, {"note": payload, payload: 1}, delay_ms=600_000)
    # a callback's reply is shown with a dead letter: the receiver controls it
    await store.add("xss_0", "dead", {"n": 1}, delay_ms=0)
    shard = store.shards.shards[0]
    await store.move_due(shard, range(store.buckets))
    for c in await store.claim(shard, 10, [1, 2, 3], 30000):
        await store.bury(c, {"status": 500, "error": XSS[0], "reply": XSS[1]})
    return keys


def xss_pages(keys: list[str]) -> list[str]:
    out = ["/", "/topics", "/dead", "/dead?" + urlencode({"topic": "xss_0"})]
    for key in keys:
        out.append(f"/topics/{key}/edit")
    for i, payload in enumerate(XSS):
        out.append("/topics?" + urlencode({"q": payload}))
        out.append("/jobs?" + urlencode({"topic": f"xss_{i}", "id": payload}))
        out.append("/jobs?" + urlencode({"topic": payload, "id": payload}))
        out.append("/dead?" + urlencode({"topic": payload}))
    return out


def assert_inert(page: str, url: str) -> None:
    for payload in (*XSS, URL_XSS):
        if str(escape(payload)) != payload:
            assert payload not in page, f"{url} shows {payload!r} unescaped"


async def test_xss_in_every_field_is_escaped_in_the_html(console: Console) -> None:
    keys = await seed_xss(console.api, console.store)
    async with httpx.AsyncClient(transport=console.transport, base_url=BASE) as me:
        token = await login(me)
        shown = 0
        for url in xss_pages(keys):
            r = await me.get(url)
            assert r.status_code == 200, (url, r.status_code)
            assert_inert(r.text, url)
            shown += sum(str(escape(p)) in r.text for p in XSS)
        assert shown >= 3 * len(XSS), "the payloads should be shown, as text"
        # template syntax in a name is text, not a template
        listing = (await me.get("/topics")).text
        assert XSS[4] in listing and "<td>49" not in listing
        # a refused form echoes every field back; a flash message echoes the job id
        form = {k: XSS[1] for k in TOPIC_FIELDS}
        r = await me.post("/topics/new", data={**form, "csrf": token})
        assert r.status_code == 422
        assert_inert(r.text, "POST /topics/new")
        for path in ("/dead/delete", "/jobs/delete", "/dead/redrive"):
            r = await me.post(path, data={"csrf": token, "topic": XSS[0], "id": XSS[1],
                                          "filter": XSS[2]})
            assert r.status_code == 303
            page = await me.get(r.headers["location"])
            assert_inert(page.text, path)
            assert str(escape(XSS[1])) in page.text, "the flash message should show the id"


@pytest.fixture
def chromium() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER):
        pytest.fail(f"{CHROMIUM} and chromedriver are needed: apt-get install chromium "
                    "chromium-driver")
    port = free_port()
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    driver = f"http://127.0.0.1:{port}"
    wait(lambda: httpx.get(driver + "/status").json()["value"]["ready"], what="chromedriver")
    b = Browser(driver)
    try:
        yield b
    finally:
        b.close()
        proc.terminate()
        proc.wait(10)


INJECTED = "img[src='x'], svg[onload], img[onerror], body script:not([src])"
VALUES_JS = ("return Array.from(document.querySelectorAll('input,textarea'))"
             ".map(function (e) { return e.value; });")


def test_xss_in_every_field_renders_inert_in_chromium(
        chromium: Browser, redis_server: RedisProcess, tmp_path: Path) -> None:
    settings = Settings(redis=(redis_server.url,), web_port=free_port(), web_host="127.0.0.1",
                        web_password=PW, db=f"sqlite:///{tmp_path / 'dq.sqlite3'}")
    with LiveConsole(settings) as live:
        async def seed() -> list[str]:
            store = open_store(settings)
            try:
                async with httpx.AsyncClient(base_url=live.url, auth=("a", PW)) as api:
                    return await seed_xss(api, store)
            finally:
                await store.shards.close()

        keys = asyncio.run(seed())
        b = chromium
        # the control: the same payload on a page that does not escape it is caught
        b.go("data:text/html," + quote(XSS[1]))
        assert not b.no_dialog()
        b.cmd("POST", "/alert/dismiss")
        assert b.count(INJECTED) == 1
        b.go(live.url + "/login")
        b.fill("#f-password", PW)
        b.click("button[type=submit]")
        assert b.text("h1") == "Dashboard"
        problems = []
        for path in xss_pages(keys):
            b.go(live.url + path)
            if not b.no_dialog():
                problems.append(f"{path}: a dialog opened")
                b.cmd("POST", "/alert/dismiss")
            if b.count(INJECTED):
                problems.append(f"{path}: {b.count(INJECTED)} element(s) made by a payload")
        # the text is there, as text
        b.go(live.url + "/topics")
        assert all(p in b.text("table") for p in XSS[:4]), "the names should read verbatim"
        b.go(live.url + f"/topics/{keys[1]}/edit")
        values = b.cmd("POST", "/execute/sync", {"script": VALUES_JS, "args": []})
        assert XSS[1] in values and URL_XSS in values
        b.go(live.url + "/dead")
        assert XSS[0] in b.text("table")
        # a form refused with hostile values in every field shows them back, inert
        b.go(live.url + "/topics/new")
        for name in ("topic", "name", "callback", "retry_when", "emails", "creator"):
            b.fill(f"#f-{name}", XSS[1])
        b.click("button.primary")
        assert b.no_dialog() and b.count(INJECTED) == 0
        values = b.cmd("POST", "/execute/sync", {"script": VALUES_JS, "args": []})
        assert values.count(XSS[1]) >= 5, values
        errors = [e for e in b.console_log()
                  if "Content Security Policy" in str(e.get("message"))]
        assert not problems, "\n".join(problems)
        print(f"\nXSS in Chromium: {len(xss_pages(keys))} pages, no dialog, no injected "
              f"element, {len(errors)} CSP reports", flush=True)


# -- a console without a password stays on loopback ---------------------------------------

def _dq_web(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`dq-web` as a real process; it should refuse at once, so 20 s means it serves."""
    repo = Path(__file__).resolve().parent.parent
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    try:
        return subprocess.run(
            [sys.executable, "-c", "from dq.cli import web_main; web_main()", *args],
            capture_output=True, text=True, timeout=20, cwd=cwd,
            env={**clean, "PYTHONPATH": str(repo), **env})
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"dq-web {' '.join(args)} served without a password instead "
                             f"of refusing: {exc.stderr!r}") from None


@pytest.mark.parametrize("env", [{}, {"DQ_WEB": "false"}])
def test_dq_web_without_a_password_off_loopback_exits_2(tmp_path: Path,
                                                       env: dict[str, str]) -> None:
    """`dq-web --web-host 0.0.0.0` and no password would serve the admin API to anyone:
    it exits 2 with one line saying what to do (also when the config turns the master's
    console off, which dq-web ignores)."""
    res = _dq_web("--web-host", "0.0.0.0", "--web-port", str(free_port()),
                  "--data-dir", str(tmp_path), "--redis", "redis://127.0.0.1:1/0",
                  env=env, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("dq-web: web_host '0.0.0.0' without a web_password")
    assert res.stderr.count("\n") == 1 and "set web_password" in res.stderr, res.stderr
    assert "127.0.0.1" in res.stderr


async def test_run_refuses_an_open_console_built_in_code(redis_server: RedisProcess,
                                                         tmp_path: Path) -> None:
    """Settings made in code skip load_settings' checks; the web role checks again."""
    from dq.errors import ConfigError
    from dq.runtime.context import Context
    from web.app import run

    settings = Settings(redis=(redis_server.url,), web_port=free_port(), web_host="0.0.0.0",
                        db=f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(ConfigError, match="without a web_password"):
        await asyncio.wait_for(run(Context(settings, "web")), 10)


# -- what a stranger can learn or cost the server ----------------------------------------

async def test_a_session_cookie_does_not_make_the_password_cheap_to_guess_offline(
        console: Console) -> None:
    """Anyone gets a signed cookie from GET /login. Its key is scrypt of the password, not
    a plain HMAC of it: a cookie signed the old, cheap way is refused, and checking one
    guess against a cookie costs a scrypt."""
    page = await console.anon.get("/login")
    cookie = console.anon.cookies["dq_session"]
    text, _, sig = cookie.rpartition(".")
    slow = hashlib.scrypt(PW.encode(), salt=b"dq-session", n=2**14, r=8, p=1, dklen=32)
    assert sig == _b64u(hmac.new(slow, text.encode(), hashlib.sha256).digest())
    cheap = hmac.new(PW.encode(), b"dq-session", hashlib.sha256).digest()
    nonce, _auth, issued = text.split(".")
    logged_in = f"{nonce}.1.{issued}"  # the same session, logged in, signed the cheap way
    forged = f"{logged_in}.{_b64u(hmac.new(cheap, logged_in.encode(), hashlib.sha256).digest())}"
    stranger = httpx.AsyncClient(transport=console.transport, base_url=BASE,
                                 cookies={"dq_session": forged})
    async with stranger:
        r = await stranger.get("/topics")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert page.status_code == 200


def _b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_an_oversized_body_is_refused_before_it_is_read(console: Console) -> None:
    """A form is read before its session is checked, and an API body before its password:
    a body larger than anything here takes gets 413 at once, with or without credentials."""
    big = {"password": "x" * (300 * 1024)}
    r = await console.anon.post("/login", data=big)
    assert r.status_code == 413 and r.json()["err"] == "too_large"
    r = await console.api.post("/api/jobs", json={"topic": "t", "id": "1", "body": {
        "pad": "x" * (300 * 1024)}})
    assert r.status_code == 413 and "KiB" in r.json()["detail"]
    r = await console.anon.post("/login", data={"csrf": "x", "password": "y"})
    assert r.status_code != 413  # an ordinary form still goes through


async def test_a_shards_password_is_not_shown_when_it_is_down(redis_server: RedisProcess,
                                                              tmp_path: Path) -> None:
    """A shard from the settings is named by its URL: when it does not answer, its error
    names it too, and the password in it must not reach pages, the API or the log."""
    down = f"redis://:TopSecretRedisPw@127.0.0.1:{free_port()}/0"
    settings = Settings(redis=(redis_server.url, down), web_password=PW,
                        db=f"sqlite:///{tmp_path / 'dq.sqlite3'}")
    registry = Registry(settings.db)
    store = open_store(settings)
    app = create_app(settings, registry=registry, store=store)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE,
                                     auth=("admin", PW)) as api:
            shards = await api.get("/api/shards")
            dead = await api.get("/api/dead")
            page = await api.get("/shards")
        assert "TopSecretRedisPw" not in shards.text + dead.text + page.text
        assert any("***@" in s["error"] for s in shards.json())
        assert dead.status_code == 503 and "***@" in dead.json()["detail"]
    finally:
        await store.shards.close()
        registry.close()


async def test_a_stored_mail_password_is_not_sent_to_another_server(console: Console) -> None:
    """Leaving the password field empty keeps the stored one only for the same host, port
    and user: pointed elsewhere (where "test mail" would hand it over), it is dropped."""
    token = await login(console.anon)
    form = {"csrf": token, "host": "smtp.corp.example", "port": "587", "user": "dq@corp",
            "password": "Corp-Mail-Pw", "tls": "starttls", "sender": "dq@corp.example",
            "redis_emails": ""}
    assert (await console.anon.post("/alert", data=form)).status_code == 303
    assert console.registry.alert().password == "Corp-Mail-Pw"
    same = {**form, "password": "", "sender": "alerts@corp.example"}
    assert (await console.anon.post("/alert", data=same)).status_code == 303
    assert console.registry.alert().password == "Corp-Mail-Pw"  # kept: the same server
    moved = {**form, "password": "", "host": "127.0.0.1", "port": "2525"}
    assert (await console.anon.post("/alert", data=moved)).status_code == 303
    assert console.registry.alert().password == ""


async def test_a_link_cannot_put_its_words_in_the_consoles_messages(console: Console) -> None:
    await login(console.anon)
    lure = "Your session expired. Log in at https:evil.example"
    r = await console.anon.get(f"/topics/{quote(lure)}/edit", follow_redirects=True)
    assert "evil.example" not in r.text and "does not exist" in r.text
