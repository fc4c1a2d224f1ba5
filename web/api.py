"""The JSON admin API under /api (OpenAPI at /openapi.json, readable docs at /docs).

Every route needs the console password (HTTP Basic or Bearer) when one is set. Errors are
`{"detail", "err", "errors"}` with a fitting status (see web.errors).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from dq.errors import BAD_REQUEST, NOT_FOUND, TOPIC_OFFLINE, UNKNOWN_TOPIC, DqError
from dq.registry.core import Topic
from dq.roles.alert import send_alert
from dq.storage.payload import BadPayload
from dq.wire.frames import MAX_DEPTH
from dq.wire.requests import AddRequest, parse_request
from web import schemas as s
from web.auth import require_api
from web.errors import EXISTS, INVALID, MAIL_FAILED, NOT_CONFIGURED, ApiError, Invalid
from web.forms import (
    EMAIL,
    alert_json,
    check_callback_target,
    topic_json,
    validate_alert,
    validate_shard,
    validate_topic,
)
from web.ops import (
    ShardView,
    breaker_states,
    job_json,
    redrive_all,
    search_topics,
    shard_views,
    topic_counters,
)
from web.state import WebState, db, state

router = APIRouter(prefix="/api", dependencies=[Depends(require_api)])
St = Annotated[WebState, Depends(state)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorOut} for code in (400, 401, 404, 409, 422)}
_ADD_FIELDS = ("topic", "id", "body", "delay", "fix_time", "due_ms")


def body_of(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra describing a JSON request body (we read and validate it ourselves)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


async def read_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400/415/422 saying what to send."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, BAD_REQUEST, "send the body as JSON with the header "
                       "'Content-Type: application/json'")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, BAD_REQUEST, f"the request body is not valid JSON ({exc})") from None
    if (raw.count(b"[") + raw.count(b"{") > MAX_DEPTH) and _deeper_than(data, MAX_DEPTH):
        raise _too_deep()
    if not isinstance(data, dict):
        raise ApiError(400, BAD_REQUEST, "the request body must be a JSON object, e.g. "
                       '{"topic": "order", ...}')
    return data


def _too_deep() -> ApiError:
    return ApiError(422, INVALID, f"the request body is nested more than {MAX_DEPTH} levels "
                    "deep; nothing here takes that: send a flatter JSON body")


def _deeper_than(obj: Any, limit: int) -> bool:
    """Whether JSON containers nest more than `limit` deep, a level at a time (no recursion:
    the body is one a stranger may have sent, checked before anything walks it)."""
    level = [obj]
    for _ in range(limit):
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


async def _topic_or_404(st: WebState, key: str) -> Topic:
    topic = await db(st.registry.get_topic, key)
    if topic is None:
        raise ApiError(404, NOT_FOUND, f"there is no topic {key!r}; GET /api/topics lists them")
    return topic


# topics -------------------------------------------------------------------------------

@router.get("/topics", response_model=s.TopicList, tags=["topics"], responses=_ERRORS)
async def list_topics(st: St, q: str = "", offset: Annotated[int, Query(ge=0)] = 0,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Topics whose key or name contains `q`, by key, `limit` from `offset`."""
    found = search_topics(await db(st.registry.topics), q)
    shown = found[offset:offset + limit]
    return {"total": len(found), "topics": await _with_breakers(st, shown)}


async def _with_breakers(st: WebState, topics: list[Topic]) -> list[dict[str, Any]]:
    """The topics as the API shows them, each with its breaker's state when it has one."""
    states = await breaker_states(st.store, topics)
    return [{**topic_json(t), "breaker": states[t.topic]["state"] if t.topic in states else None}
            for t in topics]


@router.post("/topics", status_code=201, response_model=s.TopicOut, tags=["topics"],
             responses=_ERRORS, openapi_extra=body_of(s.TopicIn))
async def create_topic(request: Request, st: St) -> dict[str, Any]:
    """Register a topic. 409 when the key exists (PUT /api/topics/{topic} changes it)."""
    data = await read_object(request)
    topic = validate_topic(data, creator="api")
    await check_callback_target(st, topic.callback)
    if await db(st.registry.get_topic, topic.topic) is not None:
        raise ApiError(409, EXISTS, f"topic {topic.topic!r} already exists; change it with "
                       f"PUT /api/topics/{topic.topic}",
                       {"topic": "a topic with this key already exists"})
    return topic_json(await db(st.registry.save_topic, topic))


@router.get("/topics/{topic}", response_model=s.TopicOut, tags=["topics"], responses=_ERRORS)
async def get_topic(topic: str, st: St) -> dict[str, Any]:
    return (await _with_breakers(st, [await _topic_or_404(st, topic)]))[0]


@router.put("/topics/{topic}", response_model=s.TopicOut, tags=["topics"], responses=_ERRORS,
            openapi_extra=body_of(s.TopicIn))
async def update_topic(topic: str, request: Request, st: St) -> dict[str, Any]:
    """Change a topic. Fields left out keep their values; an empty secret keeps the secret."""
    data = await read_object(request)
    existing = await _topic_or_404(st, topic)
    data.setdefault("topic", topic)
    updated = validate_topic(data, existing=existing, key=topic)
    await check_callback_target(st, updated.callback)
    return topic_json(await db(st.registry.save_topic, updated))


@router.post("/topics/{topic}/pause", response_model=s.TopicOut, tags=["topics"],
             responses=_ERRORS)
async def pause_topic(topic: str, st: St) -> dict[str, Any]:
    """Pause a topic: adds are still taken, and nothing is called until it is resumed
    (every dq instance stops within `registry_refresh` seconds; calls under way finish)."""
    return topic_json(await _set_paused(st, topic, True))


@router.post("/topics/{topic}/resume", response_model=s.TopicOut, tags=["topics"],
             responses=_ERRORS)
async def resume_topic(topic: str, st: St) -> dict[str, Any]:
    """Resume a paused topic: the jobs that fell due meanwhile are called, in order and
    within its rate_limit and concurrency."""
    return topic_json(await _set_paused(st, topic, False))


async def _set_paused(st: WebState, key: str, paused: bool) -> Topic:
    topic = await _topic_or_404(st, key)
    if topic.paused == paused:
        return topic
    return await db(st.registry.save_topic, replace(topic, paused=paused))


@router.delete("/topics/{topic}", response_model=s.Done, tags=["topics"], responses=_ERRORS)
async def delete_topic(topic: str, st: St) -> dict[str, Any]:
    """Delete a topic. Jobs already queued for it stay; workers drop them as unknown."""
    if not await db(st.registry.delete_topic, topic):
        raise ApiError(404, NOT_FOUND, f"there is no topic {topic!r} to delete")
    return {"ok": True, "detail": f"topic {topic} deleted"}


# shards -------------------------------------------------------------------------------

@router.get("/shards", response_model=list[s.ShardOut], tags=["shards"], responses=_ERRORS)
async def list_shards(st: St) -> list[dict[str, Any]]:
    """Every shard with a live probe: PING, version, memory and job counts."""
    return [v.json() for v in await shard_views(st)]


@router.post("/shards", status_code=201, response_model=s.ShardOut, tags=["shards"],
             responses=_ERRORS, openapi_extra=body_of(s.ShardIn))
async def save_shard(request: Request, st: St) -> dict[str, Any]:
    """Add a shard (or change the URL of the one with this name). Each dq-master's checker
    notices within `registry_refresh` seconds and has it reload, which starts using it."""
    name, url = validate_shard(await read_object(request))
    conf = await db(st.registry.save_shard, name, url)
    view = next(v for v in await shard_views(st) if v.id == conf.id)
    return view.json()


@router.delete("/shards/{shard_id}", response_model=s.Done, tags=["shards"],
               responses=_ERRORS)
async def delete_shard(shard_id: int, st: St, force: bool = False) -> dict[str, Any]:
    """Remove a shard from the registry. Refused (409) while it still holds jobs, unless
    `force`: after a reload no worker would deliver them."""
    views: list[ShardView] = [v for v in await shard_views(st) if v.id == shard_id]
    if not views:
        raise ApiError(404, NOT_FOUND, f"there is no shard with id {shard_id}")
    jobs = views[0].depths.get("jobs", 0)
    if jobs and not force:
        raise ApiError(409, EXISTS, f"shard {views[0].name} still holds {jobs} job(s); after "
                       "a reload nobody would deliver them. Drain it first, or pass "
                       "?force=true")
    await db(st.registry.delete_shard, shard_id)
    return {"ok": True, "detail": f"shard {views[0].name} removed; each dq-master reloads "
            "within a few seconds to apply it"}


# alert settings -----------------------------------------------------------------------

@router.get("/alert", response_model=s.AlertOut, tags=["alert"], responses=_ERRORS)
async def get_alert(st: St) -> dict[str, Any]:
    return alert_json(await db(st.registry.alert))


@router.put("/alert", response_model=s.AlertOut, tags=["alert"], responses=_ERRORS,
            openapi_extra=body_of(s.AlertIn))
async def put_alert(request: Request, st: St) -> dict[str, Any]:
    """Change the SMTP settings. Fields left out keep their values, as does an empty
    password."""
    data = await read_object(request)
    conf = validate_alert(data, await db(st.registry.alert))
    await db(st.registry.save_alert, conf)
    return alert_json(conf)


@router.post("/alert/test", response_model=s.Done, tags=["alert"],
             responses={**_ERRORS, 502: {"model": s.ErrorOut}},
             openapi_extra=body_of(s.TestMailIn))
async def test_alert(request: Request, st: St) -> dict[str, Any]:
    """Send a test mail with the stored settings to `to`."""
    data = await read_object(request)
    return await send_test_mail(st, data.get("to"))


async def send_test_mail(st: WebState, to: Any) -> dict[str, Any]:
    """Mail a test message with the stored settings; Invalid/ApiError say what failed."""
    if not isinstance(to, str) or not EMAIL.fullmatch(to.strip()):
        raise Invalid({"to": "to must be one email address, e.g. ops@example.com"})
    conf = await db(st.registry.alert)
    if not conf.host:
        raise ApiError(409, NOT_CONFIGURED, "no SMTP host is configured; save the alert settings "
                       "first", {"host": "set the SMTP host first"})
    text = ("This is a test mail from the dq console.\n\nIf you can read it, alert mail "
            "from dq reaches you: dead letters and Redis outages will be reported here.\n")
    if not await send_alert(conf, [to.strip()], "[dq] test mail", text):
        raise ApiError(502, MAIL_FAILED, f"the mail server {conf.host}:{conf.port or 'default'}"
                       " did not accept the test mail; the dq-web log says why")
    return {"ok": True, "detail": f"test mail sent to {to.strip()}"}


# jobs ---------------------------------------------------------------------------------

@router.post("/jobs", status_code=201, response_model=s.AddOut, tags=["jobs"],
             responses=_ERRORS, openapi_extra=body_of(s.JobIn))
async def add_job(request: Request, response: Response, st: St) -> dict[str, Any]:
    """Add (or replace) a job, validated exactly as the TCP server's `add`."""
    data = await read_object(request)
    unknown = {k: "unknown field" for k in data if k not in _ADD_FIELDS and k != "cmd"}
    if unknown:
        raise ApiError(400, BAD_REQUEST, f"unknown field(s) {', '.join(unknown)}; send "
                       f"{', '.join(_ADD_FIELDS)}", unknown)
    try:
        req = parse_request({**data, "cmd": "add"}, tz=st.settings.zone)
    except DqError as exc:
        field = exc.msg.split(" ", 1)[0]
        errors = {field: exc.msg} if field in _ADD_FIELDS else {}
        raise ApiError(400, exc.err, exc.msg, errors) from None
    assert isinstance(req, AddRequest)
    topic = await db(st.registry.get_topic, req.topic)
    if topic is None:
        raise ApiError(404, UNKNOWN_TOPIC, f"topic {req.topic!r} is not registered; register "
                       "it in the console (or POST /api/topics) before adding jobs to it")
    if not topic.online:
        raise ApiError(409, TOPIC_OFFLINE, f"topic {req.topic!r} is offline; set it online in "
                       "the console before adding jobs to it")
    due_ms, delay_ms = req.due_ms, req.delay_ms
    if due_ms is None and delay_ms is None:
        delay_ms = topic.delay * 1000
    res = await st.store.add(req.topic, req.id, req.body, priority=topic.priority,
                             due_ms=due_ms, delay_ms=delay_ms)
    if res.replaced:
        response.status_code = 200
    return {"topic": req.topic, "id": req.id, "replaced": res.replaced, "due_ms": res.due_ms,
            "due": st.store.clock.fmt_time(res.due_ms), "shard": res.shard}


@router.get("/jobs/{topic}/{job_id:path}", response_model=s.JobOut, tags=["jobs"],
            responses=_ERRORS)
async def get_job(topic: str, job_id: str, st: St) -> dict[str, Any]:
    """A job's state (delayed, ready, inflight, dead), due time, attempts and body."""
    info = await st.store.lookup(topic, job_id)
    if info is None:
        raise ApiError(404, NOT_FOUND, f"no job {job_id!r} in topic {topic!r}: it was never "
                       "added, was delivered, or was deleted")
    return job_json(st.store, info)


@router.delete("/jobs/{topic}/{job_id:path}", response_model=s.Done, tags=["jobs"],
               responses=_ERRORS)
async def delete_job(topic: str, job_id: str, st: St) -> dict[str, Any]:
    if not await st.store.delete(topic, job_id):
        raise ApiError(404, NOT_FOUND, f"no job {job_id!r} in topic {topic!r} to delete")
    return {"ok": True, "detail": f"job {topic}:{job_id} deleted"}


# dead letters -------------------------------------------------------------------------

@router.get("/dead", response_model=s.DeadList, tags=["dead letters"], responses=_ERRORS)
async def list_dead(st: St, topic: str = "",
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """Dead letters, newest first, optionally of one topic, with their last error."""
    dead = await st.store.dead_letters(topic or None, limit=limit)
    return {"dead": [job_json(st.store, j) for j in dead]}


@router.post("/dead/{topic}/{job_id:path}/redrive", response_model=s.Done,
             tags=["dead letters"], responses=_ERRORS)
async def redrive(topic: str, job_id: str, st: St) -> dict[str, Any]:
    """Give a dead letter fresh attempts and make it due now."""
    try:
        redriven = await st.store.redrive(topic, job_id)
    except BadPayload as exc:
        raise ApiError(400, BAD_REQUEST, f"job {topic}:{job_id} is stored in a form dq cannot "
                       f"read ({exc}), so it cannot be redriven; delete it") from None
    if not redriven:
        raise ApiError(404, NOT_FOUND, f"job {topic}:{job_id} is not a dead letter")
    return {"ok": True, "detail": f"job {topic}:{job_id} redriven"}


@router.post("/dead/redrive", response_model=s.Done, tags=["dead letters"], responses=_ERRORS)
async def redrive_many(st: St, topic: str = "") -> dict[str, Any]:
    """Redrive every dead letter, or those of one topic."""
    n = await redrive_all(st.store, topic or None)
    return {"ok": True, "detail": f"{n} dead letter(s) redriven"}


# statistics ---------------------------------------------------------------------------

@router.get("/stats", response_model=s.StatsOut, tags=["stats"], responses=_ERRORS)
async def stats(st: St) -> dict[str, Any]:
    """Per-topic counters (today and total), shard depths, and the last hour per minute."""
    topics = list((await db(st.registry.topics)).values())
    minutes = await st.store.stats.minute_stats(60)
    return {"topics": await topic_counters(st.store, topics),
            "shards": [v.json() for v in await shard_views(st)],
            "minutes": [{"minute": m, "writes": row.get("writes", 0), "ok": row.get("ok", 0),
                         "fail": row.get("fail", 0)} for m, row in minutes]}
