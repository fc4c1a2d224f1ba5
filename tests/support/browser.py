"""Headless Chromium through chromedriver, and a live dq-web console (uvicorn) for it."""

from __future__ import annotations

import asyncio
import base64
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from dq.config import Settings
from dq.runtime.context import Context
from tests.support.paths import ARTIFACTS
from web.app import run

CHROMIUM = "/usr/bin/chromium"


CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


T = TypeVar("T")


class WebDriverError(Exception):
    pass


class Browser:
    """Just enough of W3C WebDriver: navigate, find, type, click, read, screenshot."""

    def __init__(self, driver: str) -> None:
        self.http = httpx.Client(base_url=driver, timeout=30)
        self.user_data = tempfile.mkdtemp(prefix="dq-chromium-")
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "unhandledPromptBehavior": "ignore",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    f"--user-data-dir={self.user_data}", "--window-size=1360,1000"]}}
        value = self.send("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.path = f"/session/{value['sessionId']}"
        self.clicked_on = ""  # the page (its <html> element) the last click was made on

    def send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.request(method, path, json=body if method == "POST" else None)
        value = r.json().get("value")
        if r.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value}")
        return value

    def cmd(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.send(method, self.path + path, body if body is not None else {})

    def close(self) -> None:
        try:
            self.send("DELETE", self.path)
        finally:
            self.http.close()
            shutil.rmtree(self.user_data, ignore_errors=True)

    def go(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        found = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        return str(next(iter(found.values())))

    def count(self, css: str) -> int:
        return len(self.cmd("POST", "/elements", {"using": "css selector", "value": css}))

    def fill(self, css: str, text: str) -> None:
        el = self.find(css)
        self.cmd("POST", f"/element/{el}/clear")
        self.cmd("POST", f"/element/{el}/value", {"text": text})

    def click(self, css: str) -> None:
        """Click, and when that loads a new page (a link, a form), wait for it."""
        self.clicked_on = self.find("html")
        self.cmd("POST", f"/element/{self.find(css)}/click")
        self.wait_for_load(self.clicked_on)

    def wait_for_load(self, old_page: str, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.find("html") != old_page and self.cmd(
                        "POST", "/execute/sync",
                        {"script": "return document.readyState", "args": []}) == "complete":
                    return
            except WebDriverError as exc:
                if "unexpected alert" in str(exc):
                    return  # a confirm dialog holds the page; the caller answers it
            time.sleep(0.05)

    def accept_confirm(self, expect: str) -> None:
        text = wait(lambda: self.cmd("GET", "/alert/text"), what="a confirm dialog")
        assert expect in text, text
        self.cmd("POST", "/alert/accept")
        self.wait_for_load(self.clicked_on, timeout=10)

    def no_dialog(self) -> bool:
        try:
            self.cmd("GET", "/alert/text")
        except WebDriverError as exc:
            return "no such alert" in str(exc)
        return False

    def text(self, css: str = "body") -> str:
        return str(self.cmd("GET", f"/element/{self.find(css)}/text"))

    def url(self) -> str:
        return str(self.cmd("GET", "/url"))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return path

    def console_log(self) -> list[dict[str, Any]]:
        try:
            entries: list[dict[str, Any]] = self.cmd("POST", "/se/log", {"type": "browser"})
        except WebDriverError:
            return []
        return entries


def wait(probe: Callable[[], T], *, what: str, timeout: float = 10) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = probe()
            if result:
                return result
        except (WebDriverError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class LiveConsole:
    """web.app.run(ctx) on a free port, in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.ctx = Context(settings, "web")
        self.url = f"http://127.0.0.1:{settings.web_port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(run(self.ctx),), daemon=True)

    def __enter__(self) -> LiveConsole:
        self.thread.start()
        wait(lambda: httpx.get(self.url + "/healthz").status_code == 200, what="the console")
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.ctx.stopping.set)
        self.thread.join(15)
        assert not self.thread.is_alive(), "the console did not stop"
        self.loop.close()
