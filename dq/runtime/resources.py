"""The store and registry a role works with: opened as the role starts, closed (store
first, then registry) as it ends, and only those the role opened itself: a test that hands
a role its own store or registry keeps it open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from dq.config import Settings
from dq.runtime.context import Context, open_store, role_plan
from dq.sharding.plan import ShardPlan, plan_shards
from dq.storage.store import Store

if TYPE_CHECKING:
    from dq.registry.core import Registry


def _open_registry(settings: Settings) -> Registry:
    from dq.registry.core import Registry  # a timer never needs SQLAlchemy otherwise

    return Registry(settings.db_url())


class RoleResources:
    """What `role_resources` opened or was given, and which of it the role owns."""

    def __init__(self, settings: Settings, *, store: Store | None = None,
                 registry: Registry | None = None) -> None:
        self.settings = settings
        self._store = store
        self.registry = registry
        self.plan: ShardPlan | None = None
        self.own_store = False
        self.own_registry = False

    @property
    def store(self) -> Store:
        assert self._store is not None, "role_resources opens the store first"
        return self._store

    async def registry_now(self) -> Registry:
        """The registry, opened now (in a thread) if the role had none: a consumer reads
        its alert settings only once it has a dead letter to mail."""
        if self.registry is None:
            opened = await asyncio.to_thread(_open_registry, self.settings)
            if self.registry is None:
                self.registry, self.own_registry = opened, True
            else:  # another task opened it meanwhile
                opened.close()
        return self.registry

    async def close(self) -> None:
        """Close what the role opened: the store's connections, then the registry."""
        if self.own_store and self._store is not None:
            await self._store.shards.close()
        if self.own_registry and self.registry is not None:
            self.registry.close()


@asynccontextmanager
async def role_resources(
        ctx: Context, *, store: Store | None = None, registry: Registry | None = None,
        open_registry: bool = False,
        make_store: Callable[[Settings, ShardPlan], Store] = open_store,
        registry_failed: Callable[[Exception], None] | None = None,
) -> AsyncIterator[RoleResources]:
    """The store (given, else made by `make_store` over this role's shard plan) and the
    registry (given, else opened when `open_registry`) of one role run; on the way out
    it closes what it opened, the store before the registry.

    With `registry_failed`, a registry that cannot be opened or read is told to it and the
    role goes on with the configured shards (the checker); otherwise the error is raised.
    """
    res = RoleResources(ctx.settings, store=store, registry=registry)
    try:
        if store is None:
            try:
                if open_registry and res.registry is None:
                    res.registry = await asyncio.to_thread(_open_registry, ctx.settings)
                    res.own_registry = True
                res.plan = await role_plan(ctx, res.registry)
            except Exception as exc:
                if registry_failed is None:
                    raise
                registry_failed(exc)
                res.plan = ctx.plan or plan_shards(ctx.settings)
            res._store, res.own_store = make_store(ctx.settings, res.plan), True
        elif open_registry and res.registry is None:
            res.registry = await asyncio.to_thread(_open_registry, ctx.settings)
            res.own_registry = True
        yield res
    finally:
        await res.close()
