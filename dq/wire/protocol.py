"""The wire protocol: frame codec, request validation and PHP-compatible replies.

A frame is 4 ASCII decimal digits giving the byte length of a UTF-8 JSON text, then that
text (DESIGN.md section 4). Replies are encoded as PHP's json_encode would, byte for byte,
so the original PHP and Java clients see exactly what the PHP server sent them.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias
from zoneinfo import ZoneInfo

import orjson

from dq.errors import BAD_REQUEST, TOO_LARGE, UNAVAILABLE, DqError
from dq.fastjson import has_long_number
from dq.wire import fixtime

MAX_FRAME: Final = 9999  # the most 4 decimal digits can declare
MAX_DEPTH: Final = 100  # JSON nesting we accept, so anything decoded can be re-encoded anywhere
MAX_TOPIC: Final = 255
MAX_ID: Final = 200
MAX_DUE_MS: Final = fixtime.MAX_DUE_MS  # 9999-12-31 23:59:59.999 UTC
MAX_MANY: Final = 200  # jobs in one add_many frame (their errors still fit one reply)
COMMANDS: Final = ("add", "add_many", "get", "del", "ping")

Frame: TypeAlias = dict[str, Any]  # a decoded request object, not yet validated


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame that could not be decoded. `fatal` means frame boundaries are lost:
    reply with `error_reply(it)`, then close the connection."""

    err: str
    msg: str
    fatal: bool = False


_EXAMPLE = '{"cmd":"ping"}'


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf, which no JSON text can carry
        raise ValueError(f"{text} is too large for a JSON number")
    return value


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# orjson decodes ~4x faster, but reads integers beyond 64 bits as floats: a frame with a
# run of 19 digits (or anything orjson refuses) takes the exact stdlib path instead.
_UNDECODED = object()
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: Any) -> bool:
    """True when a string in obj holds half a UTF-16 surrogate pair: not a character, it
    cannot be encoded as UTF-8 (so neither stored nor sent on)."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _too_deep(obj: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep, a level at a time (an add_many
    frame is wide: hundreds of containers, three or four levels)."""
    level = [obj]
    for _ in range(limit):
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        if not below:
            return False
        level = below
    return True


_TOO_DEEP = FrameError(BAD_REQUEST, f"the JSON is nested more than {MAX_DEPTH} levels deep; "
                       "send a flatter body")


def _stdlib_decode(payload: bytes | bytearray) -> Any:
    """The exact decoder, whose errors the client is shown."""
    try:
        # Decode UTF-8 ourselves: json.loads on bytes would also accept UTF-16 and UTF-32.
        return _decoder.decode(payload.decode("utf-8"))
    except RecursionError:
        return _TOO_DEEP
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, huge ints
        return FrameError(BAD_REQUEST, f"the frame is not valid UTF-8 JSON ({exc}); "
                          f"send one JSON object, e.g. {_EXAMPLE}")


def decode_payload(payload: bytes | bytearray) -> Frame | FrameError:
    """Decode one frame's JSON text into a request object, or say what is wrong with it."""
    obj: Any = _UNDECODED
    if not has_long_number(payload):
        try:  # refuses (for the stdlib path to explain) NaN, lone surrogates, bad UTF-8
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            pass
    if obj is _UNDECODED:
        obj = _stdlib_decode(payload)
        if isinstance(obj, FrameError):
            return obj
    if not isinstance(obj, dict):
        return FrameError(BAD_REQUEST, f"the frame must hold a JSON object, e.g. {_EXAMPLE}, "
                          f"not a JSON {type(obj).__name__}")
    # The bracket count bounds the depth, so the walk runs only for unusual frames. An
    # add_many frame's jobs sit two levels deeper (its list, and the job) than an add's
    # fields: their bodies may nest as deep as an add's.
    if payload.count(b"[") + payload.count(b"{") > MAX_DEPTH and _too_deep(
            obj, MAX_DEPTH + 2 if obj.get("cmd") == "add_many" else MAX_DEPTH):
        return _TOO_DEEP
    # Escapes like \\ud800 decode to lone surrogates; only look when one may be present.
    if b"\\u" in payload and _SURROGATE_ESCAPE.search(payload) and _lone_surrogate(obj):
        return FrameError(BAD_REQUEST, "the JSON holds an unpaired UTF-16 surrogate escape "
                          "(e.g. \\ud800), which is not a character; send valid Unicode")
    return obj


class FrameDecoder:
    """Incremental frame splitter for one connection: feed it what the socket gives.

    `feed` returns, in order, each complete frame's request object or a FrameError.
    Bytes of an oversized frame are dropped as they arrive, never buffered.
    """

    __slots__ = ("_buf", "_closed", "max_frame", "skipping")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if not 1 <= max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame must be between 1 and {MAX_FRAME}")
        self.max_frame = max_frame
        self.skipping = 0  # bytes of an oversized frame still to drop
        self._buf = bytearray()
        self._closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered of a frame not yet complete (0 between frames)."""
        return len(self._buf)

    @property
    def closed(self) -> bool:
        """A frame header was garbage: frame boundaries are lost, nothing more is decoded."""
        return self._closed

    def state(self) -> tuple[bytes, int]:
        """What a reload hands to the next server with the connection: the bytes of the
        frame begun, and the bytes of an oversized frame still to drop."""
        return bytes(self._buf), self.skipping

    def restore(self, pending: bytes, skipping: int) -> None:
        """Go on from `state()` of the decoder this connection had in another process."""
        self._buf[:] = pending
        self.skipping = skipping

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        return [decode_payload(item) if isinstance(item, bytes) else item
                for item in self.split(data)]

    def split(self, data: bytes) -> list[bytes | FrameError]:
        """As `feed`, with each complete frame's JSON text left undecoded: a server decodes
        it when it starts the request, so one read of 256 KB (5,000 small frames) is not
        decoded in one go while other clients wait."""
        out: list[bytes | FrameError] = []
        if self._closed:
            return out
        if self.skipping:
            if len(data) <= self.skipping:
                self.skipping -= len(data)
                return out
            data = data[self.skipping:]
            self.skipping = 0
        buf = self._buf
        work: bytes | bytearray = data
        if buf:
            buf += data
            work = buf
        pos, end, limit = 0, len(work), self.max_frame
        while end - pos >= 4:
            head = work[pos:pos + 4]
            if not head.isdigit():  # bytes.isdigit is ASCII-only
                out.append(FrameError(
                    BAD_REQUEST, f"a frame must start with 4 ASCII digits giving the JSON "
                    f"length, e.g. 0014{_EXAMPLE}; got {bytes(head)!r}, so the connection "
                    "is closed", fatal=True))
                self._closed = True
                buf.clear()
                return out
            size = int(head)
            start = pos + 4
            stop = start + size
            if size > limit:
                out.append(FrameError(TOO_LARGE, f"the frame declares {size} bytes of JSON, "
                                      f"more than the {limit} this server accepts; "
                                      "send a smaller body"))
                if stop > end:
                    self.skipping = stop - end
                    pos = end
                    break
                pos = stop
            elif size == 0:
                out.append(FrameError(BAD_REQUEST, "the frame is empty (length 0000); "
                                      f"send a JSON object, e.g. 0014{_EXAMPLE}"))
                pos = start
            elif stop > end:
                break
            else:
                out.append(bytes(work[start:stop]))
                pos = stop
        if work is buf:
            del buf[:pos]
        elif pos < end:
            buf += work[pos:]
        return out


# -- requests ---------------------------------------------------------------------------

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


# -- replies ----------------------------------------------------------------------------

_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def _payload(obj: Any) -> bytes:
    # PHP's json_encode escapes "/" and, like ensure_ascii, writes \uXXXX in lower case.
    # Python never escapes "/", so every "/" in the text is a literal one.
    return _encode(obj).replace("/", "\\/").encode("ascii")


def encode_frame(obj: Any) -> bytes:
    """Frame `obj` as PHP would; DqError('too_large') when it exceeds 9999 bytes."""
    payload = _payload(obj)
    if len(payload) > MAX_FRAME:
        raise DqError(TOO_LARGE, f"the message is {len(payload)} bytes of JSON, more than "
                      f"the {MAX_FRAME} a frame can carry; make the body smaller")
    return b"%04d" % len(payload) + payload


OK_EMPTY: Final = encode_frame({"code": 1, "msg": "succ", "data": []})


def many_reply(results: Sequence[DqError | None]) -> bytes:
    """The reply to add_many: per job, in order, 1 when it was stored, else {"err","msg"}.

    When the messages do not all fit in one frame, a message repeated with the same err
    is given once and then as "" (the same as the last message given with that err), then
    the messages given are cut to 80 characters, then all are left out."""
    for step in ("all", "once", "short", "none"):
        data: list[Any] = []
        last: dict[str, str] = {}
        for r in results:
            if r is None:
                data.append(1)
                continue
            msg = r.msg
            if step == "none" or (step != "all" and last.get(r.err) == msg):
                msg = ""
            else:
                last[r.err] = msg
                if step == "short":
                    msg = msg[:80]
            data.append({"err": r.err, "msg": msg})
        payload = _payload({"code": 1, "msg": "succ", "data": data})
        if len(payload) <= MAX_FRAME:
            break
    return b"%04d" % len(payload) + payload


def error_reply(error: DqError | FrameError | tuple[str, str]) -> bytes:
    """A failure frame: {"code":0,"msg":...,"err":...,"data":[]}."""
    err, msg = error if isinstance(error, tuple) else (error.err, error.msg)
    return encode_frame({"code": 0, "msg": msg, "err": err, "data": []})


def ok_reply(data: Any = None) -> bytes:
    """A success frame; data None is PHP's empty array. A reply too big for one frame
    becomes a too_large failure."""
    if data is None:
        return OK_EMPTY
    payload = _payload({"code": 1, "msg": "succ", "data": data})
    if len(payload) > MAX_FRAME:
        return error_reply((TOO_LARGE, f"the reply would be {len(payload)} bytes of JSON, more "
                            f"than the {MAX_FRAME} a frame can carry, so the job's body "
                            "cannot be returned over this protocol"))
    return b"%04d" % len(payload) + payload


def decode_reply(obj: Frame) -> Any:
    """For clients: the data of a success reply; raise DqError for a failure."""
    if obj.get("code") == 1:
        return obj.get("data")
    msg = obj.get("msg")
    raise DqError(str(obj.get("err") or UNAVAILABLE),
                  msg if isinstance(msg, str) and msg else "the server reported a failure")
