"""A real Redis Sentinel setup on loopback free ports: 1 master, replicas, 3 sentinels.

Used by tests/test_sentinel.py and bench/ (python -m bench.add --sentinel ...). Sentinels
decide quickly (down-after-milliseconds 1000, failover-timeout 3000), so a master killed
with -9 is replaced within a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.procs import cmd, free_port, start_redis, stop
from tests.support.tls import TlsFiles

SERVICE = "mymaster"


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
    """A redis-server (or sentinel) on a free loopback port: `args(port)` are its arguments,
    run in a directory of its own under `home`."""

    def __init__(self, home: Path, args: Callable[[int], list[str]]) -> None:
        self.home = home
        self.port = free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be on PATH"
        cwd = self.home / str(port)
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([binary, *self.args(port)], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> Proc:
        """Start (on another free port when this one was taken meanwhile)."""
        self.port, self.proc = start_redis(self._launch, self.port, free_port)
        return self

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
        master = Proc(self.home, self._server_args).start()
        self.servers.append(master)
        for _ in range(self.n_replicas):
            rep = Proc(self.home, lambda port: self._server_args(port, self._link(master)))
            self.servers.append(rep.start())
        self._wait(lambda: all("state=online" in info(master.port).get(f"slave{i}", "")
                               for i in range(self.n_replicas)), "the replicas to connect")
        for _ in range(3):
            self.sentinels.append(Proc(self.home, self._sentinel_args).start())
        # Ready for a failover once every sentinel knows the replicas and the others.
        for s in self.sentinels:
            self._wait(lambda s=s: len(cmd(s.port, "SENTINEL", "replicas", SERVICE))  # type: ignore[arg-type]
                       >= self.n_replicas, "the sentinels to see the replicas")
            self._wait(lambda s=s: len(cmd(s.port, "SENTINEL", "sentinels", SERVICE))  # type: ignore[arg-type]
                       >= 2, "the sentinels to see each other")
        return self

    def _sentinel_args(self, port: int) -> list[str]:
        conf = self.home / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.home}\n"
            f"loglevel warning\n"
            f"{self._sentinel_extra(port)}"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self._link(self.servers[0])} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n")
        return [str(conf), "--sentinel"]

    # What a TLS set-up (TlsSentinelSetup) does otherwise:
    def _server_args(self, port: int, replicaof: int | None = None) -> list[str]:
        return redis_args(port, replicaof=replicaof)

    def _link(self, proc: Proc) -> int:
        """The port replicas and sentinels reach `proc` on (and the sentinels name)."""
        return proc.port

    def _plain(self, port: int) -> int:
        """The plain port of the server the sentinels name by `port`."""
        return port

    def _sentinel_extra(self, port: int) -> str:
        return ""

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
        """The master's (plain) port as the first sentinel that answers sees it."""
        for s in self.sentinels:
            try:
                reply = cmd(s.port, "SENTINEL", "get-master-addr-by-name", SERVICE)
            except OSError:
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return self._plain(int(reply[1]))
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


class TlsSentinelSetup(SentinelSetup):
    """The same over TLS: servers and sentinels listen on a TLS port beside their plain one
    (which this class's own checks use), replicate and link over TLS, and the sentinels name
    the TLS ports; `url` is a rediss+sentinel:// URL of the sentinels' TLS ports."""

    def __init__(self, home: Path, tls: TlsFiles, **kw: Any) -> None:
        super().__init__(home, **kw)
        self.tls = tls
        self.tls_ports: dict[int, int] = {}  # plain port -> TLS port

    def tls_port(self, port: int) -> int:
        return self.tls_ports.setdefault(port, free_port())

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{self.tls_port(s.port)}" for s in self.sentinels)
        return f"rediss+sentinel://{hosts}/{SERVICE}"

    def _server_args(self, port: int, replicaof: int | None = None) -> list[str]:
        return redis_args(port, replicaof=replicaof) + self.tls.server_args(self.tls_port(port))

    def _link(self, proc: Proc) -> int:
        return self.tls_port(proc.port)

    def _plain(self, port: int) -> int:
        return next(plain for plain, tls in self.tls_ports.items() if tls == port)

    def _sentinel_extra(self, port: int) -> str:
        return self.tls.conf_lines(self.tls_port(port))
