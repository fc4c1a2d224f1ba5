"""The master's children: spawn, reap, murder and retire them, and the embedded Redis.

`WorkerPool` holds everything the master knows about its children and the verb-named
lifecycle methods (gunicorn's shape); `dq.master.arbiter.Arbiter` adds signals, stop and reload.
Plain synchronous code: each child imports its role only after fork.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import NoReturn

from dq.config import Settings
from dq.errors import EXIT_BOOT
from dq.master.embedded import EmbeddedError, EmbeddedRedis
from dq.master.supervise import (
    BOOT_STREAK,
    ROLE_ORDER,
    ROLE_PATHS,
    BootError,
    Counters,
    Slot,
    Worker,
    describe_exit,
)
from dq.runtime.shared import LoadBoard
from dq.sharding.plan import plan_shards

log = logging.getLogger("dq.master")

STOP_MARGIN = 5.0  # past settings.grace, a child that has not exited gets SIGKILL
ABORT_GRACE = 5.0  # between SIGABRT and SIGKILL for a child without heartbeat
BOOT_TIMEOUT = 60.0  # a booting child (imports, first connections) may be silent this long
REDIS_READY = 10.0  # seconds the embedded redis-server has to answer PING at start
SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR2, signal.SIGCHLD)


def web_bind_host(cfg: Settings) -> str:
    """Where dq-web listens (as web.app.bind_host, which the master must not import)."""
    if cfg.web_host:
        return cfg.web_host
    return "0.0.0.0" if cfg.web_password else "127.0.0.1"


def ready_line(cfg: Settings, listener: socket.socket | None) -> str:
    """The one line that says the system is up and what to do next (README's commands)."""
    host, port = listener.getsockname()[:2] if listener is not None else (cfg.host, cfg.port)
    here = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    parts = [f"dq is ready: clients add jobs on TCP {host}:{port}"]
    if cfg.web:
        web = web_bind_host(cfg)
        web_here = "127.0.0.1" if web in ("0.0.0.0", "::") else web
        auth = "-u :$DQ_WEB_PASSWORD " if cfg.web_password else ""
        parts.append(f"the console is http://{web_here}:{cfg.web_port}/")
        parts.append(f"register a topic: curl {auth}-H 'content-type: application/json' "
                     f"{web_here}:{cfg.web_port}/api/topics -d '{{\"topic\": \"demo\", "
                     f"\"callback\": \"http://127.0.0.1:8000/cb\"}}'")
    else:
        parts.append("no console (--no-web): register topics in the registry's dq_topic")
    parts.append(f"add a job: python3 -c \"from dq.client import DqClient; "
                 f"DqClient(['{here}:{port}']).add('demo', '1', {{'hello': 'world'}}, "
                 f"delay=5)\"")
    return "; ".join(parts)


class WorkerPool:
    """The children of one master, by pid, with a restart backoff per (role, index) slot."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.num_consumers = cfg.consumers
        self.generation = 0
        self.up_generation = -1  # the last generation logged as fully up
        self.workers: dict[int, Worker] = {}
        self.slots: dict[tuple[str, int], Slot] = {}
        self.seq = 0
        self.pid = os.getpid()
        self.stopping = False
        self.counters = Counters()
        self.pipe: tuple[int, int] = (-1, -1)
        self.listener: socket.socket | None = None
        self.handover: socket.socket | None = None  # servers pass connections on (reload)
        self.board = LoadBoard(max(64, 4 * cfg.servers))  # the servers' connection counts
        self.board_slots: dict[int, tuple[LoadBoard, int]] = {}  # server pid -> its slot
        self.plan = plan_shards(cfg)  # the generation's shards (dq/sharding/plan.py)
        self.announced = False  # the ready line was logged
        self.redis: EmbeddedRedis | None = None
        self.web_at: tuple[str, int] | None = None  # where the last dq-web forked listens
        self.redis_slot = Slot()
        self.hb_dir = Path()

    def wanted_slots(self) -> list[tuple[str, int]]:
        counts = {"server": self.cfg.servers, "timer": self.cfg.timers,
                  "consumer": self.num_consumers, "checker": 1, "web": int(self.cfg.web)}
        return [(role, i) for role in ROLE_ORDER for i in range(counts[role])]

    def current(self, role: str, index: int) -> Worker | None:
        for w in self.workers.values():
            if (w.role, w.index, w.generation) == (role, index, self.generation) \
                    and not w.retiring_at:
                return w
        return None

    def web_shares_port(self) -> bool:
        """Whether a new dq-web may start beside the old one: on the same address both
        listen with SO_REUSEPORT (web/app.py), so the console stays up through a reload.
        On another address the old one goes first (it may hold what the new one needs)."""
        return any(w.role == "web" for w in self.workers.values()) \
            and self.web_at == (web_bind_host(self.cfg), self.cfg.web_port)

    def spawn_worker(self, role: str, index: int) -> Worker:
        """Fork one child for (role, index) of the current generation."""
        if role == "web":
            self.web_at = (web_bind_host(self.cfg), self.cfg.web_port)
        self.seq += 1
        hb = self.hb_dir / f"{role}-{index}-{self.seq}"
        hb.write_bytes(b"")
        board, board_slot = self.board, -1
        if role == "server":
            board_slot = board.claim()
            if board_slot < 0:
                log.warning("no free slot for %s-%d on the servers' load board (%d slots): "
                            "it accepts without regard to the others", role, index,
                            board.slots)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self.child_main(role, index, hb, board_slot)
        except OSError:
            board.release(board_slot)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if board_slot >= 0:
            self.board_slots[pid] = (board, board_slot)
        worker = Worker(pid, role, index, self.generation, hb, time.monotonic())
        self.workers[pid] = worker
        self.counters.spawned += 1
        log.debug("spawned %s (pid %d, generation %d)", worker.name, pid, self.generation)
        return worker

    def child_main(self, role: str, index: int, hb: Path, board_slot: int = -1) -> NoReturn:
        """In the forked child: hand over to dq.runtime.context.run_child; never return."""
        try:
            from dq.runtime.context import run_child

            close = [*self.pipe]
            if self.redis is not None and self.redis.lock_fd >= 0:
                close.append(self.redis.lock_fd)
            if role != "server":
                close += [s.fileno() for s in (self.listener, self.handover) if s is not None]
            run_child(self.cfg, role, index, role_path=ROLE_PATHS[role],
                      heartbeat=str(hb), master_pid=self.pid,
                      listen_sock=self.listener if role == "server" else None,
                      handover_sock=self.handover if role == "server" else None,
                      board=self.board if board_slot >= 0 else None, board_slot=board_slot,
                      close_fds=close, plan=self.plan)
        except BaseException as exc:
            try:
                hb.write_text(f"boot-failed: {type(exc).__name__}: {exc}\n")
            finally:
                os._exit(EXIT_BOOT)
        os._exit(EXIT_BOOT)  # pragma: no cover - run_child never returns

    def spawn_workers(self) -> None:
        """Fork every wanted slot that has no live child and whose backoff has passed."""
        now = time.monotonic()
        for role, index in self.wanted_slots():
            if self.current(role, index) is not None:
                continue
            if role == "web" and any(w.role == "web" for w in self.workers.values()) \
                    and not self.web_shares_port():
                continue  # the old dq-web holds another address; it is retired first
            slot = self.slots.setdefault((role, index), Slot())
            if now < slot.next_at:
                continue
            try:
                self.spawn_worker(role, index)
            except OSError as exc:  # EAGAIN/ENOMEM: try again later, not in a loop
                delay = slot.died(0, now, boot_failed=False)
                log.error("cannot fork %s: %s; retrying in %.1f s", role, exc, delay)

    def manage_workers(self) -> None:
        """Keep the configured numbers: respawn, retire the unwanted and the old generation."""
        self.manage_redis()
        self.spawn_workers()
        wanted = set(self.wanted_slots())
        for w in list(self.workers.values()):
            if w.retiring_at:
                continue
            if w.generation == self.generation:
                if (w.role, w.index) not in wanted:
                    self.retire(w, "no longer wanted")
            elif (w.role == "web" and not self.web_shares_port()) or self.role_ready(w.role):
                self.retire(w, f"replaced by generation {self.generation}")

    def role_ready(self, role: str) -> bool:
        """Every current slot of `role` has a live child that has booted."""
        for r, index in self.wanted_slots():
            if r == role:
                w = self.current(r, index)
                if w is None or not w.ready:
                    return False
        return True

    def retire(self, worker: Worker, why: str) -> None:
        """Stop one child for good: TERM, or for a server that serves, USR1 (hand your
        connections to the servers that go on serving, then stop; dq/runtime/handover.py)."""
        hand_over = worker.role == "server" and worker.ready and self.handover is not None
        log.info("retiring %s (pid %d, generation %d): %s%s", worker.name, worker.pid,
                 worker.generation, why,
                 "; it hands its connections over" if hand_over else "")
        worker.retiring_at = time.monotonic()
        self.kill_worker(worker.pid, signal.SIGUSR1 if hand_over else signal.SIGTERM)

    def kill_worker(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def kill_workers(self, sig: int) -> None:
        """Signal every child; TERM skips those already retiring (a 2nd TERM means now)."""
        now = time.monotonic()
        for w in list(self.workers.values()):
            if sig == signal.SIGTERM:
                if w.retiring_at:
                    continue
                w.retiring_at = now
            self.kill_worker(w.pid, sig)

    def note_ready(self) -> None:
        """Notice children that finished booting (they write 'ready' in their file)."""
        for w in self.workers.values():
            if not w.ready and w.status() == "ready":
                w.ready = True
                slot = self.slots.get((w.role, w.index))
                if slot is not None and slot.boot_failures:
                    log.info("%s booted after %d failed attempts", w.name, slot.boot_failures)
                    slot.boot_failures = 0
        if self.up_generation != self.generation and all(
                self.role_ready(role) for role in ROLE_ORDER):
            self.up_generation = self.generation
            log.info("generation %d is up: %s", self.generation, ", ".join(
                sorted(w.name for w in self.workers.values()
                       if w.generation == self.generation and not w.retiring_at)))
            if not self.announced:
                self.announced = True
                log.info("%s", ready_line(self.cfg, self.listener))

    def reap_workers(self) -> None:
        """Collect every exited child and decide what its exit means."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if self.redis is not None and pid == self.redis.pid:
                self.redis_exited(code)
                continue
            board, board_slot = self.board_slots.pop(pid, (self.board, -1))
            board.release(board_slot)
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.worker_exited(worker, code)

    def worker_exited(self, w: Worker, code: int) -> None:
        status = w.status()
        w.heartbeat.unlink(missing_ok=True)
        ran = time.monotonic() - w.started
        if self.stopping or w.retiring_at:
            log.info("%s (pid %d) %s", w.name, w.pid, describe_exit(code))
            return
        if w.generation != self.generation:
            log.warning("%s (pid %d, old generation) %s", w.name, w.pid, describe_exit(code))
            return
        self.counters.restarts += 1
        slot = self.slots.setdefault((w.role, w.index), Slot())
        delay = slot.died(ran, time.monotonic(), boot_failed=code == EXIT_BOOT)
        if code != EXIT_BOOT:
            log.warning("%s (pid %d) %s after %.1f s; restarting in %.1f s", w.name, w.pid,
                        describe_exit(code), ran, delay)
            return
        why = status.removeprefix("boot-failed: ") or "see its log lines above"
        if slot.boot_failures < BOOT_STREAK:
            log.warning("%s (pid %d) could not boot: %s; retrying in %.1f s", w.name, w.pid,
                        why, delay)
        elif slot.boot_failures == BOOT_STREAK:
            log.error("%s could not boot %d times in a row (%s); retrying every %.0f s until "
                      "it boots", w.name, slot.boot_failures, why, delay)
        else:
            log.debug("%s could not boot again: %s", w.name, why)

    def murder_workers(self) -> None:
        """SIGABRT a child without heartbeat for heartbeat_timeout (BOOT_TIMEOUT while it
        boots), SIGKILL it 5 s later."""
        now, wall = time.monotonic(), time.time()
        for w in list(self.workers.values()):
            if w.aborted_at:
                if now - w.aborted_at > ABORT_GRACE:
                    self.kill_worker(w.pid, signal.SIGKILL)
                continue
            if w.retiring_at and now - w.retiring_at > self.cfg.grace + STOP_MARGIN:
                log.warning("%s (pid %d) still runs %.0f s after TERM; killing it", w.name,
                            w.pid, now - w.retiring_at)
                self.kill_worker(w.pid, signal.SIGKILL)
                w.aborted_at = now
                continue
            try:
                silent = wall - w.heartbeat.stat().st_mtime
            except OSError:
                continue
            limit = self.cfg.heartbeat_timeout if w.ready else max(
                self.cfg.heartbeat_timeout, BOOT_TIMEOUT)
            if silent > limit:
                log.error("%s (pid %d) sent no heartbeat for %.0f s; aborting it", w.name,
                          w.pid, silent)
                self.counters.murdered += 1
                self.kill_worker(w.pid, signal.SIGABRT)
                w.aborted_at = now

    # embedded redis

    def start_redis(self) -> None:
        assert self.redis is not None
        try:
            self.redis.spawn()
        except (EmbeddedError, OSError) as exc:
            raise BootError(f"cannot start the embedded redis-server: {exc}") from None
        if not self.redis.wait_ready(REDIS_READY):
            raise BootError(f"the embedded redis-server did not answer PING within "
                            f"{REDIS_READY:.0f} s; see {self.redis.dir / 'redis.log'}")

    def manage_redis(self) -> None:
        if self.redis is None or self.redis.pid or self.stopping:
            return
        if time.monotonic() < self.redis_slot.next_at:
            return
        try:
            self.redis.spawn()
        except (EmbeddedError, OSError) as exc:
            delay = self.redis_slot.died(0, time.monotonic(), boot_failed=True)
            log.error("cannot start the embedded redis-server: %s; retrying in %.1f s",
                      exc, delay)

    def redis_exited(self, code: int) -> None:
        assert self.redis is not None
        ran = time.monotonic() - self.redis.started
        pid, self.redis.pid = self.redis.pid, 0
        if self.stopping:
            return
        delay = self.redis_slot.died(ran, time.monotonic(), boot_failed=False)
        log.warning("embedded redis-server (pid %d) %s after %.1f s; restarting in %.1f s",
                    pid, describe_exit(code), ran, delay)
