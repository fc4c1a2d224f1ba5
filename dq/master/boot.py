"""The master's boot step: a short forked child that reads the registry before the roles start.

It opens the registry, which creates missing tables and columns once, before any child
starts (so children never race each other over the schema), and reports the enabled
`dq_redis` shards, from which the master makes the generation's shard plan
(dq/sharding/plan.py, `make_plan`). The master imports no SQLAlchemy: only the child does,
after the fork.
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

from dq.config import Settings
from dq.runtime.titles import BOOT, set_title
from dq.sharding.plan import Named, ShardPlan, drained_path, enabled_shards, plan_shards

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
        set_title(BOOT)
        from dq.runtime.logs import setup_logging

        setup_logging(settings, BOOT)
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


def make_plan(cfg: Settings, *, keep_embedded: bool, start: bool = False,
              close_fds: Iterable[int] = ()) -> ShardPlan | None:
    """The shard plan for `cfg`: its `redis` setting and the registry's shards, read by
    the boot step. A registry that cannot be read at start leaves the `redis` setting
    alone (the checker reloads once it reads shards there); on a reload it keeps the
    running generation (None)."""
    try:
        rows = read_registry(cfg, close_fds=close_fds)
    except BootStepError as exc:
        if not start:
            log.error("reload refused, the running generation stays: cannot read the "
                      "registry's shards: %s", exc)
            return None
        log.warning("cannot read the registry's shards (%s); starting with %s, and the "
                    "checker reloads when the registry names shards", exc,
                    "the redis setting" if cfg.redis else "the embedded redis")
        rows = []
    plan = plan_shards(cfg, rows, keep_embedded=keep_embedded)
    if plan.only_embedded:  # the only shard (again): it takes adds, whatever it held
        drained_path(cfg).unlink(missing_ok=True)
    if plan.retired:
        log.info("the embedded redis in %s/redis holds jobs from before shards were "
                 "configured: they are delivered from there and moved to the shards; "
                 "it takes no new jobs", cfg.data_dir)
    return plan
