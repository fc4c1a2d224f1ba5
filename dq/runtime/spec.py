"""What one child is launched with, made by the master before the fork.

As gunicorn builds its Worker before forking, the master builds a frozen `ChildSpec`
(role, number, generation, settings, shard plan, sockets, descriptors to close) and the
child runs it (dq.runtime.context.run_child). Standard library only: the master imports it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dq.config import Settings
from dq.runtime.titles import child_name

if TYPE_CHECKING:
    from dq.runtime.shared import LoadBoard
    from dq.sharding.plan import ShardPlan


@dataclass(frozen=True)
class ChildSpec:
    """One child of one generation, complete before the fork."""

    role: str
    index: int
    generation: int
    settings: Settings
    plan: ShardPlan  # the generation's shards (dq/sharding/plan.py)
    role_path: str  # 'module:function', imported by the child after the fork
    heartbeat: Path  # the file the child touches, and writes 'ready' or why it failed in
    master_pid: int
    # The master's TCP socket, and the Unix socket on which servers pass a reload's
    # connections on (dq/runtime/handover.py): servers only.
    listen_sock: socket.socket | None = None
    handover_sock: socket.socket | None = None
    board: LoadBoard | None = None  # the servers' connection counts (dq/runtime/shared.py)
    board_slot: int = -1  # this server's place on it
    close_fds: tuple[int, ...] = ()  # the master's descriptors the child must not keep

    @property
    def name(self) -> str:
        return child_name(self.role, self.index)
