"""The topics as servers and consumers look them up: a cache over the registry.

It knows no SQL: it asks `Registry` for a fingerprint and, when that changed, for the topics.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dq.registry.core import Registry, Topic

log = logging.getLogger("dq.topics")


class TopicCache:
    """Workers' view of the topics: answers from memory and re-reads the registry at most
    every `refresh` seconds, fully only when its fingerprint changed.

    A failed refresh is logged and the previous topics are kept.
    """

    def __init__(self, registry: Registry, *, refresh: float = 2.0) -> None:
        self._registry = registry
        self._interval = refresh
        self._topics: dict[str, Topic] = {}
        self._fingerprint: str | None = None
        self._checked: float | None = None  # monotonic time of the last check
        self.generation = 0  # goes up whenever the topics were reloaded
        self._lock = asyncio.Lock()  # binds to a loop on first use, not here

    def _due(self) -> bool:
        return self._checked is None or time.monotonic() - self._checked >= self._interval

    async def get(self, key: str) -> Topic | None:
        if self._due():
            await self._refresh(force=False, if_due=True)
        return self._topics.get(key)

    def get_nowait(self, key: str) -> Topic | None:
        return self._topics.get(key)

    async def current(self) -> int:
        """Refresh when due (as `get` does); the generation of the topics now held."""
        if self._due():
            await self._refresh(force=False, if_due=True)
        return self.generation

    def all(self) -> list[Topic]:
        """Every topic, as last loaded."""
        return list(self._topics.values())

    async def refresh(self, force: bool = False) -> None:
        """Check the fingerprint now; reload all topics when it changed, or always if `force`."""
        await self._refresh(force=force, if_due=False)

    async def _refresh(self, *, force: bool, if_due: bool) -> None:
        async with self._lock:
            if if_due and not self._due():
                return  # another task refreshed while this one waited for the lock
            known = None if force else self._fingerprint
            try:
                fp, topics = await asyncio.to_thread(self._load, known)
            except Exception:
                log.warning("registry refresh failed; keeping %d cached topics",
                            len(self._topics), exc_info=True)
            else:
                self._fingerprint = fp
                if topics is not None:
                    self._topics = topics
                    self.generation += 1
                    log.info("registry: loaded %d topics", len(topics))
            finally:
                # Also after a failure: a dead database is retried per interval, not per get.
                self._checked = time.monotonic()

    def _load(self, known: str | None) -> tuple[str, dict[str, Topic] | None]:
        # Fingerprint first: a change landing between the two reads is seen next time.
        fp = self._registry.fingerprint()
        if fp == known:
            return fp, None
        return fp, self._registry.topics()
