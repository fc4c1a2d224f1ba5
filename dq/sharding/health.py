"""The shard health record every process of one dq instance shares.

The checker (dq/roles/checker/) is its only writer: `<data_dir>/health.json` maps a shard's
name (password masked) to `{"up": bool, "since": epoch s, "error": str, "guests": bool}`
and is replaced atomically (tmp file + rename) when a shard goes down or comes back, or
starts or stops holding guests (jobs whose owner is another shard, see dq/storage/guests.py:
while a shard holds any, an add on a job's owner also evicts the job's older copy there).
Servers, timers and consumers read it through a `HealthReader` attached to their
ShardSet: reading `Shard.up` polls the file's identity at most every `every` seconds and
re-reads it only when it changed, so the hot path pays one clock read per check. A shard
missing from the record, or a record that is missing or unreadable, counts as up: a lost
file never stops writes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dq.config import Settings
from dq.sharding.refusals import safe_name

if TYPE_CHECKING:
    from dq.sharding.shards import Shard

log = logging.getLogger("dq.health")

HEALTH_FILE = "health.json"
POLL_EVERY = 0.5  # seconds between checks of the file's identity


def health_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / HEALTH_FILE


@dataclass(frozen=True)
class ShardHealth:
    """What the checker last decided about one shard."""

    up: bool
    since: float  # epoch seconds of the last state change
    error: str = ""
    guests: bool = False  # holds jobs whose owner is another shard

    def json(self) -> dict[str, Any]:
        return {"up": self.up, "since": round(self.since, 3), "error": self.error,
                "guests": self.guests}


def write_health(path: Path, record: Mapping[str, ShardHealth]) -> None:
    """Replace the record atomically: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({name: h.json() for name, h in record.items()}, indent=1,
                      sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=".health.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_health(path: Path) -> dict[str, ShardHealth]:
    """The record; {} when there is none. Raises ValueError when it does not parse."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("health record is not a JSON object")
    out = {}
    for name, item in data.items():
        if isinstance(item, dict):
            out[str(name)] = ShardHealth(bool(item.get("up", True)),
                                         float(item.get("since", 0.0)),
                                         str(item.get("error", "")),
                                         bool(item.get("guests", False)))
    return out


class HealthReader:
    """Applies the shared record to a process's shards (`Shard.mark`), re-reading the file
    only when its identity (inode, mtime, size) changed and at most every `every` s."""

    def __init__(self, path: Path, *, every: float = POLL_EVERY) -> None:
        self.path = path
        self.every = every
        self.shards: list[Shard] = []
        self.record: dict[str, ShardHealth] = {}
        self._next = 0.0
        self._seen: tuple[int, int, int] | None = None

    def attach(self, shards: Iterable[Shard]) -> None:
        for shard in shards:
            self.shards.append(shard)
            shard.health = self

    def poll(self) -> None:
        """Cheap unless `every` has passed; then stat, and read when the file changed."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        try:
            st = os.stat(self.path)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        except OSError as exc:
            log.debug("cannot stat %s: %s", self.path, exc)
            return
        if seen == self._seen:
            return
        self._seen = seen
        try:
            record = {} if seen is None else read_health(self.path)
        except (OSError, ValueError) as exc:
            log.warning("shard health record %s is unreadable (%s); keeping the last one",
                        self.path, exc)
            return
        self.record = record
        self.apply()

    def apply(self) -> None:
        for shard in self.shards:
            entry = self.record.get(safe_name(shard.name))
            up = True if entry is None else entry.up
            if shard.marked_up and not up:
                log.warning("redis shard %s is marked down by the checker (%s); writes go "
                            "to the other shards", safe_name(shard.name),
                            entry.error if entry else "")
                # Calls stuck on a hung server would otherwise wait forever: fail them now.
                shard.conn.close()
            elif up and not shard.marked_up:
                log.info("redis shard %s is marked up again", safe_name(shard.name))
            shard.mark(up)
            shard.has_guests = entry is not None and entry.guests
