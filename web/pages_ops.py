"""Console pages for operations: Redis shards, alert settings, jobs, dead letters, API docs."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from dq.registry.core import AlertConf
from web.api import send_test_mail
from web.auth import require_docs
from web.errors import ApiError, Invalid
from web.forms import ALERT_FIELDS, alert_json, validate_alert, validate_shard
from web.ops import redrive_all, shard_views
from web.pages import Form, PageSession, St, _text
from web.state import db
from web.views import redirect, render

router = APIRouter(include_in_schema=False)


# shards -------------------------------------------------------------------------------

@router.get("/shards")
async def shards_page(request: Request, st: St, sess: PageSession, edit: int = 0) -> Response:
    views = await shard_views(st)
    editing = next((v for v in views if edit and v.id == edit), None)
    values = {"name": editing.name, "url": editing.url} if editing else {"name": "", "url": ""}
    return render(request, "shards.html", {"shards": views, "values": values,
                                           "editing": editing, "errors": {}})


async def _shard_form_error(request: Request, st: Any, exc: Invalid, values: dict[str, str],
                            edit: int | None) -> Response:
    views = await shard_views(st)
    editing = next((v for v in views if edit and v.id == edit), None)
    return render(request, "shards.html", {"shards": views, "values": values,
                                           "editing": editing, "errors": exc.errors},
                  status=422)


@router.post("/shards")
async def add_shard(request: Request, st: St, form: Form) -> Response:
    values = {"name": _text(form, "name"), "url": _text(form, "url")}
    try:
        name, url = validate_shard(values)
    except Invalid as exc:
        return await _shard_form_error(request, st, exc, values, None)
    await db(st.registry.save_shard, name, url)
    return redirect("/shards", f"Shard {name} saved. Each dq-master notices within a few "
                    "seconds and reloads to start using it.")


@router.post("/shards/{shard_id}/edit")
async def edit_shard(shard_id: int, request: Request, st: St, form: Form) -> Response:
    confs = {c.id: c for c in await db(st.registry.shards)}
    old = confs.get(shard_id)
    if old is None:
        return redirect("/shards", f"Shard {shard_id} no longer exists.", error=True)
    values = {"name": _text(form, "name"), "url": _text(form, "url")}
    try:
        name, url = validate_shard(values, keep_url=old.url)
    except Invalid as exc:
        return await _shard_form_error(request, st, exc, values, shard_id)
    saved = await db(st.registry.save_shard, name, url)
    if saved.id != shard_id:  # renamed: the new name made a new row
        await db(st.registry.delete_shard, shard_id)
    return redirect("/shards", f"Shard {name} saved. Each dq-master notices within a few "
                    "seconds and reloads to use the change.")


@router.post("/shards/{shard_id}/delete")
async def delete_shard(shard_id: int, st: St, form: Form) -> Response:
    if await db(st.registry.delete_shard, shard_id):
        return redirect("/shards", "Shard removed. Each dq-master notices within a few "
                        "seconds and reloads to stop using it.")
    return redirect("/shards", "That shard was already removed.", error=True)


# alert settings -----------------------------------------------------------------------

def _alert_values(conf: AlertConf) -> dict[str, Any]:
    values = alert_json(conf)
    values["redis_emails"] = ", ".join(conf.redis_emails)
    values["password"] = ""
    return values


@router.get("/alert")
async def alert_page(request: Request, st: St, sess: PageSession) -> Response:
    conf = await db(st.registry.alert)
    return render(request, "alert.html", {"values": _alert_values(conf), "errors": {},
                                          "password_set": bool(conf.password)})


@router.post("/alert")
async def save_alert(request: Request, st: St, form: Form) -> Response:
    current = await db(st.registry.alert)
    data = {k: _text(form, k) for k in (*ALERT_FIELDS, "clear_password") if k in form}
    try:
        conf = validate_alert(data, current)
    except Invalid as exc:
        return render(request, "alert.html", {
            "values": {**_alert_values(current), **data, "password": ""}, "errors": exc.errors,
            "password_set": bool(current.password)}, status=422)
    await db(st.registry.save_alert, conf)
    return redirect("/alert", "Alert settings saved.")


@router.post("/alert/test")
async def test_mail(st: St, form: Form) -> Response:
    try:
        done = await send_test_mail(st, _text(form, "to"))
    except ApiError as exc:
        message = next(iter(exc.errors.values()), exc.detail) if exc.status == 422 else exc.detail
        return redirect("/alert", f"Test mail not sent: {message}", error=True)
    return redirect("/alert", done["detail"].capitalize() + ".")


# jobs ---------------------------------------------------------------------------------

@router.get("/jobs")
async def jobs_page(request: Request, st: St, sess: PageSession, topic: str = "",
                    id: str = "") -> Response:
    job, searched = None, bool(topic and id)
    if searched:
        job = await st.store.lookup(topic, id)
    topics = sorted(await db(st.registry.topics))
    return render(request, "jobs.html", {"topic": topic, "id": id, "job": job,
                                         "searched": searched, "topics": topics})


@router.post("/jobs/delete")
async def delete_job(st: St, form: Form) -> Response:
    topic, job_id = _text(form, "topic"), _text(form, "id")
    back = "/jobs?" + urlencode({"topic": topic, "id": job_id})
    if await st.store.delete(topic, job_id):
        return redirect(back, f"Job {topic}:{job_id} deleted.")
    return redirect(back, f"Job {topic}:{job_id} was not found (already delivered or "
                    "deleted).", error=True)


# dead letters -------------------------------------------------------------------------

@router.get("/dead")
async def dead_page(request: Request, st: St, sess: PageSession, topic: str = "") -> Response:
    dead = await st.store.dead_letters(topic or None, limit=200)
    topics = sorted(await db(st.registry.topics))
    return render(request, "dead.html", {"dead": dead, "topic": topic, "topics": topics})


def _dead_back(form: Any) -> str:
    topic = _text(form, "filter")
    return "/dead" + ("?" + urlencode({"topic": topic}) if topic else "")


@router.post("/dead/redrive")
async def redrive_one(st: St, form: Form) -> Response:
    topic, job_id = _text(form, "topic"), _text(form, "id")
    if await st.store.redrive(topic, job_id):
        return redirect(_dead_back(form), f"Job {topic}:{job_id} redriven: it is due now.")
    return redirect(_dead_back(form), f"Job {topic}:{job_id} is no longer a dead letter.",
                    error=True)


@router.post("/dead/redrive-all")
async def redrive_every(st: St, form: Form) -> Response:
    n = await redrive_all(st.store, _text(form, "filter") or None)
    return redirect(_dead_back(form), f"{n} dead letter(s) redriven.")


@router.post("/dead/delete")
async def delete_dead(st: St, form: Form) -> Response:
    topic, job_id = _text(form, "topic"), _text(form, "id")
    if await st.store.delete(topic, job_id):
        return redirect(_dead_back(form), f"Dead letter {topic}:{job_id} deleted.")
    return redirect(_dead_back(form), f"Job {topic}:{job_id} was already gone.", error=True)


# API docs -----------------------------------------------------------------------------

@router.get("/openapi.json", dependencies=[Depends(require_docs)])
async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", dependencies=[Depends(require_docs)])
async def docs_page(request: Request) -> Response:
    spec = request.app.openapi()
    ops = [{"method": method.upper(), "path": path, **op}
           for path, item in spec.get("paths", {}).items() for method, op in item.items()]
    return render(request, "docs.html", {"ops": ops, "schemas":
                                         spec.get("components", {}).get("schemas", {})})
