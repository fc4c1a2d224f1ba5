"""Reloads keep established client connections (issue 16, point 4), and do not stack.

The original's PHP client (DqClient::connect) opens one connection, never reconnects and
gives up on a reply after 1 s (SO_RCVTIMEO); its Java client also keeps one connection.
Such clients must see every request answered, once and in order, across USR2/HUP reloads
of a real dq-master; quick reloads must fold instead of stacking generations.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dq.client import DqClient
from tests.support.masters import Master
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess

TOPIC = "reload"
RCV_TIMEOUT = 1.0  # the PHP client's SO_RCVTIMEO


def frame(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return b"%04d" % len(data) + data


class PhpClient:
    """What DqClient.php does: one TCP connection, never reconnected, `NNNN{json}` frames,
    a 1 s receive timeout; a failed read is a failed request."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.sock.settimeout(RCV_TIMEOUT)
        self.local = self.sock.getsockname()

    def read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            out += chunk
        return out

    def reply(self) -> dict[str, Any]:
        head = self.read_exact(4)
        assert head.isdigit(), head
        out: dict[str, Any] = json.loads(self.read_exact(int(head)))
        return out

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(frame(req))
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def add(job_id: str) -> dict[str, Any]:
    return {"cmd": "add", "topic": TOPIC, "id": job_id, "body": {"id": job_id},
            "delay": 3600}


def get(job_id: str) -> dict[str, Any]:
    return {"cmd": "get", "topic": TOPIC, "id": job_id}


def register_topic(db_url: str) -> None:
    from dq.registry.core import Registry, Topic

    reg = Registry(db_url)
    reg.save_topic(Topic(id=0, topic=TOPIC, name=TOPIC, delay=0,
                         callback="http://127.0.0.1:9/never", method="POST", timeout_ms=5000,
                         emails=(), retry_when="", priority=2, online=True, max_attempts=0,
                         secret="", body_format="form", creator=""))
    reg.close()


def titles(*, servers: int, timers: int = 1, consumers: int = 1) -> list[str]:
    return sorted([*(f"dq-server-{i}" for i in range(servers)),
                   *(f"dq-timer-{i}" for i in range(timers)),
                   *(f"dq-consumer-{i}" for i in range(consumers)), "dq-checker"])


@pytest.fixture
def dq_master(tmp_path: Path, redis_server: RedisProcess) -> Iterator[Callable[..., Master]]:
    """A real dq-master on `redis_server` with the topic registered, no console."""
    started: list[Master] = []
    db = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    register_topic(db)

    def make(*args: str, env: dict[str, str] | None = None, toml: str = "") -> Master:
        home = tmp_path / f"m{len(started)}"
        if toml:
            home.mkdir(parents=True)
            (home / "dq.toml").write_text(toml)
        else:
            args = ("--consumers", "1", *args)
        m = Master(home, free_port(), ["--redis", redis_server.url, "--db", db, "--no-web",
                                       "--timers", "1", *args], env or {})
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


def reload_and_wait(m: Master, sig: int, want: list[str], generation: int) -> None:
    """Send a reload signal; wait until the new generation is up and the old one gone."""
    old = set(m.workers())
    m.kill(sig)
    m.wait(f"generation {generation} up", lambda: f"generation {generation} is up"
           in m.output(), timeout=60)
    m.wait("the old generation gone", lambda: not old & set(m.workers())
           and m.titles() == want, timeout=60)


def stored(redis_server: RedisProcess, ids: list[str]) -> set[str]:
    import redis

    r = redis.Redis(port=redis_server.port)
    try:
        keys = [f"{TOPIC}:{i}" for i in ids]
        found = r.hmget("dq:jobs", keys) if keys else []
        return {i for i, v in zip(ids, found, strict=True) if v is not None}
    finally:
        r.close()


# --------------------------------------------------------------------------------------


def _php_adder(port: int, stop: threading.Event, added: list[str], failed: list[str],
               tag: str, slowest: list[float]) -> None:
    client = PhpClient(port)
    n = 0
    try:
        while not stop.is_set() and len(failed) < 5:
            n += 1
            job = f"{tag}-{n}"
            t0 = time.monotonic()
            try:
                rep = client.call(add(job))
            except OSError as exc:  # a timeout, a reset, a close: what PHP sees as false
                failed.append(f"{job}: {exc!r}")
                continue
            slowest[0] = max(slowest[0], time.monotonic() - t0)
            if rep.get("code") == 1:
                added.append(job)
            else:
                failed.append(f"{job}: {rep}")
            time.sleep(0.003)
    finally:
        client.close()


def _py_adder(port: int, stop: threading.Event, added: list[str], failed: list[str],
              socks: list[object]) -> None:
    with DqClient([f"127.0.0.1:{port}"], timeout=RCV_TIMEOUT) as client:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                client.add(TOPIC, f"py-{n}", {"n": n}, delay=3600)
                added.append(f"py-{n}")
            except Exception as exc:
                failed.append(f"py-{n}: {exc!r}")
            if client._sock not in socks:
                socks.append(client._sock)
            time.sleep(0.003)


def test_php_client_adds_through_five_reloads_on_one_connection(
        dq_master: Callable[..., Master], redis_server: RedisProcess) -> None:
    """USR2, HUP, USR2, HUP, USR2 while a PHP-like client (one connection, 1 s receive
    timeout) and the Python DqClient add without pause: zero failures, every add
    answered and stored, and neither client needed a second connection."""
    m = dq_master("--servers", "2")
    want = titles(servers=2)
    m.wait_titles(want, timeout=60)
    m.wait("generation 0 up", lambda: "generation 0 is up" in m.output(), timeout=60)
    stop = threading.Event()
    php_added: list[str] = []
    php_failed: list[str] = []
    py_added: list[str] = []
    py_failed: list[str] = []
    py_socks: list[object] = []
    slowest = [0.0]
    threads = [threading.Thread(target=_php_adder, args=(m.port, stop, php_added, php_failed,
                                                          f"php{i}", slowest))
               for i in range(2)]
    threads.append(threading.Thread(target=_py_adder,
                                    args=(m.port, stop, py_added, py_failed, py_socks)))
    for t in threads:
        t.start()
    try:
        m.wait("adds flowing", lambda: len(php_added) > 40 and len(py_added) > 20)
        for gen, sig in enumerate((signal.SIGUSR2, signal.SIGHUP) * 2 + (signal.SIGUSR2,),
                                  start=1):
            before = len(php_added)
            reload_and_wait(m, sig, want, gen)
            # the clients go on adding on their connections after the reload too
            m.wait("adds after the reload", lambda b=before: len(php_added) > b + 20
                   or bool(php_failed))
            assert php_failed == [], (gen, php_failed[:5])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert php_failed == [], php_failed[:5]
    assert py_failed == [], py_failed[:5]
    assert len(py_socks) == 1, "the Python client had to reconnect"
    handed = [int(n) for n in re.findall(r"handed (\d+) connections to the new generation",
                                         m.output())]
    # 2 old servers a reload; between them they held the 3 clients' connections
    assert len(handed) == 10 and sum(handed) >= 5 * 3, handed
    assert stored(redis_server, php_added) == set(php_added)
    assert stored(redis_server, py_added) == set(py_added)
    print(f"5 reloads: {len(php_added)} PHP-client adds, {len(py_added)} DqClient adds, "
          f"no failure; slowest PHP-client reply {slowest[0] * 1000:.0f} ms; handed {handed}")


def _pipeliner(port: int, stop: threading.Event, log: dict[str, Any]) -> None:
    """Batches of 40 pipelined frames (add i, get i, ...) on one connection: each reply
    must come once, in order, within 1 s."""
    client = PhpClient(port)
    n = 0
    try:
        while not stop.is_set():
            batch = []
            for _ in range(20):
                n += 1
                batch.append((add(f"p-{n}"), f"p-{n}"))
                batch.append((get(f"p-{n}"), f"p-{n}"))
            client.sock.sendall(b"".join(frame(req) for req, _ in batch))
            for req, job in batch:
                try:
                    rep = client.reply()
                except OSError as exc:
                    log["errors"].append(f"{req['cmd']} {job}: {exc!r}")
                    return  # the stream is out of step now
                if rep.get("code") != 1:
                    log["errors"].append(f"{req['cmd']} {job}: {rep}")
                elif req["cmd"] == "get" and rep["data"].get("id") != job:
                    log["errors"].append(f"get {job} answered with {rep['data']}")
                log["answered"] += 1
            log["batches"] += 1
        # nothing more may arrive: a reply answered twice would show here
        client.sock.settimeout(0.3)
        try:
            extra = client.sock.recv(65536)
        except TimeoutError:
            extra = b""
        if extra:
            log["errors"].append(f"unasked-for bytes: {extra[:200]!r}")
    finally:
        log["sent"] = 2 * n
        client.close()


def test_pipelined_requests_in_flight_at_a_reload_are_answered_once_in_order(
        dq_master: Callable[..., Master], redis_server: RedisProcess) -> None:
    m = dq_master("--servers", "2")
    want = titles(servers=2)
    m.wait_titles(want, timeout=60)
    m.wait("generation 0 up", lambda: "generation 0 is up" in m.output(), timeout=60)
    stop = threading.Event()
    logs = [{"errors": [], "answered": 0, "batches": 0, "sent": 0} for _ in range(3)]
    threads = [threading.Thread(target=_pipeliner, args=(m.port, stop, log)) for log in logs]
    for t in threads:
        t.start()
    try:
        m.wait("batches flowing", lambda: all(log["batches"] > 5 for log in logs))
        for gen, sig in enumerate((signal.SIGUSR2, signal.SIGHUP, signal.SIGUSR2), start=1):
            reload_and_wait(m, sig, want, gen)
            marks = [log["batches"] for log in logs]
            m.wait("batches after the reload", lambda mk=marks: all(
                log["batches"] > k + 5 or log["errors"] for log, k in zip(logs, mk,
                                                                         strict=True)))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    for log in logs:
        assert log["errors"] == [], log["errors"][:5]
        assert log["answered"] == log["sent"] > 0, log
    print("pipelined through 3 reloads:", [log["answered"] for log in logs])


def test_a_frame_begun_before_a_reload_is_finished_after_it(
        dq_master: Callable[..., Master]) -> None:
    """Half a frame, then a reload that replaces the server: the other half, sent once
    the old server has exited, completes it on the new one; so does an oversized frame
    whose reply came before the reload and whose rest is dropped after it."""
    m = dq_master("--servers", "1", env={"DQ_MAX_FRAME": "2000"})
    want = titles(servers=1)
    m.wait_titles(want, timeout=60)
    m.wait("generation 0 up", lambda: "generation 0 is up" in m.output(), timeout=60)
    half = PhpClient(m.port)
    big = PhpClient(m.port)
    try:
        assert half.call({"cmd": "ping"})["code"] == 1
        whole = frame(add("half-1"))
        half.sock.sendall(whole[:25])
        big.sock.sendall(b"3000" + b"x" * 500)  # 3,000 bytes of JSON: more than 2,000
        too_large = big.reply()
        assert too_large["code"] == 0 and "3000 bytes" in too_large["msg"], too_large
        time.sleep(0.3)  # the old server has read both
        old_server = m.pid_of("dq-server-0")
        reload_and_wait(m, signal.SIGUSR2, want, 1)
        assert old_server not in m.workers()
        half.sock.sendall(whole[25:] + frame(get("half-1")))
        assert half.reply()["code"] == 1
        assert half.reply()["data"]["id"] == "half-1"
        big.sock.sendall(b"x" * 2500 + frame({"cmd": "ping"}))
        assert big.reply() == {"code": 1, "msg": "succ", "data": []}
    finally:
        half.close()
        big.close()


def test_quick_reloads_fold_and_never_stack_generations(
        dq_master: Callable[..., Master], tmp_path: Path) -> None:
    """10 USR2 0.3-1 s apart, dq.toml changing between them: the dq children alive never
    exceed the configured number plus one starting generation, and the end is one
    generation running the last configuration."""
    m = dq_master("--servers", "2", toml="consumers = 1\n")
    toml = m.home / "dq.toml"
    configured = len(titles(servers=2, consumers=3))  # the most any dq.toml below asks
    m.wait_titles(titles(servers=2), timeout=60)
    m.wait("generation 0 up", lambda: "generation 0 is up" in m.output(), timeout=60)
    peak = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(m.workers()))
            time.sleep(0.02)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        delays = [0.3, 0.7, 0.4, 1.0, 0.3, 0.5, 0.9, 0.3, 0.6, 0.4]
        for i, delay in enumerate(delays):
            toml.write_text(f"consumers = {1 + i % 3}\n")  # the last one: 10 % 3 -> 1 + 0
            m.kill(signal.SIGUSR2)
            time.sleep(delay)
        final = titles(servers=2, consumers=1 + (len(delays) - 1) % 3)

        def settled() -> bool:
            out = m.output()
            gens = re.findall(r"reload: starting generation (\d+)", out)
            # no reload held since the last one started, and that one is up
            return bool(gens) and f"generation {gens[-1]} is up" in out \
                and out.rfind("reload held") < out.rfind("reload: starting generation") \
                and m.titles() == final
        m.wait("one generation with the last config", settled, timeout=120)
        # it stays that way: no reload left behind
        starts = m.output().count("reload: starting generation")
        time.sleep(3)
        assert m.titles() == final
        assert m.output().count("reload: starting generation") == starts
    finally:
        stop.set()
        counter.join()
    out = m.output()
    assert peak[0] <= 2 * configured, f"{peak[0]} dq children alive at once, configured " \
        f"{configured}"
    assert "reload held" in out
    print(f"10 quick USR2: at most {peak[0]} dq children alive (configured at most "
          f"{configured}); {out.count('reload: starting generation')} generations started")


def test_term_still_drains_pipelined_requests_and_closes(
        dq_master: Callable[..., Master], redis_server: RedisProcess) -> None:
    """TERM is a stop, not a hand-over: what the server has read is answered, the
    connection is closed, every add answered `succ` is stored, none answered twice."""
    m = dq_master("--servers", "1")
    m.wait_titles(titles(servers=1), timeout=60)
    m.wait("generation 0 up", lambda: "generation 0 is up" in m.output(), timeout=60)
    client = PhpClient(m.port)
    client.sock.settimeout(10)
    ids = [f"t-{i}" for i in range(300)]
    client.sock.sendall(b"".join(frame(add(i)) for i in ids))
    m.kill(signal.SIGTERM)
    answered: list[str] = []
    try:
        for job in ids:
            rep = client.reply()
            assert rep["code"] == 1, rep
            answered.append(job)
    except ConnectionError:
        pass  # closed after the requests it had read
    assert client.sock.recv(1) == b""
    client.close()
    assert m.proc.wait(30) == 0
    assert answered, "nothing was answered before the stop"
    assert stored(redis_server, answered) == set(answered)
    assert "connections to the new generation" not in m.output()


def test_handed_connections_are_shared_by_the_new_servers(
        dq_master: Callable[..., Master]) -> None:
    """The new generation's servers share the connections handed to them as they share
    new ones (the load board): after a reload, no server holds them all, so long-lived
    clients do not pile onto one process reload after reload."""
    m = dq_master("--servers", "2")
    want = titles(servers=2)
    m.wait_titles(want, timeout=60)
    m.wait("generation 0 up", lambda: "generation 0 is up" in m.output(), timeout=60)
    clients = [PhpClient(m.port) for _ in range(20)]
    try:
        for c in clients:
            assert c.call({"cmd": "ping"})["code"] == 1
        for gen in (1, 2):
            reload_and_wait(m, signal.SIGUSR2, want, gen)
            for c in clients:
                assert c.call({"cmd": "ping"})["code"] == 1
    finally:
        for c in clients:
            c.close()
    out = m.output()
    handed = [int(n) for n in re.findall(r"handed (\d+) connections to the new generation",
                                         out)]
    # Each reload hands every connection once: a retiring server that took one from its
    # retiring sibling would hand it on again (21 for 20), and would count it adopted.
    assert len(handed) == 4 and sum(handed[:2]) == sum(handed[2:]) == 20, handed
    adopted = [int(n) for n in re.findall(r"dq-server-\d stopped: .* adopted=(\d+)", out)]
    assert len(adopted) == 4 and sum(adopted) == 20, adopted  # generation 1 took the 20
    # what generation 1's two servers held, as they handed it on at the second reload
    assert min(handed[2:]) >= 4, handed
    print("connections each server handed on, reload by reload:", handed)
