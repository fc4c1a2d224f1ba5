"""The console's HTTP connections: deadlines on reading a request, and a connection cap.

uvicorn arms no timer until a first response is sent, and its `limit_concurrency` counts
connections still sending their headers, so a few hundred half-sent requests would hold
their sockets forever, or push real requests into 503s. This h11 protocol (always h11,
httptools or not) closes a connection whose request head has not arrived HEAD_TIMEOUT
seconds after it opened (or after its previous answer), trickled bytes or not, and one
whose body has not arrived BODY_TIMEOUT seconds after its head. At MAX_CONNECTIONS, a new
connection makes room by closing the oldest one still waiting for its head (else it is
closed itself): a flood of idle sockets cannot keep a real request out. Idle keep-alive
connections close after uvicorn's `timeout_keep_alive`, and a head over 16 KiB is refused
(400) by h11 (uvicorn's `h11_max_incomplete_event_size` default).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEAD_TIMEOUT: float = 10.0  # seconds for a request's line and headers to arrive, whole
BODY_TIMEOUT: float = 30.0  # seconds for its body (at most web.app.MAX_BODY bytes)
KEEP_ALIVE: Final = 5  # seconds an idle connection is kept between requests
MAX_CONNECTIONS: int = 1000  # open connections; the oldest waiting for a head goes first
LOG_EVERY: Final = 60.0  # seconds between two summary lines about dropped connections
_TIMEOUT_REPLY: Final = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; "
                         b"charset=utf-8\r\nconnection: close\r\ncontent-length: 47\r\n\r\n"
                         b"the request did not arrive in time; send again\n")
_WAITING: Final = (h11.IDLE, h11.SEND_BODY)  # the client's states we wait on with a deadline


class _Dropped:
    """Connections closed for being slow or too many, logged as one line a minute."""

    def __init__(self) -> None:
        self.counts = {"head": 0, "body": 0, "over the cap": 0}
        self.logged = 0.0

    def add(self, why: str) -> None:
        self.counts[why] += 1
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY:
            self.logged = now
            log.warning("dq-web dropped connections so far: %d sent no whole request head "
                        "within %g s, %d no whole body within %g s, %d over the cap of %d "
                        "connections", self.counts["head"], HEAD_TIMEOUT, self.counts["body"],
                        BODY_TIMEOUT, self.counts["over the cap"], MAX_CONNECTIONS)


dropped = _Dropped()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each part of a request the client owes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: type[h11.IDLE] | type[h11.SEND_BODY] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._since = 0.0  # when the current phase began

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > MAX_CONNECTIONS and not self._make_room():
            dropped.add("over the cap")
            self.transport.close()
            return
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _make_room(self) -> bool:
        """Close the oldest other connection still waiting for its request head."""
        waiting = [c for c in self.connections if c is not self
                   and isinstance(c, GuardedH11Protocol) and c._phase is h11.IDLE]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._since)
        dropped.add("over the cap")
        oldest._cancel()
        oldest._phase = None  # it leaves `connections` only later, in connection_lost
        oldest.transport.close()
        return True

    def _watch(self) -> None:
        """Arm the deadline for what the client owes next (head or body), once per part:
        bytes trickling in do not push it back."""
        state = self.conn.their_state
        phase = state if state in _WAITING else None
        if phase is self._phase or self.transport.is_closing():
            return
        self._cancel()
        self._phase, self._since = phase, self.loop.time()
        if phase is not None:
            limit = HEAD_TIMEOUT if phase is h11.IDLE else BODY_TIMEOUT
            self._deadline = self.loop.call_later(limit, self._expire)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase is h11.IDLE:
            dropped.add("head")
            if self.conn.trailing_data[0]:  # part of a head came: say why it is closed
                self.transport.write(_TIMEOUT_REPLY)
        else:
            dropped.add("body")
        self.transport.close()
