"""The harness the delivery benchmarks share: a lean HTTP callback receiver and dq's real
timer and consumer roles, each in a child process.

Both are context managers that start their children on entry and stop them on exit. Nest
them receiver first, so that the roles stop (finishing the callbacks they have in flight)
before the receiver hands over what it saw:

    ctx = mp.get_context("fork")  # children start before this process runs an event loop
    with Receiver(ctx, port) as rx, roles(ctx, settings):
        ...add jobs...
        rx.wait(n, timeout)
    rx.arrivals  # job id -> arrival time (epoch s); a repeat is kept as 'dup:<id>:<time>'
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.context import ForkContext, ForkProcess
from multiprocessing.synchronize import Event as MpEvent
from types import TracebackType
from typing import Any

from dq.config import Settings
from dq.roles import consumer, timer
from dq.runtime.context import Context, run_loop

REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Type: application/json\r\n\r\n" \
        b'{"code":0}'


# receiver (child process) ---------------------------------------------------------------
class _Http(asyncio.Protocol):
    """Just enough HTTP/1.1 for a callback client: keep-alive, Content-Length bodies, 200 to all."""

    def __init__(self, arrivals: dict[str, float], count: Any) -> None:
        self.arrivals, self.count, self.buf = arrivals, count, b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            length = 0
            job = ""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-dq-id":
                    job = value.strip().decode()
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            now = time.time()
            if job in self.arrivals:
                self.arrivals[f"dup:{job}:{now}"] = now
            else:
                self.arrivals[job] = now
            self.count.value += 1
            assert self.transport is not None
            self.transport.write(REPLY)


def _receiver_main(port: int, count: Any, ready: MpEvent, stop: MpEvent,
                   out: Connection) -> None:
    arrivals: dict[str, float] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Http(arrivals, count), "127.0.0.1", port,
                                          backlog=2048)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        server.close()

    asyncio.run(main())
    out.send(arrivals)


class Receiver:
    """The receiver on 127.0.0.1:`port` in a child process, running inside a `with` block.

    `count` is the number of callbacks so far (shared memory); `arrivals` is filled in when
    the block exits.
    """

    def __init__(self, ctx: ForkContext, port: int) -> None:
        self.count = ctx.Value("i", 0)
        self.arrivals: dict[str, float] = {}
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self._rx, tx = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_receiver_main,
                                   args=(port, self.count, self._ready, self._stop, tx))

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def wait(self, n: int, timeout: float, poll: float = 0.01) -> None:
        """Return once `n` callbacks have arrived, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.count.value < n and time.monotonic() < deadline:
            time.sleep(poll)

    def __enter__(self) -> Receiver:
        self.process.start()
        self._ready.wait(10)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self.arrivals = self._rx.recv() if self._rx.poll(10) else {}
        self.process.join(5)


# dq roles (child processes) -------------------------------------------------------------
def _role_main(role: str, index: int, settings: Settings, stop: MpEvent) -> None:
    logging.basicConfig(level=logging.INFO, format=f"  [{role}-{index}] %(message)s")
    for quiet in ("dq.notify", "dq.registry.core", "dq.registry.topics"):
        logging.getLogger(quiet).setLevel(logging.WARNING)

    async def main() -> None:
        ctx = Context(settings, role, index)

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            ctx.stopping.set()

        watcher = asyncio.create_task(watch())
        await (timer.run(ctx) if role == "timer" else consumer.run(ctx))
        watcher.cancel()

    run_loop(main())  # the loop dq's own children run on (uvloop when installed)


@contextmanager
def roles(ctx: ForkContext, settings: Settings) -> Iterator[list[ForkProcess]]:
    """`settings.timers` timer and `settings.consumers` consumer processes, the real
    `dq.roles.timer.run` and `dq.roles.consumer.run`, for the length of a `with` block."""
    stop = ctx.Event()
    procs = [ctx.Process(target=_role_main, args=(role, i, settings, stop))
             for role, n in (("timer", settings.timers), ("consumer", settings.consumers))
             for i in range(n)]
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        stop.set()
        for p in procs:
            p.join(30)
