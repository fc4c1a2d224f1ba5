"""The master's embedded redis-server: prepared, started, restarted with backoff, stopped.

dq/master/embedded.py knows how to run one redis-server over the data dir; this is how the
master supervises it beside its children (its pid is reaped in the same loop).
"""

from __future__ import annotations

import logging
import time

from dq.config import Settings
from dq.master.embedded import EmbeddedError, EmbeddedRedis, find_binary
from dq.master.supervise import Slot, describe_exit
from dq.runtime.shared import BootError

log = logging.getLogger("dq.master")

REDIS_READY = 10.0  # seconds the embedded redis-server has to answer PING at start


class RedisKeeper:
    """Keeps one embedded redis-server running while the master runs."""

    def __init__(self, redis: EmbeddedRedis) -> None:
        self.redis = redis
        self.slot = Slot()  # its restart backoff

    @classmethod
    def prepare(cls, cfg: Settings) -> RedisKeeper:
        """The embedded Redis over cfg's data dir, locked and with a binary to run."""
        try:
            redis = EmbeddedRedis(cfg)
            redis.lock()
            find_binary()
        except EmbeddedError as exc:
            raise BootError(str(exc)) from None
        return cls(redis)

    @property
    def pid(self) -> int:
        return self.redis.pid

    @property
    def lock_fd(self) -> int:
        return self.redis.lock_fd

    def start(self) -> None:
        """Start it and wait until it answers PING; BootError when it does not."""
        try:
            self.redis.spawn()
        except (EmbeddedError, OSError) as exc:
            raise BootError(f"cannot start the embedded redis-server: {exc}") from None
        if not self.redis.wait_ready(REDIS_READY):
            raise BootError(f"the embedded redis-server did not answer PING within "
                            f"{REDIS_READY:.0f} s; see {self.redis.dir / 'redis.log'}")

    def manage(self, stopping: bool) -> None:
        """Start it again once its backoff has passed, unless it runs or the master stops."""
        if self.redis.pid or stopping:
            return
        if time.monotonic() < self.slot.next_at:
            return
        try:
            self.redis.spawn()
        except (EmbeddedError, OSError) as exc:
            delay = self.slot.died(0, time.monotonic(), boot_failed=True)
            log.error("cannot start the embedded redis-server: %s; retrying in %.1f s",
                      exc, delay)

    def exited(self, code: int, stopping: bool) -> None:
        """The master reaped it: restart it after its backoff, unless the master stops."""
        ran = time.monotonic() - self.redis.started
        pid, self.redis.pid = self.redis.pid, 0
        if stopping:
            return
        delay = self.slot.died(ran, time.monotonic(), boot_failed=False)
        log.warning("embedded redis-server (pid %d) %s after %.1f s; restarting in %.1f s",
                    pid, describe_exit(code), ran, delay)

    def stop(self) -> None:
        self.redis.stop()

    def unlock(self) -> None:
        self.redis.unlock()
