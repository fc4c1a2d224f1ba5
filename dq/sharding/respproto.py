"""RESP on the wire for dq/sharding/resp.py: commands packed by hiredis, replies parsed by
hiredis and matched in order to what waits for them (a future, or a callback called as
soon as its reply is read)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import hiredis
from redis.exceptions import NoScriptError, ResponseError

if TYPE_CHECKING:
    from dq.sharding.resp import RespConnection

log = logging.getLogger("dq.resp")

# Gets a command's reply, or the exception it failed with, as soon as it is read.
ReplyCallback: TypeAlias = Callable[[Any, BaseException | None], None]
Waiter: TypeAlias = "asyncio.Future[Any] | ReplyCallback"

PING = b"*1\r\n$4\r\nPING\r\n"


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


def call_back(callback: ReplyCallback, reply: Any, error: BaseException | None) -> None:
    """A reply callback; one that fails must not leave the other replies unmatched."""
    try:
        callback(None if error is not None else reply, error)
    except Exception:
        log.exception("a redis reply callback failed")


def settle(waiter: Waiter, reply: Any, error: BaseException | None) -> None:
    """Tell a waiter its reply or error (a future already cancelled is left alone)."""
    if not isinstance(waiter, asyncio.Future):
        call_back(waiter, reply, error)
    elif waiter.done():
        return
    elif error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(reply)


class RespProtocol(asyncio.Protocol):
    """Reads a connection's replies and hands each to the oldest waiter."""

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
            if not isinstance(waiter, asyncio.Future):  # settle(), inlined: the hot path
                call_back(waiter, reply, error)
            elif waiter.done():
                continue
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(exc)
