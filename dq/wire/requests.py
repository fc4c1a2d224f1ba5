"""The wire protocol's requests: what a decoded frame may ask, checked field by field.

`parse_request` turns a request object (dq/wire/frames.py decodes it) into an AddRequest,
GetRequest, DelRequest or PingRequest, or raises DqError('bad_request') saying what to send
instead; an add_many frame's jobs are checked one by one (`parse_many`, `parse_add`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias
from zoneinfo import ZoneInfo

from dq.errors import BAD_REQUEST, DqError
from dq.wire import fixtime
from dq.wire.frames import Frame, decode_payload

MAX_TOPIC: Final = 255
MAX_ID: Final = 200
MAX_DUE_MS: Final = fixtime.MAX_DUE_MS  # 9999-12-31 23:59:59.999 UTC
MAX_MANY: Final = 200  # jobs in one add_many frame (their errors still fit one reply)
COMMANDS: Final = ("add", "add_many", "get", "del", "ping")


@dataclass(slots=True)  # not frozen: its __init__ runs once per add (the hot path)
class AddRequest:
    """Store or replace job (topic, id). At most one of due_ms (epoch ms) and delay_ms is
    set; neither means the topic's own delay."""

    cmd: ClassVar[str] = "add"
    topic: str
    id: str
    body: dict[str, Any]
    due_ms: int | None = None
    delay_ms: int | None = None


@dataclass(frozen=True, slots=True)
class GetRequest:
    cmd: ClassVar[str] = "get"
    topic: str
    id: str


@dataclass(frozen=True, slots=True)
class DelRequest:
    cmd: ClassVar[str] = "del"
    topic: str
    id: str


@dataclass(frozen=True, slots=True)
class PingRequest:
    cmd: ClassVar[str] = "ping"


Request: TypeAlias = AddRequest | GetRequest | DelRequest | PingRequest

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _bad(msg: str) -> DqError:
    return DqError(BAD_REQUEST, msg)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _topic(obj: Frame) -> str:
    topic = obj.get("topic")
    if not isinstance(topic, str) or not 0 < len(topic) <= MAX_TOPIC:
        raise _bad(f"topic must be a registered topic's name: a string of 1 to {MAX_TOPIC} "
                   f"characters, e.g. \"order\" (got {_show(topic)})")
    if ":" in topic or (not topic.isprintable() and _CONTROL.search(topic)):
        raise _bad(f"topic must not contain ':' or control characters (the job key is "
                   f"topic:id); send the registered topic's name (got {_show(topic)})")
    return topic


def _id(obj: Frame) -> str:
    job_id = obj.get("id")
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_ID:
        raise _bad(f"id must be a string of 1 to {MAX_ID} characters or an integer, "
                   f"e.g. \"42\" (got {_show(job_id)})")
    # isprintable() is False for every control character (and for a few other ones, which
    # the search then lets through): most ids are printable and skip the search.
    if not job_id.isprintable() and _CONTROL.search(job_id):
        raise _bad(f"id must not contain control characters (got {_show(job_id)})")
    return job_id


def _body(obj: Frame) -> dict[str, Any]:
    body = obj.get("body")
    if isinstance(body, dict):
        return body
    if body is None or body == []:  # PHP encodes an empty array as []
        return {}
    if isinstance(body, list):  # a PHP list: the original stored it keyed by position
        return {str(i): v for i, v in enumerate(body)}
    if isinstance(body, str):
        # The original's Java client sends the body as a string (DqRequestAdd.body is a
        # String): one holding a JSON object's text is that object.
        decoded = decode_payload(body.encode("utf-8", "surrogatepass"))
        if isinstance(decoded, dict):
            return decoded
        raise _bad(f'body was a string that does not hold a JSON object (got {_show(body)}); '
                   'send the object itself, e.g. "body":{"order_id":42}, or its JSON text '
                   'as the string, e.g. "body":"{\\"order_id\\":42}"')
    raise _bad(f'body must be a JSON object, e.g. {{"order_id":42}} (got {_show(body)})')


_fix_times: dict[tuple[str, ZoneInfo | None], int] = {}


def _fix_time(value: Any, now_ms: int | None, tz: ZoneInfo | None) -> tuple[int | None, int | None]:
    """(due_ms, delay_ms) of a fix_time (dq/wire/fixtime.py). Clients send the same few
    absolute strings over and over (one per second at most), so those answers are kept."""
    if isinstance(value, str):
        cached = _fix_times.get((value, tz))
        if cached is not None:
            return cached, None
    due_ms, delay_ms = fixtime.parse(value, tz, now_ms)
    if due_ms is not None and isinstance(value, str):
        if len(_fix_times) >= 4096:
            _fix_times.clear()
        _fix_times[(value, tz)] = due_ms
    return due_ms, delay_ms


def _when(obj: Frame, now_ms: int | None, tz: ZoneInfo | None) -> tuple[int | None, int | None]:
    """(due_ms, delay_ms) from fix_time, due_ms or delay; (None, None) for the topic's delay."""
    fix: Any = obj.get("fix_time")
    delay: Any = obj.get("delay")
    due: Any = obj.get("due_ms")
    given = (fix is not None) + (delay is not None) + (due is not None)
    if not given:
        return None, None
    if given > 1:
        names = [k for k in ("fix_time", "delay", "due_ms") if obj.get(k) is not None]
        raise _bad(f"give at most one of fix_time, delay and due_ms (got {', '.join(names)})")
    if fix is not None:
        return _fix_time(fix, now_ms, tz)
    if due is not None:
        if type(due) is not int or not 0 <= due <= MAX_DUE_MS:
            raise _bad(f"due_ms must be an integer of epoch milliseconds, e.g. 1893456000000 "
                       f"(got {_show(due)})")
        return due, None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    longest = (MAX_DUE_MS - now) / 1000
    # The comparison also refuses NaN and infinities.
    if type(delay) not in (int, float) or not 0 <= delay <= longest:
        raise _bad(f"delay must be a number of seconds from 0 up to year 9999, e.g. 30 or 1.5 "
                   f"(got {_show(delay)})")
    return None, round(delay * 1000)


def _parse_add(obj: Frame, now_ms: int | None, tz: ZoneInfo | None) -> AddRequest:
    topic, job_id, body = _topic(obj), _id(obj), _body(obj)
    due_ms, delay_ms = _when(obj, now_ms, tz)
    return AddRequest(topic, job_id, body, due_ms, delay_ms)


def parse_add(obj: Any, *, now_ms: int | None = None, tz: ZoneInfo | None = None) -> AddRequest:
    """Validate one job of an add_many frame: an add request's fields, without "cmd"."""
    if not isinstance(obj, dict):
        raise _bad(f'each job of add_many must be an object like an add request, e.g. '
                   f'{{"topic":"order","id":"42","body":{{}}}} (got {_show(obj)})')
    cmd = obj.get("cmd")
    if cmd is not None and cmd != "add":
        raise _bad(f'each job of add_many is an add: leave "cmd" out of it (got {_show(cmd)}); '
                   "send other commands in frames of their own")
    return _parse_add(obj, now_ms, tz)


def parse_many(obj: Frame) -> list[Any]:
    """The jobs of an add_many frame ({"cmd":"add_many","jobs":[{add fields}, ...]}), each
    still to be validated with `parse_add`: one bad job fails alone, not its frame."""
    jobs = obj.get("jobs")
    if not isinstance(jobs, list) or not 0 < len(jobs) <= MAX_MANY:
        raise _bad(f"jobs must be a list of 1 to {MAX_MANY} add requests without \"cmd\", "
                   f'e.g. [{{"topic":"order","id":"42","body":{{}}}}] (got {_show(jobs)}); '
                   "split larger batches over several frames")
    return jobs


def parse_request(obj: Frame, *, now_ms: int | None = None,
                  tz: ZoneInfo | None = None) -> Request:
    """Validate a decoded request. `tz` is the zone of fix_time (None: local); `now_ms`
    (default: the clock) bounds `delay` and anchors a relative fix_time ('+2 days').
    Raises DqError('bad_request', msg)."""
    cmd = obj.get("cmd")
    if cmd == "add":
        return _parse_add(obj, now_ms, tz)
    if cmd == "get":
        return GetRequest(_topic(obj), _id(obj))
    if cmd == "del":
        return DelRequest(_topic(obj), _id(obj))
    if cmd == "ping":
        return PingRequest()
    raise _bad(f"cmd must be one of {', '.join(COMMANDS)} (got {_show(cmd)})")
