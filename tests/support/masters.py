"""A real dq-master for end-to-end tests (test_master, test_chaos): `python -m dq.cli` in a
directory of its own, its children found through /proc by their process titles, and every
process it was seen with killed when the test is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.paths import REPO


def title_of(pid: int) -> str:
    """A process's title as ps shows it (setproctitle rewrites the command line)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def children_of(ppid: int) -> dict[int, str]:
    """Live (not zombie) children of `ppid`: pid -> title."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] == "Z" or int(stat[1]) != ppid:
                continue
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry)] = title_of(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class Master:
    """`python -m dq.cli` on 127.0.0.1:`port` with its data dir under `home` and its output
    in a log file there; `stop()` ends it and every child it was seen with."""

    def __init__(self, home: Path, port: int, args: Sequence[str],
                 env: Mapping[str, str]) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home, self.port = home, port
        self.log = home / f"master-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "dq.cli", "--host", "127.0.0.1", "--port", str(port),
                "--data-dir", str(home / "var"), *args]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
        self.env = {**clean, "PYTHONPATH": str(REPO), "DQ_GRACE": "5", **env}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=home, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.seen: set[int] = set()  # every child pid listed so far, for stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[int, str]:
        """Every live child (the embedded redis-server too): pid -> title."""
        kids = children_of(self.pid)
        self.seen |= set(kids)
        return kids

    def workers(self) -> dict[int, str]:
        """The dq-* children: pid -> title."""
        return {pid: t for pid, t in self.children().items() if t.startswith("dq-")}

    def titles(self) -> list[str]:
        return sorted(self.workers().values())

    def pid_of(self, title: str) -> int:
        return next(pid for pid, t in self.workers().items() if t == title)

    def wait(self, what: str, pred: Callable[[], Any], timeout: float = 20.0) -> Any:
        """`pred()`'s first true value, polled until `timeout`; fails with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.output().splitlines()[-40:])
        raise AssertionError(f"timed out waiting for {what}; master rc={self.proc.poll()}, "
                             f"children {self.workers()}\n--- master log tail ---\n{tail}")

    def wait_titles(self, titles: Collection[str], timeout: float = 20.0, *,
                    exact: bool = True) -> dict[int, str]:
        """Wait until the dq-* children are exactly `titles` (or, not `exact`, include
        them); returns the children then."""
        want = sorted(titles)
        if exact:
            self.wait(f"children {want}", lambda: self.titles() == want, timeout)
        else:
            self.wait(f"children {want} among others",
                      lambda: set(want) <= set(self.titles()), timeout)
        return self.workers()

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill_all(self) -> None:
        """kill -9 the master and every child it has had."""
        kids = set(self.children()) | self.seen
        kill_quietly(self.pid)
        for pid in kids:
            kill_quietly(pid)
        self.proc.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, timeout: float = 20.0) -> int | None:
        """TERM and wait up to `timeout` s, then kill -9 what is left; the master's exit code
        (None when it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        rc = self.proc.poll()
        if rc is None:
            self.kill_all()
        for pid in self.seen:
            kill_quietly(pid)
        return rc
