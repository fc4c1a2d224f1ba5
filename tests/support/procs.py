"""Ports and processes every helper shares: a free port, a Redis (or sentinel) started on
one, one command to it, stopping a child process.

The tests run in parallel (pytest-xdist), and other test runs may share the machine. A port
from `free_port()` is checked free and then released, so another process could take it
before the server binds it; three things make that rare and harmless:
- the ports come from below Linux's ephemeral range (32768-60999), so no outgoing
  connection (a client's, a Receiver's bind to port 0) takes one meanwhile;
- each xdist worker draws from a slice of its own, from a random point on, so two workers
  do not pick the same port;
- `start_redis` checks that the server answering is the one it started (INFO's
  process_id), and on a first start moves to another free port when the port was taken.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import hiredis

_LOW, _HIGH, _SLICES = 10000, 32000, 16
_SIZE = (_HIGH - _LOW) // _SLICES


def _slice_ports() -> Iterator[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...; unset when serial
    n = int(worker[2:]) if worker[2:].isdigit() else _SLICES - 1
    low = _LOW + (n % _SLICES) * _SIZE
    at = random.randrange(_SIZE)
    while True:
        at = (at + 1) % _SIZE
        yield low + at


_ports = _slice_ports()


def free_port() -> int:
    """A loopback port nothing listens on, from this worker's slice."""
    for _ in range(_SIZE):
        port = next(_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in this worker's slice")


def cmd(port: int, *args: str, timeout: float = 1.0) -> object:
    """One command to a local Redis or sentinel; its reply (hiredis: bytes, int, list)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(hiredis.pack_command(args))
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionResetError(f"redis on port {port} closed the connection")
            reader.feed(chunk)
        return reply


def _answers_as(port: int, pid: int) -> bool:
    """Whether the Redis on `port` is process `pid` (not another test's on a port both
    picked)."""
    reply = cmd(port, "INFO", "server", timeout=0.5)
    return isinstance(reply, bytes) and f"process_id:{pid}\r\n".encode() in reply


def start_redis(launch: Callable[[int], subprocess.Popen[bytes]], port: int,
                pick: Callable[[], int] | None = None, *, timeout: float = 10.0,
                ) -> tuple[int, subprocess.Popen[bytes]]:
    """`launch(port)` (a redis-server or sentinel listening on `port`) until it answers;
    when it exits first (its port was taken) and `pick` is given, again on `pick()`'s port,
    up to 3 times. Returns the port and the process."""
    for _ in range(3):
        proc = launch(port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _answers_as(port, proc.pid):
                    return port, proc
            except OSError:
                pass
            time.sleep(0.02)
        stop(proc)
        if pick is None:
            break
        port = pick()
    raise RuntimeError(f"redis on port {port} did not start")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """TERM a child and reap it; kill -9 it when it has not exited within `timeout` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
