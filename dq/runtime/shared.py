"""What the master and its children share: the listening socket and the servers' load board.

Plain synchronous code with no third-party imports (the master imports it too).
"""

from __future__ import annotations

import errno
import mmap
import socket


class BootError(Exception):
    """The master cannot start (port taken, data dir locked, ...); the message says why."""


class AddressInUse(BootError):
    """The port to listen on is taken (EADDRINUSE)."""


class LoadBoard:
    """How many connections each dq-server process holds, in memory the master maps before
    forking and every child shares: a server that holds more than the least loaded other
    one leaves the next connection to it (dq/roles/server/listener.py). A slot is FREE
    (no process), BOOTING (forked, not accepting yet), DRAINING (no longer accepting) or a
    count of connections; only counts make others wait."""

    FREE = -2
    DRAINING = -1
    BOOTING = -3

    def __init__(self, slots: int = 64) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, 4 * slots)  # anonymous and shared: inherited by fork
        self._view = memoryview(self._mem).cast("i")
        for i in range(slots):
            self._view[i] = self.FREE

    def claim(self) -> int:
        """A free slot for a server about to be forked (in the master), or -1: none left."""
        for i in range(self.slots):
            if self._view[i] == self.FREE:
                self._view[i] = self.BOOTING
                return i
        return -1

    def release(self, slot: int) -> None:
        if 0 <= slot < self.slots:
            self._view[slot] = self.FREE

    def set(self, slot: int, value: int) -> None:
        if 0 <= slot < self.slots:
            self._view[slot] = value

    def least_other(self, slot: int) -> int | None:
        """The fewest connections any other accepting server holds (None: no other)."""
        loads = [v for i, v in enumerate(self._view) if v >= 0 and i != slot]
        return min(loads) if loads else None



def bind_listener(host: str, port: int) -> socket.socket:
    """The TCP listen socket every dq-server shares; opened once, never closed on reload."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # before bind
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        error = AddressInUse if exc.errno == errno.EADDRINUSE else BootError
        raise error(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
