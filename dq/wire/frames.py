"""The wire protocol's frames: the 4-digit length framing, its JSON text, and replies.

A frame is 4 ASCII decimal digits giving the byte length of a UTF-8 JSON text, then that
text (DESIGN.md section 4). Replies are encoded as PHP's json_encode would, byte for byte,
so the original PHP and Java clients see exactly what the PHP server sent them. What a
decoded request may hold is dq/wire/requests.py's business.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson

from dq.errors import BAD_REQUEST, TOO_LARGE, UNAVAILABLE, DqError
from dq.fastjson import has_long_number

MAX_FRAME: Final = 9999  # the most 4 decimal digits can declare
MAX_DEPTH: Final = 100  # JSON nesting we accept, so anything decoded can be re-encoded anywhere

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
        pos = self._cut(work, out)
        if self._closed:
            buf.clear()
        elif work is buf:
            del buf[:pos]
        elif pos < len(work):
            buf += work[pos:]
        return out

    def _cut(self, work: bytes | bytearray, out: list[bytes | FrameError]) -> int:
        """Append to `out` the frames `work` completes (and the errors of bad ones); return
        how far it was consumed. A garbage header closes the decoder."""
        pos, end, limit = 0, len(work), self.max_frame
        while end - pos >= 4:
            head = work[pos:pos + 4]
            if not head.isdigit():  # bytes.isdigit is ASCII-only
                out.append(_garbage_header(head))
                self._closed = True
                return pos
            size = int(head)
            start = pos + 4
            stop = start + size
            if size > limit:
                out.append(FrameError(TOO_LARGE, f"the frame declares {size} bytes of JSON, "
                                      f"more than the {limit} this server accepts; "
                                      "send a smaller body"))
                if stop > end:
                    self.skipping = stop - end
                    return end
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
        return pos


def _garbage_header(head: bytes | bytearray) -> FrameError:
    return FrameError(BAD_REQUEST, f"a frame must start with 4 ASCII digits giving the JSON "
                      f"length, e.g. 0014{_EXAMPLE}; got {bytes(head)!r}, so the connection "
                      "is closed", fatal=True)


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
