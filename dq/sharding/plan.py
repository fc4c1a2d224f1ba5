"""The one shard list every role of a generation works: `plan_shards`.

Server, timers, consumers, checker and console all work the same list: the `redis`
setting, then the enabled `dq_redis` rows of the registry. The embedded redis-server is the
only shard when neither names one. When they do, and the embedded Redis still runs (or its
data dir holds data from before), it is *retired*: every role keeps working it (timers
move its due jobs, consumers deliver them, get/del and the console find them) but no add is
routed to it, until the checker finds it holds no job and marks it drained.

The master reads the registry once per generation (in a short forked step, dq/master/boot.py) and
hands the plan to every child it forks, so no role can accept a job onto a shard that the
timers and consumers of its generation do not work. Standard library only: the master
imports this.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dq.config import Settings

EMBEDDED = "embedded"  # the embedded redis-server's shard name

Named = tuple[str, str]  # (shard name, URL)


def embedded_redis_url(settings: Settings) -> str:
    """Where the embedded redis-server listens: a unix socket in the data dir."""
    return f"unix://{Path(settings.data_dir).resolve() / 'redis.sock'}"


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one generation: `shards` take adds; `retired` are worked, take none."""

    shards: tuple[Named, ...]
    retired: tuple[Named, ...] = ()

    @property
    def every(self) -> list[Named]:
        """Every shard to work, those taking adds first."""
        return [*self.shards, *self.retired]

    @property
    def embedded(self) -> bool:
        """Whether the embedded redis-server is one of them (so the master must run it)."""
        return any(name == EMBEDDED for name, _ in self.every)

    @property
    def only_embedded(self) -> bool:
        return [name for name, _ in self.shards] == [EMBEDDED]

    def describe(self) -> str:
        if self.only_embedded:
            return "embedded redis"
        out = f"{len(self.shards)} shard(s)"
        return out + f", {len(self.retired)} retired" if self.retired else out

    def to_json(self) -> str:
        return json.dumps({"shards": self.shards, "retired": self.retired})

    @classmethod
    def from_json(cls, text: str) -> ShardPlan:
        data = json.loads(text)
        return cls(tuple((str(n), str(u)) for n, u in data["shards"]),
                   tuple((str(n), str(u)) for n, u in data.get("retired", ())))


def masked(name: str) -> str:
    """A shard's name as logs show it: a URL's password left out."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", name)


def drained_record(settings: Settings) -> Path:
    """The URLs of retired shards the checker found empty, one a line (dq/roles/checker/)."""
    return Path(settings.data_dir).resolve() / "drained-shards"


def drained_urls(settings: Settings) -> set[str]:
    try:
        return set(drained_record(settings).read_text(encoding="utf-8").split())
    except OSError:
        return set()


def carry_over(old: ShardPlan, new: ShardPlan, drained: Iterable[str] = ()) -> ShardPlan:
    """`new`, with the shards `old` worked that `new` leaves out kept as retired: a reload
    that drops a shard from the list (disabled or deleted in the registry) leaves its jobs
    to be delivered and moved to the other shards, and the jobs the old generation's
    servers write there until they stop; a shard once found empty (`drained` URLs) is let
    go. The embedded Redis is not carried: it has its own rule (plan_shards)."""
    have = {url for _, url in new.every}
    done = set(drained)
    keep = tuple(s for s in old.every if s[1] not in have and s[1] not in done
                 and s[0] != EMBEDDED)
    return ShardPlan(new.shards, new.retired + keep) if keep else new


def plan_shards(settings: Settings, registry: Iterable[Named] = (), *,
                keep_embedded: bool = False) -> ShardPlan:
    """The shard list: the `redis` setting (each named by its URL), then the registry's
    enabled shards (`registry`, (name, url) pairs; a URL already listed is not repeated).
    When that is empty, the embedded Redis alone; otherwise the embedded Redis is retired
    when `keep_embedded` (it runs, or holds data not yet drained)."""
    named: list[Named] = [(url, url) for url in settings.redis]
    seen = {url for _, url in named}
    for name, url in registry:
        if url not in seen:
            named.append((name or url, url))
            seen.add(url)
    embedded = (EMBEDDED, embedded_redis_url(settings))
    if not named:
        return ShardPlan((embedded,))
    return ShardPlan(tuple(named), (embedded,) if keep_embedded else ())


def enabled_shards(confs: Iterable[Any]) -> list[Named]:
    """(name, url) of the enabled shard rows (dq.registry.core.ShardConf), in id order."""
    return [(c.name or c.url, c.url) for c in confs if c.enabled]


def drained_path(settings: Settings) -> Path:
    """The file the checker writes once a retired embedded Redis holds no job: a later
    start with real shards configured no longer runs it (dq/sharding/plan.py)."""
    return Path(settings.data_dir).resolve() / "redis" / "drained"


def command(conn: socket.socket, *args: str) -> bytes:
    """Send one command in RESP and return the first line of the reply."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    conn.sendall(b"".join(parts))
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = conn.recv(256)
        if not chunk:
            break
        reply += chunk
    return reply.split(b"\r\n", 1)[0]


def state(path: str | Path, timeout: float = 0.5) -> str:
    """What a Redis on the unix socket `path` says to PING: 'ready', 'loading' (its data set
    is still being read into memory: it answers -LOADING) or 'down' (no answer)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            reply = command(conn, "PING")
    except OSError:
        return "down"
    return "ready" if reply == b"+PONG" else "loading" if reply.startswith(b"-LOADING") \
        else "down"
