"""Frame codec, request validation and PHP-compatible replies (pure, no I/O)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dq.errors import BAD_REQUEST, TOO_LARGE, UNAVAILABLE, DqError
from dq.fastjson import has_long_number
from dq.protocol import (
    MAX_DEPTH,
    OK_EMPTY,
    AddRequest,
    DelRequest,
    FrameDecoder,
    FrameError,
    GetRequest,
    PingRequest,
    decode_payload,
    decode_reply,
    encode_frame,
    error_reply,
    ok_reply,
    parse_request,
)

UTC = ZoneInfo("UTC")
ADD = {"cmd": "add", "topic": "order", "id": "42", "body": {"order_id": 42}}


def frame(obj: Any) -> bytes:
    text = json.dumps(obj).encode()
    return b"%04d" % len(text) + text


def parse(**changes: Any) -> Any:
    return parse_request({**ADD, **changes}, now_ms=0, tz=UTC)


# -- FrameDecoder -----------------------------------------------------------------------

def test_frame_split_at_every_byte() -> None:
    data = frame(ADD) + frame({"cmd": "ping"})
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        out = dec.feed(data[:cut])
        assert dec.pending_bytes == cut - sum(len(frame(o)) for o in out)
        out += dec.feed(data[cut:])
        assert out == [ADD, {"cmd": "ping"}]
        assert dec.pending_bytes == 0


def test_one_byte_at_a_time() -> None:
    dec = FrameDecoder()
    out = [o for b in frame(ADD) * 3 for o in dec.feed(bytes([b]))]
    assert out == [ADD] * 3


def test_many_frames_in_one_chunk() -> None:
    objs = [{"cmd": "get", "topic": "t", "id": str(i)} for i in range(500)]
    out = FrameDecoder().feed(b"".join(frame(o) for o in objs))
    assert out == objs


def test_garbage_prefix_is_fatal_and_stops_decoding() -> None:
    dec = FrameDecoder()
    out = dec.feed(frame(ADD) + b"GET / HTTP/1.1\r\n\r\n" + frame(ADD))
    assert out[0] == ADD
    assert isinstance(out[1], FrameError) and out[1].fatal and out[1].err == BAD_REQUEST
    assert "4 ASCII digits" in out[1].msg
    assert len(out) == 2 and dec.pending_bytes == 0
    assert dec.feed(frame(ADD)) == []


@pytest.mark.parametrize("head", [b" 047", b"-047", b"+047", b"\xd9\xa1\xd9\xa2", b"4.00"])
def test_prefix_must_be_ascii_digits(head: bytes) -> None:
    out = FrameDecoder().feed(head + b"{}")
    assert len(out) == 1 and isinstance(out[0], FrameError) and out[0].fatal


def test_declared_length_longer_than_data_stays_pending() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"0100{\"cmd\":") == []
    assert dec.pending_bytes == 11
    assert dec.feed(b"012") == []
    assert dec.pending_bytes == 14


def test_too_large_frame_is_skipped_without_buffering() -> None:
    dec = FrameDecoder(max_frame=100)
    big = b"0500" + b"x" * 500
    out = dec.feed(big[:50])
    assert len(out) == 1 and isinstance(out[0], FrameError)
    assert out[0].err == TOO_LARGE and not out[0].fatal and "500" in out[0].msg
    assert dec.pending_bytes == 0 and dec.skipping == 454
    assert dec.feed(big[50:300]) == [] and dec.pending_bytes == 0
    assert dec.feed(big[300:] + frame({"cmd": "ping"})) == [{"cmd": "ping"}]
    # the same frame in one chunk, followed by another
    out = FrameDecoder(max_frame=100).feed(big + frame(ADD))
    assert isinstance(out[0], FrameError) and out[0].err == TOO_LARGE and out[1] == ADD


def test_max_frame_is_allowed_exactly() -> None:
    body = {"pad": ""}
    size = len(frame({**ADD, "body": body})) - 4
    body["pad"] = "x" * (200 - size)
    assert FrameDecoder(max_frame=200).feed(frame({**ADD, "body": body})) == [
        {**ADD, "body": body}]


def test_zero_length_is_bad_request_and_decoding_goes_on() -> None:
    out = FrameDecoder().feed(b"0000" + frame(ADD))
    assert isinstance(out[0], FrameError) and out[0].err == BAD_REQUEST and not out[0].fatal
    assert out[1] == ADD


@pytest.mark.parametrize("text", [b"{", b"{'a':1}", b"\xff\xfe{}", b'{"a":NaN}',
                                  b'{"a":1} x', b"\xef\xbb\xbf{}",
                                  '{"a":1}'.encode("utf-16")])
def test_invalid_json_is_bad_request(text: bytes) -> None:
    out = FrameDecoder().feed(b"%04d" % len(text) + text + frame(ADD))
    assert isinstance(out[0], FrameError) and out[0].err == BAD_REQUEST and not out[0].fatal
    assert "JSON" in out[0].msg
    assert out[1] == ADD


@pytest.mark.parametrize("text", [b"[]", b"1", b'"cmd"', b"null", b"true"])
def test_non_object_json_is_bad_request(text: bytes) -> None:
    out = FrameDecoder().feed(b"%04d" % len(text) + text)
    assert isinstance(out[0], FrameError) and "JSON object" in out[0].msg


def test_deep_nesting_is_bad_request() -> None:
    out = decode_payload(b"[" * 100000)
    assert isinstance(out, FrameError) and out.err == BAD_REQUEST
    items = FrameDecoder().feed(b"9999" + b"[" * 9999 + frame(ADD))
    assert isinstance(items[0], FrameError) and items[1] == ADD
    nested = b'{"a":' * 200 + b"1" + b"}" * 200
    out = decode_payload(nested)
    assert isinstance(out, FrameError) and "nested" in out.msg
    ok = b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH
    assert isinstance(decode_payload(ok), dict)
    flat = json.dumps({"items": [[] for _ in range(500)], "s": "[{" * 100}).encode()
    assert isinstance(decode_payload(flat), dict)


def test_non_ascii_json_is_utf8() -> None:
    obj = {**ADD, "body": {"name": "订单 😀"}}
    assert FrameDecoder().feed(frame(obj)) == [obj]
    raw = json.dumps(obj, ensure_ascii=False).encode()
    assert FrameDecoder().feed(b"%04d" % len(raw) + raw) == [obj]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(1, 9999))
def test_random_bytes_never_raise(chunks: list[bytes], max_frame: int) -> None:
    dec = FrameDecoder(max_frame=max_frame)
    for chunk in chunks:
        for item in dec.feed(chunk):
            assert isinstance(item, dict | FrameError)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.binary(max_size=40)), max_size=10))
def test_random_frames_never_raise(parts: list[tuple[int, bytes]]) -> None:
    dec = FrameDecoder(max_frame=30)
    for n, junk in parts:
        dec.feed(b"%04d" % n + junk)


# -- parse_request ----------------------------------------------------------------------

def test_parse_valid_requests() -> None:
    assert parse() == AddRequest("order", "42", {"order_id": 42}, None, None)
    assert parse_request({"cmd": "get", "topic": "t", "id": 7}, tz=None) == GetRequest("t", "7")
    assert parse_request({"cmd": "del", "topic": "t", "id": "a:b"}) == DelRequest("t", "a:b")
    assert parse_request({"cmd": "ping"}) == PingRequest()
    assert parse(body=[]).body == {}
    assert parse(body=None).body == {}
    no_body = {k: v for k, v in ADD.items() if k != "body"}
    assert parse_request(no_body) == AddRequest("order", "42", {})
    assert parse(delay=30).delay_ms == 30000
    assert parse(delay=1.5) == AddRequest("order", "42", {"order_id": 42}, None, 1500)
    assert parse(delay=0).delay_ms == 0
    assert parse(due_ms=1893456000000).due_ms == 1893456000000
    assert parse(fix_time=None, delay=None, due_ms=None).due_ms is None
    assert parse(topic="t" * 255).topic == "t" * 255
    assert parse(id="i" * 200).id == "i" * 200


def test_fix_time_in_a_zone() -> None:
    shanghai = ZoneInfo("Asia/Shanghai")
    req = parse_request({**ADD, "fix_time": "2024-01-01 08:00:00"}, tz=shanghai)
    assert isinstance(req, AddRequest) and req.due_ms == 1704067200000 and req.delay_ms is None
    assert parse(fix_time="2024-01-01 08:00:00").due_ms == 1704096000000
    local = parse_request({**ADD, "fix_time": "2030-06-15 12:30:45"}, tz=None)
    assert isinstance(local, AddRequest)
    assert local.due_ms == int(datetime(2030, 6, 15, 12, 30, 45).timestamp()) * 1000
    assert parse(fix_time="2024-02-29 00:00:00").due_ms == 1709164800000


def bad(field: str, obj: dict[str, Any]) -> DqError:
    with pytest.raises(DqError) as info:
        parse_request(obj, now_ms=0, tz=UTC)
    assert info.value.err == BAD_REQUEST
    assert field in info.value.msg
    return info.value


@pytest.mark.parametrize(("field", "changes"), [
    ("topic", {"topic": ""}), ("topic", {"topic": None}), ("topic", {"topic": 5}),
    ("topic", {"topic": "t" * 256}), ("topic", {"topic": "a:b"}), ("topic", {"topic": "a\nb"}),
    ("id", {"id": ""}), ("id", {"id": None}), ("id", {"id": True}), ("id", {"id": 1.5}),
    ("id", {"id": "i" * 201}), ("id", {"id": "a\x00b"}), ("id", {"id": ["1"]}),
    ("body", {"body": "text"}), ("body", {"body": 42}), ("body", {"body": [1]}),
    ("body", {"body": True}),
    ("fix_time", {"fix_time": "2024-01-01"}), ("fix_time", {"fix_time": "2024-02-30 00:00:00"}),
    ("fix_time", {"fix_time": "2024-01-01T08:00:00"}), ("fix_time", {"fix_time": ""}),
    ("fix_time", {"fix_time": "2024-01-01 08:00:00\n"}), ("fix_time", {"fix_time": 1700000000}),
    ("fix_time", {"fix_time": "2024-01-01 24:00:00"}),
    ("fix_time", {"fix_time": "0000-01-01 00:00:00"}),
    ("fix_time", {"fix_time": "２０２４-01-01 08:00:00"}),
    ("delay", {"delay": -1}), ("delay", {"delay": "30"}), ("delay", {"delay": True}),
    ("delay", {"delay": float("nan")}), ("delay", {"delay": float("inf")}),
    ("delay", {"delay": 10**400}), ("delay", {"delay": [30]}),
    ("due_ms", {"due_ms": 1.5e12}), ("due_ms", {"due_ms": "1893456000000"}),
    ("due_ms", {"due_ms": False}), ("due_ms", {"due_ms": -1}), ("due_ms", {"due_ms": 10**20}),
    ("fix_time", {"fix_time": "2024-01-01 08:00:00", "delay": 5}),
    ("due_ms", {"delay": 5, "due_ms": 5}),
])
def test_add_validation(field: str, changes: dict[str, Any]) -> None:
    bad(field, {**ADD, **changes})


def test_missing_fields() -> None:
    bad("topic", {"cmd": "add", "id": "1"})
    bad("id", {"cmd": "add", "topic": "t"})
    bad("topic", {"cmd": "get", "id": "1"})
    bad("id", {"cmd": "del", "topic": "t"})
    bad("id", {"cmd": "get", "topic": "t", "id": False})


@pytest.mark.parametrize("cmd", [None, "ADD", "put", 1, ["add"]])
def test_unknown_cmd_names_the_commands(cmd: Any) -> None:
    obj = {"topic": "t", "id": "1"} if cmd is None else {"cmd": cmd, "topic": "t", "id": "1"}
    err = bad("cmd", obj)
    assert all(c in err.msg for c in ("add", "get", "del", "ping"))


def test_messages_say_what_to_send() -> None:
    assert '{"order_id":42}' in bad("body", {**ADD, "body": "x"}).msg
    assert "YYYY-MM-DD HH:MM:SS" in bad("fix_time", {**ADD, "fix_time": "tomorrow"}).msg
    long = bad("topic", {**ADD, "topic": "x" * 5000}).msg
    assert len(long) < 300


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
keys = st.sampled_from(["cmd", "topic", "id", "body", "fix_time", "delay", "due_ms"])
special = st.sampled_from(["add", "get", "del", "ping", "order", "2024-01-01 08:00:00", [],
                           "9999-12-31 23:59:59", "0001-01-01 00:00:00"])


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(keys | st.text(max_size=5), special | json_values, max_size=8),
       st.sampled_from(["add", "get", "del", "ping"]),
       st.sampled_from([None, UTC, ZoneInfo("Asia/Shanghai"), ZoneInfo("Pacific/Kiritimati")]),
       st.integers(0, 2**60) | st.none())
def test_parse_request_only_raises_dq_error(obj: dict[str, Any], cmd: str,
                                            tz: ZoneInfo | None, now_ms: int | None) -> None:
    for candidate in (obj, {**obj, "cmd": cmd}):
        try:
            req = parse_request(candidate, now_ms=now_ms, tz=tz)
        except DqError as exc:
            assert exc.err == BAD_REQUEST
        else:
            if isinstance(req, AddRequest):
                assert req.due_ms is None or req.delay_ms is None


# -- replies ----------------------------------------------------------------------------

def test_ok_empty_is_php_bytes() -> None:
    assert OK_EMPTY == b'0033{"code":1,"msg":"succ","data":[]}'
    assert ok_reply() == OK_EMPTY
    assert len(OK_EMPTY) - 4 == 33


def test_replies_match_php_json_encode() -> None:
    body = {"name": "订单 😀", "url": "http://shop.example/cb?a=1", "n": 1.5, "ok": True,
            "q": 'say "hi"\\', "tab": "\t\x01", "none": None}
    expected = (b'{"code":1,"msg":"succ","data":{"name":"\\u8ba2\\u5355 \\ud83d\\ude00",'
                b'"url":"http:\\/\\/shop.example\\/cb?a=1","n":1.5,"ok":true,'
                b'"q":"say \\"hi\\"\\\\","tab":"\\t\\u0001","none":null}}')
    assert ok_reply(body) == b"%04d" % len(expected) + expected
    assert json.loads(ok_reply(body)[4:])["data"] == body
    assert encode_frame({"cmd": "ping"}) == b'0014{"cmd":"ping"}'


def test_error_reply() -> None:
    expected = b'{"code":0,"msg":"no job order:42 \\/ check","err":"not_found","data":[]}'
    want = b"%04d" % len(expected) + expected
    assert error_reply(("not_found", "no job order:42 / check")) == want
    assert error_reply(DqError("not_found", "no job order:42 / check")) == want
    assert error_reply(FrameError("not_found", "no job order:42 / check")) == want


def test_reply_too_large_for_four_digits() -> None:
    reply = ok_reply({"pad": "x" * 9990})
    assert len(reply) < 9999
    obj = json.loads(reply[4:])
    assert obj["code"] == 0 and obj["err"] == TOO_LARGE and "bytes" in obj["msg"]
    overhead = len(b'{"code":1,"msg":"succ","data":{"pad":""}}')
    fits = ok_reply({"pad": "x" * (9999 - overhead)})
    assert fits.startswith(b"9999") and len(fits) == 10003
    assert json.loads(ok_reply({"pad": "x" * (10000 - overhead)})[4:])["err"] == TOO_LARGE
    # escapes count: 2000 CJK characters are 12000 bytes on the wire
    assert json.loads(ok_reply({"p": "订" * 2000})[4:])["err"] == TOO_LARGE
    with pytest.raises(DqError) as info:
        encode_frame({"cmd": "add", "body": {"pad": "x" * 10000}})
    assert info.value.err == TOO_LARGE


def test_decode_reply() -> None:
    assert decode_reply({"code": 1, "msg": "succ", "data": []}) == []
    assert decode_reply({"code": 1, "msg": "succ", "data": {"a": 1}}) == {"a": 1}
    with pytest.raises(DqError) as info:
        decode_reply({"code": 0, "msg": "no such job", "err": "not_found", "data": []})
    assert (info.value.err, info.value.msg) == ("not_found", "no such job")
    with pytest.raises(DqError) as info:
        decode_reply({"code": 0, "msg": "fail", "data": []})  # the PHP server's failure
    assert (info.value.err, info.value.msg) == (UNAVAILABLE, "fail")
    with pytest.raises(DqError):
        decode_reply({})


def test_round_trip_through_the_decoder() -> None:
    out = FrameDecoder().feed(ok_reply({"url": "a/b", "名": 1}) + error_reply(("x", "y")))
    assert decode_reply(out[0]) == {"url": "a/b", "名": 1}  # type: ignore[arg-type]
    with pytest.raises(DqError):
        decode_reply(out[1])  # type: ignore[arg-type]


def test_integers_beyond_64_bits_stay_exact() -> None:
    """orjson would read these as floats; a 20-digit run takes the exact decoder."""
    big = 2**70 + 1
    for text in (f'{{"cmd":"add","topic":"t","id":"1","body":{{"n":{big}}}}}',
                 f'{{"cmd":"add","topic":"t","id":"1","body":{{"n":-{big},"m":[{big}]}}}}'):
        obj = decode_payload(text.encode())
        assert isinstance(obj, dict) and abs(obj["body"]["n"]) == big
        assert type(obj["body"]["n"]) is int


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300)
@given(json_values)
def test_fast_decoder_reads_what_the_stdlib_reads(value: Any) -> None:
    """The orjson path and the stdlib path give the same object for any JSON text."""
    for ensure_ascii in (True, False):
        text = json.dumps({"cmd": "add", "v": value}, ensure_ascii=ensure_ascii)
        obj = decode_payload(text.encode())
        if isinstance(obj, FrameError):  # only what the stdlib path refuses too
            assert "surrogate" in obj.msg or "nested" in obj.msg
            continue
        assert obj == json.loads(text)


@settings(max_examples=500)
@given(st.binary(max_size=80)
       | st.text(alphabet="0123456789a٣\"{}:,.-e", max_size=80).map(str.encode))
def test_long_number_check_matches_the_regex(text: bytes) -> None:
    """The translate-and-search check finds exactly what re's \\d{20} finds (ASCII digits:
    other scripts' digits are no JSON number)."""
    assert has_long_number(text) == bool(re.search(rb"\d{20}", text))
    assert has_long_number(bytearray(text)) == has_long_number(text)


@pytest.mark.parametrize("char", [chr(c) for c in [*range(0x20), 0x7f]])
def test_control_characters_are_refused_in_topic_and_id(char: str) -> None:
    for field, value in (("topic", f"or{char}der"), ("id", f"4{char}2")):
        obj = {"cmd": "add", "topic": "order", "id": "42", field: value}
        with pytest.raises(DqError, match="control characters") as info:
            parse_request(obj)
        assert info.value.err == BAD_REQUEST


def test_other_unprintable_characters_are_allowed_in_topic_and_id() -> None:
    """Only ASCII control characters are refused, as before the isprintable() fast path."""
    for text in ("a\u00a0b", "a\u2028b", "\u200bx", "名前"):
        req = parse_request({"cmd": "add", "topic": text, "id": text})
        assert isinstance(req, AddRequest) and (req.topic, req.id) == (text, text)
