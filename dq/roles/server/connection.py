"""One client connection: frames in, requests started at a pace the client can take.

Bytes arrive in `data_received`, are cut into frames by the FrameDecoder and wait in the
connection's backlog; `_start_backlog` hands them to the Handler (dq/roles/server/
handler.py), TURN_SLICE a loop turn, and queues each reply in request order (the
ReplyQueue of dq/roles/server/replies.py). After each write (`_written`) the connection
decides whether to close, start more of the backlog or read again.

Flow control: a connection stops reading (and starting requests) while it has
MAX_OUTSTANDING requests or MAX_FRAMES_OUT frames in progress, MAX_SLOW coroutine-answered
requests (gets, dels) weighing SLOW_WEIGHT each, or WRITE_HIGH bytes of replies its client
has not read; so a client that pipelines and never reads holds up only itself. `reap`
closes connections that stall inside a frame (FRAME_TIMEOUT) or idle too long. For a
reload the connection stops reading, answers what it read and is handed over whole
(`stop_reading`, `handable`, `handed_over`; the listener does the handing).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from dq.config import Settings
from dq.errors import BAD_REQUEST, TOO_MANY_CONNECTIONS
from dq.roles.server.replies import ReplyQueue
from dq.wire.frames import OK_EMPTY, FrameDecoder, FrameError, decode_payload, error_reply

if TYPE_CHECKING:
    from dq.roles.server.listener import Server

MAX_OUTSTANDING = 4096  # requests in progress per connection before reading pauses (an
#                        add_many frame counts as the adds it carries, a get or del as
#                        SLOW_WEIGHT) ...
MAX_FRAMES_OUT = 1024  # ... or frames (at most 9,999 bytes each: 10 MB)
# Gets and dels (and other requests answered by a coroutine) in progress per connection:
# a coroutine each, and a get's reply is up to 10 KB where an add's is 33 bytes. Five
# clients that pipeline gets and never read then put ~MAX_SLOW * 5 requests ahead of
# everyone else's, not ~5,000 (a canary waited 224-723 ms behind them; bench/stall.py).
MAX_SLOW = 16
SLOW_WEIGHT = MAX_OUTSTANDING // MAX_SLOW  # what one counts for in in_progress
TURN_SLICE = 128  # requests of one connection started per loop turn (one frame more at most)
WRITE_HIGH = 64 * 1024  # unsent reply bytes of a connection before it starts no more requests
FRAME_TIMEOUT = 10.0  # seconds a started frame may take to arrive in full


class Connection(ReplyQueue, asyncio.Protocol):
    """One client: frames in, replies out in request order."""

    def __init__(self, server: Server, pending: bytes = b"", skipping: int = 0, *,
                 adopted: bool = False) -> None:
        super().__init__(server.coalescer)
        self.server = server
        self.decoder = FrameDecoder(server.settings.max_frame)
        self.adopted = adopted  # handed over by a retiring server (a reload)
        self.handing = False  # being handed to the next server: read no more
        self.transport: asyncio.Transport | None = None
        # frames read, not yet started: their JSON text (decoded when started), or an error
        self.backlog: collections.deque[bytes | FrameError] = collections.deque()
        self.paused_writing = False
        self.reading = True
        self.closing = False
        self.eof = False  # the client sent all it will: close once it is answered
        self.last_active = time.monotonic()
        self.frame_started = 0.0
        self.resume_scheduled = False  # a later loop turn goes on with the backlog
        self.starting = False  # _start_backlog is running (a reply it queued may flush)
        if pending or skipping:  # the frame the retiring server had begun
            self.decoder.restore(pending, skipping)
            self.frame_started = self.last_active

    # asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.opening -= 1
        if (len(self.server.connections) >= self.server.settings.max_connections
                and not self.adopted):
            self.transport.write(error_reply((
                TOO_MANY_CONNECTIONS, f"the server already has {len(self.server.connections)} "
                "connections, its limit; retry later or use another dq server")))
            transport.close()
            self.server.refused += 1
            return
        self.server.connections.add(self)
        self.transport.set_write_buffer_limits(WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server._publish()
        self.closing = True
        self._drop_replies()
        self.backlog.clear()

    def eof_received(self) -> bool | None:
        """The client half-closed (as `nc -N` does): answer every request it sent, then
        close, as the original server did. True keeps the transport open to write."""
        self.eof = True
        if not self.busy:
            return None  # nothing owed: asyncio closes it
        return True

    def pause_writing(self) -> None:
        self.paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.backlog and not self.resume_scheduled:
            self._start_backlog()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        items = self.decoder.split(data)
        self.backlog.extend(items)
        self._start_backlog()
        # A frame's clock starts at its first byte and runs until its last: a client that
        # trickles a byte a second must not hold its frame, and its connection, open.
        if not (self.decoder.pending_bytes or self.decoder.skipping):
            self.frame_started = 0.0
        elif items or not self.frame_started:
            self.frame_started = self.last_active  # a frame ended here; the next began here
        self._update_reading()

    # starting requests -----------------------------------------------------------------
    def _start_backlog(self) -> None:
        """Start decoded requests while fewer than MAX_OUTSTANDING are in progress (in
        fewer than MAX_FRAMES_OUT frames), TURN_SLICE of them a loop turn: one client's
        burst of pipelined frames is worked off as its replies go out, and each slice's
        adds are in Redis while the next slice is decoded here."""
        self.resume_scheduled = False
        if self.starting:  # called again by a reply this loop queued: it goes on itself
            return
        self.starting = True
        try:
            handler = self.server.handler
            backlog = self.backlog
            started = 0
            while (backlog and self.in_progress < MAX_OUTSTANDING
                   and len(self.replies) < MAX_FRAMES_OUT and not self.closing
                   and not self.paused_writing):
                if started >= TURN_SLICE:
                    self.resume_scheduled = True
                    handler.loop.call_soon(self._resume)
                    return
                raw = backlog.popleft()
                item = decode_payload(raw) if isinstance(raw, bytes) else raw
                count = 1
                if isinstance(item, FrameError):
                    self._queue(error_reply(item))
                    if item.fatal:
                        backlog.clear()
                        self._close_after_replies()
                        return
                else:
                    cmd = item.get("cmd")
                    if cmd == "ping":
                        self._queue(OK_EMPTY)
                    elif cmd == "add":
                        self._queue(handler.fast(item))
                    elif cmd == "add_many":
                        jobs = item.get("jobs")  # as many as its adds
                        if type(jobs) is list and jobs:
                            count = len(jobs)
                        self._queue(handler.fast(item), count)
                    else:
                        self._queue(handler.fast(item), SLOW_WEIGHT)
                started += count
            if self.eof and not self.busy and self.transport is not None:
                self.transport.close()  # half-closed, and all answered (without a flush)
        finally:
            self.starting = False

    def _resume(self) -> None:
        """The next slice of the backlog, a loop turn later."""
        if self.transport is None or self.transport.is_closing():
            self.resume_scheduled = False
            return
        self._start_backlog()
        self._update_reading()

    # flow control ----------------------------------------------------------------------
    def _written(self) -> None:
        """Replies were written (ReplyQueue._flush): close once all are out and nothing
        more will be answered; else start more of the backlog once half the room is free,
        and read again when there is room."""
        assert self.transport is not None
        replies = self.replies
        if not replies and (self.closing or (self.eof and not self.backlog)):
            self.transport.close()
            return
        if (self.backlog and self.in_progress < MAX_OUTSTANDING // 2
                and len(replies) < MAX_FRAMES_OUT // 2
                and not self.resume_scheduled):
            self._start_backlog()
        self._update_reading()

    def _close_after_replies(self) -> None:
        self.closing = True
        self._flush()

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        want = (not self.paused_writing and not self.backlog and not self.handing
                and self.in_progress < MAX_OUTSTANDING and len(self.replies) < MAX_FRAMES_OUT)
        if want != self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
                if self.frame_started:  # its clock stood still while we did not read
                    self.frame_started = time.monotonic()
            else:
                self.transport.pause_reading()

    @property
    def busy(self) -> bool:
        return bool(self.replies or self.backlog)

    # hand-over (a reload) --------------------------------------------------------------
    def stop_reading(self) -> None:
        """Read no more: what the client sends from now on waits in the socket for the
        server this connection is handed to."""
        if not self.handing:
            self.handing = True
            self._update_reading()

    @property
    def handable(self) -> bool:
        """Every request read is answered and its reply is with the kernel: the socket,
        with the frame begun, can go to another server."""
        t = self.transport
        return (self.handing and t is not None and not t.is_closing() and not self.busy
                and not self.eof and not self.closing and not self.decoder.closed
                and t.get_write_buffer_size() == 0)

    @property
    def finishing(self) -> bool:
        """Closes by itself once answered (half-closed, or its frames were garbage)."""
        t = self.transport
        return t is None or t.is_closing() or self.eof or self.closing or self.decoder.closed

    def handed_over(self) -> None:
        """Another server has the socket now: close this process's copy, and only it (no
        shutdown, so the connection stays up)."""
        assert self.transport is not None
        self.transport.abort()


async def reap(connections: Iterable[Connection], settings: Settings) -> None:
    """Close connections that idle too long or stall inside a frame, checking each
    second (`connections` is the server's live set)."""
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        idle_timeout = settings.idle_timeout
        for conn in list(connections):
            # A frame stalls only while the server reads: not while it has paused
            # reading (a backlog, or a client slow to read its replies).
            stalled = (conn.reading and conn.frame_started
                       and now - conn.frame_started > FRAME_TIMEOUT)
            idle = (idle_timeout > 0 and not conn.busy
                    and now - conn.last_active > idle_timeout)
            if (stalled or idle) and conn.transport is not None:
                if stalled:
                    conn.transport.write(error_reply((
                        BAD_REQUEST, f"the frame did not arrive in full within "
                        f"{FRAME_TIMEOUT:g}s; the connection is closed")))
                conn.transport.close()
