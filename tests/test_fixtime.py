"""fix_time in every spelling php-delayqueue's users send (the original passed it to PHP's
strtotime()), read in the configured zone; everything else refused with the forms listed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from dq.errors import BAD_REQUEST, DqError
from dq.wire import fixtime
from dq.wire.requests import AddRequest, parse_request
from tests.support.redisproc import RedisProcess
from tests.support.server import frame, raw_exchange, start_server

SHANGHAI = ZoneInfo("Asia/Shanghai")  # UTC+8, no DST
NEW_YORK = ZoneInfo("America/New_York")


def utc_ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


NOW = utc_ms(2030, 1, 31, 0, 0, 0)  # 08:00:00 in Shanghai

ABSOLUTE: list[tuple[Any, ZoneInfo, int]] = [
    ("2030-01-31 08:00:00", SHANGHAI, utc_ms(2030, 1, 31, 0, 0, 0)),
    ("2030-01-31 08:00", SHANGHAI, utc_ms(2030, 1, 31, 0, 0, 0)),
    ("2030-01-31", SHANGHAI, utc_ms(2030, 1, 30, 16, 0, 0)),  # midnight in the zone
    ("2030/01/31 08:00:00", SHANGHAI, utc_ms(2030, 1, 31, 0, 0, 0)),
    ("2030/01/31", SHANGHAI, utc_ms(2030, 1, 30, 16, 0, 0)),
    ("2030-1-5 8:05:09", SHANGHAI, utc_ms(2030, 1, 5, 0, 5, 9)),  # date('Y-n-j G:i:s')
    ("2030-01-31T08:00:00", SHANGHAI, utc_ms(2030, 1, 31, 0, 0, 0)),
    ("2030-01-31T08:00:00Z", SHANGHAI, utc_ms(2030, 1, 31, 8, 0, 0)),
    ("2030-01-31T08:00:00z", SHANGHAI, utc_ms(2030, 1, 31, 8, 0, 0)),
    ("2030-01-31T08:00:00+02:00", SHANGHAI, utc_ms(2030, 1, 31, 6, 0, 0)),
    ("2030-01-31T08:00:00-0530", SHANGHAI, utc_ms(2030, 1, 31, 13, 30, 0)),
    ("2030-01-31T08:00:00+09", SHANGHAI, utc_ms(2030, 1, 30, 23, 0, 0)),
    ("2030-01-31T08:00:00.250Z", SHANGHAI, utc_ms(2030, 1, 31, 8, 0, 0) + 250),
    ("2030-01-31T08:00Z", SHANGHAI, utc_ms(2030, 1, 31, 8, 0, 0)),
    ("2030-01-31 08:00:00 +00:00", SHANGHAI, utc_ms(2030, 1, 31, 8, 0, 0)),
    (1893456000, SHANGHAI, 1893456000_000),
    ("1893456000", SHANGHAI, 1893456000_000),
    ("@1893456000", SHANGHAI, 1893456000_000),
    (0, SHANGHAI, 0),
    ("2024-02-29 00:00:00", UTC, utc_ms(2024, 2, 29, 0, 0, 0)),
    # DST in a named zone: 2030-03-10 02:30 never happens in New York (clocks go from 02:00
    # EST to 03:00 EDT): read as strtotime reads it, 03:30 EDT. 2030-11-03 01:30 happens
    # twice: the first, EDT (UTC-4).
    ("2030-03-10 01:59:59", NEW_YORK, utc_ms(2030, 3, 10, 6, 59, 59)),
    ("2030-03-10 02:30:00", NEW_YORK, utc_ms(2030, 3, 10, 7, 30, 0)),
    ("2030-03-10 03:00:00", NEW_YORK, utc_ms(2030, 3, 10, 7, 0, 0)),
    ("2030-11-03 01:30:00", NEW_YORK, utc_ms(2030, 11, 3, 5, 30, 0)),
    ("2030-11-03 02:30:00", NEW_YORK, utc_ms(2030, 11, 3, 7, 30, 0)),
]


@pytest.mark.parametrize(("value", "tz", "due_ms"), ABSOLUTE)
def test_absolute_forms(value: Any, tz: ZoneInfo, due_ms: int) -> None:
    assert fixtime.parse(value, tz, NOW) == (due_ms, None)
    req = parse_request({"cmd": "add", "topic": "t", "id": "1", "fix_time": value}, tz=tz)
    assert isinstance(req, AddRequest) and (req.due_ms, req.delay_ms) == (due_ms, None)


RELATIVE: list[tuple[str, ZoneInfo, int, int]] = [
    ("+1 second", SHANGHAI, NOW, 1_000),
    ("+30 seconds", SHANGHAI, NOW, 30_000),
    ("+1 minute", SHANGHAI, NOW, 60_000),
    ("+5 minutes", SHANGHAI, NOW, 300_000),
    ("+2 hours", SHANGHAI, NOW, 7_200_000),
    ("+1 day", SHANGHAI, NOW, 86_400_000),
    ("+3 days", SHANGHAI, NOW, 3 * 86_400_000),
    ("+1 week", SHANGHAI, NOW, 7 * 86_400_000),
    ("+2 weeks", SHANGHAI, NOW, 14 * 86_400_000),
    ("10 minutes", SHANGHAI, NOW, 600_000),
    ("+10minutes", SHANGHAI, NOW, 600_000),
    ("+1 DAY", SHANGHAI, NOW, 86_400_000),
    ("+0 seconds", SHANGHAI, NOW, 0),
    # DST: a day keeps the wall-clock time, so it is 23 hours when clocks go forward and
    # 25 when they go back; hours stay exact.
    ("+1 day", NEW_YORK, utc_ms(2030, 3, 9, 17, 0, 0), 23 * 3_600_000),  # 12:00 EST -> EDT
    ("+24 hours", NEW_YORK, utc_ms(2030, 3, 9, 17, 0, 0), 24 * 3_600_000),
    ("+1 day", NEW_YORK, utc_ms(2030, 11, 2, 16, 0, 0), 25 * 3_600_000),  # 12:00 EDT -> EST
    ("+1 week", NEW_YORK, utc_ms(2030, 3, 5, 17, 0, 0), (7 * 24 - 1) * 3_600_000),
]


@pytest.mark.parametrize(("value", "tz", "now_ms", "delay_ms"), RELATIVE)
def test_relative_forms(value: str, tz: ZoneInfo, now_ms: int, delay_ms: int) -> None:
    assert fixtime.parse(value, tz, now_ms) == (None, delay_ms)
    obj = {"cmd": "add", "topic": "t", "id": "1", "fix_time": value}
    req = parse_request(obj, tz=tz, now_ms=now_ms)
    assert isinstance(req, AddRequest) and (req.due_ms, req.delay_ms) == (None, delay_ms)
    # Asked twice, a relative form is measured from each request's own now.
    later = parse_request(obj, tz=tz, now_ms=now_ms + 5000)
    assert isinstance(later, AddRequest) and later.due_ms is None


def test_the_configured_zone_decides_local_forms() -> None:
    for value in ("2030-01-31 08:00:00", "2030/01/31 08:00", "2030-01-31T08:00:00"):
        shanghai = fixtime.parse(value, SHANGHAI, NOW)[0]
        new_york = fixtime.parse(value, NEW_YORK, NOW)[0]
        assert shanghai is not None and new_york is not None
        assert new_york - shanghai == 13 * 3_600_000
    # a time with its own offset, or a timestamp, is the same instant in every zone
    for value in ("2030-01-31T08:00:00Z", "2030-01-31T08:00:00+08:00", 1893456000):
        assert fixtime.parse(value, SHANGHAI, NOW) == fixtime.parse(value, NEW_YORK, NOW)


BAD: list[Any] = [
    "2030-02-30", "2030-02-30 00:00:00", "2030-13-01 00:00:00", "2030-01-32",
    "2030-01-31 24:00:00", "2030-01-31 08:60:00", "2030-01-31 08:00:61", "0000-00-00 00:00:00",
    "2030-01-31T08:00:00+25:00", "2030-01-31Z", "2030-01-31 08", "2030-01-31 08:00:00\n",
    " 2030-01-31 08:00:00", "2030-01-31/08:00:00", "2030/01-31", "30-01-31", "２０３０-01-31",
    "tomorrow", "next monday", "now", "", "+", "+1", "+1 month", "+1 year", "-1 day",
    "+1.5 hours", "+1 fortnight", "+999999999999 weeks", "12345678", "123456789012", "@-1",
    "@", 1.5, -1, 10**20, True, None, [], {"at": 1}, [2030, 1, 31],
]


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_anything_else_is_refused_with_the_forms(value: Any) -> None:
    with pytest.raises(DqError) as info:
        fixtime.parse(value, SHANGHAI, NOW)
    assert info.value.err == BAD_REQUEST
    msg = info.value.msg
    assert "fix_time" in msg and "YYYY-MM-DD HH:MM:SS" in msg and "+N second(s)" in msg
    assert "Unix timestamp" in msg and "ISO 8601" in msg
    if value is not None:  # null means "not given" in a request
        obj = {"cmd": "add", "topic": "t", "id": "1", "fix_time": value}
        with pytest.raises(DqError):
            parse_request(obj, tz=SHANGHAI, now_ms=NOW)


def test_an_impossible_date_says_it_is_not_real() -> None:
    with pytest.raises(DqError) as info:
        fixtime.parse("2030-02-30", SHANGHAI, NOW)
    assert "not a real date" in info.value.msg and "day is out of range" in info.value.msg


# -- over the wire, on a real server -------------------------------------------------------

async def test_every_form_over_tcp_add_and_add_many(tmp_path: Path,
                                                     redis_server: RedisProcess) -> None:
    """What a PHP client sends, framed as it frames it, to a server set to New York."""
    running, ctx, task = await start_server(tmp_path, [redis_server.url],
                                            timezone="America/New_York")
    try:
        forms = {"date": "2030-03-10", "slash": "2030/03/10 02:30:00", "iso": "2030-03-10T12:00Z",
                 "unix": 1893456000, "hm": "2030-11-03 01:30"}
        want = {"date": utc_ms(2030, 3, 10, 5, 0, 0), "slash": utc_ms(2030, 3, 10, 7, 30, 0),
                "iso": utc_ms(2030, 3, 10, 12, 0, 0), "unix": 1893456000_000,
                "hm": utc_ms(2030, 11, 3, 5, 30, 0)}
        for name, value in forms.items():
            req = frame({"cmd": "add", "topic": "order", "id": name, "body": {},
                         "fix_time": value})
            [reply] = await asyncio.to_thread(raw_exchange, running.port, req)
            assert reply["code"] == 1, (name, reply)
        before = time.time() * 1000
        jobs = [{"topic": "order", "id": "rel", "body": {}, "fix_time": "+2 hours"},
                {"topic": "order", "id": "bad", "body": {}, "fix_time": "2030-02-30"}]
        [reply] = await asyncio.to_thread(raw_exchange, running.port,
                                          frame({"cmd": "add_many", "jobs": jobs}))
        assert reply["data"][0] == 1
        assert reply["data"][1]["err"] == "bad_request"
        assert "not a real date" in reply["data"][1]["msg"]
        assert "+N second(s)" in reply["data"][1]["msg"]
        for name, due_ms in want.items():
            info = await running.store.lookup("order", name)
            assert info is not None and info.due_ms == due_ms, name
        info = await running.store.lookup("order", "rel")
        assert info is not None
        assert before + 7_195_000 <= info.due_ms <= time.time() * 1000 + 7_205_000
        req = frame({"cmd": "add", "topic": "order", "id": "no", "body": {},
                     "fix_time": "next monday"})
        [reply] = await asyncio.to_thread(raw_exchange, running.port, req)
        assert reply["code"] == 0 and reply["err"] == "bad_request"
        assert fixtime.HELP in reply["msg"]
        assert await running.store.lookup("order", "no") is None
        assert await running.store.lookup("order", "bad") is None
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await running.store.shards.close()
        running.registry.close()
