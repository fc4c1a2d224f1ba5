"""A reload (SIGHUP, SIGUSR2): re-read the configuration and start a new generation.

The old generation retires once the new one is up (Children.manage_workers); the listen
socket never closes, so no client sees a refused connection. Every step that can fail
leaves the running generation as it is and says why in one log line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dq.config import Settings, load_settings
from dq.errors import ConfigError
from dq.master.boot import make_plan
from dq.master.embedded import holds_data
from dq.master.keeper import RedisKeeper
from dq.master.supervise import anchor_paths, bind_handover
from dq.runtime.logs import setup_logging
from dq.runtime.shared import BootError, LoadBoard, bind_listener
from dq.sharding.plan import ShardPlan, carry_over, drained_urls, masked

if TYPE_CHECKING:
    from dq.master.arbiter import Arbiter

log = logging.getLogger("dq.master")

REFUSED = "reload refused, the running generation stays: %s"


class Reloader:
    """The arbiter's reloads: at most one generation starts beside the serving one."""

    def __init__(self, arbiter: Arbiter, overrides: dict[str, Any], cwd: Path,
                 config_file: str) -> None:
        self.arbiter = arbiter
        self.overrides = dict(overrides)
        self.cwd = cwd
        self.config_file = str(cwd / config_file) if config_file else ""
        self.pending = False  # reloads folded into the one that runs next

    def reload(self) -> None:
        """Re-read the config, start a new generation; the old one retires once it is up.

        At most one generation starts beside the serving one: a reload that arrives
        meanwhile is held, and all those held become one reload, with the configuration of
        that moment, once the new generation is up and the old one has stopped."""
        why = self.arbiter.children.reload_waits()
        if why:
            if not self.pending:
                log.info("reload held: %s; it runs once that is done (further reloads "
                         "meanwhile are folded into it)", why)
            self.pending = True
            return
        self.pending = False
        cfg = self.load()
        plan = None if cfg is None else self.plan(cfg)
        if cfg is None or plan is None or not self.start_embedded(cfg, plan):
            return
        try:
            self.renew_handover()
        except BootError as exc:
            log.error(REFUSED, exc)
            return
        if self.move_listener(cfg):
            self.start_generation(cfg, plan)

    def run_held(self) -> None:
        """Run the reload that was held, once nothing makes it wait any more."""
        if self.pending and not self.arbiter.children.reload_waits():
            log.info("reload: generation %d is up and the one before has stopped; running "
                     "the reload that was held", self.arbiter.children.generation)
            self.reload()

    def load(self) -> Settings | None:
        """The configuration now (None: it cannot be read; said why)."""
        try:
            cfg = anchor_paths(load_settings(self.overrides, config_file=self.config_path()),
                               self.cwd)
            setup_logging(cfg, "dq-master")
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return None
        return cfg

    def config_path(self) -> str | None:
        if self.config_file:
            return self.config_file
        found = self.cwd / "dq.toml"
        return str(found) if found.is_file() else None

    def plan(self, cfg: Settings) -> ShardPlan | None:
        """The new generation's shards; those left out of the list stay retired."""
        arb = self.arbiter
        running = arb.keeper is not None and bool(arb.keeper.pid)
        plan = make_plan(cfg, keep_embedded=running and holds_data(cfg),
                         close_fds=arb.launch.close_fds())
        if plan is None:
            return None
        old = arb.launch.plan
        plan = carry_over(old, plan, drained_urls(cfg))
        if len(plan.retired) > len(old.retired):
            log.info("reload: shards left out of the list are worked, and take no new job, "
                     "until they hold none: %s", ", ".join(
                         masked(n) for n, _ in plan.retired if n not in dict(old.retired)))
        return plan

    def start_embedded(self, cfg: Settings, plan: ShardPlan) -> bool:
        """The embedded Redis, when the plan has it and the master runs none yet."""
        arb = self.arbiter
        if not plan.embedded or arb.keeper is not None:
            return True
        try:
            arb.keep_redis(RedisKeeper.prepare(cfg))
            assert arb.keeper is not None
            arb.keeper.start()
        except BootError as exc:
            arb.keep_redis(None)
            log.error(REFUSED, exc)
            return False
        return True

    def renew_handover(self) -> None:
        """A hand-over socket of its own for the generation about to start, bound at the
        same path: the old servers hand their connections to that path, so only the new
        generation can take them. The old socket stays open in the old servers, which
        still accept on it, but nothing can connect to it any more. (With one socket for
        all, a retiring server that had not yet seen its own USR1 took connections from
        its retiring sibling and handed them on a second time.)"""
        launch, children = self.arbiter.launch, self.arbiter.children
        if launch.handover is None:
            return
        if any(w.role == "server" and w.generation != children.generation
               for w in children.workers.values()):
            # A reload not held (the new generation fails to boot) while servers from
            # before still hand over: they keep the socket the current generation takes
            # on. A new one would hold their connections until the next generation boots.
            log.info("reload: servers of an older generation still hand connections "
                     "over; the new generation shares their hand-over socket")
            return
        path = launch.handover.getsockname()
        aside = f"{path}.old"
        os.replace(path, aside)  # nothing hands over now: no generation is retiring
        try:
            sock = bind_handover(path)
        except BootError:
            os.replace(aside, path)
            raise
        os.unlink(aside)
        launch.handover.close()  # the old servers keep their copies until they exit
        launch.handover = sock

    def move_listener(self, cfg: Settings) -> bool:
        """A new listen socket when the host or port changed (False: it cannot be bound)."""
        launch = self.arbiter.launch
        old = launch.cfg
        if (cfg.host, cfg.port) == (old.host, old.port):
            return True
        try:
            listener = bind_listener(cfg.host, cfg.port)
        except BootError as exc:
            hint = ("; a new host on the same port cannot be bound while the old one "
                    "listens: restart dq-master to change it" if cfg.port == old.port else "")
            log.error("reload refused, the running configuration stays: %s%s", exc, hint)
            return False
        assert launch.listener is not None
        launch.listener.close()  # the old generation keeps its copies until it exits
        launch.listener = listener
        # servers on the old socket must not leave connections to those on the new one
        self.arbiter.children.board = LoadBoard(max(64, 4 * cfg.servers))
        return True

    def start_generation(self, cfg: Settings, plan: ShardPlan) -> None:
        arb = self.arbiter
        arb.launch.plan = plan
        arb.launch.cfg = cfg
        arb.children.next_generation()
        log.info("reload: starting generation %d: %s", arb.children.generation, arb.summary())
        arb.manage_workers()
