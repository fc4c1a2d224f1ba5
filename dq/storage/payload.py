"""The stored form of a job (its payload): written, read and versioned only here.

A job's payload is "<version>|<priority>|<attempt>|<due>|<due - set>|<body JSON>", times
in hex milliseconds (set: when it was added), attempt the deliveries made so far (failed
ones, and ones cut off by an expired lease: requeue_expired.lua counts those). The scripts
read version and priority with a prefix match (dq/storage/lua/_job.lua, the Lua side of
this module) instead of decoding the body, and the fixed part costs ~35 bytes per pending
job. dq 0.1 stored JSON: {"v":..,"p":..,"due":..,"n":..,"set":..,"body":..}; it is still read.

Topic and id are not in it (the hash field, the tid, has them), nor the original's
notify_time and dq_set_time: they are derived from due and set when the body is read
(`Store.full_body`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

from dq import fastjson
from dq.errors import UNAVAILABLE, DqError

_VERSION_PREFIX = secrets.token_hex(4)
_version_seq = itertools.count(1)


def _new_prefix() -> None:
    """A forked child makes versions of its own: the parent's prefix and counter would
    give another child's versions too."""
    global _VERSION_PREFIX, _version_seq
    _VERSION_PREFIX = secrets.token_hex(4)
    _version_seq = itertools.count(1)


os.register_at_fork(after_in_child=_new_prefix)


def new_version() -> str:
    """A version no other add will produce: a random per-process prefix and a counter."""
    return f"{_VERSION_PREFIX}{next(_version_seq):x}"


@dataclass(frozen=True, slots=True)
class Stored:
    """A payload read back from Redis."""

    version: str
    priority: int
    attempt: int
    due_ms: int
    set_ms: int
    body: dict[str, Any]  # as stored: without notify_time/dq_set_time on a first attempt


class BadPayload(ValueError):
    """A stored job that cannot be read (written by hand, or damaged): says what is wrong."""


def encode(version: str, priority: int, attempt: int, due_ms: int, set_ms: int,
           body: str) -> str:
    """The stored text of a job whose body is the JSON text `body`."""
    return f"{version}|{priority}|{attempt}|{due_ms:x}|{due_ms - set_ms:x}|{body}"


def decode(raw: bytes) -> Stored:
    """Read a stored payload; BadPayload when it cannot be (its body must be a JSON object)."""
    try:
        if raw[:1] == b"{":  # dq 0.1
            data = json.loads(raw)
            stored = Stored(str(data["v"]), int(data.get("p", 2)), int(data.get("n", 0)),
                            int(data.get("due", 0)), int(data.get("set", 0)),
                            data.get("body", {}))
        else:
            version, prio, attempt, due_hex, ahead, body = raw.split(b"|", 5)
            due = int(due_hex, 16)
            stored = Stored(version.decode(), int(prio), int(attempt), due,
                            due - int(ahead, 16), fastjson.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadPayload(f"{exc.__class__.__name__}: {exc}"[:200]) from None
    if not isinstance(stored.body, dict):
        raise BadPayload(f"its body is a JSON {type(stored.body).__name__}, not an object")
    return stored


def readable(tid: str, raw: bytes) -> Stored:
    """`decode`, failing with what a client or the console can act on."""
    try:
        return decode(raw)
    except BadPayload as exc:
        raise DqError(UNAVAILABLE, f"job {tid} is stored in a form dq cannot read ({exc}); "
                      "delete it and add it again") from None


# The version a script reads off a payload (job_vp in dq/storage/lua/_job.lua), for one
# whose other parts cannot be read.
_VERSION_OF = re.compile(rb'^([0-9A-Fa-f]+)\|\d\||^\{"v":"([0-9A-Fa-f]+)","p":\d')


def version_of(raw: bytes) -> str:
    """The version the scripts see in a payload ("" when there is none)."""
    m = _VERSION_OF.match(raw)
    return "" if m is None else (m.group(1) or m.group(2)).decode()
