"""The arbiter: dq-master forks the roles, supervises them and answers signals.

Modelled on gunicorn's arbiter. Signal handlers only queue the signal and write to a
wakeup pipe (dq/master/signals.py); the main loop dispatches `handle_<name>()`. The master
does no business work, imports no redis, httpx or SQLAlchemy and runs no event loop: each
child imports its role after fork (dq.runtime.context.run_child). Its duties live beside
it: the children (dq/master/children.py), a reload (dq/master/reload.py), the embedded
Redis (dq/master/keeper.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from dq.config import Settings
from dq.errors import EXIT_BOOT
from dq.master.boot import make_plan
from dq.master.children import STOP_MARGIN, Children, Launch
from dq.master.console import web_listen_error
from dq.master.embedded import holds_data
from dq.master.keeper import RedisKeeper
from dq.master.reload import Reloader
from dq.master.signals import SignalQueue
from dq.master.supervise import (
    anchor_paths,
    bind_handover,
    check_pid_file,
    listen_after_orphans,
    remove_empty_data_dir,
    remove_pid_file,
    retry_after_orphans,
    write_pid_file,
)
from dq.runtime.shared import BootError
from dq.runtime.titles import MASTER, set_title
from dq.sharding.plan import plan_shards

log = logging.getLogger("dq.master")

FAST_STOP = 3.0  # how long QUIT waits before SIGKILL


class Halt(Exception):
    """Leaves the main loop with an exit status."""

    def __init__(self, code: int = 0) -> None:
        super().__init__(code)
        self.code = code


class Arbiter:
    """Keeps the configured children running; a reload replaces them by generation."""

    def __init__(self, settings: Settings, *, overrides: dict[str, Any] | None = None,
                 cwd: Path | None = None) -> None:
        cwd = cwd or Path.cwd()
        cfg = anchor_paths(settings, cwd)
        self.launch = Launch(cfg, plan_shards(cfg), pid=os.getpid())
        self.children = Children(self.launch)
        self.signals = SignalQueue()
        self.keeper: RedisKeeper | None = None  # the embedded redis-server, when planned
        self.reloader = Reloader(self, overrides or {}, cwd, settings.config_file)
        self.started = time.monotonic()

    @property
    def cfg(self) -> Settings:
        """The settings of the current generation."""
        return self.launch.cfg

    # start and stop

    def prepare(self) -> None:
        """What can fail before daemonizing, so errors reach the terminal: BootError.

        Then the boot step (dq/master/boot.py) reads the registry, creating its tables once before
        any child starts, and the shard plan is made; the embedded Redis is prepared when
        the plan has it. A data dir this start created is removed again when it fails."""
        check_pid_file(self.cfg.pid_file)
        self.launch.listener = listen_after_orphans(self.cfg.host, self.cfg.port,
                                                    say=log.warning)
        self.check_web_address()
        data = Path(self.cfg.data_dir)
        created = not data.exists()
        try:
            try:
                data.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BootError(f"cannot create data dir {self.cfg.data_dir}: "
                                f"{exc.strerror}") from None
            plan = make_plan(self.cfg, keep_embedded=holds_data(self.cfg), start=True,
                             close_fds=self.launch.close_fds())
            assert plan is not None
            self.launch.plan = plan
            if plan.embedded:
                self.keep_redis(RedisKeeper.prepare(self.cfg))
        except BootError:
            self.close_listener()
            if created:
                remove_empty_data_dir(data)
            raise

    def check_web_address(self) -> None:
        """BootError when dq-web could not listen where it should (a dead master's console
        may still hold the address: wait for that one)."""
        if not self.cfg.web:
            return
        why = web_listen_error(self.cfg)
        if why:
            def free() -> bool | None:
                return None if web_listen_error(self.cfg) else True
            if retry_after_orphans(self.cfg.web_port, b"dq-web", free, say=log.warning):
                why = ""
        if why:
            self.close_listener()
            raise BootError(why)

    def close_listener(self) -> None:
        if self.launch.listener is not None:
            self.launch.listener.close()
            self.launch.listener = None

    def keep_redis(self, keeper: RedisKeeper | None) -> None:
        """Run this embedded Redis from now on (None: none); no child inherits its lock."""
        self.keeper = keeper
        self.launch.lock_fd = keeper.lock_fd if keeper is not None else -1

    def start(self) -> None:
        self.launch.pid = os.getpid()
        set_title(MASTER)
        write_pid_file(self.cfg.pid_file)
        self.signals.install()
        self.launch.pipe = self.signals.pipe
        self.launch.hb_dir = Path(tempfile.mkdtemp(prefix="dq-master-"))
        self.launch.handover = bind_handover(str(self.launch.hb_dir / "handover.sock"))
        assert self.launch.listener is not None
        host, port = self.launch.listener.getsockname()[:2]
        log.info("dq-master started (pid %d) on %s:%d: %s", self.launch.pid, host, port,
                 self.summary())
        if self.keeper is not None:
            self.keeper.start()

    def summary(self) -> str:
        redis = self.launch.plan.describe()
        web = f"web :{self.cfg.web_port}" if self.cfg.web else "no web"
        return (f"{self.cfg.servers} server(s), {self.cfg.timers} timer(s), "
                f"{self.children.num_consumers} consumer(s), {web}, {redis}")

    def run(self) -> int:
        """The main loop; returns the master's exit status."""
        try:
            self.start()
            self.manage_workers()
            while True:
                handler = self.signals.next_handler()
                if handler is None:
                    self.sleep()
                    self.reap_workers()
                    self.children.note_ready()
                    self.children.murder_workers()
                    self.manage_workers()
                    self.reloader.run_held()
                    continue
                getattr(self, handler)()
        except Halt as halt:
            return halt.code
        except BootError as exc:
            log.error("%s", exc)
            self.stop(graceful=False)
            return EXIT_BOOT
        except Exception:
            log.exception("unhandled error in dq-master; stopping")
            self.stop(graceful=True)
            return 1
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        c = self.children.counters
        log.info("dq-master stopped after %.0f s: spawned=%d restarts=%d reloads=%d "
                 "murdered=%d", time.monotonic() - self.started, c.spawned, c.restarts,
                 c.reloads, c.murdered)
        remove_pid_file(self.cfg.pid_file)
        if self.launch.handover is not None:
            self.launch.handover.close()
        if self.launch.hb_dir != Path():
            shutil.rmtree(self.launch.hb_dir, ignore_errors=True)
        if self.keeper is not None:
            self.keeper.unlock()

    def stop(self, graceful: bool = True) -> None:
        """Stop every child (TERM, or QUIT when fast), then KILL stragglers, then Redis."""
        children = self.children
        children.stopping = True
        if self.launch.listener is not None:
            self.launch.listener.close()
        children.kill_workers(signal.SIGTERM if graceful else signal.SIGQUIT)
        limit = self.cfg.grace + STOP_MARGIN if graceful else FAST_STOP
        deadline = time.monotonic() + limit
        while children.workers and time.monotonic() < deadline:
            self.reap_workers()
            if graceful and self.signals.escalated():
                log.info("second stop signal: fast stop")
                graceful = False
                children.kill_workers(signal.SIGQUIT)
                deadline = min(deadline, time.monotonic() + FAST_STOP)
            time.sleep(0.05)
        if children.workers:
            log.warning("%d children still running %.0f s after the stop signal; killing "
                        "them", len(children.workers), limit)
            children.kill_workers(signal.SIGKILL)
            deadline = time.monotonic() + 2
            while children.workers and time.monotonic() < deadline:
                self.reap_workers()
                time.sleep(0.02)
        if self.keeper is not None:
            self.keeper.stop()

    # the loop

    def manage_workers(self) -> None:
        """Keep the embedded Redis and the configured children running."""
        if self.keeper is not None:
            self.keeper.manage(self.children.stopping)
        self.children.manage_workers()

    def reap_workers(self) -> None:
        """Collect every exited child (and the embedded Redis) and decide what it means."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.keeper is not None and pid == self.keeper.pid:
                self.keeper.exited(code, self.children.stopping)
                continue
            self.children.exited(pid, code)

    def sleep(self) -> None:
        """Wait for a signal, at most a second (less while a child boots or a respawn is due,
        or a held reload waits for the old generation to go)."""
        timeout = 1.0
        if self.reloader.pending or self.children.booting():
            timeout = 0.1
        now = time.monotonic()
        due = self.children.next_due()
        if self.keeper is not None:
            due.append(self.keeper.slot.next_at)
        due = [at for at in due if at > now]
        if due:
            timeout = min(timeout, max(0.01, min(due) - now))
        self.signals.wait(timeout)

    # signals

    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_term(self) -> NoReturn:
        log.info("SIGTERM: stopping gracefully")
        self.stop(graceful=True)
        raise Halt(0)

    def handle_int(self) -> NoReturn:
        log.info("SIGINT: stopping gracefully")
        self.stop(graceful=True)
        raise Halt(0)

    def handle_quit(self) -> NoReturn:
        log.info("SIGQUIT: fast stop")
        self.stop(graceful=False)
        raise Halt(0)

    def handle_hup(self) -> None:
        log.info("SIGHUP: reloading")
        self.reloader.reload()

    def handle_usr2(self) -> None:
        log.info("SIGUSR2: reloading")
        self.reloader.reload()

    def handle_ttin(self) -> None:
        children = self.children
        children.num_consumers += 1
        log.info("SIGTTIN: consumers %d -> %d", children.num_consumers - 1,
                 children.num_consumers)
        self.manage_workers()

    def handle_ttou(self) -> None:
        children = self.children
        if children.num_consumers <= 1:
            log.info("SIGTTOU: already down to one consumer")
            return
        children.num_consumers -= 1
        log.info("SIGTTOU: consumers %d -> %d", children.num_consumers + 1,
                 children.num_consumers)
        self.manage_workers()
