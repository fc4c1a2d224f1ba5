"""A reload's connection hand-over: established client connections move to the new server.

The original's PHP and Java clients open one connection and never reconnect, so a reload
must not close it. The master binds one Unix socket (SOCK_SEQPACKET, in its private
directory: dq.master.supervise.bind_handover) before forking any server; every server accepts on
it. A retiring server (SIGUSR1 from the master, once the new generation's servers are up)
stops reading each connection, answers what it has read, then sends the socket itself
(SCM_RIGHTS) with the bytes of a frame it has begun: one stream of one record per
connection, so the new servers share them as they share new connections (the load board).
The server that receives it goes on reading where the other stopped, so what the client
sends meanwhile waits in the kernel and is answered once, in order.

A record is HEADER (magic, bytes of an oversized frame still to drop) followed by the
bytes of the frame begun, with exactly one file descriptor attached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("dq.server")

HEADER = struct.Struct("!4sI")
MAGIC = b"DQH1"
RECORD_MAX = 65536  # a record carries at most one frame begun (9,999 bytes of JSON + 4)
SEND_TIMEOUT = 5.0  # seconds a retiring server waits for the receiver to make room
DEFER = 0.002  # seconds a busier server leaves a stream to the others (as server.DEFER)
ACCEPT_BURST = 16  # streams accepted a loop turn at most


async def hand(path: str, fd: int, pending: bytes, skipping: int) -> None:
    """Hand the socket `fd` over on a stream of its own (the caller closes its copy)."""
    sender = await HandoverSender.connect(path)
    try:
        await sender.send(fd, pending, skipping)
    finally:
        sender.close()


class HandoverSender:
    """One retiring server's stream of connections to a server of the new generation."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop

    @classmethod
    async def connect(cls, path: str) -> HandoverSender:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await loop.sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, loop)

    async def send(self, fd: int, pending: bytes, skipping: int) -> None:
        """Hand over the socket `fd` (the caller still owns and closes its own copy)."""
        record = HEADER.pack(MAGIC, skipping) + pending
        async with asyncio.timeout(SEND_TIMEOUT):
            while True:
                try:
                    socket.send_fds(self.sock, [record], [fd])
                    return
                except BlockingIOError:
                    await self._writable()

    async def _writable(self) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            self.loop.remove_writer(fd)

    def close(self) -> None:
        self.sock.close()


Adopt = Callable[[socket.socket, bytes, int], None]


class HandoverReceiver:
    """Accepts retiring servers' streams on the master's socket and adopts each connection
    they hand over (`adopt(sock, frame_begun, skipping)`); while `defer()` says this
    server holds more than another, it leaves streams to the others for DEFER seconds.
    `changed()` is told when the streams open here change (they count as load)."""

    def __init__(self, listener: socket.socket, loop: asyncio.AbstractEventLoop, *,
                 adopt: Adopt, defer: Callable[[], bool],
                 changed: Callable[[], None]) -> None:
        self.listener = listener
        self.loop = loop
        self.adopt = adopt
        self.defer = defer
        self.changed = changed
        self.accepting = False
        self.watching = False  # the listener is watched (not while deferring)
        self._deferred: asyncio.TimerHandle | None = None
        self.streams: set[socket.socket] = set()
        self.adopted = 0

    def start(self) -> None:
        self.accepting = True
        self._watch(True)

    def _watch(self, on: bool) -> None:
        if on and not self.watching:
            self.loop.add_reader(self.listener.fileno(), self._accept)
        elif not on and self.watching:
            self.loop.remove_reader(self.listener.fileno())
        self.watching = on

    def stop_accepting(self) -> None:
        self.accepting = False
        self._watch(False)
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

    def _resume(self) -> None:
        self._deferred = None
        if self.accepting:
            self._watch(True)
            self._accept(force=True)

    async def settle(self, timeout: float) -> None:
        """Until every stream begun has ended (its sender hands over no more), at most
        `timeout` seconds; a stream still open then is closed, with what it still held."""
        try:
            async with asyncio.timeout(timeout):
                while self.streams:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning("a retiring server still handed connections over after %.0f s; "
                        "stopped taking them", timeout)
        self.close()

    def close(self) -> None:
        self.stop_accepting()
        for stream in list(self.streams):
            self._end(stream)

    def _accept(self, force: bool = False) -> None:
        for i in range(ACCEPT_BURST):
            if not (force and i == 0) and self.defer():
                self._watch(False)
                self._deferred = self.loop.call_later(DEFER, self._resume)
                return
            try:
                stream, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left, or another server took it
            except OSError as exc:
                log.warning("cannot accept a hand-over stream: %s", exc.strerror or exc)
                return
            stream.setblocking(False)
            self.streams.add(stream)
            self.loop.add_reader(stream.fileno(), self._receive, stream)
            self.changed()

    def _end(self, stream: socket.socket) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            self.loop.remove_reader(stream.fileno())
            stream.close()
            self.changed()

    def _receive(self, stream: socket.socket) -> None:
        for _ in range(64):  # records a loop turn at most
            try:
                data, fds, flags, _ = socket.recv_fds(stream, RECORD_MAX, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("a hand-over stream failed: %s", exc.strerror or exc)
                self._end(stream)
                return
            if not data and not fds:
                self._end(stream)  # the sender has handed over all it had
                return
            self._record(data, fds, flags)

    def _record(self, data: bytes, fds: list[int], flags: int) -> None:
        bad = ""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            bad = "truncated"
        elif len(fds) != 1:
            bad = f"{len(fds)} descriptors"
        elif len(data) < HEADER.size or data[:4] != MAGIC:
            bad = "no header"
        if bad:
            log.error("a hand-over record was malformed (%s); its connection is closed", bad)
            for fd in fds:
                os.close(fd)
            return
        _, skipping = HEADER.unpack_from(data)
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError as exc:
            os.close(fds[0])
            log.error("a handed-over descriptor is not a socket (%s)", exc.strerror or exc)
            return
        self.adopted += 1
        self.adopt(sock, data[HEADER.size:], skipping)
