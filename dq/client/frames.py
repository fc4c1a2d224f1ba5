"""The frames a client sends (add, add_many's parts, get, del, ping), byte for byte what
dq.wire.frames.encode_frame writes: PHP's framing, compact JSON in ASCII with "/"
escaped, a 4-digit length ahead.

Add frames are the hot path of a bulk load. They are written around the body's JSON
instead of through a new request dict, and orjson writes the JSON of the values it writes
exactly as the json module does (`json_text` says which); json writes the others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from dq.errors import BAD_REQUEST, DqError
from dq.wire.frames import MAX_FRAME, encode_frame

_json_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_MAX_NODES = 5000  # containers a value may hold for orjson (a frame holds fewer)


def _float_as_json(value: float) -> bool:
    """Whether orjson writes this float as json does (float.__repr__): all finite ones but
    those from 1e-9 to 1e-4, which orjson writes as 1e-7 or 0.00001 where repr gives 1e-07
    and 1e-05."""
    size = abs(value)
    return size == 0.0 or 1e-4 <= size < math.inf or size < 1e-9


def json_text(value: Any) -> str:
    """value's JSON as encode_frame writes it before escaping "/": what
    `json.dumps(value, separators=(",", ":"))` writes (ASCII, integers of any size, NaN),
    and raises what that raises."""
    kind = type(value)
    if kind is str:
        return _json_encode(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if kind is dict or kind is list:
        return _container_json(value)
    return _json_encode(value)


def _container_json(value: dict[Any, Any] | list[Any]) -> str:
    """`json_text` of a dict or list. orjson writes it when value holds only dicts, lists
    and tuples of str, int, bool, None and floats `_float_as_json` (exact types: orjson
    writes Enums, UUIDs and subclasses, json does not), and json when orjson refuses it
    (integers beyond 64 bits, lone surrogates, keys that are not str, nesting deeper than
    254) or `_escaped` cannot give json's escapes. Past _MAX_NODES containers (a circular
    value, say), json writes it."""
    node: Any = value
    stack: list[Any] = []
    nodes = 0
    while True:
        for item in node.values() if type(node) is dict else node:
            kind = type(item)
            if kind is str or kind is int or kind is bool or item is None:
                continue
            if kind is dict or kind is list or kind is tuple:
                nodes += 1
                if nodes > _MAX_NODES:
                    return _json_encode(value)
                stack.append(item)
            elif kind is not float or not _float_as_json(item):
                return _json_encode(value)
        if not stack:
            break
        node = stack.pop()
    try:
        text = orjson.dumps(value)
    except TypeError:
        return _json_encode(value)
    if text.isascii() and 0x7F not in text:
        return text.decode()
    return _escaped(text) or _json_encode(value)


def _escaped(text: bytes) -> str | None:
    """orjson's JSON text with json's escapes for what orjson writes as it is: \\u007f for
    DEL, \\u00e9 and \\u2028 for the other characters past ASCII (backslashreplace writes
    \\xe9 and \\u2028). None, for json to write it, when the text has a backslash (then a
    "\\x" might not be backslashreplace's) or a character past U+FFFF (json writes a
    surrogate pair)."""
    if 0x5C in text:
        return None
    escaped = text.decode().encode("ascii", "backslashreplace").decode()
    if "\\U" in escaped:
        return None
    return escaped.replace("\\x", "\\u00").replace("\x7f", "\\u007f")


def add_frame(topic: str, job_id: str | int, body: Mapping[str, Any] | None, *,
              delay: float | None = None, fix_time: str | int | None = None,
              due_ms: int | None = None) -> bytes:
    return _AddFrames(False).frame(topic, job_id, body, delay, fix_time, due_ms)


def _add_frame_plain(topic: str, job_id: str | int, body: Mapping[str, Any] | None, *,
                     delay: float | None = None, fix_time: str | int | None = None,
                     due_ms: int | None = None) -> bytes:
    """The reference encoding of an add: `_add_frames` must produce exactly these bytes."""
    if body and isinstance(body, str | bytes | bytearray):  # dict() would say less
        raise DqError(BAD_REQUEST, f"body must be a dict (a JSON object), e.g. "
                      f"{{'order_id': 42}}, not a {type(body).__name__}")
    req: dict[str, Any] = {"cmd": "add", "topic": topic, "id": job_id, "body": dict(body or {})}
    if delay is not None:
        req["delay"] = delay
    if fix_time is not None:
        req["fix_time"] = fix_time
    if due_ms is not None:
        req["due_ms"] = due_ms
    return encode_frame(req)


_CMD_LEN = len('"cmd":"add",')  # what an add_many part leaves out of its add frame's JSON


class _AddFrames:
    """Add frames (or, with `parts`, add_many parts: the same JSON without the length and
    "cmd"), byte for byte what `_add_frame_plain` builds, the topic's part made once."""

    __slots__ = ("lead", "parts", "prefixes", "room")

    def __init__(self, parts: bool) -> None:
        self.parts = parts
        self.lead, self.room = ("{", MAX_FRAME - _CMD_LEN) if parts else (
            '{"cmd":"add",', MAX_FRAME)
        self.prefixes: dict[str, str] = {}

    def frame(self, topic: Any, job_id: Any, body: Any, delay: Any = None,
              fix_time: Any = None, due_ms: Any = None) -> bytes:
        """The job's frame (or part). A job the fast way cannot encode (a value JSON cannot
        hold, a frame too large) goes the plain way, which raises what it always has."""
        try:
            return self.fast(topic, job_id, body, delay, fix_time, due_ms)
        except Exception:
            return self.plain(topic, job_id, body, delay, fix_time, due_ms)

    def plain(self, topic: Any, job_id: Any, body: Any, delay: Any, fix_time: Any,
              due_ms: Any) -> bytes:
        frame = _add_frame_plain(topic, job_id, body, delay=delay, fix_time=fix_time,
                                 due_ms=due_ms)
        return b"{" + frame[4 + _CMD_LEN + 1:] if self.parts else frame

    def fast(self, topic: Any, job_id: Any, body: Any, delay: Any, fix_time: Any,
              due_ms: Any) -> bytes:
        head = self.prefixes.get(topic) if type(topic) is str else None
        if head is None:  # True == 1 == 1.0: only a str topic's part is kept
            head = f'{self.lead}"topic":{json_text(topic)},"id":'
            if type(topic) is str:
                self.prefixes[topic] = head
        kind = type(job_id)
        id_text = (_json_encode(job_id) if kind is str else int.__repr__(job_id) if kind is int
                   else json_text(job_id))
        body_text = _container_json(body if type(body) is dict else dict(body)) if body else "{}"
        if delay is None and fix_time is None and due_ms is None:
            text = f'{head}{id_text},"body":{body_text}}}'
        else:
            tail = "" if delay is None else ',"delay":' + (
                int.__repr__(delay) if type(delay) is int else json_text(delay))
            if fix_time is not None:
                tail += ',"fix_time":' + json_text(fix_time)
            if due_ms is not None:
                tail += ',"due_ms":' + json_text(due_ms)
            text = f'{head}{id_text},"body":{body_text}{tail}}}'
        if "/" in text:
            text = text.replace("/", "\\/")
        if len(text) > self.room:  # the text is ASCII: characters are bytes
            raise ValueError("too large")
        return text.encode("ascii") if self.parts else f"{len(text):04d}{text}".encode("ascii")


def _add_frames(jobs: Iterable[Mapping[str, Any]], *, parts: bool = False,
                errors: dict[int, Exception] | None = None) -> list[bytes]:
    """The add frame of each job (a dict of add()'s arguments), byte for byte what
    `_add_frame_plain` builds, at a fraction of its cost.

    With `parts`, each job's part of an add_many frame instead: the same JSON without the
    length and "cmd" (`_add_frame_of` makes the add frame of a part). With `errors`, a job
    that cannot be encoded is not raised: its exception goes there under the job's index,
    and b"" in its place."""
    frames = _AddFrames(parts)
    fast, plain = frames.fast, frames.plain
    out: list[bytes] = []
    for i, job in enumerate(jobs):
        try:
            topic, job_id = job["topic"], job["id"]
        except (KeyError, TypeError) as exc:
            out.append(_failed(errors, i, exc))
            continue
        body, delay = job.get("body"), job.get("delay")
        fix_time, due_ms = job.get("fix_time"), job.get("due_ms")
        try:
            try:
                frame = fast(topic, job_id, body, delay, fix_time, due_ms)
            except Exception:  # the plain way raises what it always has
                frame = plain(topic, job_id, body, delay, fix_time, due_ms)
        except Exception as exc:
            frame = _failed(errors, i, exc)
        out.append(frame)
    return out


def _failed(errors: dict[int, Exception] | None, i: int, exc: Exception) -> bytes:
    if errors is None:
        raise exc
    errors[i] = exc
    return b""


def _add_frame_of(part: bytes) -> bytes:
    """The add frame of a job's add_many part."""
    return b'%04d{"cmd":"add",%b' % (len(part) + _CMD_LEN, part[1:])


def cmd_frame(cmd: str, topic: str, job_id: str | int) -> bytes:
    """A get or del frame."""
    return encode_frame({"cmd": cmd, "topic": topic, "id": job_id})


PING_FRAME = encode_frame({"cmd": "ping"})
