"""dq-master end to end: a real master process, real children, real Redis, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dq.config import Settings
from dq.master.embedded import EmbeddedRedis, command, find_binary, state
from dq.master.supervise import BACKOFF_MIN, BACKOFF_RESET, BOOT_STREAK, Slot
from dq.runtime.shared import LoadBoard
from tests.support.masters import Master, alive, children_of
from tests.support.paths import REPO
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.waits import wait_until

PING = b'0014{"cmd":"ping"}'


def expected_titles(*, servers: int = 1, timers: int = 1, consumers: int = 1,
                    web: bool = False) -> list[str]:
    """The children a master should run, leaving out roles whose module is not there yet."""
    out = [f"dq-server-{i}" for i in range(servers)]
    out += [f"dq-timer-{i}" for i in range(timers)]
    out += [f"dq-consumer-{i}" for i in range(consumers)]
    out += ["dq-checker"]
    if web:
        out.append("dq-web")
    return sorted(out)


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []

    def make(*args: str, redis: RedisProcess | None = None, web: bool = False,
             env: dict[str, str] | None = None) -> Master:
        argv = list(args)
        if redis is not None:
            argv += ["--redis", redis.url]
        if not web:
            argv.append("--no-web")
        # One timer and one consumer unless the test says otherwise (a later flag wins).
        m = Master(tmp_path / f"master{len(started)}", free_port(),
                   ["--timers", "1", "--consumers", "1", *argv], env or {})
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dq.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)


# --------------------------------------------------------------------------------------
# The command line


def test_help_reads_well_and_exits_0() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for text in ("delay queue", "examples:", "storage:", "--redis URL", "--no-web", "USR2"):
        assert text in res.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["--port", "99999"], ["--servers", "x"],
                                  ["--log-format", "xml"], ["--redis", "http://x"]])
def test_bad_flag_is_one_line_and_exit_2(args: list[str]) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("dq-master: ")
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stdout == ""


def test_master_imports_no_client_libraries() -> None:
    code = ("import sys, dq.cli, dq.master.arbiter; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'redis', 'httpx', 'sqlalchemy', 'uvicorn', 'fastapi', 'dq.runtime.context'}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert res.stdout.strip() == "[]"


def test_restart_backoff_doubles_resets_and_slows_after_boot_streak() -> None:
    slot = Slot()
    assert [slot.died(1, 0, boot_failed=False) for _ in range(3)] == [0.1, 0.2, 0.4]
    assert slot.died(BACKOFF_RESET, 0, boot_failed=False) == BACKOFF_MIN
    slot = Slot()
    delays = [slot.died(1, 0, boot_failed=True) for _ in range(BOOT_STREAK)]
    assert delays[-1] == 10.0 and slot.boot_failures == BOOT_STREAK


def test_log_files_route_by_logger_and_roll_at_midnight(tmp_path: Path) -> None:
    import logging

    from dq.config import Settings
    from dq.runtime.logs import make_handlers

    handlers = make_handlers(Settings(log_dir=str(tmp_path), log_format="json", daemon=True))
    today = time.time()

    def emit(name: str, level: int, msg: str, at: float = today, **extra: Any) -> None:
        record = logging.makeLogRecord({"name": name, "levelno": level, "msg": msg,
                                        "levelname": logging.getLevelName(level),
                                        "created": at, **extra})
        for h in handlers:
            if record.levelno >= h.level:
                h.handle(record)

    emit("dq.request", logging.INFO, "add order:1", tid="order:1")
    emit("dq.notify", logging.INFO, "called")
    emit("dq.consumer", logging.WARNING, "slow callback")
    emit("dq.timer", logging.INFO, "tomorrow", at=today + 86400)
    for h in handlers:
        h.close()

    def read(stem: str, at: float = today) -> list[dict[str, Any]]:
        day = time.strftime("%Y%m%d", time.localtime(at))
        path = tmp_path / f"{stem}_{day}.txt"
        return [json.loads(line) for line in path.read_text().splitlines()]

    # php-delayqueue's names (DqLog::writeLog): request_, notify_, err_, notice_Ymd.txt
    day = time.strftime("%Y%m%d", time.localtime(today))
    assert {p.name for p in tmp_path.iterdir()} == {
        f"request_{day}.txt", f"notify_{day}.txt", f"err_{day}.txt", f"notice_{day}.txt",
        time.strftime("notice_%Y%m%d.txt", time.localtime(today + 86400))}
    assert [r["msg"] for r in read("request")] == ["add order:1"]
    assert read("request")[0]["tid"] == "order:1"  # `extra` fields become JSON members
    assert [r["msg"] for r in read("notify")] == ["called"]
    assert [r["msg"] for r in read("err")] == ["slow callback"]
    assert [r["msg"] for r in read("notice")] == ["slow callback"]
    assert [r["msg"] for r in read("notice", today + 86400)] == ["tomorrow"]


# --------------------------------------------------------------------------------------
# Settings and ports the master refuses before it forks anything

DEAD_REDIS = "redis://127.0.0.1:1/0"  # never reached: the master must stop before that


def exit_status(m: Master, timeout: float = 20.0) -> int:
    """The master's exit status; fails when it is still running after `timeout` s."""
    try:
        return m.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        tail = "\n".join(m.output().splitlines()[-20:])
        raise AssertionError(f"dq-master still runs after {timeout:.0f} s; it should have "
                             f"refused to start\n--- log tail ---\n{tail}") from None


@pytest.mark.parametrize(("args", "env"), [(["--web-host", "0.0.0.0"], {}),
                                           ([], {"DQ_WEB_HOST": "10.1.2.3"})])
def test_console_without_a_password_off_loopback_exits_2_in_one_line(
        master: Callable[..., Master], args: list[str], env: dict[str, str]) -> None:
    """Without web_password the admin API trusts whoever reaches it: the console may then
    only listen on loopback, and a master told otherwise does not start."""
    m = master("--web-port", str(free_port()), "--redis", DEAD_REDIS, *args, web=True,
               env=env)
    assert exit_status(m) == 2
    out = m.output()
    assert out.startswith("dq-master: web_host ") and out.count("\n") == 1, out
    assert "without a web_password" in out
    assert "set web_password" in out and "127.0.0.1" in out


@pytest.mark.parametrize("db", ["nonsense", "mysql+pymysql://dq:s3cr3t@db:port/dq"])
def test_malformed_db_url_exits_2_in_one_line(master: Callable[..., Master], db: str) -> None:
    m = master("--db", db, "--redis", DEAD_REDIS)
    assert exit_status(m) == 2
    out = m.output()
    assert out.startswith("dq-master: db is not a valid SQLAlchemy URL") and \
        out.count("\n") == 1, out
    assert "mysql+pymysql://user:pass@host/dq" in out and "sqlite:///" in out
    assert "s3cr3t" not in out  # a password in a malformed URL is not echoed


def test_pid_file_that_cannot_be_written_exits_3_in_one_line_even_as_a_daemon(
        tmp_path: Path) -> None:
    """Checked before daemonizing: the launcher says why and exits 3, instead of 0 with a
    daemon that dies on it."""
    res = run_cli("--daemon", "--pid-file", "/proc/no-such/dq.pid", "--redis", DEAD_REDIS,
                  "--port", str(free_port()), "--no-web", "--data-dir", str(tmp_path / "var"))
    assert res.returncode == 3, res
    assert res.stderr.startswith("dq-master: cannot write the pid file /proc/no-such/dq.pid")
    assert res.stderr.count("\n") == 1, res.stderr


def test_unusable_log_dir_exits_2_in_one_line(master: Callable[..., Master]) -> None:
    m = master("--log-dir", "/proc/no-such/log", "--redis", DEAD_REDIS)
    assert exit_status(m) == 2
    out = m.output()
    assert out.startswith("dq-master: log_dir '/proc/no-such/log' cannot be used") and \
        out.count("\n") == 1, out


def test_reload_signals_right_after_start_do_not_kill_the_master(
        master: Callable[..., Master]) -> None:
    """`systemctl reload` right after `start`: HUP and USR2 that arrive while the master is
    still starting (here: waiting for its embedded Redis, before its own handlers are
    installed) are ignored, not its death."""
    m = master()  # embedded Redis
    m.wait("the embedded Redis starting", lambda: "embedded redis-server started"
           in m.output(), timeout=20)
    m.kill(signal.SIGHUP)
    m.kill(signal.SIGUSR2)
    m.wait_titles(expected_titles(), exact=False)
    assert m.proc.poll() is None


def test_console_port_taken_exits_3_in_one_line(master: Callable[..., Master]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = master("--web-port", str(port), "--redis", DEAD_REDIS, web=True)
        assert exit_status(m) == 3
    assert m.output() == (f"dq-master: dq-web cannot listen on 127.0.0.1:{port}: Address "
                          "already in use; set web_port or web_host, or --no-web\n")
    # the same port with the console off is no obstacle
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        m = master("--web-port", str(port), "--redis", DEAD_REDIS)
        time.sleep(1.5)
        assert m.proc.poll() is None, m.output()


def test_console_port_taken_later_is_said_in_one_line_until_it_is_free(
        redis_server: RedisProcess, master: Callable[..., Master], tmp_path: Path) -> None:
    """A reload moves the console to a port something else holds: no dq-web is forked
    to fail with a traceback every 10 s; the master says why in one line, once more at the
    boot streak, and starts the console once the port is free. The rest keeps running."""
    first, taken = free_port(), free_port()
    config = tmp_path / "dq.toml"
    config.write_text(f"web_port = {first}\n")
    m = master("--config", str(config), "--web-host", "127.0.0.1", redis=redis_server,
               web=True)
    m.wait_titles(expected_titles(web=True))
    m.wait("the console", lambda: _http_answers(first))
    streak = f"dq-web could not boot {BOOT_STREAK} times in a row"
    why = (f"dq-web cannot listen on 127.0.0.1:{taken}: Address already in use; set "
           "web_port or web_host, or --no-web")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", taken))
        busy.listen()
        config.write_text(f"web_port = {taken}\n")
        m.kill(signal.SIGUSR2)
        m.wait("the boot streak line", lambda: streak in m.output(), timeout=30)
        m.wait("generation 1 of the other roles", lambda: m.titles() == expected_titles(),
               timeout=30)
        time.sleep(2.5)  # the next try is 10 s away: nothing more in the meantime
        out = m.output()
        assert out.count(streak) == 1
        assert out.count(why) == BOOT_STREAK, out  # two warnings and the streak line
        assert "Traceback" not in out, out
        assert "dq-web" not in m.titles()
        assert m.proc.poll() is None
    m.wait("the console on the freed port", lambda: _http_answers(taken), timeout=20)
    m.wait("the master noticing", lambda: re.search(r"dq-web booted after \d+ failed "
                                                   "attempts", m.output()), timeout=5)
    m.kill(signal.SIGTERM)
    assert m.proc.wait(20) == 0


# --------------------------------------------------------------------------------------
# Supervision


def test_titles_restart_heartbeat_and_term(
        redis_server: RedisProcess, master: Callable[..., Master]) -> None:
    m = master(redis=redis_server, env={"DQ_HEARTBEAT_TIMEOUT": "2"})
    want = expected_titles()
    m.wait_titles(want)
    assert Path(f"/proc/{m.pid}/cmdline").read_bytes().rstrip(b"\0 ") == b"dq-master"
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    assert re.search(rf"^\s*{m.pid}\s+\d+\s+dq-master\s*$", ps, re.M)

    # A child whose loop stops (SIGSTOP) sends no heartbeat: SIGABRT, then a new one.
    m.wait("every child booted", lambda: "generation 0 is up" in m.output())
    stuck = m.pid_of("dq-checker")
    os.kill(stuck, signal.SIGSTOP)
    m.wait("the heartbeat murder", lambda: "sent no heartbeat" in m.output(), timeout=10)
    os.kill(stuck, signal.SIGCONT)
    m.wait("a new dq-checker", lambda: stuck not in m.workers() and
           "dq-checker" in m.titles(), timeout=8)

    for title in want:  # kill -9 of any child: a replacement (within 0.1-0.3 s normally)
        old = m.pid_of(title)
        os.kill(old, signal.SIGKILL)
        m.wait(f"a new {title}", lambda t=title, o=old: any(
            v == t and p != o for p, v in m.workers().items()), timeout=5.0)
    m.wait_titles(want)

    kids = set(m.workers())
    m.kill(signal.SIGTERM)
    assert m.proc.wait(15) == 0
    assert not [pid for pid in kids | m.seen if alive(pid)]
    assert "dq-master stopped" in m.output()


def test_children_stop_when_the_master_is_killed(
        redis_server: RedisProcess, master: Callable[..., Master]) -> None:
    m = master(redis=redis_server)
    kids = set(m.wait_titles(expected_titles()))
    m.proc.kill()
    m.proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in kids if alive(pid)]
    assert "went away; stopping" in m.output()


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(PING)
            return s.recv(64).startswith(b'0033{"code":1')
    except OSError:
        return False


ORPHANS_WAIT = "is still held by dq-server processes of a master that is gone"


def _orphan_wait(log: str) -> str:
    """How long a master's log says it waited for a dead master's servers."""
    stamps = {}
    for line in log.splitlines():
        for key in (ORPHANS_WAIT, "dq-master started"):
            if key in line and key not in stamps:
                stamps[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    if ORPHANS_WAIT not in stamps or len(stamps) < 2:
        return "bound at once"
    waited = stamps["dq-master started"] - stamps[ORPHANS_WAIT]
    return f"waited {waited.total_seconds():.2f} s for the orphans"


def test_new_master_binds_right_after_kill_9_of_the_old_one(
        redis_server: RedisProcess, tmp_path: Path) -> None:
    """kill -9 of the master leaves its servers (and console) running until they notice,
    holding the port: a new master started at once waits for them, says so, and serves.
    Four masters in a row, each started right after kill -9 of the one before; the third
    one's orphans are stopped (SIGSTOP) until the fourth says it waits, so the old code's
    refusal ("Address already in use", exit 3) is not missed by luck."""
    port, web_port = free_port(), free_port()
    args = ["--redis", redis_server.url, "--servers", "2", "--timers", "1", "--consumers", "1",
            "--web-host", "127.0.0.1", "--web-port", str(web_port)]
    rounds = 4
    started: list[Master] = []
    orphans: list[int] = []
    try:
        for n in range(rounds):
            t0 = time.monotonic()
            m = Master(tmp_path / f"m{n}", port, args, {})
            started.append(m)
            if orphans:  # stopped until the new master waits for them (or binds, or exits)
                m.wait("the master to wait for the orphans, start or exit", lambda m=m: (  # type: ignore[misc]
                    ORPHANS_WAIT in m.output() or "dq-master started" in m.output()
                    or m.proc.poll() is not None), timeout=40)
                for pid in orphans:
                    with contextlib.suppress(ProcessLookupError):  # gone already: fine
                        os.kill(pid, signal.SIGCONT)
                orphans = []
            m.wait_titles(expected_titles(servers=2, web=True), timeout=40)
            m.wait("it serves", lambda: _pings(port) and _http_answers(web_port))
            out = m.output()
            assert "cannot listen" not in out, out
            if n:
                print(f"\nmaster {n}, started right after kill -9 of master {n - 1}: "
                      f"{_orphan_wait(out)}, serving after {time.monotonic() - t0:.2f} s",
                      file=sys.stderr)
            if n == rounds - 1:
                break
            if n == rounds - 2:
                orphans = [pid for pid, t in m.workers().items()
                           if t.startswith(("dq-server-", "dq-web"))]
                for pid in orphans:
                    os.kill(pid, signal.SIGSTOP)
            m.proc.kill()
            m.proc.wait()
        # The stopped orphans make the last one wait; once in ~10 runs here the kernel let
        # it bind beside them all the same (both listening), so any round's wait will do.
        assert any(ORPHANS_WAIT in m.output() for m in started[1:])
        assert started[-1].proc.poll() is None
    finally:
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for m in started:
            m.stop(timeout=10)


def test_port_held_by_a_live_master_or_a_stranger_exits_3_at_once(
        redis_server: RedisProcess, master: Callable[..., Master], tmp_path: Path) -> None:
    """Only a dead master's own servers are waited for: a port a running dq-master (its
    servers' parent is alive) or any other program holds is refused at once."""
    live = master(redis=redis_server)
    live.wait("it serves", lambda: _pings(live.port))
    second = Master(tmp_path / "second", live.port, ["--redis", redis_server.url, "--no-web"],
                    {})
    assert exit_status(second) == 3
    assert second.output() == (f"dq-master: cannot listen on 127.0.0.1:{live.port}: Address "
                               "already in use\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        third = Master(tmp_path / "third", port, ["--redis", DEAD_REDIS, "--no-web"], {})
        assert exit_status(third) == 3
    assert third.output() == (f"dq-master: cannot listen on 127.0.0.1:{port}: Address "
                              "already in use\n")


def ping_loop(port: int, stop: threading.Event, stats: dict[str, int]) -> None:
    """Connect, ping, close, again and again; count what happens."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(PING)
                reply = s.recv(4096)
            stats["ok" if reply[4:].startswith(b"{") else "bad_reply"] += 1
        except ConnectionRefusedError:
            stats["refused"] += 1
        except OSError:
            stats["error"] += 1
        time.sleep(0.002)


def test_usr2_replaces_every_child_while_the_port_stays_open(
        redis_server: RedisProcess, master: Callable[..., Master]) -> None:
    m = master("--servers", "2", redis=redis_server)
    want = expected_titles(servers=2)
    old = set(m.wait_titles(want))
    stats = {"ok": 0, "refused": 0, "error": 0, "bad_reply": 0}
    stop = threading.Event()
    pinger = threading.Thread(target=ping_loop, args=(m.port, stop, stats), daemon=True)
    pinger.start()
    wait_until(lambda: stats["ok"] > 0, 10, "the first pings")
    m.kill(signal.SIGUSR2)
    m.wait("a whole new generation", lambda: not old & set(m.workers())
           and m.titles() == want, timeout=30)
    after = stats["ok"]
    wait_until(lambda: stats["ok"] > after + 5, 10, "pings to the new generation")
    stop.set()
    pinger.join(15)
    assert m.proc.poll() is None
    assert stats["refused"] == 0, stats
    assert stats["ok"] > 20, stats
    print("connect+ping loop during USR2:", stats)
    assert "reload: starting generation 1" in m.output()


def test_usr2_keeps_the_console_answering(
        redis_server: RedisProcess, master: Callable[..., Master]) -> None:
    """The new dq-web listens beside the old one (SO_REUSEPORT) and the old one stops only
    once the new one serves, so the console is not away during a reload (it was for
    seconds while the old one stopped and the new one imported and bound)."""
    web_port = free_port()
    m = master("--web-port", str(web_port), "--web-host", "127.0.0.1", redis=redis_server,
               web=True)
    m.wait_titles(expected_titles(web=True))
    m.wait("the console", lambda: _http_answers(web_port))
    old = {pid for pid, title in m.workers().items() if title == "dq-web"}
    stats = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            stats["ok" if _http_answers(web_port) else "failed"] += 1
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    m.kill(signal.SIGUSR2)
    m.wait("generation 1", lambda: "generation 1 is up" in m.output(), timeout=60)
    m.wait("the old console gone", lambda: not old & set(m.workers()), timeout=30)
    after = stats["ok"]
    wait_until(lambda: stats["ok"] > after + 5, 10, "the new console answering")
    stop.set()
    poller.join(15)
    assert "dq-web" in m.workers().values()
    # one connection may meet the old console's listening socket as it closes
    assert stats["failed"] <= 1 and stats["ok"] > 20, stats


def test_ttin_ttou_and_a_reload_that_rereads_the_config(
        redis_server: RedisProcess, master: Callable[..., Master]) -> None:
    m = master("--consumers", "2", redis=redis_server)

    def consumers() -> list[str]:
        return [t for t in m.titles() if t.startswith("dq-consumer-")]

    m.wait_titles(expected_titles(consumers=2))
    m.kill(signal.SIGTTIN)
    m.wait("3 consumers", lambda: consumers() == ["dq-consumer-0", "dq-consumer-1",
                                                  "dq-consumer-2"])
    m.kill(signal.SIGTTOU)
    m.wait("2 consumers", lambda: consumers() == ["dq-consumer-0", "dq-consumer-1"])
    m.kill(signal.SIGTTOU)
    m.wait("1 consumer", lambda: consumers() == ["dq-consumer-0"])
    m.kill(signal.SIGTTOU)
    m.wait("the refusal", lambda: "already down to one consumer" in m.output())
    assert consumers() == ["dq-consumer-0"]

    # A reload re-reads ./dq.toml: a bad one is refused, a good one applies (flags still
    # win, so the consumers go back to the --consumers 2 given at start).
    before = set(m.workers())
    (m.home / "dq.toml").write_text('servers = "lots"\n')
    m.kill(signal.SIGUSR2)
    m.wait("the refused reload", lambda: "reload refused" in m.output())
    assert set(m.workers()) == before
    # A log dir that cannot be made is refused too, and the old log handlers stay.
    (m.home / "dq.toml").write_text('log_dir = "/proc/no-such/log"\n')
    m.kill(signal.SIGHUP)
    m.wait("the refused log dir", lambda: "log_dir '/proc/no-such/log' cannot be used"
           in m.output())
    assert set(m.workers()) == before and m.proc.poll() is None
    (m.home / "dq.toml").write_text("servers = 2\n")
    m.kill(signal.SIGUSR2)
    want = expected_titles(servers=2, consumers=2)
    m.wait("the new config", lambda: m.titles() == want and not before & set(m.workers()),
           timeout=30)


def test_child_that_cannot_boot_backs_off_and_says_why(
        redis_server: RedisProcess, master: Callable[..., Master], tmp_path: Path) -> None:
    """An unreachable registry: the server exits EXIT_BOOT; the master slows down and says
    so in one line; the other children keep running. Logs are JSON in the log dir."""
    logs = tmp_path / "logs"
    nodb = f"mysql+pymysql://dq:pw@127.0.0.1:{free_port()}/dq"
    m = master("--db", nodb, "--log-dir", str(logs), "--log-format", "json",
               redis=redis_server)
    streak = f"dq-server-0 could not boot {BOOT_STREAK} times in a row"
    m.wait("the boot streak line", lambda: streak in m.output(), timeout=90)
    time.sleep(2.5)  # the next try is 10 s away: nothing more in the meantime
    text = m.output()
    assert text.count(streak) == 1
    assert len(re.findall(r"dq-server-0 \(pid \d+\) could not boot", text)) == BOOT_STREAK - 1
    assert "dq-checker" in m.titles()

    day = time.strftime("%Y%m%d")
    lines = [json.loads(line) for line in (logs / f"notice_{day}.txt").read_text().splitlines()]
    assert {"ts", "level", "logger", "process", "pid", "msg"} <= set(lines[0])
    assert any(r["process"] == "dq-master" and "started" in r["msg"] for r in lines)
    errors = [json.loads(line) for line in (logs / f"err_{day}.txt").read_text().splitlines()]
    assert any(r["process"] == "dq-master" and streak in r["msg"] for r in errors)
    assert all(r["level"] in ("WARNING", "ERROR", "CRITICAL") for r in errors)


def test_embedded_redis_default_survives_reload_and_stops_last(
        master: Callable[..., Master]) -> None:
    """No --redis: the master runs redis-server on a unix socket in the empty data dir."""
    from dq.master.embedded import ping

    web_port = free_port()
    m = master("--web-port", str(web_port), web=True)
    want = expected_titles(web=True)
    m.wait_titles(want, timeout=30)
    redis_pid = m.wait("redis-server", lambda: next(
        (p for p, c in m.children().items() if "redis-server" in c), 0))
    sock = m.home / "var" / "redis.sock"
    assert "unixsocket" in m.children()[redis_pid] and ping(sock)
    # an add and a get go through the embedded Redis, and a job reaches a local receiver
    receiver = Receiver()
    try:
        _topic(f"sqlite:///{m.home / 'var' / 'dq.sqlite3'}", "emb", receiver.url)
        m.wait("the topic", lambda: _add_get(m.port), timeout=10)
        from dq.client import DqClient

        with DqClient([f"127.0.0.1:{m.port}"]) as c:
            c.add("emb", "delivered", {"hello": "callback"}, delay=0.2)
        m.wait("the callback", lambda: "delivered" in receiver.finished, timeout=15)
    finally:
        receiver.close()
    m.wait("the console", lambda: _http_answers(web_port), timeout=10)

    old = set(m.workers())
    m.kill(signal.SIGUSR2)
    m.wait("a new generation", lambda: not old & set(m.workers()) and m.titles() == want,
           timeout=40)
    assert redis_pid in m.children(), "the embedded Redis is kept across a reload"
    m.wait("the console after the reload", lambda: _http_answers(web_port), timeout=10)

    m.kill(signal.SIGTERM)
    assert m.proc.wait(20) == 0
    assert not alive(redis_pid)
    assert (m.home / "var" / "redis" / "appendonlydir").is_dir()
    lines = m.output().splitlines()
    stopped = [i for i, line in enumerate(lines) if "exited with code" in line]
    redis_stop = next(i for i, line in enumerate(lines) if "redis-server" in line
                      and "stopped" in line)
    assert stopped and redis_stop > max(stopped), "Redis stops after every other child"


def _add_get(port: int) -> bool:
    from dq.client import DqClient
    from dq.errors import DqError

    try:
        with DqClient([f"127.0.0.1:{port}"]) as c:
            c.add("emb", "1", {"hello": "world"}, delay=3600)
            got = c.get("emb", "1")
    except DqError:
        return False
    return bool(got) and got.get("hello") == "world"


def _http_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.")
    except OSError:
        return False


def test_daemon_writes_pid_file_and_logs(redis_server: RedisProcess, tmp_path: Path) -> None:
    pid_file, logs = tmp_path / "run" / "dq.pid", tmp_path / "logs"
    port = free_port()
    res = run_cli("--daemon", "--pid-file", str(pid_file), "--log-dir", str(logs),
                  "--port", str(port), "--host", "127.0.0.1", "--no-web", "--timers", "1",
                  "--consumers", "1",
                  "--data-dir", str(tmp_path / "var"), "--redis", redis_server.url)
    assert res.returncode == 0, res.stderr
    pid = 0
    try:
        deadline = time.monotonic() + 10
        while not pid and time.monotonic() < deadline:
            pid = int(pid_file.read_text()) if pid_file.exists() else 0
            time.sleep(0.05)
        assert pid and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"dq-master")
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        want = expected_titles()
        deadline = time.monotonic() + 20
        while sorted(children_of(pid).values()) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = children_of(pid)
        assert sorted(kids.values()) == want
        day = time.strftime("%Y%m%d")
        assert "dq-master started" in (logs / f"notice_{day}.txt").read_text()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid) and not pid_file.exists()
        assert not [k for k in kids if alive(k)]
    finally:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------
# Nothing lost across reload and stop (needs the server, timer and consumer roles)



class Receiver:
    """A threaded HTTP callback receiver that answers 200 after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.arrived: list[str] = []
        self.finished: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                job = self.headers.get("X-Dq-Id", "")
                outer.arrived.append(job)
                time.sleep(delay)
                body = b'{"code":0}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.finished.append(job)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cb"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _topic(db_url: str, key: str, callback: str) -> None:
    from dq.registry.core import Registry, Topic

    reg = Registry(db_url)
    reg.save_topic(Topic(id=0, topic=key, name=key, delay=0, callback=callback,
                         method="POST", timeout_ms=5000, emails=(), retry_when="",
                         priority=2, online=True, max_attempts=0, secret="",
                         body_format="form", creator=""))
    reg.close()


def _adder(port: int, stop: threading.Event, added: list[str], failed: list[str]) -> None:
    from dq.client import DqClient
    from dq.errors import DqError

    n = 0
    with DqClient([f"127.0.0.1:{port}"]) as client:
        while not stop.is_set():
            n += 1
            try:
                client.add("steady", str(n), {"n": n}, delay=1)
                added.append(str(n))
            except (DqError, OSError) as exc:
                failed.append(f"{n}: {exc!r}")
            time.sleep(0.005)


def test_usr2_during_steady_adds_loses_nothing(
        redis_server: RedisProcess, master: Callable[..., Master], tmp_path: Path) -> None:
    receiver = Receiver()
    db = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    _topic(db, "steady", receiver.url)
    # A callback the receiver drops is retried (at-least-once); keep the retry short.
    m = master("--servers", "2", "--db", db, redis=redis_server,
               env={"DQ_TIMER_TICK": "0.1", "DQ_RETRY_UNIT": "0.2"})
    try:
        want = expected_titles(servers=2)
        old = set(m.wait_titles(want))
        # Titles appear at fork; on a loaded machine the servers take seconds more to serve.
        m.wait("generation 0 up", lambda: "generation 0 is up" in m.output(), timeout=60)
        stop, added, failed = threading.Event(), list[str](), list[str]()
        adder = threading.Thread(target=_adder, args=(m.port, stop, added, failed))
        adder.start()
        m.wait("adds flowing", lambda: len(added) > 50)
        m.kill(signal.SIGUSR2)
        m.wait("a new generation", lambda: not old & set(m.workers())
               and m.titles() == want, timeout=30)
        after = len(added)
        wait_until(lambda: len(added) > after + 20 or failed, 10, "adds to the new generation")
        stop.set()
        adder.join(15)
        assert failed == []
        m.wait("every job delivered", lambda: set(added) <= set(receiver.finished),
               timeout=20)
    finally:
        receiver.close()


def test_term_during_slow_callbacks_finishes_them(
        redis_server: RedisProcess, master: Callable[..., Master], tmp_path: Path) -> None:
    import redis

    from dq.client import DqClient

    receiver = Receiver(delay=2.0)
    db = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    _topic(db, "slow", receiver.url)
    m = master("--db", db, redis=redis_server, env={"DQ_TIMER_TICK": "0.1",
                                                    "DQ_GRACE": "10"})
    try:
        m.wait_titles(expected_titles())
        with DqClient([f"127.0.0.1:{m.port}"], timeout=15, connect_timeout=10) as client:
            for i in range(5):
                client.add("slow", str(i), {"i": i}, delay=0)
        m.wait("5 callbacks in flight", lambda: len(receiver.arrived) == 5, timeout=15)
        assert receiver.finished == []
        t0 = time.monotonic()
        m.kill(signal.SIGTERM)
        assert m.proc.wait(20) == 0
        assert 1.0 < time.monotonic() - t0 < 10
        assert sorted(receiver.finished) == sorted(receiver.arrived)
        r = redis.Redis.from_url(redis_server.url)
        assert r.hlen("dq:jobs") == 0 and r.zcard("dq:inflight") == 0
        r.close()
    finally:
        receiver.close()


def test_shard_registered_in_the_registry_is_used_after_an_automatic_reload(
        redis_factory: Callable[[], RedisProcess], master: Callable[..., Master],
        tmp_path: Path) -> None:
    """The console writes shards to the registry; the checker sees the list change and
    has the master reload (as kill -HUP would), and the new generation routes to it."""
    from dq.client import DqClient
    from dq.registry.core import Registry
    from dq.sharding.shards import ShardSet

    r1, r2 = redis_factory(), redis_factory()
    db = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    _topic(db, "grow", "http://127.0.0.1:9/")
    m = master("--db", db, redis=r1, env={"DQ_REGISTRY_REFRESH": "0.3"})
    want = expected_titles()
    old = set(m.wait_titles(want))
    time.sleep(1.0)  # a few polls of an unchanged registry: no reload
    assert "asking dq-master to reload" not in m.output() and set(m.workers()) == old

    reg = Registry(db)
    reg.save_shard("second", r2.url)
    reg.close()
    m.wait("the reload", lambda: "asking dq-master to reload" in m.output())
    m.wait("a new generation", lambda: not old & set(m.workers()) and m.titles() == want,
           timeout=30)
    # the master reloaded once, not once per poll
    time.sleep(1.0)
    assert m.output().count("asking dq-master to reload") == 1

    routing = ShardSet.from_urls([(r1.url, r1.url), ("second", r2.url)])
    job = next(f"j{i}" for i in range(100) if routing.owner(f"grow:j{i}").url == r2.url)
    with DqClient([f"127.0.0.1:{m.port}"]) as client:
        client.add("grow", job, {"n": 1}, delay=3600)
    import redis as redis_py

    with redis_py.Redis.from_url(r2.url) as on_r2:
        assert on_r2.hget("dq:jobs", f"grow:{job}") is not None


def clients_of(pid: int, port: int) -> int:
    """The established TCP connections to local `port` that process `pid` holds."""
    inodes = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":
                    inodes.add(f[9])
    held = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def test_servers_share_connections_made_together(
        redis_server: RedisProcess, master: Callable[..., Master]) -> None:
    """40 connections made at once spread over --servers 2 (the LoadBoard): the process
    that wakes first does not take them all. And a server that is stopped (SIGSTOP) while
    it holds fewer connections does not keep new ones waiting: the other takes them after
    DEFER."""
    m = master("--servers", "2", redis=redis_server)
    kids = m.wait_titles(expected_titles(servers=2))
    m.wait("generation 0 up", lambda: "generation 0 is up" in m.output())
    servers = [pid for pid, title in kids.items() if title.startswith("dq-server-")]
    ping = b'0014{"cmd":"ping"}'
    conns: list[socket.socket] = []
    late: list[socket.socket] = []
    try:
        # On a loaded machine a server may not wake within DEFER, and the other then takes
        # a burst (the fallback): up to three rounds; without the LoadBoard every round
        # splits about 42/8.
        for _ in range(3):
            for c in conns:
                c.close()
            m.wait("connections closed", lambda: all(clients_of(p, m.port) == 0
                                                     for p in servers))
            conns = [socket.create_connection(("127.0.0.1", m.port), timeout=5)
                     for _ in range(40)]
            for c in conns:
                c.sendall(ping)
            for c in conns:
                assert c.recv(100).startswith(b"00")
            held = {pid: clients_of(pid, m.port) for pid in servers}
            assert sum(held.values()) == 40, held
            if min(held.values()) >= 10:
                break
        assert min(held.values()) >= 10, held
        fewer = min(servers, key=lambda pid: held[pid])
        os.kill(fewer, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            for _ in range(8):  # the other holds more: each waits DEFER, then it takes it
                c = socket.create_connection(("127.0.0.1", m.port), timeout=5)
                late.append(c)
                c.sendall(ping)
                assert c.recv(100).startswith(b"00")
            assert time.monotonic() - t0 < 3
        finally:
            os.kill(fewer, signal.SIGCONT)
        other = next(pid for pid in servers if pid != fewer)
        assert clients_of(other, m.port) == held[other] + 8
    finally:
        for c in conns + late:
            c.close()


def test_load_board_is_shared_with_forked_children() -> None:
    board = LoadBoard(slots=4)
    a, b = board.claim(), board.claim()
    assert (a, b) == (0, 1)
    assert board.least_other(a) is None  # b boots: it does not accept yet
    board.set(b, 0)
    assert board.least_other(a) == 0
    board.set(b, 7)
    assert board.least_other(a) == 7 and board.least_other(b) is None  # a still boots
    board.set(a, 0)
    assert board.least_other(b) == 0
    pid = os.fork()
    if pid == 0:  # a server child publishes its count; the master's mapping sees it
        board.set(b, 3)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.least_other(a) == 3
    board.set(b, LoadBoard.DRAINING)
    assert board.least_other(a) is None  # a draining server does not count
    board.release(a)
    assert board.claim() == 0  # a dead server's slot is free again
    assert [board.claim(), board.claim(), board.claim()] == [2, 3, -1]


def test_embedded_redis_loading_a_large_data_set_is_waited_for(tmp_path: Path) -> None:
    """A redis-server still reading a large AOF answers -LOADING: that counts as alive (the
    master used to give up after REDIS_READY and exit 3, at every start), and a master
    finding such an orphan must not start a second Redis over the same files."""
    settings = Settings(data_dir=str(tmp_path / "var"))
    emb = EmbeddedRedis(settings)
    emb.dir.mkdir(parents=True)
    binary = find_binary()
    with subprocess.Popen([*emb.argv(binary), "--enable-debug-command", "yes"]) as seed:
        assert emb.wait_ready(10)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(str(emb.socket))
            assert command(conn, "DEBUG", "POPULATE", "3000000") == b"+OK"
            assert command(conn, "BGREWRITEAOF").startswith(b"+")
            while b"aof_rewrite_in_progress:0" not in _info(conn, "persistence") or \
                    b"aof_rewrite_scheduled:0" not in _info(conn, "persistence"):
                time.sleep(0.1)
            command(conn, "SHUTDOWN")
        seed.wait(30)
    emb.spawn()
    try:
        t0 = time.monotonic()
        # it binds its socket, then reads the AOF: wait (as long as a loaded machine needs)
        # until it says LOADING
        wait_until(lambda: state(emb.socket) == "loading", 30, "the redis-server to say LOADING")
        # 1 s, less than loading takes (printed below): only waiting while it says LOADING
        # passes; and a probe a busy machine answers late (state() waits 0.5 s) cannot
        # use up the whole wait on its own
        assert emb.wait_ready(1.0), "a Redis loading its data was given up on"
        print(f"\nloaded 3,000,000 keys in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    finally:
        emb.stop()


def _info(conn: socket.socket, section: str) -> bytes:
    conn.sendall(f"*2\r\n$4\r\nINFO\r\n${len(section)}\r\n{section}\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n"):
        head += conn.recv(1)
    size = int(head[1:-2])
    body = b""
    while len(body) < size + 2:
        body += conn.recv(size + 2 - len(body))
    return body
