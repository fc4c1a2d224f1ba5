"""Timers and consumers as tasks of the test's loop, and an SMTP mailbox: what the delivery
tests (test_delivery, test_flow, test_flow_retry, test_adopt) share."""

from __future__ import annotations

import asyncio
from typing import Any

from dq.config import Settings
from dq.roles import consumer, timer
from dq.runtime.context import Context


class Roles:
    """Timers and consumers running as tasks of this loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[tuple[Context, asyncio.Task[None]]] = []

    def start(self, role: str, index: int = 0, **changes: Any) -> tuple[Context,
                                                                        asyncio.Task[None]]:
        ctx = Context(self.settings.replace(**changes), role, index)
        fn = timer.run if role == "timer" else consumer.run
        task = asyncio.create_task(fn(ctx), name=ctx.name)
        self.running.append((ctx, task))
        return ctx, task

    def kill(self, task: asyncio.Task[None]) -> None:
        """Like kill -9: no drain, no final writes."""
        task.cancel()

    async def stop(self) -> None:
        for ctx, _ in self.running:
            ctx.stopping.set()
        tasks = [t for _, t in self.running]
        async with asyncio.timeout(15):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                raise r


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode("utf-8", "replace")))
        return "250 OK"
