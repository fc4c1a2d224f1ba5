"""The listener: a server process's connections come in here, and leave here at a reload.

`Server` accepts on the master's socket (or its own), ACCEPT_BURST a loop turn, and leaves
a new connection to a less loaded sibling (the master's LoadBoard, DEFER) or pauses when
out of file descriptors (ACCEPT_RETRY). Each accepted socket becomes a Connection
(dq/roles/server/connection.py); so does each socket a retiring server of the previous
generation hands over (`adopt`, through a HandoverReceiver). The connections share one
Handler (the requests) and one Coalescer (the replies' writes). When stopping, `drain`
answers what was read, then hands each connection to the new generation (a reload) or
closes it (a stop).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
from typing import Any

from dq.registry.topics import TopicCache
from dq.roles.server.connection import Connection
from dq.roles.server.handler import Handler
from dq.roles.server.replies import Coalescer
from dq.runtime.context import Context
from dq.runtime.handover import HandoverReceiver, hand
from dq.runtime.shared import LoadBoard, bind_listener
from dq.storage.store import Store

log = logging.getLogger("dq.server")

DEFER = 0.002  # seconds a busier server leaves a new connection to the others
ACCEPT_BURST = 16  # connections accepted a loop turn at most
ACCEPT_RETRY = 1.0  # seconds without accepting after running out of file descriptors


class Server:
    """A server role: accept on the master's socket (or its own), serve until stopping."""

    def __init__(self, ctx: Context, store: Store, topics: TopicCache) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.handler = Handler(store, topics, ctx)
        self.coalescer = Coalescer(store, self.handler.loop)  # the replies' writes
        self.connections: set[Connection] = set()
        self.refused = 0
        self.listener: socket.socket | None = None
        self.accepting = False
        self._opening: set[asyncio.Task[Any]] = set()  # accepted, not yet connected
        self.opening = 0  # of those, the ones whose Connection is not made yet
        self._deferred: asyncio.TimerHandle | None = None  # accepting again then
        self.paused = False  # out of file descriptors: not accepting for ACCEPT_RETRY
        self.receiver: HandoverReceiver | None = None  # takes a reload's connections
        self.handed = 0  # connections handed to the new generation

    async def start(self) -> None:
        """Accept on the master's socket (or a socket of its own, when run alone)."""
        sock = self.ctx.listen_sock
        if sock is None:
            sock = bind_listener(self.settings.host, self.settings.port)
        self.coalescer.hook()
        self.listener = sock
        self.accepting = True
        self._publish()
        self.handler.loop.add_reader(sock.fileno(), self._accept)
        if self.ctx.handover_sock is not None:
            self.receiver = HandoverReceiver(self.ctx.handover_sock, self.handler.loop,
                                             adopt=self.adopt, defer=self._busier,
                                             changed=self._publish)
            self.receiver.start()

    @property
    def load(self) -> int:
        streams = len(self.receiver.streams) if self.receiver is not None else 0
        return len(self.connections) + self.opening + streams

    def _busier(self) -> bool:
        """This process holds more connections than the least loaded other server."""
        board = self.ctx.board
        if board is None:
            return False
        least = board.least_other(self.ctx.board_slot)
        return least is not None and self.load > least

    def _publish(self) -> None:
        """Tell the other server processes how many connections this one holds (DRAINING:
        none, it does not accept now)."""
        if self.ctx.board is not None:
            self.ctx.board.set(self.ctx.board_slot, self.load
                               if self.accepting and not self.paused else LoadBoard.DRAINING)

    def _accept(self, force: bool = False) -> None:
        """Accept up to ACCEPT_BURST connections a loop turn, and none while this process
        holds more than the least loaded other server (the master's LoadBoard): every
        server waits on the master's socket, and the first awake would otherwise take them
        all (50 connections made together went 42 to one process, 8 to the other). After
        DEFER seconds of leaving them to the others (a server that boots, hangs or is
        stopped still counts until it is replaced), `force` takes a burst all the same."""
        assert self.listener is not None
        loop = self.handler.loop
        for _ in range(ACCEPT_BURST):
            if not force and self._busier():
                self._wait(DEFER)
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left, or another process took it
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the socket stays readable, so pause
                    # (as asyncio's own server does) rather than spin on it.
                    log.warning("cannot accept connections (%s); trying again in %g s",
                                exc.strerror, ACCEPT_RETRY)
                    self.paused = True
                    self._wait(ACCEPT_RETRY)
                return  # otherwise the peer gave up (ECONNABORTED...): the next one
            self.opening += 1
            task = loop.create_task(loop.connect_accepted_socket(
                functools.partial(Connection, self), sock))
            self._opening.add(task)
            task.add_done_callback(functools.partial(self._opened, sock))
            self._publish()

    def adopt(self, sock: socket.socket, pending: bytes, skipping: int) -> None:
        """Serve a connection a retiring server handed over, from where it stopped."""
        loop = self.handler.loop
        sock.setblocking(False)
        self.opening += 1
        task = loop.create_task(loop.connect_accepted_socket(functools.partial(
            Connection, self, pending, skipping, adopted=True), sock))
        self._opening.add(task)
        task.add_done_callback(functools.partial(self._opened, sock))
        self._publish()

    def _wait(self, seconds: float) -> None:
        """Stop watching the socket for `seconds`, then accept (a burst) again."""
        assert self.listener is not None
        loop = self.handler.loop
        loop.remove_reader(self.listener.fileno())
        self._deferred = loop.call_later(seconds, self._resume_accepting)
        self._publish()

    def _resume_accepting(self) -> None:
        self._deferred = None
        self.paused = False
        if self.accepting and self.listener is not None:
            self.handler.loop.add_reader(self.listener.fileno(), self._accept)
            self._publish()
            self._accept(force=True)

    def _opened(self, sock: socket.socket, task: asyncio.Task[Any]) -> None:
        self._opening.discard(task)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("cannot serve an accepted connection: %s", task.exception())
            self.opening -= 1  # its Connection was never made
            if sock.fileno() != -1:
                sock.close()
        self._publish()

    def stop_accepting(self) -> None:
        if not self.accepting or self.listener is None:
            return
        self.accepting = False
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        else:
            self.handler.loop.remove_reader(self.listener.fileno())
        self._publish()
        master = self.ctx.master_pid
        # Its own socket: nobody else accepts on it. The master's, once the master is gone
        # (kill -9): a new master can bind the port as soon as the orphans closed it,
        # while they still drain their connections.
        if self.ctx.listen_sock is None or (master is not None and os.getppid() != master):
            self.listener.close()

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.getsockname()[1])

    def stop(self) -> None:
        """Closed down: the store no longer calls the coalescer's flush_ready (a reply
        made ready later is written at the end of its loop turn)."""
        self.coalescer.unhook()

    async def drain(self) -> None:
        """Stop accepting, answer every request already read, then hand each connection to
        the new generation (a reload) or close it (a stop)."""
        self.stop_accepting()
        if self.receiver is not None:  # connections being handed to us are ours to serve
            await self.receiver.settle(self.settings.grace)
        if self._opening:  # accepted just before: serve them like the others
            await asyncio.wait(self._opening, timeout=self.settings.grace)
        if self.ctx.hand_over:
            await self.hand_over()
        try:
            async with asyncio.timeout(self.settings.grace):
                while any(c.busy for c in self.connections):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning("server: %d connections still busy after %.0fs grace",
                        sum(c.busy for c in self.connections), self.settings.grace)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

    async def hand_over(self) -> None:
        """A reload: stop reading every connection, answer what was read, then pass each
        socket, with the bytes of a frame begun, to a server of the new generation. What
        cannot be handed within `grace` (a client that reads no replies) is closed once
        answered, as a stop would."""
        assert self.ctx.handover_sock is not None
        path = self.ctx.handover_sock.getsockname()
        loop = self.handler.loop
        deadline = loop.time() + self.settings.grace
        try:
            while True:
                waiting = False
                for conn in list(self.connections):
                    conn.stop_reading()
                    if conn.handable:
                        await self._hand(path, conn)
                    elif not conn.finishing:
                        waiting = True
                if not waiting or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.005)
        except (OSError, TimeoutError) as exc:
            log.warning("%s could not hand all its connections over (%s); the rest are "
                        "closed once answered", self.ctx.name, exc)
        left = sum(not c.finishing for c in self.connections)
        log.info("%s handed %d connections to the new generation%s", self.ctx.name,
                 self.handed, f"; {left} did not read their replies within "
                 f"{self.settings.grace:g} s and are closed" if left else "")

    async def _hand(self, path: str, conn: Connection) -> None:
        assert conn.transport is not None
        # A copy of the descriptor: the transport's own may close while the send waits.
        fd = os.dup(conn.transport.get_extra_info("socket").fileno())
        try:
            pending, skipping = conn.decoder.state()
            await hand(path, fd, pending, skipping)
        finally:
            os.close(fd)
        self.handed += 1
        conn.handed_over()
