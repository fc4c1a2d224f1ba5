"""The master's children: what they are forked with, and spawn, reap, murder and retire.

`Children` holds everything the master knows about its children and the verb-named
lifecycle methods (gunicorn's shape); `Launch` is what the current generation's children
are forked with, from which each gets a ChildSpec before the fork (dq/runtime/spec.py).
Plain synchronous code: each child imports its role only after fork.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from dq.config import Settings
from dq.errors import EXIT_BOOT
from dq.master.console import ready_line, web_listen_error
from dq.master.signals import SIGNALS
from dq.master.supervise import (
    BOOT_STREAK,
    ROLE_ORDER,
    ROLE_PATHS,
    Counters,
    Slot,
    Worker,
    describe_exit,
)
from dq.runtime.shared import LoadBoard
from dq.runtime.spec import ChildSpec
from dq.sharding.plan import ShardPlan

log = logging.getLogger("dq.master")

STOP_MARGIN = 5.0  # past settings.grace, a child that has not exited gets SIGKILL
ABORT_GRACE = 5.0  # between SIGABRT and SIGKILL for a child without heartbeat
BOOT_TIMEOUT = 60.0  # a booting child (imports, first connections) may be silent this long


@dataclass
class Launch:
    """What the current generation's children are forked with. The arbiter fills it at
    start and changes it at a reload; each child gets a ChildSpec made from it."""

    cfg: Settings
    plan: ShardPlan  # the generation's shards (dq/sharding/plan.py)
    listener: socket.socket | None = None  # the TCP socket every dq-server shares
    handover: socket.socket | None = None  # servers pass connections on here (reload)
    hb_dir: Path = Path()  # the children's heartbeat files, and the hand-over socket
    pid: int = 0  # the master's
    pipe: tuple[int, int] = (-1, -1)  # the master's wakeup pipe
    lock_fd: int = -1  # the embedded Redis's data dir lock, held by the master

    def close_fds(self, *, keep_sockets: bool = False) -> tuple[int, ...]:
        """The master's descriptors a child closes (a server keeps the two sockets)."""
        fds = [fd for fd in (*self.pipe, self.lock_fd) if fd >= 0]
        if not keep_sockets:
            fds += [s.fileno() for s in (self.listener, self.handover) if s is not None]
        return tuple(fds)

    def spec(self, role: str, index: int, generation: int, heartbeat: Path,
             board: LoadBoard | None = None, board_slot: int = -1) -> ChildSpec:
        """The spec of one child about to be forked."""
        server = role == "server"
        return ChildSpec(role, index, generation, self.cfg, self.plan, ROLE_PATHS[role],
                         heartbeat, self.pid,
                         listen_sock=self.listener if server else None,
                         handover_sock=self.handover if server else None,
                         board=board, board_slot=board_slot,
                         close_fds=self.close_fds(keep_sockets=server))


def child_main(spec: ChildSpec) -> NoReturn:
    """In the forked child: hand over to dq.runtime.context.run_child; never return."""
    try:
        from dq.runtime.context import run_child

        run_child(spec)
    except BaseException as exc:
        try:
            spec.heartbeat.write_text(f"boot-failed: {type(exc).__name__}: {exc}\n")
        finally:
            os._exit(EXIT_BOOT)
    os._exit(EXIT_BOOT)  # pragma: no cover - run_child never returns


class Children:
    """The children of one master, by pid, with a restart backoff per (role, index) slot."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.num_consumers = launch.cfg.consumers
        self.generation = 0
        self.up_generation = -1  # the last generation logged as fully up
        self.workers: dict[int, Worker] = {}
        self.slots: dict[tuple[str, int], Slot] = {}
        self.seq = 0
        self.stopping = False
        self.counters = Counters()
        self.board = LoadBoard(max(64, 4 * launch.cfg.servers))  # the servers' connections
        self.board_slots: dict[int, tuple[LoadBoard, int]] = {}  # server pid -> its slot
        self.announced = False  # the ready line was logged
        self.web_at: tuple[str, int] | None = None  # where the last dq-web forked listens

    @property
    def cfg(self) -> Settings:
        return self.launch.cfg

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
            and self.web_at == (self.cfg.web_bind_host, self.cfg.web_port)

    def spawn_worker(self, role: str, index: int) -> Worker:
        """Fork one child for (role, index) of the current generation."""
        if role == "web":
            self.web_at = (self.cfg.web_bind_host, self.cfg.web_port)
        self.seq += 1
        hb = self.launch.hb_dir / f"{role}-{index}-{self.seq}"
        hb.write_bytes(b"")
        board, board_slot = self.board, -1
        if role == "server":
            board_slot = board.claim()
            if board_slot < 0:
                log.warning("no free slot for %s-%d on the servers' load board (%d slots): "
                            "it accepts without regard to the others", role, index,
                            board.slots)
        spec = self.launch.spec(role, index, self.generation, hb,
                                board if board_slot >= 0 else None, board_slot)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                child_main(spec)
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

    def spawn_workers(self) -> None:
        """Fork every wanted slot that has no live child and whose backoff has passed."""
        self.check_web_port()
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

    def manage_workers(self) -> None:
        """Keep the configured numbers: respawn, retire the unwanted and the old generation."""
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
        hand_over = worker.role == "server" and worker.ready \
            and self.launch.handover is not None
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
                log.info("%s", ready_line(self.cfg, self.launch.listener))

    def exited(self, pid: int, code: int) -> None:
        """A child was reaped: free its board slot and decide what its exit means."""
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

    def booting(self) -> bool:
        return any(not w.ready for w in self.workers.values())

    def next_due(self) -> list[float]:
        """When slots waiting out their backoff may be forked again (monotonic)."""
        return [s.next_at for s in self.slots.values()]

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

    def next_generation(self) -> None:
        """A reload's new generation starts: the consumers as configured, fresh backoffs."""
        self.num_consumers = self.cfg.consumers
        self.generation += 1
        self.counters.reloads += 1
        self.slots.clear()
