"""A real Redis Cluster for tests: 3 masters + 3 replicas on free loopback ports."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.procs import free_port, start_redis, stop
from tests.support.tls import TlsFiles

NODE_TIMEOUT_MS = 2000  # how long a silent master takes to be failed over (+ an election)


def cli(*args: str, timeout: float = 120.0) -> str:
    binary = shutil.which("redis-cli")
    assert binary, "redis-cli must be on PATH for the cluster tests"
    out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)} failed: {out.stdout} {out.stderr}")
    return out.stdout


def node_port() -> int:
    """A free port whose cluster bus port (+10000) is a valid port and free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNode:
    def __init__(self, home: Path, tls: TlsFiles | None = None) -> None:
        self.home = home
        self.port = node_port()
        # with TLS: the port clients over TLS reach the node on (its bus port, +10000, is
        # TLS too); `port` stays plain for this harness's own checks (Redis names each node
        # by the plain port to a plain client, by the TLS port to a TLS client)
        self.tls = tls
        self.tls_port = node_port() if tls else 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def link(self) -> int:
        """The port the cluster (and a client following its map) reaches the node on."""
        return self.tls_port or self.port

    @property
    def dir(self) -> Path:
        return self.home / f"node-{self.port}"

    def _launch(self, port: int) -> subprocess.Popen[bytes]:
        binary = shutil.which("redis-server")
        assert binary, "redis-server must be on PATH for the tests"
        data = self.home / f"node-{port}"
        data.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled",
             "yes", "--cluster-config-file", str(data / "nodes.conf"),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "",
             "--appendonly", "yes", "--dir", str(data), "--daemonize", "no",
             "--loglevel", "warning",
             *([*self.tls.server_args(self.tls_port), "--tls-cluster", "yes"]
               if self.tls else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        """Start; the first time on another free port when this one was taken meanwhile, a
        restart on its own port and data."""
        pick = None if self.started else node_port
        self.port, self.proc = start_redis(self._launch, self.port, pick, timeout=20)
        self.started = True

    def cli(self, *args: str) -> str:
        return cli("-p", str(self.port), *args)

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the node hangs, its connections stay open (a hung host)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process acts on TERM only once continued
        stop(self.proc)


class RedisCluster:
    """`redis-cli --cluster create` over 6 nodes with --cluster-replicas 1."""

    def __init__(self, home: Path, nodes: int = 6, tls: TlsFiles | None = None) -> None:
        self.tls = tls
        self.nodes = [ClusterNode(home, tls) for _ in range(nodes)]

    @property
    def url(self) -> str:
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{n.link}" for n in self.nodes[:3])

    def start(self) -> RedisCluster:
        for n in self.nodes:
            n.start()
        over = ["--tls", "--cacert", str(self.tls.ca)] if self.tls else []
        cli(*over, "--cluster", "create", *(f"127.0.0.1:{n.link}" for n in self.nodes),
            "--cluster-replicas", "1", "--cluster-yes")
        self.wait_ok()
        return self

    def alive(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def replicas_synced(self) -> bool:
        """Every live replica has its master's data (a replica still syncing cannot be
        promoted when its master dies)."""
        for n in self.alive():
            info = n.cli("INFO", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and sees the same masters, and every
        replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.alive()) \
                        and len({tuple(sorted(self.masters_seen_by(n)))
                                 for n in self.alive()}) == 1 and self.replicas_synced():
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)
        raise AssertionError("the cluster did not reach cluster_state:ok")

    def masters_seen_by(self, node: ClusterNode) -> list[int]:
        out = node.cli("CLUSTER", "NODES")
        return [int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                for line in out.splitlines()
                if "master" in line.split()[2] and "fail" not in line.split()[2]
                and line.split()[8:]]

    def masters(self) -> list[ClusterNode]:
        ports = set(self.masters_seen_by(self.alive()[0]))
        return [n for n in self.alive() if n.port in ports]

    def wait_failed_over(self, victim: ClusterNode, timeout: float = 60.0) -> None:
        """Until another node flags `victim` as failed and says cluster_state:ok again (a
        replica of it serves its slots)."""
        other = next(n for n in self.alive() if n is not victim)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                flags = [line.split()[2] for line in other.cli("CLUSTER", "NODES").splitlines()
                         if f":{victim.port}@" in line.split()[1]]
                if flags and "fail" in flags[0].split(",") and \
                        "cluster_state:ok" in other.cli("CLUSTER", "INFO"):
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        raise AssertionError(f"node :{victim.port} was not failed over")

    def node_id(self, node: ClusterNode) -> str:
        return node.cli("CLUSTER", "MYID").strip()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
