"""Every Redis key name dq uses for jobs: the one place they are built.

The Lua scripts never build a key (STYLE.md): each takes its keys in KEYS, from here.
`Keys` holds the fixed names of one store (prefix, bucket count, php-delayqueue's prefix)
and makes the per-topic, per-bucket and per-minute ones.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Sequence


def _glob_escape(text: str) -> str:
    """`text` with SCAN MATCH's special characters escaped."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class Keys:
    """The key names of a store whose keys are under `prefix`, its delayed jobs in
    `buckets` buckets (crc32(tid) % buckets). Set once: a store never renames its keys."""

    def __init__(self, prefix: str = "dq:", buckets: int = 8, orig_prefix: str = "") -> None:
        self.prefix = prefix
        self.buckets = buckets
        p = prefix
        self.jobs = p + "jobs"
        self.inflight = p + "inflight"
        self.dead = p + "dead"
        # A job's last error: a dead letter's, and a retrying job's while it waits (retry.lua
        # sets it; ack, a replacing add, redrive and delete remove it).
        self.dead_err = p + "dead:err"
        self.guests = p + "guests"
        self.moving = p + "moving"
        self.layout = p + "layout"  # the bucket count the delayed jobs are kept in
        self.alerts = p + "alerts"  # dead letters whose alert mail is owed
        # Circuit breakers (dq/roles/breaker.py), on each topic's home shard: the state per
        # topic (`breaker(topic)`), and the mails owed for their openings and closings.
        self.breaker_mail = p + "breaker:mail"
        self.ready = tuple(f"{p}ready:{n}" for n in (1, 2, 3))
        # Flow control (dq/storage/lua/claim.lua): per-topic tokens and calls in flight, the
        # leases counted in those, and the topics whose jobs wait in a held list (`held`).
        self.flow = p + "flow"
        self.flow_lease = p + "flow:lease"
        self.held_set = p + "held"
        self.delay = tuple(self.delay_of(b) for b in range(buckets))
        self.wake = tuple(f"{p}wake:{b}" for b in range(buckets))
        # The dataset's token: names its counters in the registry's export marks
        # (dq/roles/statexport.py)
        self.stat_epoch = p + "statepoch"
        # php-delayqueue's layout (DqRedis with DqConf::$prefix, "dq_" by default), whose
        # jobs dq adopts (dq/storage/adopt.py): job hash `<p>job_info`, bucket zsets
        # `<p>bucket_<n>`, ready lists `<p><priority>ready_queue`. "" = not looked for.
        self.orig_prefix = orig_prefix
        self.orig_jobs = f"{orig_prefix}job_info" if orig_prefix else ""
        self._stat: dict[str, str] = {}  # per topic: made once per add otherwise

    def bucket(self, tid: str) -> int:
        """The delay bucket of a job: crc32(tid) % buckets."""
        return zlib.crc32(tid.encode()) % self.buckets

    def delay_of(self, bucket: int) -> str:
        """The delay zset of bucket number `bucket`, which may be beyond `buckets` (one
        left by an earlier setting: dq/storage/maintenance.py)."""
        return f"{self.prefix}delay:{bucket}"

    def delay_pattern(self) -> str:
        """SCAN pattern of every delay zset, whatever the bucket count was."""
        return _glob_escape(self.prefix) + "delay:*"

    def wake_of(self, buckets: Sequence[int]) -> list[str]:
        return [self.wake[b] for b in buckets]

    def stat(self, topic: str) -> str:
        """A topic's counters (made once per add otherwise: cached)."""
        key = self._stat.get(topic)
        if key is None:
            if len(self._stat) >= 4096:
                self._stat.clear()
            key = self._stat[topic] = f"{self.prefix}stat:{topic}"
        return key

    def hist(self, topic: str) -> str:
        return f"{self.prefix}hist:{topic}"

    def minute(self, epoch_min: int | None = None) -> str:
        if epoch_min is None:
            epoch_min = int(time.time() // 60)
        return f"{self.prefix}statm:{epoch_min}"

    def held(self, topic: str) -> str:
        """The list of a flow-controlled topic's jobs that were ready but held back."""
        return f"{self.prefix}held:{topic}"

    def breaker(self, topic: str) -> str:
        return f"{self.prefix}breaker:{topic}"

    def orig_ready(self, priority: int) -> str:
        return f"{self.orig_prefix}{priority}ready_queue"

    def orig_patterns(self) -> tuple[str, str]:
        """SCAN patterns of the original's ready lists and bucket zsets."""
        p = _glob_escape(self.orig_prefix)
        return f"{p}*ready_queue", f"{p}bucket_*"
