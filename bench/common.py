"""Shared pieces of the benchmarks: real redis-servers, a registry, a dq-master, /proc CPU."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dq.registry.core import Registry, Topic

ROOT = Path(__file__).resolve().parent.parent
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def cpu_us(pids: Sequence[int]) -> float:
    """User+system CPU microseconds the processes have used so far (from /proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) * TICK_US
    return total


def pids_titled(prefix: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if cmd.startswith(prefix):
                out.append(int(d.name))
    return out


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * (len(s) - 1) + 0.5))]


@contextmanager
def redis_servers(n: int, tmp: Path, *, appendonly: bool = False) -> Iterator[list[
        tuple[str, subprocess.Popen[bytes]]]]:
    procs = []
    try:
        for i in range(n):
            port = free_port()
            d = tmp / f"redis{i}"
            d.mkdir()
            p = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes" if appendonly else "no", "--dir", str(d)],
                stdout=subprocess.DEVNULL)
            procs.append((f"redis://127.0.0.1:{port}/0", p))
            wait_port(port)
        yield procs
    finally:
        for _, p in procs:
            p.terminate()
            p.wait()


def register(db: str, topic: str, callback: str = "http://127.0.0.1:9/", **kw: object) -> None:
    reg = Registry(db)
    fields: dict[str, object] = dict(
        id=0, topic=topic, name=topic, delay=3600, callback=callback, method="POST",
        timeout_ms=3000, emails=(), retry_when="", priority=2, online=True, max_attempts=0,
        secret="", body_format="form", creator="bench")
    fields.update(kw)
    reg.save_topic(Topic(**fields))  # type: ignore[arg-type]
    reg.close()


@contextmanager
def dq_master(args: Sequence[str], port: int, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = open(tmp / "master.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "dq.cli", "--port", str(port),
                             "--data-dir", str(tmp / "var"), *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        wait_port(port)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


SETUPS = ("plain", "replica", "sentinel")
SETUP_HELP = ("the Redis behind each shard: plain (one redis-server, the default), replica "
              "(a master and 1 replica, a redis:// URL to the master), sentinel (a master, 1 "
              "replica and 3 sentinels, a redis+sentinel:// URL); replica and sentinel start "
              "one shard")


@contextmanager
def stores(shards: int, tmp: Path, *, cluster: bool = False, urls: Sequence[str] = (),
           setup: str = "plain") -> Iterator[tuple[list[str], list[int]]]:
    """The shard URLs a benchmark runs on and the redis-server pids behind them (for their
    CPU): `urls` as given (pids unknown), else a local Redis Cluster of 3 masters + 3
    replicas (`cluster`), else a master with 1 replica, reached directly (`setup`
    "replica") or through 3 sentinels ("sentinel"), else `shards` plain redis-servers."""
    if urls:
        yield list(urls), []
    elif cluster:
        from tests.support.rediscluster import RedisCluster

        c = RedisCluster(tmp / "cluster")
        try:
            c.start()
            yield [c.url], [n.proc.pid for n in c.nodes if n.proc is not None]
        finally:
            c.stop()
    elif setup in ("replica", "sentinel"):
        from tests.support.sentinels import SentinelSetup

        s = SentinelSetup(tmp / "sentinel", replicas=1)
        try:
            s.start()
            pids = [p.proc.pid for p in s.servers if p.proc]
            master = f"redis://127.0.0.1:{s.master_port()}/0"
            yield [s.url if setup == "sentinel" else master], pids
        finally:
            s.stop()
    else:
        with redis_servers(shards, tmp) as procs:
            yield [url for url, _ in procs], [p.pid for _, p in procs]


@contextmanager
def dq_stack(servers: int = 1, shards: int = 2, *, cluster: bool = False,
             urls: Sequence[str] = (), setup: str = "plain", replica_acks: int = 0,
             ) -> Iterator[tuple[int, list[int]]]:
    """`shards` redis-servers (or a local Redis Cluster, a Sentinel setup, or the shards at
    `urls`: see `stores`), a registry with the topic "bench", and a dq-master with
    `servers` server processes (1 timer, 1 consumer, no console, `replica_acks`) on a free
    port, up and settled: (its port, the redis-servers' pids)."""
    with tempdir() as t, stores(shards, Path(t), cluster=cluster, urls=urls,
                                setup=setup) as (found, pids):
        tmp = Path(t)
        db = f"sqlite:///{tmp / 'reg.sqlite3'}"
        register(db, "bench")
        port = free_port()
        flags = ["--db", db, "--servers", str(servers), "--timers", "1", "--consumers", "1",
                 "--no-web", "--replica-acks", str(replica_acks)]
        for url in found:
            flags += ["--redis", url]
        with dq_master(flags, port, tmp):
            wait_answers(port)
            time.sleep(1.0)
            yield port, pids


def wait_answers(port: int, timeout: float = 60.0) -> None:
    """Until a dq-server answers a ping on the port: the master listens on it before its
    server processes are up (seconds on a loaded machine), and a measurement must not
    count that wait."""
    from dq.client import DqClient

    client = DqClient([f"127.0.0.1:{port}"], timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


def dqload_binary() -> str | None:
    """Build ../shared/tools/dqload.c into bench/dqload when a C compiler is there."""
    out = ROOT / "bench" / "dqload"
    if out.exists():
        return str(out)
    # ../shared from the main checkout, ../../shared from a worktree in /work/wt/NAME
    src = next((p for p in (ROOT.parent / "shared" / "tools" / "dqload.c",
                            ROOT.parent.parent / "shared" / "tools" / "dqload.c")
                if p.exists()), None)
    cc = shutil.which("gcc") or shutil.which("cc")
    if src is None or not cc:
        return None
    subprocess.run([cc, "-O2", "-o", str(out), str(src)], check=True)
    return str(out)


def tempdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="dqbench-")
