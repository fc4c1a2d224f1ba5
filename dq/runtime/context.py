"""What every child process shares: its context, and how it opens the store and registry.

A role (server, timer, consumer, checker, web) is an `async def run(ctx: Context)` that
returns once `ctx.stopping` is set and its work is drained. The master makes a ChildSpec
before the fork (dq/runtime/spec.py); the child machinery (post-fork setup, asyncio.run,
signal flags, heartbeat, parent-death check) makes its Context from it and calls the
role; tests call the same function in-process.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import importlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from dq.config import Settings
from dq.errors import EXIT_BOOT, EXIT_ORPHAN
from dq.runtime.logs import setup_logging
from dq.runtime.shared import LoadBoard
from dq.runtime.spec import ChildSpec
from dq.runtime.titles import child_name, set_title
from dq.sharding.health import HealthReader, health_path
from dq.sharding.plan import ShardPlan, embedded_redis_url, enabled_shards, plan_shards
from dq.sharding.plan import state as embedded_state
from dq.sharding.shards import ShardSet
from dq.storage.store import Store

if TYPE_CHECKING:
    from dq.registry.core import Registry

_T = TypeVar("_T")


class Duty(StrEnum):
    """A duty one child of a role does for all of them, by name, so that who does what is
    read here rather than from an `index == 0` somewhere in a role."""

    ALERT_SWEEP = "alert-sweep"  # a consumer mails the alerts still owed (dead letters, breakers)
    REBUCKET = "rebucket"  # a timer keeps delayed jobs in the buckets the `buckets` setting gives


SINGLETON_DUTIES = {("consumer", 0): frozenset({Duty.ALERT_SWEEP}),
                    ("timer", 0): frozenset({Duty.REBUCKET})}


def duties_of(role: str, index: int) -> frozenset[Duty]:
    """The singleton duties of child `index` of `role`: consumer 0 sweeps the owed alerts,
    timer 0 rebuckets."""
    return SINGLETON_DUTIES.get((role, index), frozenset())


GC_THRESHOLD = 20_000  # allocations between young-generation collections (Python's: 700)


@dataclass
class Context:
    """One running role: its settings, its number, and the flag that asks it to stop."""

    settings: Settings
    role: str
    index: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    listen_sock: socket.socket | None = None  # the master's TCP socket, for servers
    # The master's Unix socket on which servers pass a reload's connections on
    # (dq/runtime/handover.py), and whether this server was asked to (SIGUSR1) rather than to stop.
    handover_sock: socket.socket | None = None
    hand_over: bool = False
    board: LoadBoard | None = None  # the servers' connection counts (dq/runtime/shared.py)
    board_slot: int = -1  # this server's place on it
    master_pid: int | None = None  # the dq-master that forked this role (None: standalone)
    # The shards of this generation (dq/sharding/plan.py), from the master; None: read_plan.
    plan: ShardPlan | None = None
    # A role may set this once it serves; otherwise it counts as booted after BOOT_WINDOW
    # seconds without failing. The master retires an old generation only when the new one
    # is ready, and a role that fails before it is ready exits with EXIT_BOOT.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # The singleton duties this child does besides its role's work; None: those of its
    # role and index (duties_of).
    duties: frozenset[Duty] | None = None

    def __post_init__(self) -> None:
        if self.duties is None:
            self.duties = duties_of(self.role, self.index)

    def does(self, duty: Duty) -> bool:
        """Whether this child does the singleton `duty`."""
        return self.duties is not None and duty in self.duties

    @property
    def name(self) -> str:
        return child_name(self.role, self.index)

    @classmethod
    def of(cls, spec: ChildSpec) -> Context:
        """The context of a forked child, from the spec its master made before the fork."""
        return cls(spec.settings, spec.role, spec.index, listen_sock=spec.listen_sock,
                   handover_sock=spec.handover_sock, board=spec.board,
                   board_slot=spec.board_slot, master_pid=spec.master_pid, plan=spec.plan)


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run, on uvloop when it is installed (a third less CPU per request on the
    server's hot path, see bench/RESULTS.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def open_store(settings: Settings, plan: ShardPlan | None = None) -> Store:
    """A Store over the plan's shards (by default the `redis` setting, else the embedded
    Redis). Connections are made lazily, inside the running loop. The shards follow the
    checker's shared health record (dq/sharding/health.py)."""
    plan = plan or plan_shards(settings)
    shards = ShardSet.from_urls(plan.shards, plan.retired,
                                command_timeout=settings.redis_timeout,
                                cluster_partitions=settings.cluster_partitions,
                                replica_acks=settings.replica_acks)
    shards.attach_health(HealthReader(health_path(settings)))
    return Store(shards, prefix=settings.prefix, buckets=settings.buckets, zone=settings.zone,
                 orig_prefix=settings.adopt_prefix, add_timeout=settings.add_timeout)


def read_plan(settings: Settings, registry: Registry | None = None) -> ShardPlan:
    """The shard plan of a role run on its own (without a dq-master to hand it one): the
    registry's shards read now, and the embedded Redis retired while it answers on its
    socket. Blocking: call it in a thread."""
    from dq.registry.core import Registry  # a timer never needs SQLAlchemy otherwise

    own = registry is None
    reg = Registry(settings.db_url()) if registry is None else registry
    try:
        rows = enabled_shards(reg.shards())
    finally:
        if own:
            reg.close()
    sock = embedded_redis_url(settings).removeprefix("unix://")
    return plan_shards(settings, rows, keep_embedded=embedded_state(sock) != "down")


async def role_plan(ctx: Context, registry: Registry | None = None) -> ShardPlan:
    """The shards this role works: the plan its master handed it, else read_plan."""
    if ctx.plan is not None:
        return ctx.plan
    return await asyncio.to_thread(read_plan, ctx.settings, registry)


# ---------------------------------------------------------------------------------------
# Child machinery: what runs in a child between the master's fork and its exit.

BOOT_WINDOW = 2.0  # a role that runs this long without failing counts as booted
HEARTBEAT_EVERY = 1.0
STOP_MARGIN = 1.0  # past settings.grace, the child cancels a role that will not return
_IGNORED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU,
            signal.SIGWINCH)
_DEFAULT = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGALRM)

log = logging.getLogger("dq.worker")


def write_status(path: Path, status: str) -> None:
    """Tell the master how boot went: 'ready' or 'boot-failed: <why>' (one line)."""
    try:
        path.write_text(status.replace("\n", " ")[:500] + "\n", encoding="utf-8")
    except OSError:
        pass


def _reason(exc: BaseException) -> str:
    """The exception in one line (SQLAlchemy appends a second line with a URL)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_role(path: str) -> Callable[[Context], Awaitable[None]]:
    """The role function named 'module:function', imported now (after fork)."""
    module_name, _, func = path.partition(":")
    module = importlib.import_module(module_name)
    fn: Callable[[Context], Awaitable[None]] = getattr(module, func or "run")
    return fn


def _post_fork(spec: ChildSpec) -> None:
    """Make a freshly forked child its own process: signals, title, fds, logs."""
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    for sig in _DEFAULT:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the master blocked them over fork
    for fd in spec.close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    # Our own process group: a terminal's ^C reaches only the master, which then stops
    # the children once, gracefully (a second signal would make them exit at once).
    os.setpgid(0, 0)
    set_title(spec.name)
    setup_logging(spec.settings, spec.name)
    faulthandler.enable(all_threads=True)  # a SIGABRT from the master dumps the stack


class _Child:
    """Signal flags, heartbeat and parent-death check of one child's event loop."""

    def __init__(self, ctx: Context, heartbeat: Path, master_pid: int) -> None:
        self.ctx = ctx
        self.heartbeat = heartbeat
        self.master_pid = master_pid
        self.signals = 0
        self.orphaned = False
        self.booted = False

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.graceful, sig)
        loop.add_signal_handler(signal.SIGQUIT, self.fast)
        loop.add_signal_handler(signal.SIGUSR1, self.retire)

    def retire(self) -> None:
        """SIGUSR1: a reload replaced this child; a server hands its connections on."""
        if not self.signals:
            self.ctx.hand_over = self.ctx.handover_sock is not None
        self.graceful(signal.SIGUSR1)

    def graceful(self, sig: int) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("%s: second %s; exiting now", self.ctx.name, signal.Signals(sig).name)
            _exit_now(1)
        log.info("%s: %s received; %s", self.ctx.name, signal.Signals(sig).name,
                 "handing its connections to the new generation" if self.ctx.hand_over
                 else "stopping gracefully")
        self.ctx.stopping.set()

    def fast(self) -> None:
        log.info("%s: SIGQUIT received; exiting now", self.ctx.name)
        _exit_now(0)

    async def beat(self) -> None:
        """Prove liveness from inside the loop; stop when the master is gone."""
        while True:
            try:
                os.utime(self.heartbeat)
            except OSError:
                pass
            if os.getppid() != self.master_pid and not self.orphaned:
                self.orphaned = True
                log.warning("%s: master (pid %d) went away; stopping", self.ctx.name,
                            self.master_pid)
                self.ctx.stopping.set()
            await asyncio.sleep(HEARTBEAT_EVERY)

    async def wait_booted(self, task: asyncio.Task[None]) -> None:
        """Until the role is ready (it said so, or survived BOOT_WINDOW) or has ended."""
        ready = asyncio.ensure_future(self.ctx.ready.wait())
        await asyncio.wait({task, ready}, timeout=BOOT_WINDOW,
                           return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not task.done() or (not task.cancelled() and task.exception() is None):
            self.booted = True
            write_status(self.heartbeat, "ready")

    async def wait_done(self, task: asyncio.Task[None]) -> None:
        """Until the role returns; once stopping, at most grace + a margin, then cancel."""
        stop = asyncio.ensure_future(self.ctx.stopping.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        limit = self.ctx.settings.grace + STOP_MARGIN
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            log.warning("%s did not stop within %.0f s; cancelling it", self.ctx.name, limit)
            task.cancel()
            await asyncio.wait({task}, timeout=5)

    def exit_code(self, task: asyncio.Task[None]) -> int:
        exc = None if not task.done() or task.cancelled() else task.exception()
        if exc is not None:
            log.error("%s failed: %s", self.ctx.name, _reason(exc), exc_info=exc)
            if not self.booted:
                write_status(self.heartbeat, "boot-failed: " + _reason(exc))
                return EXIT_BOOT
            return 1
        if self.orphaned:
            return EXIT_ORPHAN
        if not self.ctx.stopping.is_set():
            log.error("%s returned without being asked to stop", self.ctx.name)
            return 1
        return 0


async def _supervise(ctx: Context, role: Callable[[Context], Awaitable[None]],
                     heartbeat: Path, master_pid: int) -> int:
    child = _Child(ctx, heartbeat, master_pid)
    child.install_signals()
    beat = asyncio.create_task(child.beat())
    task = asyncio.ensure_future(role(ctx))
    try:
        await child.wait_booted(task)
        await child.wait_done(task)
    finally:
        beat.cancel()
    return child.exit_code(task)


def _exit_now(code: int) -> NoReturn:
    logging.shutdown()
    os._exit(code)


def run_child(spec: ChildSpec) -> NoReturn:
    """Run one role in a just-forked child and exit with its code; never returns.

    Exit codes: 0 after a clean stop, EXIT_BOOT when the role cannot start (import error,
    Redis unreachable, ... before it is ready), EXIT_ORPHAN when the master went away,
    1 when it crashed after booting.
    """
    code = EXIT_BOOT
    hb = spec.heartbeat
    started = time.monotonic()
    ctx = Context.of(spec)
    try:
        _post_fork(spec)
        log.debug("%s started (pid %d, role %s)", ctx.name, os.getpid(), spec.role_path)
        try:
            fn = load_role(spec.role_path)
        except Exception as exc:
            log.error("%s cannot load %s: %s", ctx.name, spec.role_path, _reason(exc))
            write_status(hb, "boot-failed: " + _reason(exc))
            _exit_now(EXIT_BOOT)
        # What was loaded so far lives as long as the process: keep the collector from
        # walking it again and again, and from touching (so copying) the master's pages.
        # Each request allocates a few container objects, so young collections are
        # frequent at Python's default threshold.
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 20)
        code = run_loop(_supervise(ctx, fn, hb, spec.master_pid))
        log.debug("%s exiting with code %d after %.1f s", ctx.name, code,
                 time.monotonic() - started)
    except BaseException as exc:  # a forked child must never return into the master's code
        log.exception("%s: unexpected failure", ctx.name)
        write_status(hb, "boot-failed: " + _reason(exc))
    finally:
        _exit_now(code)
