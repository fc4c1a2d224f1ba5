"""The master's signal queue and wakeup pipe (gunicorn's shape).

A handler only records the signal and writes a byte to the pipe: no logging, no I/O
beyond that byte, no kill. The main loop sleeps on the pipe, then takes the signals in
order and dispatches `handle_<name>()`.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any

SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR2, signal.SIGCHLD)
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
HANDLERS = {sig: "handle_" + sig.name[3:].lower() for sig in SIGNALS}


class SignalQueue:
    """The signals the master received and has not handled yet, and the pipe that wakes
    its loop when one arrives."""

    def __init__(self) -> None:
        self.queue: list[int] = []
        self.pipe: tuple[int, int] = (-1, -1)

    def install(self) -> None:
        self.pipe = os.pipe()
        for fd in self.pipe:
            os.set_blocking(fd, False)
        for sig in SIGNALS:
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def on_signal(self, sig: int, frame: Any) -> None:
        """Only record the signal and wake the loop: no logging, no I/O, no kill here."""
        if not (sig == signal.SIGCHLD and sig in self.queue):
            self.queue.append(sig)
        self.wakeup()

    def wakeup(self) -> None:
        try:
            os.write(self.pipe[1], b".")
        except OSError:
            pass

    def next_handler(self) -> str | None:
        """The name of the method that handles the oldest signal queued (None: none)."""
        return HANDLERS[signal.Signals(self.queue.pop(0))] if self.queue else None

    def wait(self, timeout: float) -> None:
        """Until a signal arrives, at most `timeout` seconds."""
        try:
            ready, _, _ = select.select([self.pipe[0]], [], [], timeout)
            if ready:
                while os.read(self.pipe[0], 512):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

    def escalated(self) -> bool:
        """Whether a stop signal came again (a second stop means: fast); forgets the rest."""
        hit = any(sig in STOPS for sig in self.queue)
        self.queue.clear()
        return hit
