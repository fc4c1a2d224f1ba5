"""Redis Cluster as a store: a cluster URL becomes `cluster_partitions` logical shards.

`redis+cluster://[:password@]host:port[,host:port...]` (`rediss+cluster://` with TLS)
names a whole cluster. dq's unit of sharding stays the shard: the cluster is cut into a
fixed number of partitions, each a `Shard` whose every key carries the partition's hash
tag (`{dq:17}dq:jobs`, `{dq:17}dq:delay:3`, ...). All of a partition's keys hash to one
slot, so every script's keys are in one slot; the cluster places the slots on its
masters, and rendezvous hashing spreads jobs over the partitions as over plain shards.
Each partition's tag is picked so the tags' slots are spread evenly over 0..16383: every
master that serves a fair share of the slots serves partitions.

Routing follows the cluster: the slot map (dq/sharding/clustermap.py) comes from
`CLUSTER SLOTS` (any node that answers; refreshed on a connection loss, `MOVED` and
`CLUSTERDOWN`); `MOVED` and `ASK`
(`ASKING` first) are followed; `TRYAGAIN` (a slot half moved by a reshard) is tried again
for a while. A command is sent again only when Redis said it did not run it (`MOVED`,
`ASK`, `TRYAGAIN`, `CLUSTERDOWN`, or a connection that could not be made); a connection
lost with a command on it fails that command as unavailable, as on a plain shard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.clustermap import ClusterMap, stray_partitions
from dq.sharding.clusterurl import Addr, key_slot
from dq.sharding.resp import ReplyCallback, RespConnection, safe_name

__all__ = ["ClusterMap", "PartitionClient", "PartitionConnection", "tag_keys", "warn_stray"]

log = logging.getLogger("dq.cluster")

REDIRECTS = 16  # MOVED/ASK hops one command may take before it fails
# How long a command keeps being tried while the cluster says "not now" (TRYAGAIN during a
# reshard, CLUSTERDOWN during a failover) before it fails as unavailable (the add is then
# stored on another partition, as on a plain shard that is down).
SETTLE_FOR = 3.0


# Commands whose every argument is a key, keyless ones, and the rest: key first.
_ALL_KEYS = frozenset({"DEL", "EXISTS", "UNLINK", "MGET", "TOUCH"})
_NO_KEYS = frozenset({"PING", "INFO", "SCRIPT", "TIME", "WAIT", "SCAN", "DBSIZE", "CLUSTER",
                      "ASKING", "AUTH", "SELECT", "ECHO", "CONFIG", "MEMORY"})


def tag_keys(tag: str, args: Sequence[Any]) -> tuple[Any, ...]:
    """A command with the partition's tag put before every key it names (and before a
    SCAN's MATCH pattern)."""
    cmd = str(args[0]).upper()
    if cmd in ("EVALSHA", "EVAL"):
        n = int(args[2])
        return (*args[:3], *(tag + k for k in args[3:3 + n]), *args[3 + n:])
    if cmd in _ALL_KEYS:
        return (args[0], *(tag + k for k in args[1:]))
    if cmd == "SCAN":
        out = list(args)
        for i, a in enumerate(out[:-1]):
            if str(a).upper() == "MATCH":
                out[i + 1] = tag + out[i + 1]
        return tuple(out)
    if cmd in _NO_KEYS or len(args) < 2:
        return tuple(args)
    return (args[0], tag + args[1], *args[2:])


def _untag_scan(tag: bytes, reply: Any) -> Any:
    cursor, keys = reply
    return [cursor, [k[len(tag):] if k.startswith(tag) else k for k in keys]]


def _redirect(msg: str) -> tuple[str, int, Addr] | None:
    """("MOVED" | "ASK", slot, node) of a redirection error, else None."""
    kind, _, rest = msg.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, where = rest.partition(" ")
    host, _, port = where.strip().rpartition(":")
    return kind, int(slot), (host.strip("[]"), int(port))


def _not_now(msg: str) -> bool:
    """Redis did not run the command and it may run shortly (a reshard, a failover)."""
    return msg.startswith(("TRYAGAIN", "CLUSTERDOWN"))


class PartitionConnection:
    """The connection of one partition: what `Shard.conn` offers (call, send_then,
    connected, loop, close), each command's keys tagged and sent to the node that serves
    the partition's slot, following the cluster's redirections."""

    def __init__(self, cmap: ClusterMap, tag: str, name: str) -> None:
        self.map = cmap
        self.tag = tag
        self._tag_b = tag.encode()
        self.slot = key_slot(self._tag_b)
        self.name = name
        self.label = safe_name(name)
        self._tasks: set[asyncio.Future[Any]] = set()

    @property
    def node_addr(self) -> Addr | None:
        """The node that serves the partition's slot, as last seen."""
        return self.map.slots[self.slot]

    def _current(self) -> RespConnection | None:
        addr = self.map.slots[self.slot]
        return None if addr is None else self.map.conn(addr)

    @property
    def connected(self) -> bool:
        conn = self._current()
        return conn is not None and conn.connected

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        conn = self._current()
        return None if conn is None else conn.loop

    # What dq/storage/fence.py asks of a connection (the add deadline): the node's answers.
    @property
    def heard(self) -> float:
        conn = self._current()
        return 0.0 if conn is None else conn.heard

    @property
    def command_timeout(self) -> float:
        conn = self._current()
        return self.map.command_timeout if conn is None else conn.command_timeout

    def deadline(self, seconds: float) -> str:
        conn = self._current()
        return "" if conn is None else conn.deadline(seconds)

    def unread(self) -> bool:
        conn = self._current()
        return conn is not None and conn.unread()

    def close(self) -> None:
        """Drop the connection to the partition's node (a hung one: the checker's call)."""
        conn = self._current()
        if conn is not None:
            conn.close()

    def _unavailable(self, why: object) -> DqError:
        return DqError(UNAVAILABLE, f"redis shard {self.label} is unavailable ({why}); "
                       "retry shortly")

    def send_then(self, callback: ReplyCallback, *args: Any) -> None:
        """As RespConnection.send_then; a command Redis did not run because the slot is
        elsewhere or moving is sent again (from a task) before `callback` hears of it."""
        conn = self._current()
        if conn is None or not conn.connected:
            callback(None, self._unavailable("not connected"))
            return
        tagged = tag_keys(self.tag, args)

        def done(res: Any, exc: BaseException | None) -> None:
            if isinstance(exc, ResponseError) and (_redirect(str(exc)) or _not_now(str(exc))):
                task = asyncio.ensure_future(self._follow(tagged, exc))
                self._tasks.add(task)
                task.add_done_callback(lambda t: self._deliver(t, callback))
                return
            if isinstance(exc, DqError) and exc.err == UNAVAILABLE:
                self._refresh_soon()
            callback(res, exc)

        conn.send_then(done, *tagged)

    def _deliver(self, task: asyncio.Future[Any], callback: ReplyCallback) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            callback(None, self._unavailable("cancelled"))
        else:
            exc = task.exception()
            callback(None if exc is not None else task.result(), exc)

    def _refresh_soon(self) -> None:
        task = asyncio.ensure_future(self.map.refresh())
        self._tasks.add(task)
        task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s", task.exception())

    async def call(self, *args: Any) -> Any:
        tagged = tag_keys(self.tag, args)
        res = await self._follow(tagged, None)
        if str(args[0]).upper() == "SCAN":
            return _untag_scan(self._tag_b, res)
        return res

    async def _follow(self, tagged: tuple[Any, ...], first: BaseException | None) -> Any:
        """Send a tagged command to the slot's node until it runs: after MOVED to the node
        named, after ASK with ASKING on the node named, after TRYAGAIN or CLUSTERDOWN again
        shortly (for SETTLE_FOR seconds)."""
        deadline = time.monotonic() + SETTLE_FOR
        asking: Addr | None = None
        pause = 0.02
        err = first
        for _ in range(REDIRECTS + 200):
            if err is not None:
                msg = str(err)
                where = _redirect(msg)
                if where is not None and where[0] == "MOVED":
                    self.map.moved(where[1], where[2])
                    asking = None
                elif where is not None:
                    asking = where[2]
                elif _not_now(msg):
                    if time.monotonic() >= deadline:
                        raise self._unavailable(msg.split("\n")[0][:120])
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.25)
                    if msg.startswith("CLUSTERDOWN"):
                        await self._try_refresh()
                    asking = None
                else:
                    raise err
            try:
                return await self._send(tagged, asking)
            except ResponseError as exc:
                if not (_redirect(str(exc)) or _not_now(str(exc))):
                    raise
                err = exc
        raise self._unavailable("too many redirections")

    async def _try_refresh(self) -> None:
        try:
            await self.map.refresh()
        except DqError as exc:
            log.debug("%s", exc)

    async def _send(self, tagged: tuple[Any, ...], asking: Addr | None) -> Any:
        """Once, to the slot's node (or with ASKING to `asking`). A node that cannot be
        reached makes the map be read again, and the command go to the node it then names
        (it did not run anywhere); one lost with the command on it fails the command."""
        addr = asking or await self.map.node(self.slot)
        conn = self.map.conn(addr)
        if not conn.connected:
            try:
                await conn.connect()
            except DqError:
                await self._try_refresh()
                addr = asking or await self.map.node(self.slot)
                conn = self.map.conn(addr)
                await conn.connect()
        try:
            if asking is not None:
                ask = conn.call_nowait("ASKING")
                res = conn.call_nowait(*tagged)
                await ask
                return await res
            return await conn.call_nowait(*tagged)
        except DqError as exc:
            if exc.err == UNAVAILABLE:
                self._refresh_soon()
            raise


class PartitionClient:
    """What `Shard.client` offers the timers for one partition: BLPOP on its tagged wake
    lists, at the node that serves its slot (found again after a move or failover)."""

    def __init__(self, cmap: ClusterMap, tag: str) -> None:
        self.map = cmap
        self.tag = tag
        self.slot = key_slot(tag.encode())

    async def blpop(self, keys: Sequence[str], timeout: float = 0) -> Any:
        addr = await self.map.node(self.slot)
        try:
            return await self.map.client(addr).blpop([self.tag + k for k in keys],
                                                     timeout=timeout)
        except ResponseError as exc:
            where = _redirect(str(exc))
            if where is not None and where[0] == "MOVED":
                self.map.moved(where[1], where[2])
            else:
                await self.map.refresh()
            raise
        except Exception:
            await self.map.refresh()
            raise

    async def aclose(self) -> None:
        await self.map.close()


async def warn_stray(shards: Sequence[Any], prefix: str) -> dict[str, dict[str, int]]:
    """Log an error for each cluster that holds jobs in partitions this process does not
    read; per cluster label, what `stray_partitions` found."""
    maps: dict[int, tuple[ClusterMap, list[str]]] = {}
    for shard in shards:
        conn = shard.conn
        if isinstance(conn, PartitionConnection):
            maps.setdefault(id(conn.map), (conn.map, []))[1].append(conn.tag)
    out = {}
    for cmap, tags in maps.values():
        try:
            stray = await stray_partitions(cmap, tags, prefix)
        except (DqError, ResponseError, OSError) as exc:
            log.warning("redis cluster %s: cannot look for jobs in other partitions (%s)",
                        cmap.label, exc)
            continue
        if stray:
            log.error("redis cluster %s holds %d job(s) in %d partition(s) that "
                      "cluster_partitions = %d does not read (%s): it was changed after jobs "
                      "were stored; set it back to the count they were stored with, or move "
                      "them (docs: README, 'Plain shards or a Redis Cluster')", cmap.label,
                      sum(stray.values()), len(stray), len(tags),
                      ", ".join(sorted(stray)[:5]))
        out[cmap.label] = stray
    return out
