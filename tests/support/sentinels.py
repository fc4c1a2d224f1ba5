"""A real Redis Sentinel setup on loopback free ports: 1 master, replicas, 3 sentinels.

Used by tests/test_sentinel.py and bench/ (python -m bench.add --sentinel ...). Sentinels
decide quickly (down-after-milliseconds 1000, failover-timeout 3000), so a master killed
with -9 is replaced within a few seconds.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import hiredis

from tests.support.procs import free_port, stop

SERVICE = "mymaster"


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


def info(port: int, section: str = "replication") -> dict[str, str]:
    """INFO <section> of a local Redis as a dict."""
    text = cmd(port, "INFO", section)
    assert isinstance(text, bytes), text
    out = {}
    for line in text.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value
    return out


class Proc:
    """A redis-server (or sentinel) on a free loopback port."""

    def __init__(self, home: Path, args: list[str], *, port: int = 0) -> None:
        self.port = port or free_port()
        self.home = home / str(self.port)
        self.home.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be on PATH"
        self.proc = subprocess.Popen([binary, *self.args], cwd=self.home,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if cmd(self.port, "PING", timeout=0.2) == b"PONG":
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis on port {self.port} did not start")

    def kill(self) -> None:
        """kill -9."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        stop(self.proc)


def redis_args(port: int, *, replicaof: int | None = None, fsync: str = "everysec",
               ) -> list[str]:
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", fsync, "--dir", ".", "--daemonize", "no",
            "--loglevel", "warning", "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0"]
    if replicaof:
        args += ["--replicaof", "127.0.0.1", str(replicaof)]
    return args


class SentinelSetup:
    """A master, `replicas` replicas and 3 sentinels monitoring them as SERVICE."""

    def __init__(self, home: Path, *, replicas: int = 1, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.n_replicas = replicas
        self.servers: list[Proc] = []
        self.sentinels: list[Proc] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> SentinelSetup:
        master = Proc(self.home, [])
        master.args = redis_args(master.port)
        self.servers.append(master.start())
        for _ in range(self.n_replicas):
            rep = Proc(self.home, [])
            rep.args = redis_args(rep.port, replicaof=master.port)
            self.servers.append(rep.start())
        self._wait(lambda: all("state=online" in info(master.port).get(f"slave{i}", "")
                               for i in range(self.n_replicas)), "the replicas to connect")
        for _ in range(3):
            port = free_port()
            conf = self.home / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.home}\n"
                f"loglevel warning\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            self.sentinels.append(Proc(self.home, [str(conf), "--sentinel"], port=port).start())
        # Ready for a failover once every sentinel knows the replicas and the others.
        for s in self.sentinels:
            self._wait(lambda s=s: len(cmd(s.port, "SENTINEL", "replicas", SERVICE))  # type: ignore[arg-type]
                       >= self.n_replicas, "the sentinels to see the replicas")
            self._wait(lambda s=s: len(cmd(s.port, "SENTINEL", "sentinels", SERVICE))  # type: ignore[arg-type]
                       >= 2, "the sentinels to see each other")
        return self

    def _wait(self, pred: object, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if pred():  # type: ignore[operator]
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers sees it."""
        for s in self.sentinels:
            try:
                reply = cmd(s.port, "SENTINEL", "get-master-addr-by-name", SERVICE)
            except OSError:
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return int(reply[1])
        raise RuntimeError("no sentinel names a master")

    def master(self) -> Proc:
        port = self.master_port()
        return next(p for p in self.servers if p.port == port)

    def wait_failover(self, old: int, timeout: float = 30.0) -> int:
        """The new master's port once the sentinels have promoted a replica."""
        self._wait(lambda: self.master_port() != old and
                   info(self.master_port()).get("role") == "master", "a failover", timeout)
        return self.master_port()

    def stop(self) -> None:
        for p in [*self.sentinels, *self.servers]:
            p.stop()
