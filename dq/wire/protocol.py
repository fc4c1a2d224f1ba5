"""The wire protocol's names in one module, for code written against it before it was cut
in two: the framing and replies live in dq/wire/frames.py, request validation in
dq/wire/requests.py. New code imports from those."""

from __future__ import annotations

from dq.wire.frames import (
    MAX_DEPTH,
    MAX_FRAME,
    OK_EMPTY,
    Frame,
    FrameDecoder,
    FrameError,
    decode_payload,
    decode_reply,
    encode_frame,
    error_reply,
    many_reply,
    ok_reply,
)
from dq.wire.requests import (
    COMMANDS,
    MAX_DUE_MS,
    MAX_ID,
    MAX_MANY,
    MAX_TOPIC,
    AddRequest,
    DelRequest,
    GetRequest,
    PingRequest,
    Request,
    parse_add,
    parse_many,
    parse_request,
)

__all__ = [
    "COMMANDS", "MAX_DEPTH", "MAX_DUE_MS", "MAX_FRAME", "MAX_ID", "MAX_MANY", "MAX_TOPIC",
    "OK_EMPTY", "AddRequest", "DelRequest", "Frame", "FrameDecoder", "FrameError",
    "GetRequest", "PingRequest", "Request", "decode_payload", "decode_reply", "encode_frame",
    "error_reply", "many_reply", "ok_reply", "parse_add", "parse_many", "parse_request",
]
