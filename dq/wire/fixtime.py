"""`fix_time` as php-delayqueue's users write it.

The original handed `fix_time` to PHP's strtotime(), so clients send more than one
spelling. Accepted, read in the configured zone (`timezone`, else this machine's) unless
the text carries its own offset:

- `2030-01-31 08:00:00`, `2030-01-31 08:00`, `2030-01-31` (midnight), and the same with
  `/` between the date's parts; month, day and hour may have one digit, as `date('Y-n-j G:i')`
  writes them;
- ISO 8601 with `T`, optional fractions of a second and an optional `Z` or offset
  (`2030-01-31T08:00:00+08:00`); an offset may also follow the space-separated forms;
- a Unix timestamp in seconds: a JSON integer, `@1893456000` (strtotime's spelling) or a
  string of 9 to 11 digits;
- `+N second(s)|minute(s)|hour(s)|day(s)|week(s)` from now (the `+` may be left out):
  seconds, minutes and hours are exact; days and weeks keep the wall-clock time in the
  zone, as strtotime does, so `+1 day` across a DST change is 23 or 25 hours.

Anything else, and dates that do not exist (`2030-02-30`), is a bad_request whose message
lists these forms.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final
from zoneinfo import ZoneInfo

from dq.errors import BAD_REQUEST, DqError

MAX_DUE_MS: Final = 253_402_300_799_999  # 9999-12-31 23:59:59.999 UTC

HELP: Final = (
    "fix_time must be one of: 'YYYY-MM-DD HH:MM:SS' (e.g. '2030-01-31 08:00:00'), "
    "'YYYY-MM-DD HH:MM', 'YYYY-MM-DD' (midnight), 'YYYY/MM/DD HH:MM:SS', ISO 8601 "
    "'2030-01-31T08:00:00' with an optional 'Z' or offset like '+08:00', a Unix timestamp "
    "in seconds (1893456000 or '@1893456000'), or '+N second(s)|minute(s)|hour(s)|day(s)|"
    "week(s)' (e.g. '+30 minutes'); times without an offset are in the server's zone")

_DATE_TIME: Final = re.compile(
    r"(\d{4})([-/])(\d{1,2})\2(\d{1,2})"
    r"(?:[ T](\d{1,2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r" ?(Z|[+-]\d{2}(?::?\d{2})?)?)?", re.ASCII | re.IGNORECASE)
_UNIX: Final = re.compile(r"@(\d{1,12})|(\d{9,11})", re.ASCII)
_RELATIVE: Final = re.compile(r"\+? *(\d{1,12}) *(second|minute|hour|day|week)s?",
                              re.ASCII | re.IGNORECASE)
_SECONDS: Final = {"second": 1, "minute": 60, "hour": 3600}
_DAYS: Final = {"day": 1, "week": 7}


def _bad(msg: str) -> DqError:
    return DqError(BAD_REQUEST, msg)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _clamp(ms: int) -> int:
    return min(max(0, ms), MAX_DUE_MS)


def _offset(text: str) -> timezone:
    if text.upper() == "Z":
        return UTC
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:] or 0)
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset {text} is out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _absolute(m: re.Match[str], tz: ZoneInfo | None) -> int:
    """Epoch ms of a matched date-time; ValueError when it is not a real one."""
    year, _, month, day, hour, minute, second, frac, zone = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    local = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                     int(second or 0), micro)
    # fold=0: a wall time that occurs twice (DST ends) is its first occurrence, one that
    # never occurs (DST starts) is read with the offset before the change: strtotime's
    # answers too. A naive datetime's timestamp() reads it in this machine's zone.
    if zone:
        local = local.replace(tzinfo=_offset(zone))
    elif tz is not None:
        local = local.replace(tzinfo=tz)
    return _clamp(round(local.timestamp() * 1000))


def _relative_ms(n: int, unit: str, tz: ZoneInfo | None, now_ms: int) -> int:
    """Milliseconds from now_ms to now + n units, days and weeks on the zone's wall clock."""
    unit = unit.lower()
    if unit in _SECONDS:
        return n * _SECONDS[unit] * 1000
    now = datetime.fromtimestamp(now_ms / 1000, tz)
    wall = now.replace(tzinfo=None) + timedelta(days=n * _DAYS[unit])
    then = wall if tz is None else wall.replace(tzinfo=tz)
    return round(then.timestamp() * 1000) - now_ms


def parse(value: Any, tz: ZoneInfo | None,
          now_ms: int | None = None) -> tuple[int | None, int | None]:
    """(due_ms, None) for an absolute fix_time, (None, delay_ms) for a relative one, read
    in zone tz (None: local) at now_ms (default: the clock). Raises DqError('bad_request')."""
    if type(value) is int:
        if not 0 <= value <= MAX_DUE_MS // 1000:
            raise _bad(f"fix_time {value} is not a Unix timestamp in seconds between 0 and "
                       f"year 9999; {HELP}")
        return value * 1000, None
    if not isinstance(value, str):
        raise _bad(f"{HELP} (got {_show(value)})")
    m = _DATE_TIME.fullmatch(value)
    if m is not None:
        try:
            return _absolute(m, tz), None
        except (ValueError, OverflowError, OSError) as exc:
            raise _bad(f"fix_time {_show(value)} is not a real date and time ({exc}); "
                       f"{HELP}") from None
    m = _UNIX.fullmatch(value)
    if m is not None:
        return parse(int(m.group(1) or m.group(2)), tz, now_ms)
    m = _RELATIVE.fullmatch(value)
    if m is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        try:
            delay = _relative_ms(int(m.group(1)), m.group(2), tz, now)
        except (ValueError, OverflowError, OSError):
            delay = MAX_DUE_MS  # past year 9999
        if not 0 <= delay <= MAX_DUE_MS - now:
            raise _bad(f"fix_time {_show(value)} falls after year 9999; {HELP}")
        return None, delay
    raise _bad(f"{HELP} (got {_show(value)})")
