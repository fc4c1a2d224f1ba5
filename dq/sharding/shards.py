"""Redis shards: connections, auto-pipelining, loading the scripts storage hands in, routing.

Every call a process makes to a shard goes through `Shard.call` on one pipelined
connection (dq/sharding/resp.py): what is queued in one event-loop turn goes out in one write, and
a loop turn's adds (or acks) are one script call (dq/storage/batch.py). So a server with 50 busy
connections talks to each shard in batches, not one command per round trip.
`Shard.client` (redis-py) is kept for blocking and admin commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError

from dq.errors import UNAVAILABLE, DqError
from dq.sharding import cluster, clusterurl, shardurl
from dq.sharding.refusals import ShardRefused, safe_name
from dq.sharding.resp import RespConnection
from dq.sharding.sentinel import SentinelConnection, sentinel_client

if TYPE_CHECKING:
    from dq.sharding.health import HealthReader

log = logging.getLogger("dq.shards")

# name -> (sha1, source) of the Lua scripts, and the shas of those whose result is used
# even when fewer replicas than replica_acks have it: given by the storage layer
# (dq/storage/scripts.py registers them when imported). Shards only load and call them.
SCRIPTS: dict[str, tuple[str, str]] = {}
LENIENT: set[str] = set()


def register_scripts(scripts: Mapping[str, tuple[str, str]], *, lenient: Iterable[str]) -> None:
    """Take the scripts shards load and call by name, and the names of the `lenient` ones
    (see RespConnection.lenient; every shard shares the one set, made before or after)."""
    SCRIPTS.update(scripts)
    LENIENT.update(SCRIPTS[name][0] for name in lenient)


# A connect that takes longer than this counts as a failure: adds must not wait on a dead
# shard. TLS handshakes (rediss://, maybe across a WAN) get more time.
CONNECT_TIMEOUT = 0.5
CONNECT_TIMEOUT_TLS = 1.5
# After an "unavailable" failure the shard's circuit opens: calls fail at once (and
# `up` is False, so adds go to the next shard) for a cool-off that doubles on each failed
# trial call, up to the maximum. The first success closes it.
COOLOFF_MIN = 1.0
COOLOFF_MAX = 5.0


def _weight(name: str, key: str) -> int:
    """The rendezvous weight of a shard for a key: blake2b-64 of "<name>\\0<key>"."""
    return int.from_bytes(hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest(), "big")


class Shard:
    """One Redis server: a client, its batched command queue and its health.

    `up` is what routing asks: the shard is marked up (by the checker's shared record,
    see dq/sharding/health.py) and its local circuit breaker is closed.
    """

    def __init__(self, name: str, url: str, *, connect_timeout: float | None = None,
                 command_timeout: float = 5.0, replica_acks: int = 0, conn: Any = None,
                 client: Any = None) -> None:
        self.name = name
        self.label = safe_name(name)  # the name, shown: without a password
        self.url = url
        self._name_hash = hashlib.blake2b(f"{name}\0".encode(), digest_size=8)
        if connect_timeout is None:
            connect_timeout = CONNECT_TIMEOUT_TLS if url.startswith("rediss") \
                else CONNECT_TIMEOUT
        self.conn: RespConnection
        self.client: aioredis.Redis
        self._sentinel: Sentinel | None = None
        if conn is not None:  # a partition of a Redis Cluster (dq/sharding/cluster.py)
            self.conn, self.client = conn, client
        elif shardurl.kind_of(url) == shardurl.SENTINEL:
            # The master the sentinels name, found again after a failover (dq/sharding/sentinel.py).
            self.client, self._sentinel = sentinel_client(
                url, connect_timeout=connect_timeout, command_timeout=command_timeout)
            self.conn = SentinelConnection(url, name=name, connect_timeout=connect_timeout,
                                           command_timeout=command_timeout,
                                           replica_acks=replica_acks)
        else:
            # redis-py refuses TCP-only options on unix:// URLs (the embedded default).
            tcp = {} if url.startswith("unix:") else {"socket_keepalive": True}
            self.client = aioredis.Redis.from_url(
                url, socket_connect_timeout=connect_timeout, socket_timeout=command_timeout,
                health_check_interval=0, max_connections=64, **tcp,
            )
            self.conn = RespConnection(url, name=name, connect_timeout=connect_timeout,
                                       command_timeout=command_timeout,
                                       replica_acks=replica_acks)
        if isinstance(self.conn, RespConnection):
            self.conn.lenient = LENIENT
        self.marked_up = True
        self.has_guests = False  # the checker saw guests here (dq/sharding/health.py)
        self.guests_until = 0  # epoch ms: this process wrote a guest here lately
        self.down_since = 0.0
        self.failures = 0
        self.health: HealthReader | None = None
        self.open_until = 0.0  # monotonic; the breaker is open before this
        self._cooloff = 0.0
        self._broken = ""  # why the breaker is open, for the fail-fast error
        self._loading: asyncio.Future[Any] | None = None
        # The other partitions of a Redis Cluster (cluster_shards): those that fail with
        # this one (its node's, or all while the cluster is down) open their breakers too.
        self.siblings: Sequence[Shard] = ()

    def __repr__(self) -> str:
        return f"<Shard {self.label} {'up' if self.up else 'down'}>"

    def weight(self, key: bytes) -> int:
        """`_weight(self.name, key)`, from a hash state that has already read the name."""
        h = self._name_hash.copy()
        h.update(key)
        return int.from_bytes(h.digest(), "big")

    @property
    def up(self) -> bool:
        """Marked up and the breaker closed: adds may be routed here."""
        if self.health is not None:
            self.health.poll()
        return self.marked_up and (not self.open_until or time.monotonic() >= self.open_until)

    async def call(self, *args: Any) -> Any:
        """Send one command on the shard's pipelined connection and wait for its reply.

        Fails at once with "unavailable" while the breaker is open."""
        if self.open_until and time.monotonic() < self.open_until:
            raise DqError(UNAVAILABLE, self._broken)
        try:
            res = await self.conn.call(*args)
        except DqError as exc:
            self._mark_failure(exc)
            raise
        if self.failures:
            self._recovered()
        return res

    async def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a dq/lua script by name (EVALSHA, batched; reloaded when Redis lost it)."""
        return await self.evalsha((SCRIPTS[name][0], len(keys), *keys, *args))

    async def evalsha(self, args: tuple[Any, ...]) -> Any:
        """EVALSHA sha numkeys keys... args...; scripts are reloaded when Redis lost them."""
        try:
            return await self.call("EVALSHA", *args)
        except NoScriptError:
            await self.load_scripts()
            return await self.call("EVALSHA", *args)

    async def load_scripts(self) -> None:
        """Load every script (after a restart Redis has none). Concurrent callers share
        one load instead of each sending its own."""
        if self._loading is None:
            loads = [self.call("SCRIPT", "LOAD", src) for _sha, src in SCRIPTS.values()]
            fut: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*loads))
            fut.add_done_callback(self._loaded)
            self._loading = fut
        await asyncio.shield(self._loading)

    def _loaded(self, fut: asyncio.Future[Any]) -> None:
        self._loading = None
        if not fut.cancelled():
            fut.exception()  # retrieved here; the awaiting callers see it too

    def open_error(self) -> DqError | None:
        """The error a call fails with at once while the breaker is open, else None."""
        if self.open_until and time.monotonic() < self.open_until:
            return DqError(UNAVAILABLE, self._broken)
        return None

    async def connect(self) -> None:
        """Open the shard's connection now (a failure counts, as a failed call does)."""
        if (err := self.open_error()) is not None:
            raise err
        try:
            await self.conn.connect()
        except DqError as exc:
            self._mark_failure(exc)
            raise

    def suspect(self, why: str) -> None:
        """An add found the shard silent (add_timeout): pass it over for a while, as if a
        call had failed, so that the next adds go to the next shard at once."""
        self._mark_failure(DqError(UNAVAILABLE, f"redis shard {self.label} {why}; retry "
                                   "shortly"))

    def _mark_failure(self, exc: DqError) -> None:
        self.failures += 1
        if exc.err != UNAVAILABLE or isinstance(exc, ShardRefused):
            return  # a shard that refuses writes still answers: reads go on there
        now = time.monotonic()
        if now < self.open_until:
            return  # a call sent before the breaker opened: not a new trial
        if now > self.open_until + COOLOFF_MAX:
            self._cooloff = 0.0  # a new incident, not a failed trial of the last one
        self._cooloff = min(COOLOFF_MAX, self._cooloff * 2) if self._cooloff else COOLOFF_MIN
        self.open_until = now + self._cooloff
        self._broken = exc.msg
        with_it = self._open_siblings()
        if self._cooloff == COOLOFF_MIN:
            log.warning("redis shard %s failed: %s; calls fail fast for %.1f s%s", self.label,
                        exc, self._cooloff, f" (and on {with_it} partition(s) that "
                        "fail with it)" if with_it else "")

    def _open_siblings(self) -> int:
        """Open, with this one's, the breakers of the cluster partitions that fail with it
        (dq/sharding/cluster.py `fails_with`): the next adds go to a partition elsewhere at
        once, or are answered unavailable at once. How many were opened."""
        conn, n = cast(Any, self.conn), 0
        for other in self.siblings:
            why = conn.fails_with(other.conn) if other.open_until < self.open_until else ""
            if why and other is not self:
                other.open_until, n = self.open_until, n + 1
                other._broken = f"redis shard {other.label} is unavailable ({why}); retry shortly"
        return n

    def _recovered(self) -> None:
        if self.open_until:
            log.info("redis shard %s answers again", self.label)
        self.failures = 0
        self.open_until = 0.0
        self._cooloff = 0.0
        self._broken = ""

    def mark(self, up: bool) -> None:
        """Record the shared health verdict (the breaker is separate and local)."""
        if up != self.marked_up:
            self.marked_up = up
            self.down_since = 0.0 if up else time.time()

    async def close(self) -> None:
        self.conn.close()
        await self.client.aclose()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                await s.aclose()


def cluster_shards(name: str, url: str, n: int, *, connect_timeout: float | None = None,
                   command_timeout: float = 5.0, replica_acks: int = 0) -> list[Shard]:
    """The `n` partitions of a Redis Cluster, each a Shard whose keys carry its hash tag.
    `replica_acks` goes to each node's connection (as on a plain shard's)."""
    if not 1 <= n <= clusterurl.MAX_PARTITIONS:
        raise ValueError(f"cluster_partitions must be 1 to {clusterurl.MAX_PARTITIONS} (got {n})")
    timeout = CONNECT_TIMEOUT_TLS if url.startswith("rediss") else CONNECT_TIMEOUT
    cmap = cluster.ClusterMap(clusterurl.parse_url(url), connect_timeout=connect_timeout or timeout,
                              command_timeout=command_timeout, replica_acks=replica_acks)
    out = []
    for i, tag in enumerate(clusterurl.partition_tags(n)):
        part = f"{name}#{i}"
        out.append(Shard(part, url, conn=cluster.PartitionConnection(cmap, tag, part),
                         client=cluster.PartitionClient(cmap, tag)))
    for shard in out:
        shard.siblings = out
    return out


class ShardSet:
    """The shards of a store and the rendezvous order of each tid over their names.

    `shards` is every shard to work (timers, consumers, get, del and the console go through
    all of them); `retired` ones (the embedded Redis once real shards are configured, see
    dq/sharding/plan.py) come last, own no tid and never take an add."""

    def __init__(self, shards: Sequence[Shard], retired: Sequence[Shard] = ()) -> None:
        if not shards:
            raise ValueError("at least one redis shard is needed")
        self.writers = list(shards)
        self.retired = list(retired)
        self.shards = [*self.writers, *self.retired]
        self.by_name = {s.name: s for s in self.shards}

    @classmethod
    def from_urls(cls, urls: Iterable[str] | Iterable[tuple[str, str]],
                  retired: Iterable[tuple[str, str]] = (), *,
                  cluster_partitions: int = 16, **kw: Any) -> ShardSet:
        """Shards from URLs (each named by its URL) or (name, url) pairs; `retired` ones
        (plain shards) are worked but take no add. A Redis Cluster URL gives
        `cluster_partitions` shards, named `<name>#<i>` (dq/sharding/cluster.py)."""
        shards = []
        for item in urls:
            name, url = (item, item) if isinstance(item, str) else item
            if clusterurl.is_cluster_url(url):
                shards += cluster_shards(name, url, cluster_partitions, **kw)
            else:
                shards.append(Shard(name, url, **kw))
        return cls(shards, [Shard(name, url, **kw) for name, url in retired])

    def order(self, tid: str) -> list[Shard]:
        """All shards, the tid's owner first (rendezvous hashing over shard names), the
        retired ones last."""
        return [*self._ranked(tid), *self.retired] if self.retired else self._ranked(tid)

    def _ranked(self, tid: str) -> list[Shard]:
        if len(self.writers) == 1:
            return self.writers
        key = tid.encode()
        return sorted(self.writers, key=lambda s: s.weight(key), reverse=True)

    def owner(self, tid: str) -> Shard:
        """The shard with the highest weight for the tid (the first of equals), spelled out:
        it runs once per add. Digests of one length compare as their big-endian ints do."""
        shards = self.writers
        if len(shards) == 1:
            return shards[0]
        key = tid.encode()
        best, top = shards[0], b""
        for shard in shards:
            h = shard._name_hash.copy()
            h.update(key)
            digest = h.digest()
            if digest > top:
                best, top = shard, digest
        return best

    def writable(self, tid: str, exclude: Collection[str] = ()) -> Shard:
        """The shard an add goes to: the owner, or the next healthy one while it is down.

        Shards named in `exclude` (one just failed this add) are passed over too; when
        none is healthy, the first one not excluded is returned (and will say why)."""
        return self.route(tid, exclude)[0]

    def route(self, tid: str, exclude: Collection[str] = ()) -> tuple[Shard, bool]:
        """`writable`, and whether that shard is the tid's owner (else the job written
        there is a guest, to be moved home when the owner is back)."""
        if not exclude:  # the hot path: the owner, found without sorting the others
            owner = self.owner(tid)
            if owner.up:
                return owner, True
        order = self._ranked(tid)  # never a retired shard
        for shard in order:
            if shard.up and shard.name not in exclude:
                return shard, shard is order[0]
        for shard in order:
            if shard.name not in exclude:
                return shard, shard is order[0]
        return order[0], True

    def attach_health(self, reader: HealthReader) -> None:
        """Let the shared health record (dq/sharding/health.py) mark these shards up and down."""
        reader.attach(self.shards)

    async def load_scripts(self) -> None:
        await asyncio.gather(*(s.load_scripts() for s in self.shards), return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards), return_exceptions=True)
