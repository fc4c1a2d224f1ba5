"""A lean auto-pipelining Redis connection for the hot path.

Commands are packed by hiredis (RESP) and pipelined: those queued in one event-loop turn
are written with one `transport.write` at its end (`call_nowait`), a batch its caller
gathered itself at once (`send_then`), and replies are matched in order by hiredis. That
is what the server, timers and consumers need per request: no pool, no per-command
timeout object, no per-command task. redis-py is still used for blocking and admin
commands.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeAlias, cast
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import NoScriptError, ResponseError

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.shardurl import mask

log = logging.getLogger("dq.resp")

# Gets a command's reply, or the exception it failed with, as soon as it is read.
ReplyCallback: TypeAlias = Callable[[Any, BaseException | None], None]
Waiter: TypeAlias = "asyncio.Future[Any] | ReplyCallback"
# Writes whose replies wait for a WAIT: (waiter, strict, reply, error), filled in as each
# reply is read; a strict one fails when the WAIT falls short.
Held: TypeAlias = "list[tuple[Waiter, bool, Any, BaseException | None]]"


def safe_name(text: str) -> str:
    """A shard name or URL with any password masked, fit for a log line, an error or the
    health record (a shard from the settings is named by its URL)."""
    return mask(text)


class ShardRefused(DqError):
    """A shard that is up but refuses writes (out of memory, a read-only replica, a failed
    disk save): err "unavailable", with what is wrong in the shard's words. Not a shard
    failure: reads still work there, so its breaker stays closed and an add is not moved
    to another shard (nothing would move it home while the shard refuses writes)."""

    def __init__(self, label: str, what: str, fix: str) -> None:
        self.label, self.what, self.fix = label, what, fix
        super().__init__(UNAVAILABLE, f"redis shard {label} {what}: nothing was written; {fix}")

    def for_add(self) -> DqError:
        """The same refusal, worded for the client whose add it refused."""
        return DqError(UNAVAILABLE, f"redis shard {self.label} {self.what}: job not stored; "
                       f"retry later ({self.fix})")


class ReplicasBehind(ShardRefused):
    """A write the master made but fewer than `replica_acks` replicas confirmed within
    WAIT_MS (Redis WAIT): err "unavailable". Like a refusal it neither opens the shard's
    breaker nor moves an add to another shard: the job is on this shard's master (it may
    still be delivered), and the client's retry of the same id replaces it there."""

    def __init__(self, label: str, wanted: int, got: int | None, why: str = "") -> None:
        self.label, self.wanted, self.got = label, wanted, got
        self.what = (f"stored it on the master but not yet on {wanted} replica(s) within "
                     f"{WAIT_MS} ms ({why or f'{got} confirmed'})")
        self.fix = ("retry: the same id replaces the job, so it is not delivered twice; if "
                    "this goes on, check the replicas (INFO replication) or lower "
                    "replica_acks")
        DqError.__init__(self, UNAVAILABLE, f"redis shard {label} {self.what}; {self.fix}")

    def for_add(self) -> DqError:
        return DqError(UNAVAILABLE, f"redis shard {self.label} {self.what}: the add is not "
                       f"acknowledged; {self.fix}")


# (text in the Redis error, what it means, what the operator does). In a Lua script the
# error comes wrapped ("ERR Error running script ...: -OOM command not allowed ...").
_REFUSALS: tuple[tuple[str, str, str], ...] = (
    ("OOM command not allowed", "is out of memory (maxmemory)",
     "its operator must free memory or raise maxmemory"),
    ("READONLY You can't write", "is a read-only replica",
     "point dq at its master, or at Sentinel with redis+sentinel://"),
    ("MISCONF ", "cannot save to disk (MISCONF) and refuses writes",
     "its operator must fix its disk or save settings"),
)
CLOCK_FRESH = 5.0  # seconds a comparison of the shard's clock with ours is used for
CLOCK_MARGIN_MS = 5  # what the two clocks may drift apart in that while, and more
REFUSAL_LOG_EVERY = 10.0  # seconds between a connection's log lines about refused writes
# With replica_acks, how long (ms) a batch of writes waits for its replicas (Redis WAIT)
# before it fails as ReplicasBehind: well under add_timeout, so that an add is answered
# in time and its shard is not taken for a silent one.
WAIT_MS = 150
# After a WAIT fell short, the writes of the next SHORT_FOR seconds are not waited for
# (a PING marks where their replies end) and fail as ReplicasBehind at once; then one WAIT
# tries again. WAIT holds the connection (and Redis times it out only on its 100 ms
# cron), so waiting for each batch while a replica is gone would leave every other
# command queued behind the refused adds.
SHORT_FOR = 1.0
# The commands that change jobs (every state change is a script): with replica_acks, each
# flush of the connection that carries one is followed by one WAIT.
_PING = b"*1\r\n$4\r\nPING\r\n"
DURABLE = frozenset((b"EVALSHA", "EVALSHA", b"EVAL", "EVAL"))


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (*<n> then $<len> <bytes> per argument), packed by hiredis in C:
    a batch of adds is a few thousand arguments, 2.3x faster than spelling them in Python."""
    try:
        return cast(bytes, hiredis.pack_command(args))
    except TypeError:
        bad = [type(a).__name__ for a in args if type(a) not in (str, int, float, bytes)]
        if not bad:
            raise
        raise TypeError(f"cannot send {bad[0]} to redis") from None


class _Protocol(asyncio.Protocol):
    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn
        self.reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self.conn.heard = time.monotonic()
        waiting = self.conn.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not waiting:  # unsolicited; cannot happen without pub/sub
                continue
            waiter = waiting.popleft()
            error: BaseException | None = None
            if isinstance(reply, hiredis.ReplyError):
                msg = str(reply)
                error = (NoScriptError(msg) if msg.startswith("NOSCRIPT")
                         else self.conn.refusal(msg) or ResponseError(msg))
            if not isinstance(waiter, asyncio.Future):
                _call(waiter, reply, error)
            elif waiter.done():
                continue
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(exc)


def _held(held: Held, waiter: Waiter, strict: bool, reply: Any,
          error: BaseException | None) -> None:
    held.append((waiter, strict, reply, error))


def _call(callback: ReplyCallback, reply: Any, error: BaseException | None) -> None:
    """A reply callback; one that fails must not leave the other replies unmatched."""
    try:
        callback(None if error is not None else reply, error)
    except Exception:
        log.exception("a redis reply callback failed")


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
        self._held: Held | None = None
        # Scripts (by sha) whose callers get their own result even when the WAIT after
        # them falls short: a timer's or consumer's step that, lost with its master, is
        # only done again (dq/sharding/shards.py sets them; adds, deletes and redrives are strict).
        self.lenient: frozenset[str] = frozenset()
        self._short_until = 0.0  # monotonic: writes are not waited for until then
        # One WAIT (or PING) in flight at a time; the writes flushed meanwhile wait for the
        # next, sent when it answers (group commit: they arrive at Redis behind it anyway).
        self._wait_out = False
        self._pending: list[Held] = []
        self._behind = 0  # writes not confirmed by enough replicas since the last log line
        self._behind_logged = -REFUSAL_LOG_EVERY  # monotonic
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
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._connecting: asyncio.Future[None] | None = None
        # The loop of the open connection. asyncio.get_running_loop() costs a getpid()
        # system call in Python 3.11, once per command otherwise.
        self.loop: asyncio.AbstractEventLoop | None = None

    def refusal(self, msg: str) -> DqError | None:
        """The ShardRefused a Redis error message means, if it is a refused write; logged
        as one line per connection every REFUSAL_LOG_EVERY seconds at most, with a count
        (never the command: it holds the job)."""
        found = next((r for r in _REFUSALS if r[0] in msg), None)
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
            make = loop.create_unix_connection(lambda: _Protocol(self), unquote(u.path))
        else:
            host, port = await self._address()
            make = loop.create_connection(lambda: _Protocol(self), host, port, ssl=self._tls())
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
        self._queue(pack(args), self._hold(fut, args) if self.replica_acks
                    and args[0] in DURABLE else fut)
        return fut

    def send_then(self, callback: ReplyCallback, *args: Any) -> None:
        """Write a command now (after any queued before it) on an open connection, for a
        caller that batched the loop turn's work itself; `callback` gets its reply (or
        error) as soon as it is read. No future and no scheduled callback: the hot path
        saves two loop turns. Not connected, the callback gets the error at once. Raises
        only for an argument that cannot be sent, before anything is queued."""
        if self.transport is None or self.transport.is_closing() or self.loop is None:
            _call(callback, None, self._unavailable("not connected"))
            return
        self._out.append(pack(args))
        self._waits(self._hold(callback, args) if self.replica_acks and args[0] in DURABLE
                    else callback)
        self._flush()

    def _queue(self, command: bytes, waiter: Waiter) -> None:
        self._out.append(command)
        self._waits(waiter)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            cast(asyncio.AbstractEventLoop, self.loop).call_soon(self._flush)

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

    def _hold(self, waiter: Waiter, args: tuple[Any, ...]) -> ReplyCallback:
        """A write's waiter, held until the WAIT that follows it in this flush answers.
        It fails when the WAIT falls short unless its script is one of `lenient`."""
        if self._held is None:
            self._held = []
        strict = len(args) < 2 or args[1] not in self.lenient
        return functools.partial(_held, self._held, waiter, strict)

    def _send_wait(self, groups: list[Held]) -> None:
        """Queue the WAIT (or, while replicas are known missing, a PING) whose answer
        releases these writes' replies; written with the next flush."""
        self._wait_out = True
        if self._short_until > time.monotonic():
            self._out.append(_PING)
            self.waiting.append(functools.partial(self._release, groups, waited=False))
        else:
            self._out.append(pack(("WAIT", self.replica_acks, WAIT_MS)))
            self.waiting.append(functools.partial(self._release, groups))

    def _release(self, groups: list[Held], reply: Any, error: BaseException | None, *,
                 waited: bool = True) -> None:
        """The WAIT after a flush's writes answered: they are told their own results when
        enough replicas confirmed them, else ReplicasBehind (a write that failed on its
        own is told its own error). Not `waited`: the PING sent instead of a WAIT while
        replicas are known to be missing answered."""
        short: BaseException | None = None
        if error is not None:
            short = ReplicasBehind(self.label, self.replica_acks, None, f"no answer: {error}")
        elif not waited:
            short = ReplicasBehind(self.label, self.replica_acks, None, "the last wait fell "
                                   "short; waiting again within a second")
        elif not isinstance(reply, int) or reply < self.replica_acks:
            short = ReplicasBehind(self.label, self.replica_acks, reply)
            self._short_until = time.monotonic() + SHORT_FOR
        else:
            self._short_until = 0.0
        self._wait_out = False
        held = [item for group in groups for item in group]
        if short is not None and held:
            self._behind += len(held)
            now = time.monotonic()
            if now >= self._behind_logged + REFUSAL_LOG_EVERY:
                log.warning("redis shard %s: %d write(s) not confirmed by %d replica(s) "
                            "within %d ms since the last report (%s); they are answered "
                            "unavailable", self.label, self._behind, self.replica_acks,
                            WAIT_MS, error or f"WAIT said {reply}")
                self._behind_logged, self._behind = now, 0
        for waiter, strict, res, exc in held:
            if exc is None and short is not None and strict:
                res, exc = None, short
            if not isinstance(waiter, asyncio.Future):
                _call(waiter, res, exc)
            elif waiter.done():
                continue
            elif exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(res)
        if self._pending and self.connected:
            pending, self._pending = self._pending, []
            self._send_wait(pending)
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._held is not None and self.transport is not None \
                and not self.transport.is_closing():
            # The writes of this flush, then one WAIT whose answer releases their replies.
            if self._wait_out:
                self._pending.append(self._held)
            else:
                self._send_wait([self._held])
            self._held = None
        if self._out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self._out)
            self._out.clear()
            try:
                self.transport.write(data)
            except Exception:  # not seen with asyncio's or uvloop's transports
                # Its commands are lost: closing tells their waiters (lost()), once.
                log.exception("writing to redis shard %s failed; reconnecting", self.label)
                self.transport.abort()
        self._out.clear()

    def lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        err = self._unavailable(self._why or exc or "connection closed")
        while self.waiting:
            waiter = self.waiting.popleft()
            if not isinstance(waiter, asyncio.Future):
                _call(waiter, None, err)
            elif not waiter.done():
                waiter.set_exception(err)
        groups = self._pending + ([self._held] if self._held is not None else [])
        self._pending, self._held, self._wait_out = [], None, False
        if groups:  # writes flushed with no WAIT yet, or never flushed: each gets `err`
            self._release(groups, None, err)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
