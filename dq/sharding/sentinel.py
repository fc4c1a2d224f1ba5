"""Shards on Redis Sentinel: the master is found through the sentinels, and found again.

A `redis+sentinel://s1:26379,s2:26379/mymaster[/db]` shard is the master the sentinels
monitor under `mymaster`, wherever it is now:
- each new connection asks the sentinels, all at once, `SENTINEL get-master-addr-by-name`
  (the first answer wins), connects there and checks with `ROLE` that it is a master: dq
  never writes to a replica;
- the sentinels' `+switch-master` announcements are followed (one pub/sub connection to
  one sentinel at a time, per connection that has been opened): when they name a new
  master, the connection is closed at once and the next command asks them again, so an
  idle shard switches before anything is written to the demoted master;
- a lost connection, or a `READONLY` (the master was demoted) or `LOADING` reply, drops
  the connection: the commands waiting on it fail as "unavailable" (the shard's usual
  failure: adds are retried on another shard or answered unavailable, timers and
  consumers back off and retry) and the next command asks the sentinels again;
- the blocking connections (the timers' BLPOP on the wake lists) use redis-py's Sentinel
  client, which asks the sentinels on each connect and drops a connection that answers
  READONLY; those waits last at most a second, so a timer or consumer never stays blocked
  on a demoted master (the BullMQ bug of workers that stop silently after a failover).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.resp import RespConnection
from dq.sharding.shardurl import ShardUrl, parse

log = logging.getLogger("dq.sentinel")

SUBSCRIBE_RETRY = 1.0  # seconds before listening to the next sentinel after one went away

# Replies after which the connection is dropped and the master looked up again.
_MOVED = (("READONLY", "the master was demoted to a replica (READONLY)"),
          ("LOADING", "the Redis is loading its data (LOADING)"),
          ("UNBLOCKED", "the master changed role (UNBLOCKED)"))


async def _exchange(host: str, port: int, commands: list[tuple[Any, ...]], *,
                    tls: ssl.SSLContext | None, timeout: float) -> list[Any]:
    """Send commands to one Redis (a sentinel) on a new connection; their replies, errors
    as hiredis.ReplyError values. Raises OSError/TimeoutError when it cannot be reached."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            writer.write(b"".join(hiredis.pack_command(c) for c in commands))
            parser, out = hiredis.Reader(), cast(list[Any], [])
            while len(out) < len(commands):
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError("the sentinel closed the connection")
                parser.feed(data)
                while len(out) < len(commands) and (reply := parser.gets()) is not False:
                    out.append(reply)
            return out
        finally:
            writer.close()


class SentinelConnection(RespConnection):
    """A RespConnection to the master its sentinels name (see the module's docstring)."""

    def __init__(self, url: str, *, name: str, connect_timeout: float = 1.0,
                 command_timeout: float = 5.0, replica_acks: int = 0) -> None:
        super().__init__(url, name=name, connect_timeout=connect_timeout,
                         command_timeout=command_timeout, replica_acks=replica_acks)
        self.target: ShardUrl = parse(url)
        self.sentinels = self.target.sentinels
        self.master: tuple[str, int] | None = None  # where the open connection goes
        # The sentinels get half the connect timeout, the master's connect the other half
        # (an add waits for both when it finds the connection down).
        self.ask_timeout = connect_timeout / 2
        self._watcher: asyncio.Task[None] | None = None  # follows +switch-master

    def _tls(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.target.tls else None

    def _hello(self) -> list[tuple[Any, ...]]:
        t, hello = self.target, cast(list[tuple[Any, ...]], [])
        if t.password is not None:
            hello.append(("AUTH", t.username, t.password) if t.username
                         else ("AUTH", t.password))
        if t.db:
            hello.append(("SELECT", t.db))
        return hello

    async def _ask(self, host: str, port: int) -> tuple[str, int] | str:
        """The master's address as one sentinel sees it, or why it could not say."""
        cmds: list[tuple[Any, ...]] = []
        if self.target.sentinel_password:
            cmds.append(("AUTH", self.target.sentinel_password))
        cmds.append(("SENTINEL", "get-master-addr-by-name", self.target.service))
        try:
            replies = await _exchange(host, port, cmds, tls=self._tls(),
                                      timeout=self.ask_timeout)
        except (OSError, TimeoutError) as exc:
            return f"{host}:{port} unreachable ({exc or 'timed out'})"
        except hiredis.ProtocolError as exc:
            return f"{host}:{port} does not speak RESP ({exc})"
        reply = replies[-1]
        if isinstance(reply, hiredis.ReplyError):
            return f"{host}:{port} said {reply}"
        if not reply:
            return (f"{host}:{port} monitors no master named {self.target.service!r} "
                    "(sentinel monitor <name> ...)")
        return reply[0].decode(), int(reply[1])

    async def _address(self) -> tuple[str, int]:
        """The master's address from the first sentinel to name it. All are asked at once
        (within half the connect timeout), so a sentinel that is down costs no time; the master
        named is then checked with ROLE (`_verify`)."""
        asks = [asyncio.ensure_future(self._ask(h, p)) for h, p in self.sentinels]
        why: list[str] = []
        try:
            for next_done in asyncio.as_completed(asks, timeout=self.ask_timeout):
                try:
                    got = await next_done
                except TimeoutError:
                    break
                if isinstance(got, str):
                    why.append(got)
                    continue
                if got != self.master and self.master is not None:
                    log.warning("redis shard %s: the sentinels name a new master %s:%d (was "
                                "%s:%d)", self.label, *got, *self.master)
                self.master = got
                return got
        finally:
            for ask in asks:
                ask.cancel()
        if len(why) < len(asks):
            why.append(f"{len(asks) - len(why)} gave no answer within "
                       f"{self.ask_timeout:g} s")
        raise DqError(UNAVAILABLE, f"redis shard {self.label} is unavailable (no sentinel "
                      f"named the master of {self.target.service!r}: {'; '.join(why)}); "
                      "retry shortly")

    async def _check_role(self) -> None:
        """Never write to a replica: the address the sentinels gave must answer ROLE as a
        master (right after a failover a sentinel may still name the old one)."""
        role = await self.call_nowait("ROLE")
        kind = role[0].decode() if role and isinstance(role[0], bytes) else str(role)
        if kind != "master":
            where = f"{self.master[0]}:{self.master[1]}" if self.master else "?"
            self._why = f"the sentinels named {where}, which is a {kind}"
            if self.transport is not None:
                self.transport.abort()
            raise self._unavailable(f"{self._why}; a failover is under way")

    async def _verify(self) -> None:
        await self._check_role()
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._follow_switches())

    async def _follow_switches(self) -> None:
        """Listen to the sentinels' +switch-master, one sentinel after another while the
        one listened to goes away (a second between tries)."""
        i = 0
        while True:
            host, port = self.sentinels[i % len(self.sentinels)]
            i += 1
            try:
                await self._listen(host, port)
            except (OSError, TimeoutError, hiredis.ProtocolError) as exc:
                log.debug("redis shard %s: sentinel %s:%d: %s", self.label, host, port, exc)
            await asyncio.sleep(SUBSCRIBE_RETRY)

    async def _listen(self, host: str, port: int) -> None:
        async with asyncio.timeout(self.ask_timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=self._tls())
        try:
            cmds: list[tuple[Any, ...]] = []
            if self.target.sentinel_password:
                cmds.append(("AUTH", self.target.sentinel_password))
            cmds.append(("SUBSCRIBE", "+switch-master"))
            writer.write(b"".join(hiredis.pack_command(c) for c in cmds))
            parser = hiredis.Reader()
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError("the sentinel closed the connection")
                parser.feed(data)
                while (msg := parser.gets()) is not False:
                    self._switched(msg)
        finally:
            writer.close()

    def _switched(self, msg: Any) -> None:
        """A +switch-master message ("<name> <old ip> <old port> <new ip> <new port>"):
        for this service and a master other than ours, close the connection now."""
        if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message"):
            return
        parts = msg[2].decode(errors="replace").split()
        if len(parts) != 5 or parts[0] != self.target.service:
            return
        new = (parts[3], int(parts[4]))
        if new == self.master or self.transport is None or self.transport.is_closing():
            return
        log.warning("redis shard %s: the sentinels announce a new master %s:%d "
                    "(+switch-master); switching", self.label, *new)
        self._why = "the sentinels announced a new master (+switch-master)"
        self.transport.close()  # what is written goes out; the next command asks again

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        super().close()

    def refusal(self, msg: str) -> DqError | None:
        for text, why in _MOVED:
            if msg.startswith(text) or f"-{text} " in msg:
                if self.transport is not None and not self.transport.is_closing():
                    log.warning("redis shard %s: %s; asking the sentinels for the master",
                                self.label, why)
                    self._why = why
                    self.transport.abort()
                return self._unavailable(why)
        return super().refusal(msg)


def sentinel_client(url: str, *, connect_timeout: float, command_timeout: float,
                    ) -> tuple[aioredis.Redis, Sentinel]:
    """A redis-py client of the master the URL's sentinels name (for blocking commands),
    and the Sentinel object behind it (closed with it)."""
    t = parse(url)
    common: dict[str, Any] = {"socket_connect_timeout": connect_timeout,
                              "socket_timeout": command_timeout, "socket_keepalive": True}
    if t.tls:
        common["ssl"] = True
    sentinel_kw = dict(common)
    if t.sentinel_password:
        sentinel_kw["password"] = t.sentinel_password
    sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=sentinel_kw, **common)
    client = sentinel.master_for(t.service, redis_class=aioredis.Redis, db=t.db,
                                 username=t.username, password=t.password,
                                 health_check_interval=0, max_connections=64)
    return client, sentinel
