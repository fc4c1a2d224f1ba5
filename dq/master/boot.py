"""The master's boot step: a short forked child that reads the registry before the roles start.

It opens the registry, which creates missing tables and columns once, before any child
starts (so children never race each other over the schema), and reports the enabled
`dq_redis` shards, from which the master makes the generation's shard plan
(dq/sharding/plan.py). The master imports no SQLAlchemy: only the child does, after the fork.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time
from collections.abc import Iterable
from typing import Any, NoReturn

import setproctitle

from dq.config import Settings
from dq.sharding.plan import Named, enabled_shards

log = logging.getLogger("dq.master")

STEP_TIMEOUT = 30.0  # seconds the boot step may take (a registry that does not answer)


class BootStepError(Exception):
    """The boot step could not read the registry; the message says why."""


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _child(settings: Settings, fd: int, keep: Iterable[int]) -> NoReturn:
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)  # the master's: not for this short step
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        setproctitle.setproctitle("dq-boot")
        from dq.runtime.logs import setup_logging

        setup_logging(settings, "dq-boot")
        for other in keep:
            os.close(other)
        try:
            from dq.registry.core import Registry

            registry = Registry(settings.db_url())
            try:
                out: dict[str, Any] = {"shards": enabled_shards(registry.shards())}
            finally:
                registry.close()
            code = 0
        except Exception as exc:
            out = {"error": _reason(exc)}
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        logging.shutdown()
        os._exit(code)


def read_registry(settings: Settings, *, timeout: float = STEP_TIMEOUT,
                  close_fds: Iterable[int] = ()) -> list[Named]:
    """The registry's enabled shards, read in a forked child (which also creates the
    schema). Raises BootStepError saying why it could not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(settings, w, close_fds)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise BootStepError(f"the registry did not answer within {timeout:.0f} s")
            try:
                ready, _, _ = select.select([r], [], [], left)
            except InterruptedError:
                continue
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        _wait(pid)
    try:
        out = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        out = {}
    if "shards" not in out:
        raise BootStepError(out.get("error") or "the boot step died without a word")
    return [(str(name), str(url)) for name, url in out["shards"]]


def _wait(pid: int) -> None:
    """Reap the boot child (the master's SIGCHLD handler may have queued it; its own
    reaping finds nothing then)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return
        time.sleep(0.01)
