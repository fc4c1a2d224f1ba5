"""Rendering pages: the Jinja2 environment, the context every page gets, flash messages."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, unquote
from zoneinfo import ZoneInfo

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape

FLASH_COOKIE: Final = "dq_flash"
HERE: Final = Path(__file__).parent
NAV: Final = (("dashboard", "/", "Dashboard"), ("topics", "/topics", "Topics"),
              ("jobs", "/jobs", "Jobs"), ("dead", "/dead", "Dead letters"),
              ("shards", "/shards", "Redis shards"), ("alert", "/alert", "Alerts"),
              ("docs", "/docs", "API"))


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def make_templates(zone: ZoneInfo | None = None) -> Jinja2Templates:
    """The page templates; times are shown in `zone` (None: this machine's zone)."""

    def ms_time(epoch_ms: int | None) -> str:
        if not epoch_ms:
            return "-"
        return datetime.fromtimestamp(epoch_ms / 1000, zone).strftime("%Y-%m-%d %H:%M:%S")

    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pretty"] = _pretty
    env.filters["seg"] = lambda v: quote(str(v), safe="")
    env.filters["ms_time"] = ms_time
    env.filters["num"] = lambda v: f"{int(v):,}"
    return Jinja2Templates(env=env)


def render(request: Request, name: str, context: dict[str, Any] | None = None, *,
           status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A page from templates/`name`, with the navigation, CSRF token and any flash message."""
    st = request.app.state.dq
    sess = getattr(request.state, "session", None)
    flash = None
    raw = request.cookies.get(FLASH_COOKIE)
    if raw:
        kind, _, text = unquote(raw).partition(":")
        flash = {"kind": "error" if kind == "error" else "ok", "text": text[:300]}
    ctx = {
        "nav": NAV if sess is not None and sess.auth else (),
        "active": name.split(".")[0],
        "csrf": sess.csrf if sess is not None else "",
        "logged_in": sess is not None and sess.auth and bool(st.keys.password),
        "flash": flash,
        **(context or {}),
    }
    resp = st.templates.TemplateResponse(request, name, ctx, status_code=status, headers=headers)
    if raw:
        resp.delete_cookie(FLASH_COOKIE, path="/")
    return resp


def redirect(url: str, message: str = "", *, error: bool = False) -> RedirectResponse:
    """303 to `url`, carrying a one-time message for the next page."""
    resp = RedirectResponse(url, status_code=303)
    if message:
        resp.set_cookie(FLASH_COOKIE, quote(f"{'error' if error else 'ok'}:{message[:300]}"),
                        max_age=60, path="/", httponly=True, samesite="lax")
    return resp
