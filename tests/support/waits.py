"""Waiting on a condition instead of sleeping a fixed time: the test goes on as soon as
what it waits for has happened, and a failure says what never did."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str, *,
               interval: float = 0.02) -> T:
    """`cond()`'s first true value, polled every `interval` s for up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return got


async def until(cond: Callable[[], T | Awaitable[T]], timeout: float, what: str, *,
                interval: float = 0.02) -> T:
    """The same in a loop: `cond` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got) or isinstance(got, asyncio.Future):
            got = await got
        if got:
            return got  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
