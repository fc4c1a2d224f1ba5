"""One process's view of one Redis Cluster (dq/sharding/cluster.py routes by it): which
node serves each slot, read with `CLUSTER SLOTS` from any node that answers, and one
pipelined connection per node, shared by the partitions that live there; and the check
for jobs stored under another `cluster_partitions` count (`warn_stray`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.clusterurl import SLOTS, Addr, ClusterUrl
from dq.sharding.refusals import safe_name
from dq.sharding.resp import RespConnection

log = logging.getLogger("dq.cluster")

REFRESH_GAP = 0.2  # seconds between two CLUSTER SLOTS of one map (a storm asks once)
SILENT = 0.25  # seconds a node owing replies may say nothing before a map refresh asks it last


class ClusterMap:
    """One process's view of one cluster: which node serves each slot, and one pipelined
    connection per node shared by the partitions that live there."""

    def __init__(self, cu: ClusterUrl, *, connect_timeout: float, command_timeout: float,
                 replica_acks: int = 0) -> None:
        self.cu = cu
        # passed on only when set: a RespConnection that waits for replicas takes it
        self._conn_kw: dict[str, Any] = {"replica_acks": replica_acks} if replica_acks else {}
        self.label = safe_name(cu.url)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.slots: list[Addr | None] = [None] * SLOTS
        self.masters: set[Addr] = set()
        self.conns: dict[Addr, RespConnection] = {}
        self.clients: dict[Addr, aioredis.Redis] = {}
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed = 0.0  # monotonic
        self.down_said = -1e9  # monotonic: when a node last answered that the cluster is down
        self.closed = False
        self._tasks: set[asyncio.Future[None]] = set()

    def node_url(self, addr: Addr) -> str:
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"{'rediss' if self.cu.tls else 'redis'}://{self.cu.userinfo}{host}:{addr[1]}/0"

    def conn(self, addr: Addr) -> RespConnection:
        conn = self.conns.get(addr)
        if conn is None:
            conn = self.conns[addr] = RespConnection(
                self.node_url(addr), name=f"{self.label} node {addr[0]}:{addr[1]}",
                connect_timeout=self.connect_timeout, command_timeout=self.command_timeout,
                **self._conn_kw)
        return conn

    def client(self, addr: Addr) -> aioredis.Redis:
        """A redis-py client of one node, for blocking commands (the timers' BLPOP)."""
        client = self.clients.get(addr)
        if client is None:
            client = self.clients[addr] = aioredis.Redis.from_url(
                self.node_url(addr), socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.command_timeout, health_check_interval=0,
                max_connections=64, socket_keepalive=True)
        return client

    async def refresh(self) -> None:
        """Read the slot map again (once for every caller that asks meanwhile, and at most
        every REFRESH_GAP seconds)."""
        if self._refreshing is None:
            if time.monotonic() - self._refreshed < REFRESH_GAP and any(self.slots):
                return
            fut = asyncio.ensure_future(self._refresh())
            self._refreshing = fut
            fut.add_done_callback(self._refresh_done)
        await asyncio.shield(self._refreshing)

    def _silent(self, addr: Addr) -> bool:
        """Whether the node at `addr` owes replies and has sent none for SILENT seconds."""
        conn = self.conns.get(addr)
        return conn is not None and bool(conn.waiting) and \
            time.monotonic() - conn.heard > SILENT

    def _refresh_done(self, fut: asyncio.Future[None]) -> None:
        self._refreshing = None
        self._refreshed = time.monotonic()
        if not fut.cancelled():
            fut.exception()  # retrieved here; the awaiting callers see it too

    def candidates(self) -> list[Addr]:
        """The nodes a refresh asks for the map, in turn: masters we know first (they see the
        newest map soonest), then the seeds; a node that owes replies and has said nothing
        for a while (a hung master, just failed over) last: asked first, it held every add
        waiting on this map past its deadline."""
        return sorted(dict.fromkeys([*sorted(self.masters), *self.conns, *self.cu.seeds]),
                      key=self._silent)

    async def _refresh(self) -> None:
        why: list[str] = []
        for addr in self.candidates():
            try:
                async with asyncio.timeout(self.connect_timeout + 1.0):
                    reply = await self.conn(addr).call("CLUSTER", "SLOTS")
            except (DqError, ResponseError, TimeoutError, OSError) as exc:
                why.append(f"{addr[0]}:{addr[1]}: {exc or 'no answer'}")
                continue
            self._apply(reply, addr)
            return
        raise DqError(UNAVAILABLE, f"redis cluster {self.label}: no node gave its slot map "
                      f"({'; '.join(why)[:300]}); retry shortly")

    def _apply(self, reply: Any, asked: Addr) -> None:
        slots: list[Addr | None] = [None] * SLOTS
        masters: set[Addr] = set()
        for row in reply:
            start, end, master = int(row[0]), int(row[1]), row[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            addr = (host or asked[0], int(master[1]))
            masters.add(addr)
            for s in range(start, end + 1):
                slots[s] = addr
        if masters != self.masters:
            log.info("redis cluster %s: masters %s", self.label,
                     ", ".join(f"{h}:{p}" for h, p in sorted(masters)))
            if self.masters:  # a failover or a new master: be connected before it is used
                for addr in masters - self.masters:
                    self.connect_soon(addr)
        self.slots, self.masters = slots, masters

    def connect_soon(self, addr: Addr) -> None:
        """Open the connection to a node now, in the background: commands routed there
        next find it open (and the add path judges it by its answers, not by a connect
        nobody is making)."""
        conn = self.conn(addr)
        if self.closed or conn.connected:
            return
        task = asyncio.ensure_future(conn.connect())
        self._tasks.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s", task.exception())

    async def node(self, slot: int) -> Addr:
        addr = self.slots[slot]
        if addr is None:
            await self.refresh()
            addr = self.slots[slot]
        if addr is None:
            raise DqError(UNAVAILABLE, f"redis cluster {self.label}: no node serves slot "
                          f"{slot}; retry shortly")
        return addr

    def moved(self, slot: int, addr: Addr) -> None:
        self.slots[slot] = addr
        self._refreshed = 0.0  # the next refresh may go ahead at once
        self.connect_soon(addr)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.conns.values():
            conn.close()
        await asyncio.gather(*(c.aclose() for c in self.clients.values()),
                             return_exceptions=True)


async def stray_partitions(cmap: ClusterMap, tags: Sequence[str], prefix: str,
                           ) -> dict[str, int]:
    """Partitions of another `cluster_partitions` count that hold jobs on the cluster: tag
    -> jobs there. dq reads only the partitions of its count, so jobs under other tags
    would wait forever (the count was changed after jobs were stored)."""
    await cmap.refresh()
    known = set(tags)
    pattern = "{dq:*}" + "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "jobs"
    found: dict[str, int] = {}
    for addr in sorted(cmap.masters):
        conn, cursor = cmap.conn(addr), 0
        while True:
            cursor, keys = await conn.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            for raw in keys:
                key = raw.decode()
                tag = key[:key.index("}") + 1]
                if tag not in known and key == tag + prefix + "jobs":
                    found[tag] = int(await conn.call("HLEN", key))
            cursor = int(cursor)
            if not cursor:
                break
    return {tag: n for tag, n in found.items() if n}


async def warn_stray(shards: Sequence[Any], prefix: str) -> dict[str, dict[str, int]]:
    """Log an error for each cluster that holds jobs in partitions this process does not
    read; per cluster label, what `stray_partitions` found."""
    maps: dict[int, tuple[ClusterMap, list[str]]] = {}
    for shard in shards:
        conn = shard.conn  # a cluster partition's (dq/sharding/cluster.py) has a map
        cmap = getattr(conn, "map", None)
        if isinstance(cmap, ClusterMap):
            maps.setdefault(id(cmap), (cmap, []))[1].append(conn.tag)
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
