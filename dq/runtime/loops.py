"""How a role's loops wait: a pause that ends early when the role is asked to stop, and a
doubling back-off between two bounds (a shard that fails, a ready list that is empty)."""

from __future__ import annotations

import asyncio
import contextlib

SHARD_BACKOFF_MIN = 0.5  # a role's loop over a shard that fails waits this long, doubling
SHARD_BACKOFF_MAX = 5.0  # up to this
DOWN_WAIT = 0.25  # how often a role's loop looks again at a shard marked down


async def pause(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, less once `stopping` is set; True when it is set."""
    if stopping.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
    return stopping.is_set()


class Backoff:
    """A wait that doubles from `low` up to `high` while a loop keeps failing (or finding
    nothing to do), and goes back to `low` once it succeeds."""

    __slots__ = ("delay", "high", "low")

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self.delay = low

    async def wait(self, stopping: asyncio.Event) -> None:
        """Pause for the current delay (less once `stopping` is set), then double it."""
        await pause(stopping, self.delay)
        self.delay = min(self.delay * 2, self.high)

    def reset(self) -> bool:
        """Back to the shortest wait; True when the loop had been backing off."""
        was = self.delay > self.low
        self.delay = self.low
        return was


def shard_backoff() -> Backoff:
    """The back-off of a role's loop over one shard (timer and consumer alike)."""
    return Backoff(SHARD_BACKOFF_MIN, SHARD_BACKOFF_MAX)
