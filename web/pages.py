"""Console pages: login, dashboard, topics and the topic form.

Every page needs a logged-in session (see web.auth); every POST carries the session's CSRF
token and ends in a redirect with a one-time message (post/redirect/get).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.datastructures import FormData

from web import chart
from web.auth import (
    SESSION_COOKIE,
    Session,
    TooManyGuesses,
    check_csrf,
    current_session,
    ensure_session,
    password_ok,
    require_page,
    safe_next,
)
from web.errors import Invalid
from web.forms import NEW_TOPIC, TOPIC_FIELDS, check_callback_target, topic_input, validate_topic
from web.ops import breaker_states, search_topics, shard_views, topic_counters
from web.state import WebState, db, state
from web.views import redirect, render

router = APIRouter(include_in_schema=False)
St = Annotated[WebState, Depends(state)]
PageSession = Annotated[Session, Depends(require_page)]
PER_PAGE = 25


async def posted(request: Request, sess: PageSession) -> FormData:
    """The POSTed form, once its CSRF token matched the session's (else 403)."""
    form = await request.form()
    check_csrf(sess, form)
    return form


Form = Annotated[FormData, Depends(posted)]


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


# login --------------------------------------------------------------------------------

@router.get("/login")
async def login_page(request: Request, st: St, next: str = "/") -> Response:
    if not st.keys.password:
        return redirect(safe_next(next))
    request.state.session = ensure_session(request, auth=False)
    return render(request, "login.html", {"next": safe_next(next), "error": ""})


@router.post("/login")
async def login(request: Request, st: St) -> Response:
    form = await request.form()
    sess = current_session(request)
    if sess is None:
        return redirect("/login", "Your login form expired; please try again.", error=True)
    check_csrf(sess, form)
    target = safe_next(_text(form, "next"))
    password = form.get("password")
    try:
        ok = await password_ok(request, lambda: isinstance(password, str)
                               and st.keys.check_password(password))
    except TooManyGuesses as exc:
        request.state.session = sess
        return render(request, "login.html", {"next": target, "error": exc.detail},
                      status=429, headers=exc.headers)
    if not ok:
        request.state.session = sess
        return render(request, "login.html", {"next": target, "error": "Wrong password."},
                      status=401)
    # A fresh session on login, so a session planted before it is worth nothing.
    request.state.set_session = st.keys.issue(auth=True)
    return redirect(target)


@router.post("/logout")
async def logout(form: Form) -> Response:
    resp = redirect("/login", "You are logged out.")
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# dashboard ----------------------------------------------------------------------------

@router.get("/")
async def dashboard(request: Request, st: St, sess: PageSession) -> Response:
    topics = list((await db(st.registry.topics)).values())
    counters, minutes, shards = await asyncio.gather(
        topic_counters(st.store, topics), st.store.stats.minute_stats(60), shard_views(st))
    counters.sort(key=lambda r: (-r["today"]["writes"], r["topic"]))
    totals = {k: sum(r["today"][k] for r in counters)
              for k in ("writes", "notifies", "fail", "dead")}
    return render(request, "dashboard.html", {
        "counters": counters, "totals": totals, "shards": shards,
        "chart": chart.build(minutes, st.settings.zone), "day": st.store.clock.day()})


# topics -------------------------------------------------------------------------------

@router.get("/topics")
async def topics_page(request: Request, st: St, sess: PageSession, q: str = "",
                      page: int = 1) -> Response:
    found = search_topics(await db(st.registry.topics), q)
    pages = max(1, math.ceil(len(found) / PER_PAGE))
    page = min(max(1, page), pages)
    shown = found[(page - 1) * PER_PAGE:page * PER_PAGE]
    counters, breakers = await asyncio.gather(topic_counters(st.store, shown),
                                              breaker_states(st.store, shown))
    return render(request, "topics.html", {
        "rows": list(zip(shown, counters, strict=True)), "q": q, "page": page, "pages": pages,
        "breakers": breakers,
        "total": len(found), "back": str(request.url.path) + (
            f"?{request.url.query}" if request.url.query else "")})


@router.post("/topics/{key}/toggle")
async def toggle_topic(key: str, st: St, form: Form) -> Response:
    back = safe_next(_text(form, "back") or "/topics")
    topic = await db(st.registry.get_topic, key)
    if topic is None:
        return redirect(back, f"Topic {key} no longer exists.", error=True)
    saved = await db(st.registry.save_topic, replace(topic, online=not topic.online))
    state_word = "online" if saved.online else "offline"
    return redirect(back, f"Topic {key} is now {state_word}.")


@router.post("/topics/{key}/pause")
async def pause_topic(key: str, st: St, form: Form) -> Response:
    """Pause a topic, or resume a paused one (the button on the topics page)."""
    back = safe_next(_text(form, "back") or "/topics")
    topic = await db(st.registry.get_topic, key)
    if topic is None:
        return redirect(back, f"Topic {key} no longer exists.", error=True)
    saved = await db(st.registry.save_topic, replace(topic, paused=not topic.paused))
    if saved.paused:
        return redirect(back, f"Topic {key} is paused: its jobs are kept and nothing is "
                        "called until it is resumed.")
    return redirect(back, f"Topic {key} is resumed: its waiting jobs are called.")


@router.post("/topics/{key}/delete")
async def delete_topic(key: str, st: St, form: Form) -> Response:
    if await db(st.registry.delete_topic, key):
        return redirect("/topics", f"Topic {key} deleted.")
    return redirect("/topics", f"Topic {key} did not exist.", error=True)


def _form_page(request: Request, values: dict[str, Any], *, key: str | None,
               errors: dict[str, str] | None = None, secret_set: bool = False,
               status: int = 200, breaker: dict[str, Any] | None = None) -> Response:
    return render(request, "topic_form.html", {
        "values": values, "key": key, "errors": errors or {}, "secret_set": secret_set,
        "max_attempts_default": request.app.state.dq.settings.max_attempts,
        "retry_unit": request.app.state.dq.settings.retry_unit, "breaker": breaker},
        status=status)


@router.get("/topics/new")
async def new_topic_page(request: Request, sess: PageSession) -> Response:
    return _form_page(request, dict(NEW_TOPIC), key=None)


@router.get("/topics/{key}/edit")
async def edit_topic_page(key: str, request: Request, st: St, sess: PageSession) -> Response:
    topic = await db(st.registry.get_topic, key)
    if topic is None:
        # Not repeating the key: a link from another site could make it say anything.
        return redirect("/topics", "That topic does not exist.", error=True)
    breaker = (await breaker_states(st.store, [topic])).get(key)
    return _form_page(request, topic_input(topic), key=key, secret_set=bool(topic.secret),
                      breaker=breaker)


@router.post("/topics/new")
async def create_topic(request: Request, st: St, form: Form) -> Response:
    data = {k: _text(form, k) for k in (*TOPIC_FIELDS, "clear_secret") if k in form}
    try:
        topic = validate_topic(data, creator="console")
        await check_callback_target(st, topic.callback)
        if await db(st.registry.get_topic, topic.topic) is not None:
            raise Invalid({"topic": "a topic with this key already exists; edit it instead"})
    except Invalid as exc:
        return _form_page(request, {**NEW_TOPIC, **data, "secret": ""}, key=None,
                          errors=exc.errors, status=422)
    await db(st.registry.save_topic, topic)
    return redirect("/topics?q=" + quote(topic.topic), f"Topic {topic.topic} created.")


@router.post("/topics/{key}/edit")
async def update_topic(key: str, request: Request, st: St, form: Form) -> Response:
    existing = await db(st.registry.get_topic, key)
    if existing is None:
        return redirect("/topics", f"Topic {key} no longer exists.", error=True)
    data = {k: _text(form, k) for k in (*TOPIC_FIELDS, "clear_secret") if k in form}
    data["topic"] = key
    try:
        topic = validate_topic(data, existing=existing, key=key)
        await check_callback_target(st, topic.callback)
    except Invalid as exc:
        return _form_page(request, {**topic_input(existing), **data, "secret": ""}, key=key,
                          errors=exc.errors, secret_set=bool(existing.secret), status=422)
    await db(st.registry.save_topic, topic)
    return redirect("/topics?q=" + quote(key), f"Topic {key} saved.")
