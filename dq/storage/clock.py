"""Times in the configured zone, as the original showed them: the day the counters are
kept under, and the 'Y-m-d H:i:s' of a body's notify_time and dq_set_time."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from dq.storage.payload import Stored


class Clock:
    """Formats times in `zone` (the local zone when None), memoised per second."""

    def __init__(self, zone: ZoneInfo | None = None) -> None:
        self.zone = zone
        self._day = ("", 0)
        self._times: dict[int, str] = {}

    def day(self) -> str:
        """Today as YYYYMMDD in the configured zone (cached for a second)."""
        now = int(time.time())
        if self._day[1] != now:
            self._day = (datetime.fromtimestamp(now, self.zone).strftime("%Y%m%d"), now)
        return self._day[0]

    def fmt_time(self, epoch_ms: int) -> str:
        """'Y-m-d H:i:s' in the configured zone (memoised per second: the hot path)."""
        sec = epoch_ms // 1000
        text = self._times.get(sec)
        if text is None:
            if len(self._times) > 4096:
                self._times.clear()
            text = datetime.fromtimestamp(sec, self.zone).strftime("%Y-%m-%d %H:%M:%S")
            self._times[sec] = text
        return text

    def full_body(self, stored: Stored) -> dict[str, Any]:
        """The body a callback or `get` sees: with the original's notify_time (when the job
        was due at its add) and dq_set_time (when it was added), unless it has them."""
        body = stored.body
        if "notify_time" not in body:
            body["notify_time"] = self.fmt_time(stored.due_ms)
        if "dq_set_time" not in body:
            body["dq_set_time"] = self.fmt_time(stored.set_ms)
        return body
