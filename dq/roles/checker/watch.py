"""The checker's third duty: the registry. It watches the registry's shard list (a change
made in the console has the master reload) and exports dq's counters to the original
console's dq_stat table (dq/roles/statexport.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from dq.registry.core import Registry
from dq.roles.statexport import EXPORT_EVERY, StatExporter
from dq.runtime.context import Context
from dq.runtime.loops import pause
from dq.sharding.health import safe_name
from dq.sharding.plan import ShardPlan, enabled_shards, plan_shards

log = logging.getLogger("dq.checker")


async def watch_shards(ctx: Context, registry: Registry, plan: ShardPlan,
                       every: float) -> None:
    """Ask the master to reload (SIGHUP) once the registry's shard list differs from the one
    this generation works (`plan`): shards registered, edited, enabled or disabled in the
    console take effect within `every` seconds, by the same reload as `kill -HUP`, which
    drops no job. Without a master (a role run on its own) it only logs."""
    settings = ctx.settings
    while True:
        await asyncio.sleep(every)
        try:
            rows = enabled_shards(await asyncio.to_thread(registry.shards))
        except Exception as exc:
            log.debug("%s: cannot read the registry's shards: %s", ctx.name, exc)
            continue
        now = plan_shards(settings, rows, keep_embedded=plan.embedded)
        if now.shards == plan.shards:  # retired ones come and go by themselves
            continue
        names = ", ".join(safe_name(name) for name, _ in now.every)
        if ctx.master_pid is None:
            log.warning("%s: the registry's shards changed (now %s); restart to use them",
                        ctx.name, names)
            return
        log.info("%s: the registry's shards changed (now %s); asking dq-master to reload",
                 ctx.name, names)
        os.kill(ctx.master_pid, signal.SIGHUP)
        return  # the reload replaces this checker


async def export_loop(ctx: Context, exporter: StatExporter,
                      every: float = EXPORT_EVERY) -> None:
    """Export dq's counters to the original console's dq_stat every `every` seconds
    (dq/roles/statexport.py), and once more when stopping."""
    failing = False
    while True:
        stopping = ctx.stopping.is_set()
        try:
            await exporter.export()
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("%s: exporting counters to dq_stat failed (%s: %s); trying "
                            "again every %.0f s", ctx.name, exc.__class__.__name__, exc, every)
            failing = True
        if stopping:
            return
        await pause(ctx.stopping, every)
