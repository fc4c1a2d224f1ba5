"""The master's bookkeeping: children, restart backoff, the listen socket, pid file, daemon.

Plain synchronous code with no third-party imports: the master imports this, never the
roles, redis-py, httpx or SQLAlchemy.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dq.config import Settings
from dq.runtime.shared import AddressInUse, BootError, bind_listener
from dq.runtime.titles import MASTER, child_name

# The role functions, imported by the child after fork (so a missing or broken module
# fails only that child, and a reload's new generation runs the code on disk now).
ROLE_PATHS = {
    "server": "dq.roles.server:run",
    "timer": "dq.roles.timer:run",
    "consumer": "dq.roles.consumer:run",
    "checker": "dq.roles.checker:run",
    "web": "web.app:run",
}
ROLE_ORDER = tuple(ROLE_PATHS)

BACKOFF_MIN = 0.1  # first restart delay of a slot; doubles per quick death
BACKOFF_MAX = 10.0
BACKOFF_RESET = 30.0  # a child that ran this long restarts after BACKOFF_MIN again
BOOT_STREAK = 3  # boot failures in a row after which the master says so and slows down
_T = TypeVar("_T")
ORPHAN_WAIT = 10.0  # seconds a new master waits for a dead master's servers to free the port
# (they notice within a second, but a loaded host was seen to need more than 5 s)


@dataclass
class Worker:
    """One forked child as the master sees it."""

    pid: int
    role: str
    index: int
    generation: int
    heartbeat: Path
    started: float  # time.monotonic() at fork
    ready: bool = False
    retiring_at: float = 0.0  # monotonic time the master sent it TERM, 0 = not retiring
    aborted_at: float = 0.0  # monotonic time of SIGABRT/SIGKILL, 0 = never

    @property
    def name(self) -> str:
        return child_name(self.role, self.index)

    def status(self) -> str:
        """What the child wrote in its heartbeat file: '', 'ready' or 'boot-failed: ...'."""
        try:
            return self.heartbeat.read_text(encoding="utf-8").strip()
        except OSError:
            return ""


@dataclass
class Slot:
    """Restart backoff of one (role, index) slot: no fork storm while Redis is down."""

    delay: float = 0.0
    next_at: float = 0.0  # monotonic time before which the slot is not respawned
    boot_failures: int = 0  # EXIT_BOOT exits in a row

    def died(self, ran: float, now: float, *, boot_failed: bool) -> float:
        """Record a death after `ran` seconds of life; returns the delay before respawn."""
        if ran >= BACKOFF_RESET:
            self.delay = BACKOFF_MIN
        else:
            self.delay = min(max(self.delay * 2, BACKOFF_MIN), BACKOFF_MAX)
        self.boot_failures = self.boot_failures + 1 if boot_failed else 0
        if self.boot_failures >= BOOT_STREAK:
            self.delay = BACKOFF_MAX
        self.next_at = now + self.delay
        return self.delay


def describe_exit(code: int) -> str:
    """An exit code from os.waitstatus_to_exitcode in words."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Counters:
    """What the master's summary line reports at stop."""

    spawned: int = 0
    restarts: int = 0
    reloads: int = 0
    murdered: int = 0


def anchor_paths(settings: Settings, cwd: Path) -> Settings:
    """Settings with relative paths made absolute against `cwd` (a daemon runs in /).

    A daemon has no terminal, so without a log dir it logs to `<data_dir>/log`.
    """
    def fix(path: str) -> str:
        return str(cwd / path) if path and not os.path.isabs(path) else path

    log_dir = settings.log_dir
    if settings.daemon and not log_dir:
        log_dir = os.path.join(settings.data_dir, "log")
    return settings.replace(data_dir=fix(settings.data_dir), log_dir=fix(log_dir),
                            pid_file=fix(settings.pid_file))


def bind_handover(path: str) -> socket.socket:
    """The Unix socket on which servers take a reload's connections from the old ones
    (dq/runtime/handover.py): SOCK_SEQPACKET, one record per connection; `path` lies in a directory
    only the master's user can enter."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise BootError(f"cannot open the hand-over socket {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets in LISTEN state on `port` (any address), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    return inodes


def _ppid_and_title(pid: int) -> tuple[int, bytes]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[1]), Path(f"/proc/{pid}/cmdline").read_bytes()


def port_orphans(port: int, title: bytes = b"dq-server-") -> list[int] | None:
    """The pids holding `port`'s listen socket when every one is a dq child titled
    `title`... whose master is gone (an orphan: it stops by itself within a second or so
    of seeing that); [] when no holder can be seen (nothing listens, or another user's
    process whose descriptors are hidden); None when a holder is something else."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    links = {f"socket:[{i}]" for i in inodes}
    holders = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in links for fd in fds):
                holders.add(int(entry))
        except OSError:  # gone meanwhile, or another user's: not ours to judge
            continue
    for pid in holders:
        try:
            ppid, own = _ppid_and_title(pid)
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
        try:
            _, parent = _ppid_and_title(ppid)
        except (OSError, ValueError, IndexError):
            parent = b""
        if not own.startswith(title) or parent.startswith(MASTER.encode()):
            return None
    return sorted(holders)


def retry_after_orphans(port: int, title: bytes, attempt: Callable[[], _T | None],
                        wait: float = ORPHAN_WAIT,
                        say: Callable[[str], None] = print) -> _T | None:
    """`attempt()` (a bind of `port`) again and again while the port is held only by dq
    children titled `title`... of a master that died (kill -9), up to `wait` seconds,
    saying so once; its first result that is not None. None at once when the port is held
    by something else (or by nothing that can be seen: another user's process), or at
    the end of `wait`. Orphans still there then: a BootError naming them."""
    got = attempt()
    orphans: list[int] | None = []
    for _ in range(4):  # nothing seen: the holder may just have let go, or a read missed it
        if got is not None:
            return got
        orphans = port_orphans(port, title)
        if orphans is None or orphans:
            break
        time.sleep(0.05)
        got = attempt()
    if not orphans:
        return got
    pids = ", ".join(map(str, orphans))
    what = f"{title.decode().rstrip('-')} processes of a master that is gone (pids {pids})"
    say(f"port {port} is still held by {what}; waiting up to {wait:g} s for them to exit")
    deadline = time.monotonic() + wait
    while True:
        time.sleep(0.05)
        got = attempt()
        # A read of /proc/net/tcp may miss a socket that changes meanwhile: only the
        # attempt says the port is free, and only a holder seen says it is someone else's.
        if got is not None or port_orphans(port, title) is None:
            return got
        if time.monotonic() >= deadline:
            raise BootError(f"port {port} is still held by {what} after {wait:g} s; kill "
                            "them and start again")


def listen_after_orphans(host: str, port: int, wait: float = ORPHAN_WAIT,
                         say: Callable[[str], None] = print) -> socket.socket:
    """bind_listener, waiting (see retry_after_orphans) for the servers of a master that
    died to free the port; held by anything else, the BootError is raised at once."""
    refused: list[BootError] = []

    def attempt() -> socket.socket | None:
        try:
            return bind_listener(host, port)
        except AddressInUse as exc:
            refused[:] = [exc]
            return None

    sock = retry_after_orphans(port, b"dq-server-", attempt, wait, say)
    if sock is None:
        raise refused[-1]
    return sock


def check_pid_file(path: str) -> None:
    """Refuse to start when the pid file cannot be written (before daemonizing, while the
    error can still be shown) or names a live process other than us."""
    if not path:
        return
    probe = f"{path}.{os.getpid()}.tmp"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(probe).write_text("")
        os.unlink(probe)
    except OSError as exc:
        raise BootError(f"cannot write the pid file {path} ({exc.strerror or exc}); use "
                        "another --pid-file, or create its directory for dq") from None
    try:
        pid = int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return
    if pid <= 0 or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    try:  # a reused pid: the process there now is not a dq-master
        if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(MASTER.encode()):
            return
    except OSError:
        pass
    raise BootError(f"dq-master already runs as pid {pid} (pid file {path}); "
                    "stop it first or use another --pid-file")


def remove_empty_data_dir(path: Path) -> None:
    """After a failed start that created the data dir: remove it again when it holds
    nothing but the embedded Redis's empty lock and dirs (never a file with data)."""
    try:
        for name in ("redis.lock",):
            lock = path / name
            if lock.is_file() and lock.stat().st_size == 0:
                lock.unlink()
        redis_dir = path / "redis"
        if redis_dir.is_dir() and not any(redis_dir.iterdir()):
            redis_dir.rmdir()
        path.rmdir()  # only when empty: OSError otherwise
    except OSError:
        pass


def write_pid_file(path: str) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid_file(path: str) -> None:
    """Remove the pid file if it still names this process."""
    if not path:
        return
    try:
        if Path(path).read_text().strip() == str(os.getpid()):
            os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def daemonize() -> None:
    """Double fork into the background: new session, cwd /, stdio on /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
