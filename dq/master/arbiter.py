"""The arbiter: dq-master forks the roles, supervises them and answers signals.

Modelled on gunicorn's arbiter. Signal handlers only queue the signal and write to a
wakeup pipe; the main loop dispatches `handle_<name>()`. The master does no business
work, imports no redis, httpx or SQLAlchemy and runs no event loop: each child imports
its role after fork (dq.runtime.context.run_child).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import setproctitle

from dq.config import Settings, load_settings
from dq.errors import EXIT_BOOT, ConfigError
from dq.master.boot import BootStepError, read_registry
from dq.master.children import SIGNALS, STOP_MARGIN, WorkerPool, web_bind_host
from dq.master.embedded import EmbeddedError, EmbeddedRedis, drained_path, find_binary, holds_data
from dq.master.supervise import (
    BOOT_STREAK,
    BootError,
    Slot,
    anchor_paths,
    bind_handover,
    bind_listener,
    check_pid_file,
    listen_after_orphans,
    remove_empty_data_dir,
    remove_pid_file,
    retry_after_orphans,
    write_pid_file,
)
from dq.runtime.logs import setup_logging
from dq.runtime.shared import LoadBoard
from dq.sharding.plan import ShardPlan, carry_over, drained_urls, masked, plan_shards

log = logging.getLogger("dq.master")

FAST_STOP = 3.0  # how long QUIT waits before SIGKILL


def web_listen_error(cfg: Settings, *, beside_old: bool = False) -> str:
    """Why dq-web could not listen on its address now ('' when it could): the master binds
    it with SO_REUSEADDR, as dq-web will, and closes it again. `beside_old`: the old dq-web
    listens there (a reload), so also with SO_REUSEPORT, as dq-web binds; otherwise not,
    so that a port another program shares out that way is still found taken."""
    host = web_bind_host(cfg)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if beside_old:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, cfg.web_port))
    except OSError as exc:
        return (f"dq-web cannot listen on {host}:{cfg.web_port}: {exc.strerror or exc}; "
                "set web_port or web_host, or --no-web")
    return ""


class Halt(Exception):
    """Leaves the main loop with an exit status."""

    def __init__(self, code: int = 0) -> None:
        super().__init__(code)
        self.code = code


class Arbiter(WorkerPool):
    """Keeps the configured children running; a reload replaces them by generation."""

    SIG_NAMES: ClassVar[dict[int, str]] = {sig: sig.name[3:].lower() for sig in SIGNALS}

    def __init__(self, settings: Settings, *, overrides: dict[str, Any] | None = None,
                 cwd: Path | None = None) -> None:
        self.cwd = cwd or Path.cwd()
        super().__init__(anchor_paths(settings, self.cwd))
        self.overrides = dict(overrides or {})
        self.config_file = (str(self.cwd / settings.config_file) if settings.config_file
                            else "")
        self.sig_queue: list[int] = []
        self.started = time.monotonic()
        self.reload_pending = False  # reloads folded into the one that runs next

    # start and stop

    def prepare(self) -> None:
        """What can fail before daemonizing, so errors reach the terminal: BootError.

        Then the boot step (dq/master/boot.py) reads the registry, creating its tables once before
        any child starts, and the shard plan is made; the embedded Redis is prepared when
        the plan has it. A data dir this start created is removed again when it fails."""
        check_pid_file(self.cfg.pid_file)
        self.listener = listen_after_orphans(self.cfg.host, self.cfg.port, say=log.warning)
        if self.cfg.web:
            why = web_listen_error(self.cfg)
            if why:  # a dead master's console may still hold it: wait for that one
                def free() -> bool | None:
                    return None if web_listen_error(self.cfg) else True
                if retry_after_orphans(self.cfg.web_port, b"dq-web", free, say=log.warning):
                    why = ""
            if why:
                self.listener.close()
                self.listener = None
                raise BootError(why)
        data = Path(self.cfg.data_dir)
        created = not data.exists()
        try:
            try:
                data.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BootError(f"cannot create data dir {self.cfg.data_dir}: "
                                f"{exc.strerror}") from None
            plan = self.make_plan(self.cfg, keep_embedded=holds_data(self.cfg), start=True)
            assert plan is not None
            self.plan = plan
            if plan.embedded:
                self.redis = self.prepare_redis(self.cfg, plan)
        except BootError:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            if created:
                remove_empty_data_dir(data)
            raise

    def make_plan(self, cfg: Settings, *, keep_embedded: bool,
                  start: bool = False) -> ShardPlan | None:
        """The shard plan for `cfg`: its `redis` setting and the registry's shards, read by
        the boot step. A registry that cannot be read at start leaves the `redis` setting
        alone (the checker reloads once it reads shards there); on a reload it keeps the
        running generation (None)."""
        try:
            rows = read_registry(cfg, close_fds=self.boot_close_fds())
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

    def boot_close_fds(self) -> list[int]:
        fds = [fd for fd in self.pipe if fd >= 0]
        fds += [s.fileno() for s in (self.listener, self.handover) if s is not None]
        if self.redis is not None and self.redis.lock_fd >= 0:
            fds.append(self.redis.lock_fd)
        return fds

    @staticmethod
    def prepare_redis(cfg: Settings, plan: ShardPlan) -> EmbeddedRedis:
        """The embedded Redis over cfg's data dir, locked and with a binary to run."""
        try:
            redis = EmbeddedRedis(cfg)
            redis.lock()
            find_binary()
        except EmbeddedError as exc:
            raise BootError(str(exc)) from None
        return redis

    def start(self) -> None:
        self.pid = os.getpid()
        setproctitle.setproctitle("dq-master")
        write_pid_file(self.cfg.pid_file)
        self.pipe = os.pipe()
        for fd in self.pipe:
            os.set_blocking(fd, False)
        for sig in SIGNALS:
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.hb_dir = Path(tempfile.mkdtemp(prefix="dq-master-"))
        self.handover = bind_handover(str(self.hb_dir / "handover.sock"))
        assert self.listener is not None
        host, port = self.listener.getsockname()[:2]
        log.info("dq-master started (pid %d) on %s:%d: %s", self.pid, host, port, self.summary())
        if self.redis is not None:
            self.start_redis()

    def summary(self) -> str:
        redis = self.plan.describe()
        web = f"web :{self.cfg.web_port}" if self.cfg.web else "no web"
        return (f"{self.cfg.servers} server(s), {self.cfg.timers} timer(s), "
                f"{self.num_consumers} consumer(s), {web}, {redis}")

    def run(self) -> int:
        """The main loop; returns the master's exit status."""
        try:
            self.start()
            self.manage_workers()
            while True:
                sig = self.sig_queue.pop(0) if self.sig_queue else None
                if sig is None:
                    self.sleep()
                    self.reap_workers()
                    self.note_ready()
                    self.murder_workers()
                    self.manage_workers()
                    if self.reload_pending and not self.reload_waits():
                        log.info("reload: generation %d is up and the one before has "
                                 "stopped; running the reload that was held", self.generation)
                        self.reload()
                    continue
                getattr(self, "handle_" + self.SIG_NAMES[sig])()
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
        c = self.counters
        log.info("dq-master stopped after %.0f s: spawned=%d restarts=%d reloads=%d "
                 "murdered=%d", time.monotonic() - self.started, c.spawned, c.restarts,
                 c.reloads, c.murdered)
        remove_pid_file(self.cfg.pid_file)
        if self.handover is not None:
            self.handover.close()
        if self.hb_dir != Path():
            shutil.rmtree(self.hb_dir, ignore_errors=True)
        if self.redis is not None:
            self.redis.unlock()

    def stop(self, graceful: bool = True) -> None:
        """Stop every child (TERM, or QUIT when fast), then KILL stragglers, then Redis."""
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        self.kill_workers(signal.SIGTERM if graceful else signal.SIGQUIT)
        limit = self.cfg.grace + STOP_MARGIN if graceful else FAST_STOP
        deadline = time.monotonic() + limit
        while self.workers and time.monotonic() < deadline:
            self.reap_workers()
            if graceful and self.escalated():
                log.info("second stop signal: fast stop")
                graceful = False
                self.kill_workers(signal.SIGQUIT)
                deadline = min(deadline, time.monotonic() + FAST_STOP)
            time.sleep(0.05)
        if self.workers:
            log.warning("%d children still running %.0f s after the stop signal; killing "
                        "them", len(self.workers), limit)
            self.kill_workers(signal.SIGKILL)
            deadline = time.monotonic() + 2
            while self.workers and time.monotonic() < deadline:
                self.reap_workers()
                time.sleep(0.02)
        if self.redis is not None:
            self.redis.stop()

    def spawn_workers(self) -> None:
        self.check_web_port()
        super().spawn_workers()

    def check_web_port(self) -> None:
        """Before forking a dq-web, see that its port is free: when it is not (something
        took it, or a reload moved the console to a taken port), count a boot failure for
        the slot and say so in one line (once more after BOOT_STREAK failures, then only at
        debug), instead of forking a child that fails with a traceback every 10 s."""
        if not self.cfg.web or self.current("web", 0) is not None:
            return  # no console, or this generation's is running
        beside_old = self.web_shares_port()
        if not beside_old and any(w.role == "web" for w in self.workers.values()):
            return  # the old one, on another address, is retired first
        slot = self.slots.setdefault(("web", 0), Slot())
        now = time.monotonic()
        if now < slot.next_at:
            return
        why = web_listen_error(self.cfg, beside_old=beside_old)
        if not why:
            return
        delay = slot.died(0, now, boot_failed=True)
        if slot.boot_failures < BOOT_STREAK:
            log.warning("%s; retrying in %.1f s", why, delay)
        elif slot.boot_failures == BOOT_STREAK:
            log.error("dq-web could not boot %d times in a row (%s); retrying every %.0f s "
                      "until it boots", slot.boot_failures, why, delay)
        else:
            log.debug("dq-web could not boot again: %s", why)

    def escalated(self) -> bool:
        stops = {signal.SIGINT, signal.SIGTERM, signal.SIGQUIT}
        hit = any(sig in stops for sig in self.sig_queue)
        self.sig_queue.clear()
        return hit

    # signals

    def on_signal(self, sig: int, frame: Any) -> None:
        """Only record the signal and wake the loop: no logging, no I/O, no kill here."""
        if not (sig == signal.SIGCHLD and sig in self.sig_queue):
            self.sig_queue.append(sig)
        self.wakeup()

    def wakeup(self) -> None:
        try:
            os.write(self.pipe[1], b".")
        except OSError:
            pass

    def sleep(self) -> None:
        """Wait for a signal, at most a second (less while a child boots or a respawn is due,
        or a held reload waits for the old generation to go)."""
        timeout = 1.0
        if self.reload_pending or any(not w.ready for w in self.workers.values()):
            timeout = 0.1
        now = time.monotonic()
        due = [s.next_at for s in (*self.slots.values(), self.redis_slot) if s.next_at > now]
        if due:
            timeout = min(timeout, max(0.01, min(due) - now))
        try:
            ready, _, _ = select.select([self.pipe[0]], [], [], timeout)
            if ready:
                while os.read(self.pipe[0], 512):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

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
        self.reload()

    def handle_usr2(self) -> None:
        log.info("SIGUSR2: reloading")
        self.reload()

    def handle_ttin(self) -> None:
        self.num_consumers += 1
        log.info("SIGTTIN: consumers %d -> %d", self.num_consumers - 1, self.num_consumers)
        self.manage_workers()

    def handle_ttou(self) -> None:
        if self.num_consumers <= 1:
            log.info("SIGTTOU: already down to one consumer")
            return
        self.num_consumers -= 1
        log.info("SIGTTOU: consumers %d -> %d", self.num_consumers + 1, self.num_consumers)
        self.manage_workers()

    # reload

    def reload_waits(self) -> str:
        """Why a reload now would stack a third generation ('' when it would not): the
        current one is still starting, or an older one has not stopped yet. A generation
        that cannot boot is no reason to wait: the reload may be what fixes it."""
        if any(slot.boot_failures for slot in self.slots.values()):
            return ""
        if self.up_generation != self.generation:
            return f"generation {self.generation} is still starting"
        old = sum(w.generation != self.generation for w in self.workers.values())
        if old:
            return f"{old} children of the generation before are still stopping"
        return ""

    def reload(self) -> None:
        """Re-read the config, start a new generation; the old one retires once it is up.

        At most one generation starts beside the serving one: a reload that arrives
        meanwhile is held, and all those held become one reload, with the configuration of
        that moment, once the new generation is up and the old one has stopped."""
        why = self.reload_waits()
        if why:
            if not self.reload_pending:
                log.info("reload held: %s; it runs once that is done (further reloads "
                         "meanwhile are folded into it)", why)
            self.reload_pending = True
            return
        self.reload_pending = False
        try:
            cfg = anchor_paths(load_settings(self.overrides, config_file=self.reload_config()),
                               self.cwd)
            setup_logging(cfg, "dq-master")
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        running = self.redis is not None and bool(self.redis.pid)
        plan = self.make_plan(cfg, keep_embedded=running and holds_data(cfg))
        if plan is None:
            return
        plan = carry_over(self.plan, plan, drained_urls(cfg))
        if len(plan.retired) > len(self.plan.retired):
            log.info("reload: shards left out of the list are worked, and take no new job, "
                     "until they hold none: %s", ", ".join(
                         masked(n) for n, _ in plan.retired if n not in dict(self.plan.retired)))
        if plan.embedded and self.redis is None:
            try:
                self.redis = self.prepare_redis(cfg, plan)
                self.start_redis()
            except BootError as exc:
                self.redis = None
                log.error("reload refused, the running generation stays: %s", exc)
                return
        try:
            self.renew_handover()
        except BootError as exc:
            log.error("reload refused, the running generation stays: %s", exc)
            return
        if (cfg.host, cfg.port) != (self.cfg.host, self.cfg.port):
            try:
                listener = bind_listener(cfg.host, cfg.port)
            except BootError as exc:
                hint = ("; a new host on the same port cannot be bound while the old one "
                        "listens: restart dq-master to change it"
                        if cfg.port == self.cfg.port else "")
                log.error("reload refused, the running configuration stays: %s%s", exc, hint)
                return
            assert self.listener is not None
            self.listener.close()  # the old generation keeps its copies until it exits
            self.listener = listener
            # servers on the old socket must not leave connections to those on the new one
            self.board = LoadBoard(max(64, 4 * cfg.servers))
        self.plan = plan
        self.cfg = cfg
        self.num_consumers = cfg.consumers
        self.generation += 1
        self.counters.reloads += 1
        self.slots.clear()
        log.info("reload: starting generation %d: %s", self.generation, self.summary())
        self.manage_workers()

    def renew_handover(self) -> None:
        """A hand-over socket of its own for the generation about to start, bound at the
        same path: the old servers hand their connections to that path, so only the new
        generation can take them. The old socket stays open in the old servers, which
        still accept on it, but nothing can connect to it any more. (With one socket for
        all, a retiring server that had not yet seen its own USR1 took connections from
        its retiring sibling and handed them on a second time.)"""
        if self.handover is None:
            return
        if any(w.role == "server" and w.generation != self.generation
               for w in self.workers.values()):
            # A reload not held (the new generation fails to boot) while servers from
            # before still hand over: they keep the socket the current generation takes
            # on. A new one would hold their connections until the next generation boots.
            log.info("reload: servers of an older generation still hand connections "
                     "over; the new generation shares their hand-over socket")
            return
        path = self.handover.getsockname()
        aside = f"{path}.old"
        os.replace(path, aside)  # nothing hands over now: no generation is retiring
        try:
            sock = bind_handover(path)
        except BootError:
            os.replace(aside, path)
            raise
        os.unlink(aside)
        self.handover.close()  # the old servers keep their copies until they exit
        self.handover = sock

    def reload_config(self) -> str | None:
        if self.config_file:
            return self.config_file
        found = self.cwd / "dq.toml"
        return str(found) if found.is_file() else None
