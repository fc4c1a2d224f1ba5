"""The console in a real headless Chromium, driven over W3C WebDriver (Debian's chromedriver,
spoken to with httpx: no extra package). The app runs under uvicorn via `web.app.run`.

Screenshots of the dashboard and the topic form land in tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from dq.config import Settings
from dq.runtime.context import open_store
from dq.storage.store import Store
from tests.support.browser import (
    CHROMEDRIVER,
    CHROMIUM,
    Browser,
    LiveConsole,
    wait,
)
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.web import fail_once

PW = "browser-pw"

pytestmark = pytest.mark.slow


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver) to run the console tests")
    if not os.path.exists(CHROMEDRIVER):
        pytest.fail("chromedriver is missing: apt-get install chromium-driver")
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


async def with_store(settings: Settings, fn: Callable[[Store], Any]) -> None:
    store = open_store(settings)
    try:
        await fn(store)
    finally:
        await store.shards.close()


async def bury(store: Store) -> None:
    await store.add("order_timeout", "dead-1", {"order": 7}, priority=2, delay_ms=0)
    shard = store.shards.shards[0]
    await store.move_due(shard, range(store.buckets))
    for c in await store.claim(shard, 10, [1, 2, 3], 30000):
        await store.bury(c, {"status": 500, "error": "boom"})


async def seed_history(store: Store) -> None:
    """Per-minute counters for the last hour, so the chart has something to draw."""
    shard = store.shards.shards[0]
    now = int(time.time() // 60)
    for i in range(60):
        m = now - 59 + i
        writes = round(40 + 25 * math.sin(i / 9) + 6 * math.sin(i * 1.7))
        ok = max(0, round(writes * 0.9 + 4 * math.sin(i / 3)))
        fail = round(3 + 3 * math.sin(i / 5)) if 25 <= i <= 40 else i % 7 == 0
        await shard.call("HSET", store.keys.minute(m), "writes", writes, "ok", ok, "fail",
                         int(fail))
        await shard.call("EXPIRE", store.keys.minute(m), 3600)


def test_console_in_a_browser(browser: Browser, redis_server: RedisProcess,
                              tmp_path: Path) -> None:
    settings = Settings(redis=(redis_server.url,), web_port=free_port(), web_host="127.0.0.1",
                        web_password=PW, db=f"sqlite:///{tmp_path / 'dq.sqlite3'}")
    with LiveConsole(settings) as console:
        api = httpx.Client(base_url=console.url, auth=("admin", PW))
        b = browser

        # log in
        b.go(console.url + "/")
        assert "/login" in b.url()
        b.fill("#f-password", "wrong")
        b.click("button[type=submit]")
        assert "Wrong password." in b.text(".error")
        b.fill("#f-password", PW)
        b.click("button[type=submit]")
        assert b.text("h1") == "Dashboard"

        # create a topic: first with a bad URL, then fixed
        b.click("a[href='/topics/new']")
        b.fill("#f-topic", "order_timeout")
        b.fill("#f-name", "Cancel unpaid orders")
        b.fill("#f-callback", "shop.example.com/hook")
        b.fill("#f-emails", "ops@example.com")
        b.fill("#f-retry_when", "{res.code} != 200 &&")
        b.click("button.primary")
        assert "callback must start with http:// or https://" in b.text("#e-callback")
        assert "at position" in b.text("#e-retry_when")
        b.screenshot("topic_form.png")
        b.fill("#f-callback", "https://shop.example.com/hooks/order-timeout")
        b.fill("#f-retry_when", "{res.code} != 200")
        b.click("button.primary")
        assert b.text(".flash") == "Topic order_timeout created."
        assert "order_timeout" in b.text("table")

        # XSS: a hostile topic name is shown as text, never run
        api.post("/api/topics", json={"topic": "xss", "name": "<script>alert(1)</script>",
                                      "callback": "http://h.example/"}).raise_for_status()
        b.go(console.url + "/topics")
        assert "<script>alert(1)</script>" in b.text("table")
        assert b.count("td script") == 0 and b.no_dialog()

        # add a job over the API, find it on the jobs page, delete it
        r = api.post("/api/jobs", json={"topic": "order_timeout", "id": "42",
                                        "body": {"order": 42}, "delay": 600})
        assert r.status_code == 201, r.text
        b.click("a[href='/jobs']")
        b.fill("input[name=topic]", "order_timeout")
        b.fill("input[name=id]", "42")
        b.click("button.primary")
        assert "delayed" in b.text(".badge") and '"order": 42' in b.text("#job")
        b.click("#job button.danger")
        b.accept_confirm("Delete job order_timeout:42?")
        wait(lambda: "deleted" in b.text(".flash"), what="the deletion message")
        assert api.get("/api/jobs/order_timeout/42").status_code == 404

        # redrive a dead letter
        asyncio.run(with_store(settings, bury))
        b.click("a[href='/dead']")
        assert "order_timeout:dead-1" in b.text("table") and "HTTP 500" in b.text("table")
        b.screenshot("dead.png")
        b.click("form[action='/dead/redrive'] button")
        assert b.text(".flash") == "Job order_timeout:dead-1 redriven: it is due now."
        assert api.get("/api/jobs/order_timeout/dead-1").json()["state"] == "delayed"

        # the dashboard, with an hour of traffic for the chart
        asyncio.run(with_store(settings, seed_history))
        b.click("a.brand")
        assert b.count("svg.chart polyline") == 3
        assert "order_timeout" in b.text("table")
        b.screenshot("dashboard.png")
        for page in ("topics", "jobs", "shards", "alert", "docs"):
            b.click(f"header nav a[href='/{page}']")
            assert b.count("header nav a.active") == 1, page
            b.screenshot(f"{page}.png")

        # No CSP violation and no script error (4xx answers to the bad forms are expected).
        refused = [e for e in b.console_log() if (e.get("source") != "network"
                   and e.get("level") == "SEVERE") or "Refused" in str(e.get("message"))]
        assert refused == [], refused
        api.close()


def login(b: Browser, console: LiveConsole) -> None:
    b.go(console.url + "/login")
    b.fill("#f-password", PW)
    b.click("button[type=submit]")
    assert b.text("h1") == "Dashboard"


def test_a_retrying_job_shows_its_last_error_in_a_browser(
        browser: Browser, redis_server: RedisProcess, tmp_path: Path) -> None:
    """A job waiting for its next attempt after a real 500 (real receiver, real consumer):
    the console's job page says it is retrying, with the error, the attempts so far and
    when the next attempt is due; a dead letter's error time is a date, not epoch ms."""
    settings = Settings(redis=(redis_server.url,), web_port=free_port(), web_host="127.0.0.1",
                        web_password=PW, db=f"sqlite:///{tmp_path / 'dq.sqlite3'}",
                        timers=1, retry_unit=600.0, timer_tick=0.2, registry_refresh=0.2)
    asyncio.run(fail_once(settings, "flaky", "7", (500, b"upstream is down")))
    with LiveConsole(settings) as console:
        api = httpx.Client(base_url=console.url, auth=("admin", PW))
        job = api.get("/api/jobs/flaky/7").json()
        b = browser
        login(b, console)
        b.go(f"{console.url}/jobs?topic=flaky&id=7")
        assert b.text("#job .badge") == "retrying"
        assert "waiting to retry after 1 failed attempt" in b.text("#job .facts")
        assert "Next attempt" in b.text("#job .facts") and job["due"] in b.text("#job-due")
        last = b.text("#last-error")
        assert "HTTP 500" in last and "upstream is down" in last
        assert job["error"]["at_time"] in last and str(job["error"]["at"]) not in last
        b.screenshot("job_retrying.png")

        async def kill(store: Store) -> None:
            shard = store.shards.shards[0]
            await store.add("flaky", "8", {}, delay_ms=0)
            await store.move_due(shard, range(store.buckets))
            for c in await store.claim(shard, 10, [1, 2, 3], 30000):
                await store.bury(c, {"status": 502, "error": "HTTP 502", "reply": "",
                                     "attempts": 5, "at": 1767225600000})
        asyncio.run(with_store(settings, kill))
        b.go(console.url + "/dead")
        b.cmd("POST", f"/element/{b.find('table details summary')}/click")
        row = b.text("table")
        assert "1767225600000" not in row
        assert store_time(settings, 1767225600000) in row
        api.close()


def store_time(settings: Settings, epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, settings.zone).strftime("%Y-%m-%d %H:%M:%S")
