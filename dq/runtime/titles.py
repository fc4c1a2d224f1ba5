"""The names dq's processes go by: their titles in `ps` (setproctitle) and in log lines.

One place for them, so `ps -ef | grep dq-master` and the log lines agree with DESIGN.md:
`dq-master`, `dq-server-0`, `dq-timer-1`, `dq-consumer-0`, `dq-checker`, `dq-web`, and
`dq-boot` for the master's short boot step. Standard library only: the master imports it.
"""

from __future__ import annotations

import setproctitle

MASTER = "dq-master"
BOOT = "dq-boot"
SINGLE = ("checker", "web")  # roles of which a master runs one: their names carry no number


def child_name(role: str, index: int = 0) -> str:
    """The title of one child, as `ps` shows it and its log lines name it."""
    return f"dq-{role}" if role in SINGLE else f"dq-{role}-{index}"


def set_title(name: str) -> None:
    """Show this process as `name` in `ps`."""
    setproctitle.setproctitle(name)
