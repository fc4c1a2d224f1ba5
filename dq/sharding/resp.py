"""A lean auto-pipelining Redis connection for the hot path.

Commands are packed by hiredis (RESP) and pipelined: those queued in one event-loop turn
are written with one `transport.write` at its end (`call_nowait`), a batch its caller
gathered itself at once (`send_then`), and replies are matched in order by hiredis. That
is what the server, timers and consumers need per request: no pool, no per-command
timeout object, no per-command task. redis-py is still used for blocking and admin
commands. The RESP codec is in dq/sharding/respproto.py, the WAITs of replica_acks in
dq/sharding/replicawait.py, the refusals a shard answers with in dq/sharding/refusals.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import ssl
import time
from collections.abc import Set as AbstractSet
from typing import Any, cast
from urllib.parse import unquote, urlparse

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.refusals import (
    REFUSAL_LOG_EVERY,
    REFUSALS,
    ShardRefused,
    safe_name,
)
from dq.sharding.replicawait import DURABLE, ReplicaWaits
from dq.sharding.respproto import ReplyCallback, RespProtocol, Waiter, call_back, pack, settle

log = logging.getLogger("dq.resp")

CLOCK_FRESH = 5.0  # seconds a comparison of the shard's clock with ours is used for
CLOCK_MARGIN_MS = 5  # what the two clocks may drift apart in that while, and more


class RespConnection:
    """One connection to one Redis, (re)connected on demand, commands pipelined.

    A Redis that stops answering (a hung host, a network that drops packets, a stopped
    process) keeps the connection open, so nothing would ever fail: when commands are
    waiting and no reply has come for `command_timeout` seconds, the connection is dropped
    and everything waiting on it fails as unavailable (callers retry, or the shard's
    breaker opens). One timer per connection checks this, not one per command."""

    def __init__(self, url: str, *, name: str, connect_timeout: float = 1.0,
                 command_timeout: float = 5.0, replica_acks: int = 0) -> None:
        self.url = url
        # Writes (scripts) are answered once this many replicas have them (Redis WAIT, one
        # per flush that carries any): their replies are held until the WAIT's arrives.
        self.replica_acks = replica_acks
        self.waits = ReplicaWaits(self)
        # Scripts (by sha) whose callers get their own result even when the WAIT after
        # them falls short: a timer's or consumer's step that, lost with its master, is
        # only done again (dq/sharding/shards.py sets them; adds, deletes and redrives are strict).
        self.lenient: AbstractSet[str] = frozenset()
        self.name = name
        self.label = safe_name(name)  # the name, shown: without a password
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[Waiter] = collections.deque()
        # monotonic: the last reply, or the send that found nothing waiting, if later
        self.heard = 0.0
        self._watch: asyncio.TimerHandle | None = None
        self._why = ""  # why this side dropped the connection
        # The shard's clock (epoch ms) minus this process's monotonic ms, from its last TIME:
        # never more than the true difference (the reply is read after TIME ran), so a
        # deadline built from it falls no later on the shard than meant (`deadline`).
        self.clock_ms: float | None = None
        self._clock_at = 0.0  # monotonic: when clock_ms was measured
        self._clock_asked = False
        self._refused = 0  # writes the shard refused since the last log line about them
        self._refusal_logged = -REFUSAL_LOG_EVERY  # monotonic
        self.out: list[bytes] = []
        self._flush_scheduled = False
        self._connecting: asyncio.Future[None] | None = None
        # The loop of the open connection. asyncio.get_running_loop() costs a getpid()
        # system call in Python 3.11, once per command otherwise.
        self.loop: asyncio.AbstractEventLoop | None = None

    def refusal(self, msg: str) -> DqError | None:
        """The ShardRefused a Redis error message means, if it is a refused write; logged
        as one line per connection every REFUSAL_LOG_EVERY seconds at most, with a count
        (never the command: it holds the job)."""
        found = next((r for r in REFUSALS if r[0] in msg), None)
        if found is None:
            return None
        _, what, fix = found
        self._refused += 1
        now = time.monotonic()
        if now >= self._refusal_logged + REFUSAL_LOG_EVERY:
            log.warning("redis shard %s %s: %d write(s) refused since the last report; %s",
                        self.label, what, self._refused, fix)
            self._refusal_logged, self._refused = now, 0
        return ShardRefused(self.label, what, fix)

    def _unavailable(self, why: object) -> DqError:
        return DqError(UNAVAILABLE, f"redis shard {self.label} is unavailable ({why}); "
                       "retry shortly")

    async def _address(self) -> tuple[str, int]:
        """Where the Redis to write to is: the URL's host and port (a Sentinel shard asks
        its sentinels, dq/sharding/sentinel.py)."""
        u = urlparse(self.url)
        return u.hostname or "127.0.0.1", u.port or 6379

    def _tls(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if urlparse(self.url).scheme == "rediss" else None

    def _hello(self) -> list[tuple[Any, ...]]:
        """AUTH and SELECT, as the URL asks, sent first on each new connection."""
        u = urlparse(self.url)
        hello: list[tuple[Any, ...]] = []
        if u.password:
            user = unquote(u.username) if u.username else None
            hello.append(("AUTH", user, unquote(u.password)) if user
                         else ("AUTH", unquote(u.password)))
        db = (u.path or "/0").strip("/") if u.scheme != "unix" else ""
        if db and db != "0":
            hello.append(("SELECT", db))
        return hello

    async def _verify(self) -> None:
        """Checks on a new connection once hello is done (a Sentinel shard's: a master)."""

    async def _open(self) -> None:
        u = urlparse(self.url)
        loop = self.loop = asyncio.get_running_loop()
        if u.scheme == "unix":
            make = loop.create_unix_connection(lambda: RespProtocol(self), unquote(u.path))
        else:
            host, port = await self._address()
            make = loop.create_connection(lambda: RespProtocol(self), host, port, ssl=self._tls())
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, _ = await make
        except (OSError, TimeoutError) as exc:
            raise self._unavailable(exc or "connect timed out") from None
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._why = ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for cmd in self._hello():
            await self.call(*cmd)
        await self._verify()
        self._clock(await self.call("TIME"), None)

    def _clock(self, reply: Any, error: BaseException | None) -> None:
        self._clock_asked = False
        if error is None and isinstance(reply, list) and len(reply) == 2:
            now = time.monotonic()
            self.clock_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000 - now * 1000
            self._clock_at = now

    def silent(self) -> None:
        """An add found this connection silent for add_timeout (dq/storage/fence.py). A
        plain shard has nothing to learn from that; a Sentinel shard hears of a failover
        from the sentinels (+switch-master)."""

    def unread(self) -> bool:
        """Whether the socket holds bytes this side has not read yet (or has reached its
        end): the shard answered, and only this process's busy loop is behind."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            peek = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return False
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # broken: the loop will read the error
        finally:
            peek.close()

    def deadline(self, seconds: float) -> str:
        """The shard-clock epoch ms `seconds` from now, less a margin for the clocks'
        drift since they were compared; '' when they have not been (no deadline). The
        comparison is renewed (one TIME) when older than CLOCK_FRESH."""
        if self.clock_ms is None:
            return ""
        now = time.monotonic()
        if now - self._clock_at > CLOCK_FRESH and not self._clock_asked and self.connected:
            self._clock_asked = True
            self.send_then(self._clock, "TIME")
        return str(int(now * 1000 + self.clock_ms + seconds * 1000) - CLOCK_MARGIN_MS)

    async def connect(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        fut = self._connecting
        try:
            await asyncio.shield(fut)
        finally:
            if fut.done():
                self._connecting = None

    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def call_nowait(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a command on an open connection; its reply resolves the future."""
        if self.transport is None or self.transport.is_closing() or self.loop is None:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_exception(self._unavailable("not connected"))
            return fut
        fut = self.loop.create_future()
        self._queue(pack(args), self.waits.hold(fut, args) if self.replica_acks
                    and args[0] in DURABLE else fut)
        return fut

    def send_then(self, callback: ReplyCallback, *args: Any) -> None:
        """Write a command now (after any queued before it) on an open connection, for a
        caller that batched the loop turn's work itself; `callback` gets its reply (or
        error) as soon as it is read. No future and no scheduled callback: the hot path
        saves two loop turns. Not connected, the callback gets the error at once. Raises
        only for an argument that cannot be sent, before anything is queued."""
        if self.transport is None or self.transport.is_closing() or self.loop is None:
            call_back(callback, None, self._unavailable("not connected"))
            return
        self.out.append(pack(args))
        self._waits(self.waits.hold(callback, args) if self.replica_acks and args[0] in DURABLE
                    else callback)
        self.flush()

    def _queue(self, command: bytes, waiter: Waiter) -> None:
        self.out.append(command)
        self._waits(waiter)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            cast(asyncio.AbstractEventLoop, self.loop).call_soon(self.flush)

    def _waits(self, waiter: Waiter) -> None:
        """Add a waiter for the next reply, and watch that replies keep coming."""
        if not self.waiting:
            self.heard = time.monotonic()  # the clock starts now, not at the last reply
        self.waiting.append(waiter)
        if self._watch is None:
            self._watch = cast(asyncio.AbstractEventLoop, self.loop).call_later(
                self.command_timeout / 2, self._check)

    def _check(self) -> None:
        """Drop a connection whose Redis has not answered for command_timeout seconds
        while commands wait; look again in half that while they do."""
        self._watch = None
        if not self.waiting or self.transport is None or self.transport.is_closing():
            return
        if time.monotonic() - self.heard >= self.command_timeout:
            self._why = f"no reply within {self.command_timeout:g} s"
            log.warning("redis shard %s: %s with %d command(s) waiting; dropping the "
                        "connection", self.label, self._why, len(self.waiting))
            self.transport.abort()
            return
        self._watch = cast(asyncio.AbstractEventLoop, self.loop).call_later(
            self.command_timeout / 2, self._check)

    async def call(self, *args: Any) -> Any:
        if self.transport is None or self.transport.is_closing():
            await self.connect()
        return await self.call_nowait(*args)

    def flush(self) -> None:
        """Write everything queued in one `transport.write` (with replica_acks, one WAIT
        after the writes among it)."""
        self._flush_scheduled = False
        if self.replica_acks:
            self.waits.flushing()
        if self.out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self.out)
            self.out.clear()
            try:
                self.transport.write(data)
            except Exception:  # not seen with asyncio's or uvloop's transports
                # Its commands are lost: closing tells their waiters (lost()), once.
                log.exception("writing to redis shard %s failed; reconnecting", self.label)
                self.transport.abort()
        self.out.clear()

    def lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        err = self._unavailable(self._why or exc or "connection closed")
        while self.waiting:
            settle(self.waiting.popleft(), None, err)
        self.waits.lost(err)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
