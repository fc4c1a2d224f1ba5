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
`CLUSTERDOWN`); `MOVED` and `ASK` (`ASKING` first) are followed; `TRYAGAIN` (a slot half
moved by a reshard) and `CLUSTERDOWN Hash slot not served` are tried again for a while. A
command is sent again only when Redis said it did not run it (`MOVED`, `ASK`, `TRYAGAIN`,
`CLUSTERDOWN`, or a connection that could not be made); a connection lost with a command
on it fails that command as unavailable, as on a plain shard.

The add path's deadline (add_timeout, dq/storage/fence.py) holds on a cluster too: a
partition whose commands are held back by `TRYAGAIN` counts as silent (`heard`), so an
add held there is given up in time and stored on another partition; `CLUSTERDOWN The
cluster is down` (a failover under way, every slot refuses) fails at once as
unavailable; and a partition's failure opens the breakers of the partitions that share
its fate (its node's, or all of them while the cluster is down), so the next adds go to
a partition elsewhere, or are answered unavailable, at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.clustermap import ClusterMap, warn_stray
from dq.sharding.clusterurl import Addr, key_slot
from dq.sharding.refusals import safe_name
from dq.sharding.resp import RespConnection
from dq.sharding.respproto import ReplyCallback

__all__ = ["ClusterMap", "PartitionClient", "PartitionConnection", "tag_keys", "warn_stray"]

log = logging.getLogger("dq.cluster")

REDIRECTS = 16  # MOVED/ASK hops one command may take before it fails
# How long a command keeps being tried while the cluster says "not now" (TRYAGAIN during a
# reshard, CLUSTERDOWN for one slot during a failover) before it fails as unavailable (an
# add is given up sooner, at add_timeout: see `heard`).
SETTLE_FOR = 3.0
CLUSTER_DOWN = "CLUSTERDOWN The cluster is down"  # every slot refuses, not one
DOWN_FRESH = 1.0  # seconds a "cluster is down" makes a partition's failure all of theirs


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
        # Commands waiting out a TRYAGAIN or CLUSTERDOWN (`_follow`), and the last time one
        # began to, or a command of the partition was answered, since: see `heard`.
        self._held = 0
        self._held_heard = 0.0  # monotonic
        # The node connections with commands of this partition on them (how many), which
        # may be other than the current node's after a failover or a move: see `heard`.
        self._sent: dict[RespConnection, int] = {}

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
        """When the partition last answered (monotonic). A node that answers TRYAGAIN or
        CLUSTERDOWN does not answer the commands it holds back: while any is, this is when
        that began (or a later real answer), so the add path gives up on an add held there
        after add_timeout, as on a silent shard, and stores it elsewhere or answers
        unavailable, instead of waiting out SETTLE_FOR. The node is the one the commands
        waiting went to (the least recently heard of them): after a failover the slot's new
        node answers, but not for what went to the old one. Both at once: the older (a
        command held back while another still waits on the old, hung node: the answers to
        the held ones must not hide that one's silence)."""
        heard = [conn.heard for conn in self._sent]
        if self._held:
            heard.append(self._held_heard)
        if heard:
            return min(heard)
        conn = self._current()
        return 0.0 if conn is None else conn.heard

    def _sending(self, conn: RespConnection) -> None:
        self._sent[conn] = self._sent.get(conn, 0) + 1

    def _answered(self, conn: RespConnection) -> None:
        left = self._sent.get(conn, 1) - 1
        if left > 0:
            self._sent[conn] = left
        else:
            self._sent.pop(conn, None)
        if self._held:
            self._held_heard = time.monotonic()

    def fails_with(self, other: object) -> str:
        """Why a failure of this partition is taken for one of `other` too (its breaker
        opens with this one's, dq/sharding/shards.py), or '': it lives on the same node,
        or the cluster said lately that it is down (CLUSTERDOWN: every slot refuses)."""
        if not isinstance(other, PartitionConnection) or other.map is not self.map:
            return ""
        if time.monotonic() - self.map.down_said < DOWN_FRESH:
            return "the cluster says it is down"
        addr = self.map.slots[self.slot]
        if addr is None or self.map.slots[other.slot] != addr:
            return ""
        return f"its node {addr[0]}:{addr[1]} failed"

    @property
    def command_timeout(self) -> float:
        conn = self._current()
        return self.map.command_timeout if conn is None else conn.command_timeout

    def deadline(self, seconds: float) -> str:
        conn = self._current()
        return "" if conn is None else conn.deadline(seconds)

    async def connect(self) -> None:
        """Connect to the partition's node (the map read first if it names none), its clock
        compared: a fenced add needs that before it is sent (dq/storage/fence.py)."""
        if self.map.slots[self.slot] is None:
            await self.map.refresh()
        if (conn := self._current()) is None:
            raise self._unavailable("no node serves its slot")
        await conn.connect()

    def silent(self) -> None:
        """An add found the partition silent for add_timeout: read the slot map again (the
        silent node asked last). A failover may have moved the slot, and while the old node
        hangs nothing else says so (its MOVED comes when it wakes)."""
        self._refresh_soon()

    def unread(self) -> bool:
        conns = list(self._sent) or [c for c in (self._current(),) if c is not None]
        return any(conn.unread() for conn in conns)

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
            self._answered(conn)
            if isinstance(exc, ResponseError) and (_redirect(str(exc)) or _not_now(str(exc))):
                task = asyncio.ensure_future(self._follow(tagged, exc))
                self._tasks.add(task)
                task.add_done_callback(lambda t: self._deliver(t, callback))
                return
            if isinstance(exc, DqError) and exc.err == UNAVAILABLE:
                self._refresh_soon()
            callback(res, exc)

        self._sending(conn)
        try:
            conn.send_then(done, *tagged)
        except Exception:  # an argument that cannot be sent: nothing was
            self._answered(conn)
            raise

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
        named, after ASK with ASKING on the node named, after TRYAGAIN or CLUSTERDOWN (of
        one slot) again shortly, for SETTLE_FOR seconds (held back meanwhile, see `heard`);
        a whole cluster down fails it at once."""
        deadline = time.monotonic() + SETTLE_FOR
        asking: Addr | None = None
        pause = 0.02
        err = first
        held = False
        try:
            for _ in range(REDIRECTS + 200):
                if err is not None:
                    msg = str(err)
                    where = _redirect(msg)
                    if where is not None and where[0] == "MOVED":
                        self.map.moved(where[1], where[2])
                        asking = None
                    elif where is not None:
                        asking = where[2]
                    elif msg.startswith(CLUSTER_DOWN):
                        # Every slot refuses until a failover ends: no partition can take
                        # the command meanwhile, and waiting would hold an add past its
                        # deadline. Unavailable at once; the partitions' breakers open
                        # together (`fails_with`).
                        self.map.down_said = time.monotonic()
                        self._refresh_soon()
                        raise self._unavailable(msg.split("\n")[0][:120])
                    elif _not_now(msg):
                        if not held:
                            held = self._hold()
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
        finally:
            if held:
                self._held -= 1
        raise self._unavailable("too many redirections")

    def _hold(self) -> bool:
        """A command of the partition is held back by TRYAGAIN or CLUSTERDOWN."""
        if not self._held:
            self._held_heard = time.monotonic()
        self._held += 1
        return True

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
        self._sending(conn)
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
        finally:
            self._answered(conn)


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
